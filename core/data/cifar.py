"""CIFAR-10 and CIFAR-100 (20 superclasses) from the archives' files, already on disk.

Nothing is downloaded. ROOT may hold the extracted folder (cifar-10-batches-bin/,
cifar-10-batches-py/, cifar-100-binary/, cifar-100-python/) or be that folder itself. The
binary version is read as raw records and preferred when both are present; the python
version's pickles are read by `RestrictedUnpickler`, which can rebuild numpy arrays and
nothing else, so a crafted file cannot run code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from core.data.base import DataError, Pool
from core.data.imageio import Progress, resize_batch

PIXELS = 3 * 32 * 32  # one image: 1024 red, then 1024 green, then 1024 blue bytes, row-major

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR100_SUPERCLASSES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)


@dataclass(frozen=True)
class Version:
    """Where one CIFAR variant keeps its files, in both of its on-disk versions."""

    name: str
    bin_folder: str
    py_folder: str
    train_bin: tuple[str, ...]
    test_bin: str
    train_py: tuple[str, ...]
    test_py: str
    meta_bin: str  # text file, one class name per line
    meta_py: str  # pickle holding `meta_key`
    meta_key: str
    label_key: str  # python version: the labels used as classes
    header: int  # binary version: label bytes before the pixels (the class label first)
    default_classes: tuple[str, ...]


CIFAR10 = Version(
    name="CIFAR-10", bin_folder="cifar-10-batches-bin", py_folder="cifar-10-batches-py",
    train_bin=tuple(f"data_batch_{i}.bin" for i in range(1, 6)), test_bin="test_batch.bin",
    train_py=tuple(f"data_batch_{i}" for i in range(1, 6)), test_py="test_batch",
    meta_bin="batches.meta.txt", meta_py="batches.meta", meta_key="label_names",
    label_key="labels", header=1, default_classes=CIFAR10_CLASSES,
)
CIFAR100 = Version(
    name="CIFAR-100", bin_folder="cifar-100-binary", py_folder="cifar-100-python",
    train_bin=("train.bin",), test_bin="test.bin", train_py=("train",), test_py="test",
    meta_bin="coarse_label_names.txt", meta_py="meta", meta_key="coarse_label_names",
    label_key="coarse_labels", header=2, default_classes=CIFAR100_SUPERCLASSES,
)


@dataclass(frozen=True)
class Source:
    """The files of one CIFAR variant found on disk."""

    version: Version
    binary: bool
    train: tuple[Path, ...]
    test: Path
    meta: Path


def classes10(root: Path | None) -> list[str]:
    """The 10 CIFAR-10 class names (from batches.meta when present)."""
    return class_names(find(CIFAR10, root))


def load_pools10(
    root: Path | None, image_size: int, progress: Progress = None
) -> tuple[Pool, Pool]:
    """(train pool of 50,000, test pool of 10,000) CIFAR-10 images for the usual files."""
    return load_pools(find(CIFAR10, root), image_size, progress)


def classes100(root: Path | None) -> list[str]:
    """The 20 CIFAR-100 superclass names (from the meta file when present)."""
    return class_names(find(CIFAR100, root))


def load_pools100(
    root: Path | None, image_size: int, progress: Progress = None
) -> tuple[Pool, Pool]:
    """(train pool, test pool) of CIFAR-100 images, classed by their superclass."""
    return load_pools(find(CIFAR100, root), image_size, progress)


# ---------------------------------------------------------------------------------------------
# finding and reading the files


def find(version: Version, root: Path | None) -> Source:
    """The binary or python files of `version` under ROOT (binary preferred)."""
    expected = (
        f"expected {version.bin_folder}/ or {version.py_folder}/ (the archives from the "
        f"{version.name} website, extracted); nothing is downloaded"
    )
    if root is None:
        raise DataError(f"the {version.name} data set needs a root folder: {expected}")
    root = Path(root)
    for binary in (True, False):
        name = version.bin_folder if binary else version.py_folder
        train = version.train_bin if binary else version.train_py
        test = version.test_bin if binary else version.test_py
        for folder in (root / name, root):
            if not any((folder / f).is_file() for f in (*train, test)):
                continue
            missing = [f for f in (*train, test) if not (folder / f).is_file()]
            if missing:
                raise DataError(
                    f"incomplete {version.name} files in '{folder}': missing "
                    f"{', '.join(missing)} (extract the whole archive again)"
                )
            meta = folder / (version.meta_bin if binary else version.meta_py)
            return Source(version, binary, tuple(folder / f for f in train), folder / test, meta)
    raise DataError(f"no {version.name} files under '{root}': {expected}")


def class_names(source: Source) -> list[str]:
    """Names from the meta file, or the published list when the meta file is absent."""
    version, n = source.version, len(source.version.default_classes)
    if not source.meta.is_file():
        return list(version.default_classes)
    if source.binary:
        try:
            text = source.meta.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise DataError(f"cannot read '{source.meta}': {err.strerror}") from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        meta = _load_pickle(source.meta)
        meta = {_text(k): v for k, v in meta.items()} if isinstance(meta, dict) else {}
        names = meta.get(version.meta_key)
        names = [_text(x) for x in names] if isinstance(names, list | tuple) else []
    if len(names) != n or len(set(names)) != n:
        raise DataError(
            f"'{source.meta}' does not list {n} distinct {version.name} class names "
            f"(found {len(names)}); delete it to use the published names"
        )
    return names


def load_pools(source: Source, image_size: int, progress: Progress = None) -> tuple[Pool, Pool]:
    """Read every batch of `source` into a train and a test pool."""
    names = class_names(source)
    files = [*source.train, source.test]
    parts = []
    for k, path in enumerate(files):
        if progress is not None:
            progress(f"reading {path.name}", k / len(files))
        parts.append(_read_binary(source.version, path) if source.binary
                     else _read_python(source.version, path))
    if progress is not None:
        progress(f"read {source.version.name}", 1.0)
    pools = []
    for chunk in (parts[:-1], parts[-1:]):
        images = torch.from_numpy(np.concatenate([p[0] for p in chunk]))
        if image_size != 32:
            images = resize_batch(images, image_size)
        pools.append(Pool(
            images=images,
            classes=[names[label] for _, labels, _ in chunk for label in labels.tolist()],
            names=[f"{path}#{i}" for _, labels, path in chunk for i in range(len(labels))],
        ))
    return pools[0], pools[1]


def _read_binary(version: Version, path: Path) -> tuple[np.ndarray, np.ndarray, Path]:
    """Records of label byte(s) + 3072 pixel bytes -> (N, 3, 32, 32) uint8, (N,) labels."""
    record = version.header + PIXELS
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"cannot read {version.name} batch '{path}': {err}") from None
    if data.size == 0 or data.size % record:
        raise DataError(
            f"{version.name} batch '{path}' has {data.size} bytes: expected a non-zero multiple "
            f"of {record} ({version.header} label byte(s) + {PIXELS} pixel bytes per image); "
            "extract the archive again"
        )
    records = data.reshape(-1, record)
    labels = records[:, 0].astype(np.int64)
    images = records[:, version.header:].reshape(-1, 3, 32, 32)
    _check_labels(version, path, labels)
    return images, labels, path


def _read_python(version: Version, path: Path) -> tuple[np.ndarray, np.ndarray, Path]:
    """A pickled dict {'data': (N, 3072) uint8, <label_key>: N labels} -> arrays."""
    batch = _load_pickle(path)
    problem = f"{version.name} batch '{path}' is not the expected dict"
    if not isinstance(batch, dict):
        raise DataError(f"{problem}: found {type(batch).__name__}")
    batch = {_text(k): v for k, v in batch.items()}  # keys may be bytes after a re-pickle
    data, labels = batch.get("data"), batch.get(version.label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != PIXELS:
        raise DataError(f"{problem}: 'data' must be a (N, {PIXELS}) uint8 array")
    try:
        labels = np.asarray(labels)
    except Exception as err:  # whatever the pickle held
        raise DataError(f"{problem}: {version.label_key!r} is not a list ({err})") from None
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{problem}: {version.label_key!r} must hold one integer per image")
    labels = labels.astype(np.int64)
    _check_labels(version, path, labels)
    return np.ascontiguousarray(data).reshape(-1, 3, 32, 32), labels, path


def _check_labels(version: Version, path: Path, labels: np.ndarray) -> None:
    n = len(version.default_classes)
    bad = labels[(labels < 0) | (labels >= n)]
    if bad.size:
        raise DataError(
            f"{version.name} batch '{path}' holds label {int(bad[0])}: expected 0..{n - 1}"
        )


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# restricted unpickling


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays, dicts, lists and strings, and nothing else.

    Any other global a pickle names (a class, a function such as os.system) raises DataError
    before it is looked up, so loading an untrusted file cannot run code.
    """

    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 pickles: str and numpy buffers
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        found = allowed_globals().get((module, name))
        if found is None:
            raise DataError(
                f"refusing to load '{self.source}': it references {module}.{name}, which is not "
                "a numpy array (expected a CIFAR python batch)"
            )
        return found


@cache
def allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled numpy array or scalar names, under numpy 1.x and 2.x names."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{module}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return allowed


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Protocol-2 pickles store an array's bytes as `_codecs.encode(text, 'latin1')`."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise DataError(f"refusing _codecs.encode with encoding {encoding!r} in a pickle")
    return text.encode("latin-1", errors)


def _load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, str(path)).load()
    except DataError:
        raise
    except OSError as err:
        raise DataError(f"cannot read '{path}': {err.strerror or err}") from None
    except Exception as err:  # truncated or garbled pickle
        raise DataError(
            f"cannot read '{path}': broken pickle ({type(err).__name__}: {err}); extract the "
            "archive again"
        ) from None
