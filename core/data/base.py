"""The in-memory data set types and the one-class / unbalanced protocols.

Every loader ends in the same place: decoded uint8 tensors held in memory, so training never
touches PIL or the disk. A `Pool` is what a loader reads (one split, every class); `make_split`
turns two pools into the protocol's `Split` of training and test `ImageSet`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

NORMAL = "normal"


class DataError(ValueError):
    """A data set, folder, class or file is missing or not what was expected."""


@dataclass
class Pool:
    """Images of one split as a loader reads them, every class included."""

    images: torch.Tensor  # (N, C, H, W) uint8
    classes: list[str]  # per-sample class (class folder, or MVTec "good" / defect type)
    names: list[str]  # per-sample source path or generated id
    masks: torch.Tensor | None = None  # (N, H, W) uint8, 1 = defect pixel
    edge: torch.Tensor | None = None  # (N,) bool: rare-but-normal variation
    kinds: list[str] | None = None  # per-sample anomaly kind where the class does not say it

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError("pool images must be a (N, C, H, W) uint8 tensor")
        if len(self.classes) != n or len(self.names) != n:
            raise DataError("pool classes and names must have one entry per image")
        if self.edge is None:
            self.edge = torch.zeros(n, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.images)

    def take(self, index: np.ndarray | list[int]) -> Pool:
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        pick = idx.tolist()
        return Pool(
            images=self.images[idx],
            classes=[self.classes[i] for i in pick],
            names=[self.names[i] for i in pick],
            masks=None if self.masks is None else self.masks[idx],
            edge=self.edge[idx],
            kinds=None if self.kinds is None else [self.kinds[i] for i in pick],
        )


@dataclass
class ImageSet:
    """Images with their ground truth, ready for training or evaluation."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64: 0 normal, 1 anomaly
    types: list[str]  # "normal" or the anomaly type (class, defect, or object/style/local)
    names: list[str]
    edge: torch.Tensor  # (N,) bool: edge-case normal
    masks: torch.Tensor | None = None  # (N, H, W) uint8, only where the data set has masks

    def __len__(self) -> int:
        return len(self.images)

    @property
    def anomaly_types(self) -> list[str]:
        return sorted({t for t in self.types if t != NORMAL})

    def subset(self, index: np.ndarray | list[int]) -> ImageSet:
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        pick = idx.tolist()
        return ImageSet(
            images=self.images[idx],
            labels=self.labels[idx],
            types=[self.types[i] for i in pick],
            names=[self.names[i] for i in pick],
            edge=self.edge[idx],
            masks=None if self.masks is None else self.masks[idx],
        )

    @staticmethod
    def concat(sets: list[ImageSet]) -> ImageSet:
        sets = [s for s in sets if len(s)]
        if not sets:
            raise DataError("nothing to concatenate: every image set is empty")
        with_masks = any(s.masks is not None for s in sets)
        masks = None
        if with_masks:
            masks = torch.cat([
                s.masks if s.masks is not None
                else torch.zeros(len(s), *s.images.shape[-2:], dtype=torch.uint8)
                for s in sets
            ])
        return ImageSet(
            images=torch.cat([s.images for s in sets]),
            labels=torch.cat([s.labels for s in sets]),
            types=[t for s in sets for t in s.types],
            names=[n for s in sets for n in s.names],
            edge=torch.cat([s.edge for s in sets]),
            masks=masks,
        )


@dataclass
class Split:
    """A protocol's training and test sets, plus what the app and metrics need to know."""

    train: ImageSet  # normal images, plus labelled anomalies in the unbalanced setting
    test: ImageSet
    dataset: str
    normal_class: str
    classes: list[str] = field(default_factory=list)


