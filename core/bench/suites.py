"""The benchmark's suites and how they become cells: which splits `anomem bench` runs.

A cell is one split of one data set (a data set, a normal class, a setting); every method of the
benchmark runs on exactly that split. `plan` turns the requested suites into cells, skipping
(and saying why) those whose data is not at hand.

Suites:
- shapes: the built-in data, one cell with object, style and local anomalies;
- cifar10: one-class, every class normal in turn, the nine others anomalous (class folders
  DATA/cifar10/{train,test}/<class>/);
- cifar10-unbalanced: the Deep SAD protocol, labelled anomalies drawn from one anomaly class
  at each ratio, test on all ten classes;
- mvtec: MVTec AD bottle (DATA/mvtec_ad/bottle), image and pixel AUROC;
- speed: a stage-1 step of the from-scratch encoder against the bare backbone, scoring on
  each encoder, and a saved detector of each scored with PyTorch and with its ONNX export at
  batch 1 and 32 (see core.bench.speed);
- general: every data set at hand, to judge a design choice on all of them at once: the
  built-in shapes and digits, and under DATA Fashion-MNIST, KolektorSDD, MVTec AD bottle and
  CIFAR-10 (a few evenly spaced normal classes each, `--per-set`), one-class, then unbalanced
  on each class-folder set (its first class normal, labelled anomalies from two other classes);
- any `--path`: a class-folder data set (every class in turn) or one MVTec-layout category.

This module loads no torch at import (core.data is imported where classes are listed), so the
CLI reads SUITES from it and `anomem --help` stays quick.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.config import DataConfig

SUITES = ("shapes", "cifar10", "cifar10-unbalanced", "mvtec", "speed", "general")
DEFAULT_SUITES = tuple(s for s in SUITES if s != "general")  # general: ask for it by name
# The general suite's data sets: (name in tables, data set, folder under DATA or None)
GENERAL = (("shapes", "shapes", None), ("digits", "digits", None),
           ("fashion_mnist", "folder", "fashion_mnist"), ("kolektorsdd", "mvtec", "kolektorsdd"),
           ("mvtec_bottle", "mvtec", "mvtec_ad/bottle"), ("cifar10", "folder", "cifar10"))

Say = Callable[[str], None]


@dataclass(frozen=True)
class Cell:
    """One split of one data set: every method of the benchmark runs on exactly this."""

    suite: str
    dataset: str
    root: str | None
    normal_class: str
    setting: str = "one-class"
    ratio: float = 0.0
    anomaly_classes: tuple[str, ...] = ()

    def data(self, seed: int) -> DataConfig:
        return DataConfig(dataset=self.dataset, root=self.root, normal_class=self.normal_class,
                          setting=self.setting, anomaly_ratio=self.ratio or 0.05,
                          anomaly_classes=self.anomaly_classes, seed=seed)

    @property
    def label(self) -> str:
        extra = f" {self.ratio:.0%} labelled" if self.setting == "unbalanced" else ""
        if self.anomaly_classes and self.suite.startswith("general"):
            extra += f" from {', '.join(self.anomaly_classes)}"
        return f"{self.suite} · {self.normal_class}{extra}"

    @property
    def slug(self) -> str:
        """The name of AnoMem's run folder for this cell."""
        from core.runs import safe_name  # core.runs loads the model: see the module's note

        ratio = f"-{self.ratio:g}" if self.setting == "unbalanced" else ""
        extra = "-" + "+".join(self.anomaly_classes) if self.suite.startswith("general") and \
            self.anomaly_classes else ""
        return safe_name(f"{self.suite}-{self.normal_class}-{self.setting}{ratio}{extra}")


@dataclass
class BenchOptions:
    """What `anomem bench` runs: the suites and their data, the methods, AnoMem's settings."""

    out: Path = Path("benchmarks")
    minutes: float = 5.0  # training budget of every trained method, per cell
    suites: tuple[str, ...] = DEFAULT_SUITES
    data_root: Path | None = None
    paths: tuple[Path, ...] = ()
    classes: tuple[str, ...] = ()  # restrict the class-folder suites to these normal classes
    unbalanced_class: str | None = None  # None: the first class
    anomaly_class: str | None = None  # None: the class after it
    ratios: tuple[float, ...] = (0.01, 0.05, 0.1)
    per_set: int = 3  # general suite: normal classes per class-folder data set
    deep_peer: bool = True  # run Deep SVDD / Deep SAD (it takes the whole budget per cell)
    feature_peers: bool = True  # run DN2, PaDiM and PatchCore on AnoMem's pretrained features
    seed: int = 0
    device: str = "auto"
    overrides: tuple[str, ...] = ()  # "section.field=value" settings of every AnoMem run
    preset: str = "quick"  # AnoMem's preset: "scratch" benchmarks the from-scratch encoder


