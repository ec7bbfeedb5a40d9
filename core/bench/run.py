"""`anomem bench`: AnoMem, its ablations and its peers on the same splits, side by side.

The benchmark is a list of cells (a data set, a normal class, a setting) and, in each, a list of
methods. Every finished (cell, method) becomes one row of `results.csv`, which is rewritten
atomically after each row together with `results.md`; a rerun reads the CSV and skips what is
there, so an interrupted benchmark resumes where it stopped. AnoMem's run folders are kept under
`runs/`, so its ablations come from the very model that was benchmarked.

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
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.bench.ablations import deviation_norm_scores, encoder_knn_scores
from core.bench.feature_peers import FEATURE_PEERS, make_feature_peers
from core.bench.peers import DeepSVDD, MapPeer, Peer, make_peers
from core.config import PRETRAINED_INPUT, DataConfig, RunConfig, preset, with_overrides
from core.data import DataError, Split, list_classes, load_split
from core.files import write_atomic
from core.metrics import image_metrics, pixel_auroc
from core.model.anomem import AnoMem
from core.pipeline import resume_run, train_run
from core.runs import (
    FINISHED,
    METRICS,
    STOPPED,
    TRAINING,
    RunError,
    delete_run,
    load_run,
    read_json,
    run_state,
    safe_name,
    write_json,
)
from core.train.scoring import score_images
from core.train.trainer import Progress

SUITES = ("shapes", "cifar10", "cifar10-unbalanced", "mvtec", "speed", "general")
DEFAULT_SUITES = tuple(s for s in SUITES if s != "general")  # general: ask for it by name
COLUMNS = ("suite", "dataset", "normal_class", "setting", "ratio", "anomaly_classes", "method",
           "kind", "auroc", "pixel_auroc", "by_type", "train_s", "note")
# The general suite's data sets: (name in tables, data set, folder under DATA or None)
GENERAL = (("shapes", "shapes", None), ("digits", "digits", None),
           ("fashion_mnist", "folder", "fashion_mnist"), ("kolektorsdd", "mvtec", "kolektorsdd"),
           ("mvtec_bottle", "mvtec", "mvtec_ad/bottle"), ("cifar10", "folder", "cifar10"))
UNBOUNDED_EPOCHS = 100_000
ANOMEM = "AnoMem"

# Published mean AUROC (%), quoted beside ours: GPU-scale training, original CIFAR files.
PUBLISHED = {
    "cifar10": [("CSI (Tack et al. 2020)", 94.3), ("Deep SVDD (Ruff et al. 2018)", 64.8)],
    "cifar100": [("CSI (Tack et al. 2020)", 89.6)],
    "cifar10-unbalanced": [("Deep SAD (Ruff et al. 2020)", {0.01: 72.6, 0.05: 77.9, 0.1: 79.8})],
}


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
        ratio = f"-{self.ratio:g}" if self.setting == "unbalanced" else ""
        extra = "-" + "+".join(self.anomaly_classes) if self.suite.startswith("general") and \
            self.anomaly_classes else ""
        return safe_name(f"{self.suite}-{self.normal_class}-{self.setting}{ratio}{extra}")

    def key(self, method: str) -> tuple[str, ...]:
        return _key(self.suite, self.normal_class, self.setting, self.ratio,
                    ",".join(self.anomaly_classes), method)


@dataclass
class BenchOptions:
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


@dataclass
class Results:
    """results.csv as rows keyed by (suite, class, setting, ratio, method)."""

    path: Path
    rows: dict[tuple, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Results:
        res = cls(Path(path))
        if res.path.is_file():
            with open(res.path, newline="") as f:
                for row in csv.DictReader(f):
                    row.setdefault("anomaly_classes", "")  # a file from before the column
                    if set(COLUMNS) <= set(row):
                        res.rows[_row_key(row)] = row
        return res

    def has(self, cell: Cell, method: str) -> bool:
        return cell.key(method) in self.rows

    def add(self, row: dict) -> None:
        self.rows[_row_key(row)] = {c: _fmt(row.get(c)) for c in COLUMNS}
        self.save()

    def save(self) -> None:
        """Rewrite results.csv (atomically) from `rows`."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows.values())
        write_atomic(self.path, buf.getvalue())


