"""Class folders: ROOT/{train,test}/<class>/<image files>.

Each class is a folder of images directly inside ROOT/train or ROOT/test (sub-folders of a
class folder are not searched). Files are taken in sorted order; files whose suffix is not an
image suffix, and hidden files, are ignored; an unreadable image is skipped with a warning,
but a class folder with no readable image is refused.
A class may appear in only one of the two splits.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from core.data.base import DataError, Pool
from core.data.imageio import Progress, describe_skipped, list_images, load_images, warn_skipped

LAYOUT = "ROOT/train/<class>/*.png|jpg|... and ROOT/test/<class>/*"
SPLITS = ("train", "test")


def classes(root: Path | None) -> list[str]:
    """Sorted names of the class folders under ROOT/train that hold at least one image."""
    root = _check_root(root)
    found = _scan(root, "train")
    if not found:
        raise _no_classes(root)
    return sorted(found)


def load_pools(root: Path | None, image_size: int, progress: Progress = None) -> tuple[Pool, Pool]:
    """(train pool, test pool), every image as uint8 (3, image_size, image_size)."""
    root = _check_root(root)
    by_split = {split: _scan(root, split) for split in SPLITS}
    if not by_split["train"]:
        raise _no_classes(root)
    entries = [  # train first, then test: the decoded array splits into two slices
        (split, name, path)
        for split in SPLITS
        for name in sorted(by_split[split])
        for path in by_split[split][name]
    ]
    where = {path: (split, name) for split, name, path in entries}
    paths = [path for _, _, path in entries]
    array, kept, skipped = load_images(paths, image_size, progress=progress)
    _check_readable(root, by_split, paths, kept, skipped)
    warn_skipped(skipped, f"'{root}'")
    images = torch.from_numpy(array)
    n_train = sum(where[path][0] == "train" for path in kept)
    train, test = kept[:n_train], kept[n_train:]
    return (
        Pool(images=images[:n_train], classes=[where[p][1] for p in train],
             names=[str(p) for p in train]),
        Pool(images=images[n_train:], classes=[where[p][1] for p in test],
             names=[str(p) for p in test]),
    )


def _check_readable(root: Path, by_split: dict[str, dict[str, list[Path]]], paths: list[Path],
                    kept: list[Path], skipped: list[str]) -> None:
    """A class folder none of whose image files can be read is refused, naming them: left to
    the skipping, the class would silently vanish and a later error would not say why."""
    readable = set(kept)
    failed = [path for path in paths if path not in readable]  # in the order of `skipped`
    reasons = dict(zip(failed, skipped, strict=True))
    for split, found in by_split.items():
        for name, files in sorted(found.items()):
            if all(path in reasons for path in files):
                raise DataError(
                    f"class folder '{root / split / name}': none of its {len(files)} image "
                    "file(s) can be read (expected at least one readable image):\n"
                    + describe_skipped([reasons[path] for path in files])
                )


def _no_classes(root: Path) -> DataError:
    return DataError(f"no class folder with images under '{root / 'train'}': expected {LAYOUT}")


def _check_root(root: Path | None) -> Path:
    if root is None:
        raise DataError(f"the folder data set needs a root folder: expected {LAYOUT}")
    root = Path(root)
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"missing folder '{root / split}': expected {LAYOUT}")
    return root


def _scan(root: Path, split: str) -> dict[str, list[Path]]:
    """Class name -> sorted image files, for the class folders of one split that hold any."""
    found: dict[str, list[Path]] = {}
    with os.scandir(root / split) as entries:
        folders = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    for name in folders:
        files = list_images(root / split / name)
        if files:
            found[name] = files
    return found
