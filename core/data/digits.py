"""scikit-learn's bundled handwritten digits (8x8, values 0..16): ten classes, no download.

The images are scaled to 0..255, upscaled with bilinear interpolation and replicated to three
channels. The train / test split is fixed (60 % / 40 %, stratified by digit, seed 0), so every
run and every machine sees the same two pools.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from core.data.base import Pool
from core.data.imageio import Progress, resize_batch

CLASSES = [str(d) for d in range(10)]
TEST_SHARE = 0.4
SEED = 0


def classes(root: Path | None = None) -> list[str]:
    """["0", ..., "9"]; `root` is not used (the data ships with scikit-learn)."""
    return list(CLASSES)


def load_pools(root: Path | None, image_size: int, progress: Progress = None) -> tuple[Pool, Pool]:
    """(train pool, test pool) of (3, image_size, image_size) uint8 digits.

    Names are "digits/<split>/<index>" with the image's index in scikit-learn's data set.
    """
    if progress is not None:
        progress("loading scikit-learn digits", 0.0)
    bunch = load_digits()
    raw = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), 0..16
    target = np.asarray(bunch.target, dtype=np.int64)
    grey = torch.from_numpy(np.rint(raw * (255 / 16)).clip(0, 255).astype(np.uint8))
    images = resize_batch(grey[:, None], image_size).expand(-1, 3, -1, -1).contiguous()
    train_idx, test_idx = split_indices(target)
    pools = []
    for split, index in (("train", train_idx), ("test", test_idx)):
        pools.append(Pool(
            images=images[torch.from_numpy(index)],
            classes=[CLASSES[t] for t in target[index].tolist()],
            names=[f"digits/{split}/{i:04d}" for i in index.tolist()],
        ))
    if progress is not None:
        progress("loaded scikit-learn digits", 1.0)
    return pools[0], pools[1]


def split_indices(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices: stratified by class, the same on every call."""
    train, test = train_test_split(
        np.arange(len(target)), test_size=TEST_SHARE, stratify=target, random_state=SEED
    )
    return np.sort(train), np.sort(test)