def _key(suite: str, normal: str, setting: str, ratio: float | str, anomalies: str,
         method: str) -> tuple[str, ...]:
    """A row's identity. Only the general suite draws labels from several classes per ratio,
    so only its rows are told apart by them (older suites' rows have no such column)."""
    anomalies = anomalies if suite.startswith("general/") else ""
    return (suite, normal, setting, f"{float(ratio or 0):g}", anomalies, method)


def _row_key(row: dict) -> tuple:
    return _key(row["suite"], row["normal_class"], row["setting"], row.get("ratio") or 0.0,
                row.get("anomaly_classes") or "", row["method"])


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict):
        return json.dumps({k: round(x, 4) for k, x in v.items()}, sort_keys=True)
    if isinstance(v, tuple):
        return ",".join(v)
    return str(v)


# ---------------------------------------------------------------------------------------------
# planning


def plan(opts: BenchOptions, say: Callable[[str], None] = print) -> list[Cell]:
    """The cells of the requested suites whose data is present; says why others are skipped."""
    cells: list[Cell] = []
    root = opts.data_root
    if "shapes" in opts.suites:
        cells.append(Cell("shapes", "shapes", None, list_classes("shapes")[0]))
    cifar = _cifar(root)
    for suite in ("cifar10", "cifar10-unbalanced"):
        if suite not in opts.suites:
            continue
        if cifar is None:
            say(f"{suite}: skipped (expects class folders DATA/cifar10/{{train,test}}/<class>/ "
                f"under --data-root, got {root})")
            continue
        classes = list_classes(*cifar)
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


def general_cells(opts: BenchOptions, say: Callable[[str], None] = print) -> list[Cell]:
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
        classes = list_classes(dataset, root)
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


def _cifar(root: Path | None) -> tuple[str, str] | None:
    """(dataset, root) of CIFAR-10 under `root`: class folders, or the original files."""
    if root is None:
        return None
    folder = Path(root) / "cifar10"
    for dataset in ("folder", "cifar10"):
        try:
            if list_classes(dataset, folder):
                return dataset, str(folder)
        except DataError:
            continue
    return None


def _path_cells(path: Path, only: tuple[str, ...]) -> list[Cell]:
    if (path / "train" / "good").is_dir() and (path / "test").is_dir():
        return [Cell(f"path:{path.name}", "mvtec", str(path), "good")]
    classes = list_classes("folder", path)  # DataError names the path and the layout
    return [Cell(f"path:{path.name}", "folder", str(path), c) for c in classes
            if not only or c in only]


# ---------------------------------------------------------------------------------------------
# running


def anomem_config(cell: Cell, opts: BenchOptions) -> RunConfig:
    """The benchmark's preset within its time budget: a from-scratch encoder trains until the
    budget is spent (epochs unbounded); memories on a frozen encoder stop at the preset's
    epochs, or earlier if the budget says so (their loss is flat by then)."""
    cfg = preset(opts.preset, cell.data(opts.seed))
    if not cfg.model.pretrained:
        cfg.train.epochs = UNBOUNDED_EPOCHS
    cfg.train.max_minutes = opts.minutes
    cfg.train.seed, cfg.train.device = opts.seed, opts.device
    return with_overrides(cfg, opts.overrides)


def _metrics_row(cell: Cell, method: str, kind: str, labels: np.ndarray, scores: np.ndarray,
                 types: list[str], train_s: float | None, note: str = "",
                 pixel: float | None = None) -> dict:
    m = image_metrics(labels, scores, types)
    return {"suite": cell.suite, "dataset": cell.dataset, "normal_class": cell.normal_class,
            "setting": cell.setting, "ratio": cell.ratio,
            "anomaly_classes": cell.anomaly_classes, "method": method, "kind": kind,
            "auroc": m["auroc"], "pixel_auroc": pixel, "by_type": m["auroc_by_type"],
            "train_s": train_s, "note": note}


