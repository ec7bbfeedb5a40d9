"""One MVTec AD category: ROOT/train/good, ROOT/test/<type>, ROOT/ground_truth/<type>.

Training images are all normal ("good"); a test image's class is its folder name ("good" or a
defect type) and its mask comes from ground_truth/<type>/<stem>_mask.png (255 = defect). Any
category and resolution reads the same way; grayscale categories are replicated to 3
channels. A category whose images are far from square (KolektorSDD's are 205 x 512) is read at
their aspect (`shape`): thin defects need the resolution along the long side, which squashing
to a square would take away. A defect image whose mask is missing or unreadable keeps an
all-zero mask, with one warning listing those images.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from core.config import MAX_SIDE
from core.data.base import DataError, Pool
from core.data.imageio import (
    WORKERS,
    Progress,
    Size,
    declared_size,
    describe_skipped,
    hw,
    list_images,
    load_images,
    read_mask,
    warn_skipped,
)

GOOD = "good"
SQUARE_BELOW = 1.25  # a category whose median long / short side is below this is read square
LONG_SIDE_MULTIPLE = 32  # the long side is rounded to the encoder's deepest stride
LAYOUT = (
    "an MVTec AD category: ROOT/train/good/*.png, ROOT/test/<good or defect type>/*.png, "
    "ROOT/ground_truth/<defect type>/<name>_mask.png"
)


def classes(root: Path | None) -> list[str]:
    """["good"]: the only class that can be normal, after checking the layout."""
    root = _check_root(root)
    if not list_images(root / "train" / GOOD):
        raise DataError(f"no images in '{root / 'train' / GOOD}': expected {LAYOUT}")
    return [GOOD]


def shape(root: Path | None, size: int) -> tuple[int, int]:
    """(height, width) to read the category at: `size` x `size` when its training images are
    about square, else their median aspect with the shorter side `size` and the longer one
    rounded to a multiple of LONG_SIDE_MULTIPLE (at most MAX_SIDE). Reads file headers only."""
    root = _check_root(root)
    sizes = [s for s in map(declared_size, list_images(root / "train" / GOOD)) if s]
    if not sizes:
        return size, size
    ratio = float(np.median([h / w for w, h in sizes]))
    if max(ratio, 1 / ratio) < SQUARE_BELOW:
        return size, size
    long = size * max(ratio, 1 / ratio)
    multiple = int(long / LONG_SIDE_MULTIPLE + 0.5) * LONG_SIDE_MULTIPLE  # halves round up
    long = min(MAX_SIDE, max(size, multiple))
    return (long, size) if ratio > 1 else (size, long)


def load_pools(root: Path | None, image_size: Size, progress: Progress = None
               ) -> tuple[Pool, Pool]:
    """(train pool of "good" images, test pool of every type with its (N, H, W) masks), at
    `image_size`: a side or (height, width)."""
    root = _check_root(root)
    train_paths = list_images(root / "train" / GOOD)
    if not train_paths:
        raise DataError(f"no images in '{root / 'train' / GOOD}': expected {LAYOUT}")
    test_types = _test_types(root)
    kind = {path: GOOD for path in train_paths}
    for name, paths in test_types.items():
        kind.update(dict.fromkeys(paths, name))
    test_paths = [p for paths in test_types.values() for p in paths]
    array, kept, skipped = load_images(train_paths + test_paths, image_size, progress=progress)
    warn_skipped(skipped, f"'{root}'")
    images = torch.from_numpy(array)
    n_train = len(set(kept) & set(train_paths))  # train images come first in `kept`
    train, test = kept[:n_train], kept[n_train:]
    test_classes = [kind[p] for p in test]
    masks = _read_masks(root, test, test_classes, image_size)
    return (
        Pool(images=images[:n_train], classes=[GOOD] * len(train),
             names=[str(p) for p in train]),
        Pool(images=images[n_train:], classes=test_classes, names=[str(p) for p in test],
             masks=torch.from_numpy(masks)),
    )


def anomaly_types(root: Path | None) -> list[str]:
    """The defect types under ROOT/test, for drawing labelled anomalies."""
    return sorted(t for t in _test_types(_check_root(root)) if t != GOOD)


def _check_root(root: Path | None) -> Path:
    if root is None:
        raise DataError(f"the mvtec data set needs a root folder: expected {LAYOUT}")
    root = Path(root)
    for folder in (root / "train" / GOOD, root / "test"):
        if not folder.is_dir():
            raise DataError(f"missing folder '{folder}': expected {LAYOUT}")
    return root


def _test_types(root: Path) -> dict[str, list[Path]]:
    """Type name -> its sorted test images, for every test folder that holds any."""
    with os.scandir(root / "test") as entries:
        names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    found = {name: list_images(root / "test" / name) for name in names}
    found = {name: paths for name, paths in found.items() if paths}
    if not found:
        raise DataError(f"no test images under '{root / 'test'}': expected {LAYOUT}")
    return found


def _read_masks(root: Path, paths: list[Path], kinds: list[str], size: Size) -> np.ndarray:
    """(N, H, W) uint8 masks; zeros for "good" and for defects without a usable mask."""
    masks = np.zeros((len(paths), *hw(size)), dtype=np.uint8)
    folders: dict[str, dict[str, Path]] = {}
    for kind in set(kinds) - {GOOD}:
        folders[kind] = {p.stem: p for p in list_images(root / "ground_truth" / kind)}

    def read(i: int) -> str | None:
        kind, image = kinds[i], paths[i]
        found = folders[kind].get(f"{image.stem}_mask") or folders[kind].get(image.stem)
        if found is None:
            where = root / "ground_truth" / kind / f"{image.stem}_mask.png"
            return f"'{image}': expected '{where}'"
        try:
            masks[i] = read_mask(found, size)
        except DataError as err:
            return f"'{image}': {err}"
        return None

    defects = [i for i, kind in enumerate(kinds) if kind != GOOD]
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        missing = [m for m in pool.map(read, defects) if m is not None]
    if missing:
        warnings.warn(
            f"{len(missing)} defect image(s) under '{root}' have no readable mask and keep "
            f"an all-zero mask:\n{describe_skipped(missing)}",
            stacklevel=3,
        )
    return masks