def plan(opts: BenchOptions, say: Say = print) -> list[Cell]:
    """The cells of the requested suites whose data is present; says why others are skipped."""
    cells: list[Cell] = []
    root = opts.data_root
    if "shapes" in opts.suites:
        cells.append(Cell("shapes", "shapes", None, _classes("shapes")[0]))
    cifar = cifar_source(root)
    for suite in ("cifar10", "cifar10-unbalanced"):
        if suite not in opts.suites:
            continue
        if cifar is None:
            say(f"{suite}: skipped (expects class folders DATA/cifar10/{{train,test}}/<class>/ "
                f"under --data-root, got {root})")
            continue
        classes = _classes(*cifar)
        if suite == "cifar10":
            cells += [Cell(suite, *cifar, c) for c in classes
                      if not opts.classes or c in opts.classes]
        else:
            normal = opts.unbalanced_class or classes[0]
            anomaly = opts.anomaly_class or classes[(classes.index(normal) + 1) % len(classes)]
            cells += [Cell(suite, *cifar, normal, "unbalanced", r, (anomaly,))
                      for r in opts.ratios]
    if "mvtec" in opts.suites:
        bottle = root / "mvtec_ad" / "bottle" if root else None
        if bottle is None or not (bottle / "train" / "good").is_dir():
            say(f"mvtec: skipped (expects DATA/mvtec_ad/bottle/ under --data-root, got {root})")
        else:
            cells.append(Cell("mvtec", "mvtec", str(bottle), "good"))
    if "general" in opts.suites:
        cells += general_cells(opts, say)
    for path in opts.paths:
        cells += _path_cells(Path(path), opts.classes)
    return cells


def spread(items: list[str], n: int) -> list[str]:
    """n evenly spaced items, the first included: a subset chosen without looking at results."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def general_cells(opts: BenchOptions, say: Say = print) -> list[Cell]:
    """One-class cells on every data set at hand, then unbalanced cells on the class-folder
    ones (the first normal class; labelled anomalies from two other classes in turn)."""
    one_class, unbalanced = [], []
    for name, dataset, folder in GENERAL:
        root = None
        if folder is not None:
            path = opts.data_root / folder if opts.data_root else None
            layout = "train/good" if dataset == "mvtec" else "train"
            if path is None or not (path / layout).is_dir():
                say(f"general: {name} skipped (expects DATA/{folder}/{layout} under "
                    f"--data-root, got {opts.data_root})")
                continue
            root = str(path)
        suite = f"general/{name}"
        classes = _classes(dataset, root)
        if dataset == "mvtec":
            one_class.append(Cell(suite, dataset, root, classes[0]))
            continue
        picked = [c for c in classes if c in opts.classes] if opts.classes else \
            spread(classes, 1 if dataset == "shapes" else opts.per_set)
        one_class += [Cell(suite, dataset, root, c) for c in picked]
        if dataset == "shapes" or not picked:  # `--classes` may name none of this set's
            continue
        normal = picked[0]
        others = [c for c in classes if c != normal]
        for anomaly in spread(others, 2):
            unbalanced += [Cell(suite, dataset, root, normal, "unbalanced", r, (anomaly,))
                           for r in opts.ratios]
    return one_class + unbalanced


def cifar_source(root: Path | None) -> tuple[str, str] | None:
    """(dataset, root) of CIFAR-10 under `root`: class folders, or the original files."""
    if root is None:
        return None
    from core.data import DataError  # see the module's note

    folder = Path(root) / "cifar10"
    for dataset in ("folder", "cifar10"):
        try:
            if _classes(dataset, folder):
                return dataset, str(folder)
        except DataError:
            continue
    return None


def _path_cells(path: Path, only: tuple[str, ...]) -> list[Cell]:
    if (path / "train" / "good").is_dir() and (path / "test").is_dir():
        return [Cell(f"path:{path.name}", "mvtec", str(path), "good")]
    classes = _classes("folder", path)  # DataError names the path and the layout
    return [Cell(f"path:{path.name}", "folder", str(path), c) for c in classes
            if not only or c in only]


def _classes(dataset: str, root: str | Path | None = None) -> list[str]:
    """core.data.list_classes, imported on first use: see the module's note."""
    from core.data import list_classes

    return list_classes(dataset, root)