def run_anomem(cell: Cell, split: Split, opts: BenchOptions,
               say: Callable[[str], None] = print) -> Iterator[dict]:
    """Train (or reuse, or resume) AnoMem on the cell; yield its row and its ablations' rows."""
    out = opts.out / "runs" / cell.slug
    last = [time.monotonic()]

    def progress(p: Progress) -> None:  # a line every half minute, not a bar per cell
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            say(f"    {p.stage} {p.done:.0%}: {p.message}")

    state = run_state(out) if out.exists() else None
    if state == TRAINING:
        raise RunError(f"{out}: another process is training this run")
    if state == FINISHED:
        metrics = read_json(out / METRICS)
    else:
        metrics = None
        if state == STOPPED:
            say(f"    resuming {out}")
            try:
                metrics = resume_run(out, progress)
            except RunError as err:  # damaged, written by another version, or taken meanwhile
                say(f"    cannot resume ({err}): training again")
        if metrics is None:
            if out.exists():  # a run that died before it could be resumed; refused, with its
                delete_run(out)  # folder untouched, if another process took it meanwhile
            metrics = train_run(anomem_config(cell, opts), out, progress, split=split,
                                explore=False)  # the benchmark opens no page
    test, labels = split.test, split.test.labels.numpy()
    row = {"suite": cell.suite, "dataset": cell.dataset, "normal_class": cell.normal_class,
           "setting": cell.setting, "ratio": cell.ratio,
           "anomaly_classes": cell.anomaly_classes, "kind": "ours",
           "train_s": metrics.get("train_seconds")}
    yield {**row, "method": ANOMEM, "auroc": metrics["auroc"],
           "pixel_auroc": metrics.get("pixel_auroc"), "by_type": metrics["auroc_by_type"],
           "note": f"{len(read_history_epochs(out))} epochs"}
    for scale, value in metrics["auroc_by_scale"].items():
        yield {**row, "method": f"AnoMem, {scale} only", "kind": "ablation", "auroc": value,
               "note": "same model, one scale's score"}
    model = load_run(out).model
    device = "cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu"
    if not model.frozen:  # on a frozen encoder, DN2 and the scale ablations say as much, and
        # each of these passes every test image through the encoder again
        normals = split.train.images[split.train.labels == 0]
        knn = encoder_knn_scores(model, normals, test.images, device=device)
        yield _metrics_row(cell, "AnoMem, no memory (encoder + kNN)", "ablation", labels, knn,
                           test.types, None, "same encoder, pooled queries, cosine kNN k=2")
        dev = deviation_norm_scores(model, test.images, device=device)
        yield _metrics_row(cell, "AnoMem, no stage 2 (deviation norm)", "ablation", labels,
                           dev, test.types, None, "same memory, mean |q - r|, no detector")
    yield from _combination_rows(cell, model, metrics, split, device)


def _combination_rows(cell: Cell, model: AnoMem, metrics: dict, split: Split, device: str
                      ) -> Iterator[dict]:
    """Stage 2's candidate weightings, and each term alone, on the benchmarked model."""
    weights = (metrics.get("stage2") or {}).get("weights")
    if not weights:  # a run from before the report
        return
    test, labels = split.test, split.test.labels.numpy()
    scored = score_images(model, test.images, device, with_maps=False)
    names = model.detector.term_names
    z = np.stack([scored.terms[n] for n in names], 1)
    chosen = metrics["stage2"].get("chosen")
    for rule, w in weights.items():
        note = "same model, one-class weights" + (" (chosen)" if rule == chosen else "")
        yield _metrics_row(cell, f"AnoMem, {rule} weights", "ablation", labels,
                           z @ np.array([w[n] for n in names]), test.types, None, note)
    for j, name in enumerate(names):
        yield _metrics_row(cell, f"AnoMem, {name} only", "ablation", labels, z[:, j],
                           test.types, None, "same model, one standardised term")