def pool_to_set(pool: Pool, is_normal: list[bool]) -> ImageSet:
    """Label a pool: normal images get type "normal", anomalies their kind or class."""
    types = []
    for i, normal in enumerate(is_normal):
        if normal:
            types.append(NORMAL)
        elif pool.kinds is not None and pool.kinds[i]:
            types.append(pool.kinds[i])
        else:
            types.append(pool.classes[i])
    return ImageSet(
        images=pool.images,
        labels=torch.tensor([0 if n else 1 for n in is_normal], dtype=torch.int64),
        types=types,
        names=list(pool.names),
        edge=pool.edge & torch.tensor(is_normal, dtype=torch.bool),
        masks=pool.masks,
    )


def make_split(
    train_pool: Pool,
    test_pool: Pool,
    *,
    dataset: str,
    normal_class: str,
    normal_test_class: str | None = None,
    setting: str = "one-class",
    anomaly_ratio: float = 0.05,
    anomaly_classes: tuple[str, ...] = (),
    max_train: int | None = None,
    seed: int = 0,
) -> Split:
    """One class is normal, everything else is an anomaly (its type kept per sample).

    Unbalanced: `round(anomaly_ratio * n_normal)` labelled anomalies (at least one) are drawn
    from the training pool's images of `anomaly_classes` (all anomaly classes when empty). When
    the training pool holds no anomalies (MVTec AD), they are drawn from the test pool and taken
    out of the test set, so no image is ever both trained on and tested.
    """
    normal_test_class = normal_test_class or normal_class
    rng = np.random.default_rng(seed)
    classes = sorted(set(train_pool.classes) | set(test_pool.classes))

    normal_idx = np.flatnonzero(is_normal(train_pool, normal_class))
    if len(normal_idx) == 0:
        raise DataError(
            f"normal class {normal_class!r} has no training images "
            f"(classes found: {', '.join(sorted(set(train_pool.classes))) or 'none'})"
        )
    if max_train is not None and len(normal_idx) > max_train:
        normal_idx = np.sort(rng.choice(normal_idx, size=max_train, replace=False))
    train_sets = [pool_to_set(train_pool.take(normal_idx), [True] * len(normal_idx))]
    test_keep = np.arange(len(test_pool))

    if setting == "unbalanced":
        wanted = set(anomaly_classes)
        source, from_test = train_pool, False
        candidates = _anomaly_indices(train_pool, normal_class, wanted)
        if len(candidates) == 0:
            source, from_test = test_pool, True
            candidates = _anomaly_indices(test_pool, normal_test_class, wanted)
        if len(candidates) == 0:
            what = ", ".join(sorted(wanted)) if wanted else "any anomaly class"
            raise DataError(f"unbalanced setting: no images of {what} to label as anomalies")
        n = max(1, round(anomaly_ratio * len(normal_idx)))
        if from_test:  # leave at least half of each test anomaly pool for evaluation
            n = min(n, len(candidates) // 2 or 1)
        picked = np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))
        train_sets.append(pool_to_set(source.take(picked), [False] * len(picked)))
        if from_test:
            test_keep = np.setdiff1d(test_keep, picked)

    test = test_pool.take(test_keep)
    test_set = pool_to_set(test, is_normal(test, normal_test_class))
    if test_set.labels.sum() == 0 or (test_set.labels == 0).sum() == 0:
        raise DataError(
            f"test split of {dataset!r} needs both normal ({normal_test_class!r}) and anomalous "
            "images"
        )
    return Split(
        train=ImageSet.concat(train_sets),
        test=test_set,
        dataset=dataset,
        normal_class=normal_class,
        classes=classes,
    )


def _anomaly_indices(pool: Pool, normal_class: str, wanted: set[str]) -> np.ndarray:
    hits = []
    for i, c in enumerate(pool.classes):
        kind = pool.kinds[i] if pool.kinds else ""
        if c == normal_class and not kind:
            continue
        if not wanted or c in wanted or (kind and kind in wanted):
            hits.append(i)
    return np.array(hits, dtype=np.int64)


def is_normal(pool: Pool, normal_class: str) -> list[bool]:
    """Normal means: of the normal class and not marked as a variant (style, local) of it."""
    kinds = pool.kinds or [""] * len(pool)
    return [c == normal_class and not k for c, k in zip(pool.classes, kinds, strict=True)]
