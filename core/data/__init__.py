"""Data sets by name, and the protocol that turns one into a training and a test split.

Each data set module provides `classes(root) -> list[str]` and
`load_pools(root, image_size, progress) -> (train Pool, test Pool)` (CIFAR's module serves two
data sets, hence the function-name suffix), and may provide `shape(root, size) -> (height,
width)` when its images need not be square; `load_split` applies the one-class or unbalanced
protocol of `DataConfig` on top. Modules are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from core.config import DataConfig
from core.data.base import NORMAL, DataError, ImageSet, Pool, Split, make_split

__all__ = [
    "DATASETS", "NORMAL", "DataError", "DatasetInfo", "ImageSet", "Pool", "Split",
    "anomaly_choices", "list_classes", "load_split",
]

Progress = Callable[[str, float], None] | None


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    needs_root: bool
    image_size: int  # working resolution when DataConfig.image_size is None
    module: str  # core.data.<module>
    suffix: str = ""  # function-name suffix inside the module
    aligned: bool = False  # every image shows its object in the same place and pose

    @property
    def _module(self) -> ModuleType:
        return importlib.import_module(f"core.data.{self.module}")

    def classes(self, root: Path | None) -> list[str]:
        return getattr(self._module, f"classes{self.suffix}")(root)

    def shape(self, root: Path | None, size: int) -> tuple[int, int]:
        """(height, width) to read the images at: square unless the module says otherwise."""
        found = getattr(self._module, f"shape{self.suffix}", None)
        return found(root, size) if found else (size, size)

    def load_pools(self, root: Path | None, size: int | tuple[int, int],
                   progress: Progress) -> tuple[Pool, Pool]:
        return getattr(self._module, f"load_pools{self.suffix}")(root, size, progress)


DATASETS: dict[str, DatasetInfo] = {
    "shapes": DatasetInfo(
        "shapes", "built-in generated shapes with object, style and local anomalies", False, 32,
        "shapes"),
    "digits": DatasetInfo(
        "digits", "scikit-learn's bundled 8x8 handwritten digits, upscaled", False, 32,
        "digits"),
    "folder": DatasetInfo(
        "folder", "class folders ROOT/{train,test}/<class>/*", True, 32, "folder"),
    "mvtec": DatasetInfo(
        "mvtec", "an MVTec AD category ROOT/{train/good,test/<type>,ground_truth/<type>}", True,
        128, "mvtec", aligned=True),
    "cifar10": DatasetInfo(
        "cifar10", "CIFAR-10 files already on disk (binary or python version)", True, 32,
        "cifar", "10"),
    "cifar100": DatasetInfo(
        "cifar100", "CIFAR-100 files on disk, 20 superclasses", True, 32, "cifar", "100"),
}


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


def _root(info: DatasetInfo, root: str | Path | None) -> Path | None:
    if not info.needs_root:
        return None
    if root is None:
        raise DataError(f"data set {info.name!r} needs --data-root: {info.description}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data root {str(path)!r} is not a folder ({info.description})")
    return path


def list_classes(name: str, root: str | Path | None = None) -> list[str]:
    """The classes a user may pick as normal."""
    info = _info(name)
    return info.classes(_root(info, root))


def anomaly_choices(name: str, root: str | Path | None, normal: str) -> list[str]:
    """What labelled anomalies can be drawn from: a data set's anomaly kinds or defect types
    where it has them, then its other classes."""
    info = _info(name)
    path = _root(info, root)
    kinds = getattr(info._module, "anomaly_types", lambda _root: [])(path)
    return kinds + [c for c in info.classes(path) if c != normal and c not in kinds]


def load_split(cfg: DataConfig, progress: Progress = None) -> Split:
    """Read the data set named by `cfg` and apply its protocol."""
    info = _info(cfg.dataset)
    root = _root(info, cfg.root)
    classes = info.classes(root)
    if not classes:
        raise DataError(f"data set {cfg.dataset!r} at {root} has no classes")
    normal = cfg.normal_class or classes[0]
    if normal not in classes:
        raise DataError(
            f"normal class {normal!r} is not in {cfg.dataset!r}: expected one of "
            f"{', '.join(classes)}"
        )
    size = cfg.image_size or info.image_size
    height, width = info.shape(root, size) if cfg.keep_aspect else (size, size)
    train_pool, test_pool = info.load_pools(root, size if height == width else (height, width),
                                            progress)
    if cfg.dataset == "shapes":
        from core.data import shapes

        train_pool, test_pool = shapes.for_normal_class(train_pool, test_pool, normal)
    known = set(train_pool.classes) | set(test_pool.classes)
    known |= {k for p in (train_pool, test_pool) for k in (p.kinds or []) if k}
    unknown = sorted(set(cfg.anomaly_classes) - known)
    if unknown:
        raise DataError(
            f"anomaly class {', '.join(map(repr, unknown))} is not in {cfg.dataset!r}: "
            f"expected some of {', '.join(sorted(known - {normal}))}"
        )
    return make_split(
        train_pool, test_pool, dataset=cfg.dataset, normal_class=normal,
        setting=cfg.setting,
        anomaly_ratio=cfg.anomaly_ratio, anomaly_classes=cfg.anomaly_classes,
        max_train=cfg.max_train, seed=cfg.seed,
    )