def read_history_epochs(out: Path) -> list[int]:
    file = out / "history.jsonl"
    if not file.is_file():
        return []
    return [json.loads(line)["epoch"] for line in file.read_text().splitlines() if line]


def feature_input_size(cell: Cell, opts: BenchOptions) -> int:
    """The side AnoMem's pretrained encoder reads the cell's images at; for an AnoMem set to a
    from-scratch encoder (no input size), the side the pretrained preset would use."""
    model = anomem_config(cell, opts).model
    return model.input_size or max(PRETRAINED_INPUT, model.image_size)


def peers_for(cell: Cell, opts: BenchOptions) -> list[Peer]:
    """All peers one-class, those on AnoMem's pretrained features last; only Deep SAD (Deep
    SVDD given the labels) when unbalanced: the other peers ignore labels and would repeat
    their one-class numbers."""
    device = "cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu"
    if cell.setting == "unbalanced":
        return [DeepSVDD(minutes=opts.minutes, seed=opts.seed, device=device, labelled=True)
                ] if opts.deep_peer else []
    peers = make_peers(opts.minutes, opts.seed, device)
    if not opts.deep_peer:
        peers = [p for p in peers if not isinstance(p, DeepSVDD)]
    if opts.feature_peers:
        peers += make_feature_peers(feature_input_size(cell, opts), opts.seed, device)
    return peers


def run_peer(cell: Cell, split: Split, peer: Peer) -> dict:
    """Fit the peer on the training split, score the test split; the row has pixel AUROC too
    when the peer gives anomaly maps and the test images have masks."""
    train, test = split.train, split.test
    normals = train.images[train.labels == 0]
    anomalies = train.images[train.labels == 1]
    start = time.perf_counter()
    peer.fit(normals, anomalies if len(anomalies) else None)
    fit_s = time.perf_counter() - start
    scores = peer.score(test.images)
    pixel = None
    if isinstance(peer, MapPeer) and test.masks is not None:
        pixel = pixel_auroc(peer.maps(test.images), test.masks.numpy(),
                            test.types)["pixel_auroc"]
    return _metrics_row(cell, peer.name, "peer", test.labels.numpy(), scores, test.types,
                        fit_s, pixel=pixel)


def run_speed(opts: BenchOptions, say: Callable[[str], None]) -> None:
    """speed.json: the step costs, the scoring rate of each encoder ("pretrained": the
    pretrained one's), then a saved detector of each scored with PyTorch and onnxruntime
    ("deployed"). Each part is written as it is done; a rerun times only what the file lacks
    (delete it to time everything again)."""
    from core.bench.speed import BATCHES, deployed_rate, inference_rate, measure

    file = opts.out / "speed.json"
    speed = read_json(file) if file.is_file() else {}
    if {"pretrained", "deployed"} <= speed.keys():
        return
    cifar = _cifar(opts.data_root)
    data = (DataConfig(dataset=cifar[0], root=cifar[1], max_train=1024, seed=opts.seed)
            if cifar else DataConfig(seed=opts.seed))
    split = load_split(data)
    cfg = preset("scratch", data)  # stage-1 steps: the encoder that stage 1 trains
    cfg.train.device = opts.device
    pretrained = preset("quick", data)
    pretrained.train.device = opts.device
    if not speed:
        say(f"speed: timing stage-1 steps on {data.dataset} ({cfg.model.image_size} px)")
        report = measure(cfg, split.train.images)
        speed = {**report.as_dict(), "dataset": data.dataset, "image_size": cfg.model.image_size}
    if "pretrained" not in speed:
        speed["pretrained"] = {"inference_images_per_s": inference_rate(
            pretrained, split.train.images), "input_size": pretrained.model.input_size}
        write_json(file, speed)
    if "deployed" not in speed:
        say(f"speed: exporting each encoder to ONNX, scoring at batch "
            f"{' and '.join(map(str, BATCHES))} with PyTorch and onnxruntime")
        speed["deployed"] = {name: deployed_rate(c, split.train.images).as_dict()
                             for name, c in (("scratch", cfg), ("pretrained", pretrained))}
        write_json(file, speed)


def bench(opts: BenchOptions, say: Callable[[str], None] = print) -> Results:
    """Run every missing (cell, method) of the plan; returns the results so far."""
    opts.out.mkdir(parents=True, exist_ok=True)
    results = Results.load(opts.out / "results.csv")
    cells = plan(opts, say)
    todo = [(c, m) for c in cells for m in [ANOMEM, *(p.name for p in peers_for(c, opts))]
            if not results.has(c, m)]
    say(f"{len(cells)} cells, {len(todo)} (cell, method) pairs to run, "
        f"{opts.minutes:g} min training budget each")
    if "speed" in opts.suites:
        run_speed(opts, say)
    done = 0
    for cell in cells:
        methods = [ANOMEM, *peers_for(cell, opts)]
        if all(results.has(cell, m if isinstance(m, str) else m.name) for m in methods):
            continue
        # read as AnoMem's config reads it (the preset may set the size, as the CLI does): every
        # method of the cell sees the same images
        split = load_split(anomem_config(cell, opts).data)
        for method in methods:
            name = method if isinstance(method, str) else method.name
            if results.has(cell, name):
                continue
            done += 1
            say(f"[{done}/{len(todo)}] {cell.label} · {name} …")
            start = time.perf_counter()
            try:
                rows = list(run_anomem(cell, split, opts, say)) if name == ANOMEM else [
                    run_peer(cell, split, method)]
            except RunError as err:  # a run folder another process holds: left as it is
                say(f"    skipped: {err}")
                continue
            for row in rows:
                results.add(row)
            write_atomic(opts.out / "results.md", render_markdown(results, opts))
            say(f"    AUROC {rows[0]['auroc']:.3f} ({time.perf_counter() - start:.0f} s)")
    write_atomic(opts.out / "results.md", render_markdown(results, opts))
    return results


# ---------------------------------------------------------------------------------------------
# the Markdown report


def _pct(v: object) -> str:
    if v in (None, ""):
        return "–"
    return f"{100 * float(v):.1f}"


def _methods(rows: list[dict]) -> list[str]:
    order = {"ours": 0, "ablation": 1, "peer": 2}
    seen: dict[str, int] = {}
    for r in rows:
        seen.setdefault(r["method"], order.get(r["kind"], 3))
    return sorted(seen, key=lambda m: (seen[m], list(seen).index(m)))


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _by_class_table(rows: list[dict], suite: str) -> str:
    classes = list(dict.fromkeys(r["normal_class"] for r in rows))
    body = []
    for m in _methods(rows):
        vals = {r["normal_class"]: r["auroc"] for r in rows if r["method"] == m}
        got = [float(vals[c]) for c in classes if vals.get(c)]
        mean = _pct(np.mean(got)) + ("" if len(got) == len(classes) else f" ({len(got)})")
        body.append([m, *(_pct(vals.get(c)) for c in classes), mean if got else "–"])
    for name, value in PUBLISHED.get(suite, []):
        body.append([f"{name}, published, GPU-scale", *("" for _ in classes), f"{value:.1f}"])
    return _table(["method", *classes, "mean"], body)


def _unbalanced_table(rows: list[dict], one_class: list[dict]) -> str:
    ratios = sorted({float(r["ratio"]) for r in rows})
    normal = rows[0]["normal_class"]
    body = []
    for m in _methods(rows):
        vals = {float(r["ratio"]): r["auroc"] for r in rows if r["method"] == m}
        ref = next((r["auroc"] for r in one_class
                    if r["normal_class"] == normal and r["method"] == m), None)
        body.append([m, _pct(ref), *(_pct(vals.get(x)) for x in ratios)])
    for name, values in PUBLISHED["cifar10-unbalanced"]:
        body.append([f"{name}, published, GPU-scale (mean over classes)", "",
                     *(f"{values[x]:.1f}" if x in values else "" for x in ratios)])
    return _table(["method", "one-class (0%)", *(f"{x:.0%}" for x in ratios)], body)


def _types_table(rows: list[dict]) -> str:
    types = sorted({t for r in rows for t in json.loads(r["by_type"] or "{}")})
    body = []
    for m in _methods(rows):
        r = next(r for r in rows if r["method"] == m)
        by_type = json.loads(r["by_type"] or "{}")
        secs = f"{float(r['train_s']):.0f}" if r["train_s"] else ""
        body.append([m, _pct(r["auroc"]), *(_pct(by_type.get(t)) for t in types),
                     _pct(r["pixel_auroc"]), secs])
    return _table(["method", "AUROC", *types, "pixel AUROC", "train s"], body)


GENERAL_COLUMNS = ("AnoMem", "AnoMem, fixed weights", "AnoMem, learned weights",
                   "AnoMem, pixels/knn only", "AnoMem, pixels/layout only", *FEATURE_PEERS,
                   "kNN (pixels, k=2)", "IForest (16x16 px)",
                   "OCSVM (16x16 px, nu=0.1)", "Deep SVDD")
SHALLOW = ("kNN (pixels, k=2)", "IForest (16x16 px)", "OCSVM (16x16 px, nu=0.1)")


def _means(auroc: dict[tuple[str, str], float], classes: list[str], methods: tuple[str, ...]
           ) -> list[float]:
    """Each method's mean AUROC over the classes it ran on; methods that ran on none left out."""
    return [float(np.mean([auroc[(c, m)] for c in classes if (c, m) in auroc]))
            for m in methods if any((c, m) in auroc for c in classes)]


def _above(ours: list[float], peers: list[float]) -> str:
    """Whether AnoMem's mean beats the best of the peers' means: yes, tie, no, or – if either
    side is missing."""
    if not (ours and peers):
        return "–"
    mean, best = np.mean(ours), max(peers)
    return "yes" if mean > best else "tie" if mean == best else "no"


def general_tables(rows: list[dict]) -> str:
    """The general suite: one-class means per data set beside the peers, counting the classes
    where AnoMem is at or above pixel kNN and at or above the best peer on its own pretrained
    features; then the unbalanced pairs."""
    one = [r for r in rows if r["setting"] == "one-class"]
    sets = list(dict.fromkeys(r["suite"] for r in one))
    body, wins, total, same_wins, same_total = [], 0, 0, 0, 0
    for suite in sets:
        mine = [r for r in one if r["suite"] == suite]
        classes = list(dict.fromkeys(r["normal_class"] for r in mine))
        auroc = {(r["normal_class"], r["method"]): float(r["auroc"]) for r in mine}
        cells = []
        for m in GENERAL_COLUMNS:
            got = [auroc[(c, m)] for c in classes if (c, m) in auroc]
            cells.append(_pct(np.mean(got)) if got else "–")
        pairs = [(auroc[(c, ANOMEM)], auroc[(c, SHALLOW[0])]) for c in classes
                 if (c, ANOMEM) in auroc and (c, SHALLOW[0]) in auroc]
        beat = sum(a >= k for a, k in pairs)
        wins, total = wins + beat, total + len(pairs)
        same = [(auroc[(c, ANOMEM)], max(auroc[(c, m)] for m in FEATURE_PEERS if (c, m) in auroc))
                for c in classes
                if (c, ANOMEM) in auroc and any((c, m) in auroc for m in FEATURE_PEERS)]
        same_beat = sum(a >= p for a, p in same)
        same_wins, same_total = same_wins + same_beat, same_total + len(same)
        ours = [auroc[(c, ANOMEM)] for c in classes if (c, ANOMEM) in auroc]
        body.append([suite.removeprefix("general/"), ", ".join(classes), *cells,
                     f"{beat}/{len(pairs)}", _above(ours, _means(auroc, classes, SHALLOW)),
                     f"{same_beat}/{len(same)}",
                     _above(ours, _means(auroc, classes, FEATURE_PEERS))])
    header = ["data set", "normal classes", *GENERAL_COLUMNS, "AnoMem >= kNN",
              "above best shallow", "AnoMem >= best same-backbone",
              "above best same-backbone"]
    text = ("## General suite, one-class\n\nMean AUROC (%) over the normal classes listed; "
            "`fixed` / `learned` weights and the pixel term alone are ablations of the same "
            f"model. AnoMem at or above pixel kNN on {wins} of {total} classes, and at or above "
            "the best same-backbone peer (DN2, PaDiM, PatchCore on the frozen EfficientNet-Lite0 "
            f"features AnoMem reads) on {same_wins} of {same_total}.\n\n"
            + _table(header, body) + "\n")
    unb = [r for r in rows if r["setting"] == "unbalanced"]
    if unb:
        ref = {(r["suite"], r["normal_class"]): float(r["auroc"]) for r in one
               if r["method"] == ANOMEM}
        suites = {suite: i for i, suite in enumerate(dict.fromkeys(r["suite"] for r in rows))}
        unb.sort(key=lambda r: (suites[r["suite"]], r["normal_class"], r["anomaly_classes"],
                                float(r["ratio"]), r["method"]))
        body = []
        for r in unb:
            if r["method"] not in (ANOMEM, "Deep SAD"):
                continue
            by_type = json.loads(r["by_type"] or "{}")
            seen = [v for k, v in by_type.items() if k in r["anomaly_classes"].split(",")]
            unseen = [v for k, v in by_type.items() if k not in r["anomaly_classes"].split(",")]
            one_class = ref.get((r["suite"], r["normal_class"]))
            body.append([r["suite"].removeprefix("general/"), r["normal_class"],
                         r["anomaly_classes"], f"{float(r['ratio']):.0%}", r["method"],
                         _pct(one_class) if r["method"] == ANOMEM else "",
                         _pct(r["auroc"]), _pct(np.mean(seen)) if seen else "–",
                         _pct(np.mean(unseen)) if unseen else "–"])
        text += ("\n## General suite, unbalanced\n\nAUROC (%); seen: the labelled class, "
                 "unseen: mean over the anomaly classes no label came from.\n\n" + _table(
                     ["data set", "normal", "labelled from", "ratio", "method",
                      "one-class AUROC", "AUROC", "seen", "unseen"], body) + "\n")
    return text


def render_markdown(results: Results, opts: BenchOptions) -> str:
    """results.md: one table per suite (AUROC, %), then the speed report."""
    rows = list(results.rows.values())
    parts = [f"# Benchmark\n\nAUROC in %, {opts.minutes:g} min training budget per cell on "
             f"this machine; `–`: not run yet. Ablations reuse the benchmarked model.\n"]
    general = [r for r in rows if r["suite"].startswith("general/")]
    if general:
        parts.append(general_tables(general))
    suites = list(dict.fromkeys(r["suite"] for r in rows if r not in general))
    for suite in suites:
        mine = [r for r in rows if r["suite"] == suite]
        if suite == "cifar10":
            parts.append(f"## CIFAR-10, one-class\n\n{_by_class_table(mine, suite)}\n")
        elif suite == "cifar10-unbalanced":
            one = [r for r in rows if r["suite"] == "cifar10"]
            anomaly = mine[0]["normal_class"]
            parts.append(f"## CIFAR-10, unbalanced (normal: {anomaly}; labelled anomalies from "
                         f"one class)\n\n{_unbalanced_table(mine, one)}\n")
        elif suite.startswith("path:") and len({r["normal_class"] for r in mine}) > 1:
            parts.append(f"## {suite[5:]}\n\n{_by_class_table(mine, suite)}\n")
        else:
            title = {"shapes": "shapes (built-in)", "mvtec": "MVTec AD bottle"}.get(
                suite, suite.removeprefix("path:"))
            parts.append(f"## {title}\n\n{_types_table(mine)}\n")
    speed = opts.out / "speed.json"
    if speed.is_file():
        s = json.loads(speed.read_text())
        parts.append(
            "## Speed\n\n"
            f"On {s['device']} ({s['threads']} threads), {s['dataset']} at {s['image_size']} px, "
            f"batches of {s['batch']} training images:\n\n" + _table(["", "value"], [
                ["bare backbone, forward + backward of two views",
                 f"{s['backbone_images_per_s']:.0f} images/s"],
                ["AnoMem stage-1 step (shifted negatives included)",
                 f"{s['anomem_images_per_s']:.0f} images/s "
                 f"({s['step_cost_ratio']:.2f}x the backbone's cost per image)"],
                ["AnoMem stage-1 step without shifted negatives",
                 f"{s['anomem_no_shift_images_per_s']:.0f} images/s "
                 f"({s['step_cost_ratio_no_shift']:.2f}x)"],
                *([f"AnoMem stage-1 step, shifted copies of {float(f):.0%} of the normals",
                   f"{s['backbone_images_per_s'] / r:.0f} images/s ({r:.2f}x)"]
                  for f, r in s.get("step_cost_ratio_by_shift_fraction", {}).items()
                  if float(f) < 1),
                ["inference (scores and maps), from-scratch encoder",
                 f"{s['inference_images_per_s']:.0f} images/s"],
                *([f"inference (scores and maps), pretrained encoder at "
                   f"{s['pretrained']['input_size']} px",
                   f"{s['pretrained']['inference_images_per_s']:.0f} images/s"]
                  for _ in [0] if "pretrained" in s),
                *_deployed_rows(s.get("deployed", {})),
                ["share of a step spent making batches and views", f"{s['data_share']:.1%}"],
                ["peak memory", f"{s['peak_memory_mb']:.0f} MB"],
            ]) + "\n" + _deployed_note(s.get("deployed", {})))
    return "\n".join(parts)


ENCODERS = {"scratch": "from-scratch", "pretrained": "pretrained"}  # speed.json's "deployed"


def _deployed_rows(deployed: dict) -> list[list[str]]:
    """One row per encoder and batch size: a saved detector's images/s with PyTorch and with
    onnxruntime, side by side (`core.bench.speed.deployed_rate`)."""
    rows = []
    for name, d in deployed.items():
        rates = d["images_per_s"]
        for batch in d["images"]:
            torch_rate, onnx_rate = rates["pytorch"][batch], rates["onnxruntime"][batch]
            rows.append([f"saved detector, {ENCODERS.get(name, name)} encoder "
                         f"({d['backbone']}), batch {batch}",
                         f"PyTorch {torch_rate:.0f} images/s, onnxruntime {onnx_rate:.0f} "
                         f"images/s ({onnx_rate / torch_rate:.2f}x)"])
    return rows


def _deployed_note(deployed: dict) -> str:
    """What the saved-detector rows time, under the speed table."""
    if not deployed:
        return ""
    d = next(iter(deployed.values()))
    counts = " and ".join(f"{n} images at batch {b}" for b, n in d["images"].items())
    threads = f"{d['threads']} thread{'s' if d['threads'] != 1 else ''}"
    return (f"\nSaved detector: `Detector.score` (resizing, scores and maps) on each preset's "
            f"model saved as a run without training, which costs the same to score (PyTorch on "
            f"{d['pytorch_device']}, {threads}), and on its checked ONNX export (onnxruntime on "
            f"the CPU, as many threads); images/s over {counts}, after a warm-up "
            f"batch; (Nx): onnxruntime's rate over PyTorch's.\n")
