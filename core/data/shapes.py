"""`shapes`: the built-in data set, generated on the fly, deterministic, no files.

Each image is one shape on a noisy dark background. A class is a shape; its normal look is a
solid warm colour (red to yellow) with soft shading. For any chosen normal class the test set
holds the three anomaly kinds the product is about:

- object: another shape, drawn in the normal style;
- style: the same shape in another appearance (a cool palette, or a striped texture);
- local: the normal shape and style with one small defect (a hole or a speck, with a mask).

About 5% of normal images are edge cases (rare but normal: a tiny shape or a dim colour) and are
flagged as such, so the explorer can show how the memory keeps them.
"""

from __future__ import annotations

import colorsys
import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch

from core.data.base import Pool
from core.data.imageio import default_cache_dir
from core.files import atomic_path

CLASSES = ("circle", "square", "triangle", "cross")
SIZES = {  # images per class and split: (normal, style, local)
    "train": (1200, 60, 60),
    "test": (200, 100, 100),
}
SPLITS = ("train", "test")
VARIANTS = ("", "style", "local")  # normal, then the style and local anomalies of a class
OBJECT_TEST_PER_CLASS = 100  # clean images of each other class in a test set
EDGE_SHARE = 0.05
_SEED = 20221117


def classes(root: Path | None = None) -> list[str]:
    return list(CLASSES)


def anomaly_types(root: Path | None = None) -> list[str]:
    """The anomaly kinds a user can label in the unbalanced setting."""
    return ["object", "style", "local"]


def load_pools(root: Path | None, image_size: int, progress=None) -> tuple[Pool, Pool]:
    """The train and test pools of every class at `image_size` pixels.

    Drawing them takes seconds, so the arrays are kept in the on-disk image cache
    (`ANOMEM_CACHE`), keyed on this module's source, NumPy's version and the size: any change
    to how shapes are drawn draws them again.
    """
    arrays = _read_cache(image_size)
    if arrays is None:
        arrays = _render_all(image_size, progress)
        _write_cache(image_size, arrays)
    elif progress:
        progress("read the shapes from the cache", 1.0)
    pools = []
    for split in SPLITS:
        labels = [(name, variant, i) for name in CLASSES
                  for variant, n in zip(VARIANTS, SIZES[split], strict=True) for i in range(n)]
        pools.append(Pool(
            images=torch.from_numpy(arrays[f"{split}_images"]),
            classes=[name for name, _, _ in labels],
            names=[f"shapes/{split}/{name}/{variant or 'normal'}/{i:04d}"
                   for name, variant, i in labels],
            masks=torch.from_numpy(arrays[f"{split}_masks"]),
            edge=torch.from_numpy(arrays[f"{split}_edge"]),
            kinds=[variant for _, variant, _ in labels],
        ))
    return pools[0], pools[1]


def _render_all(image_size: int, progress=None) -> dict[str, np.ndarray]:
    """{"train_images", "train_masks", "train_edge", "test_...": arrays} of every class."""
    arrays = {}
    for split_id, split in enumerate(SPLITS):
        parts = []
        for class_id, name in enumerate(CLASSES):
            for variant_id, (variant, n) in enumerate(zip(VARIANTS, SIZES[split], strict=True)):
                rng = np.random.default_rng([_SEED, split_id, class_id, variant_id])
                parts.append(_render(rng, class_id, n, image_size, variant))
            if progress:
                progress(f"generating {split} {name}", (split_id * 4 + class_id + 1) / 8)
        for key in ("images", "masks", "edge"):
            arrays[f"{split}_{key}"] = np.concatenate([p[key] for p in parts])
    return arrays


def _cache_file(image_size: int) -> Path:
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"numpy {np.__version__} size {image_size}".encode())
    return default_cache_dir() / f"shapes-{digest.hexdigest()[:32]}.npz"


def _read_cache(image_size: int) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when they are missing or not what was written."""
    path = _cache_file(image_size)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in saved.files}
        for split in SPLITS:
            n = len(CLASSES) * sum(SIZES[split])
            expected = {"images": ((n, 3, image_size, image_size), np.uint8),
                        "masks": ((n, image_size, image_size), np.uint8),
                        "edge": ((n,), np.bool_)}
            for key, (shape, dtype) in expected.items():
                array = arrays[f"{split}_{key}"]
                if array.shape != shape or array.dtype != dtype:
                    return None
    except Exception:  # a broken cache entry is a miss, never an error
        return None
    return arrays


def _write_cache(image_size: int, arrays: dict[str, np.ndarray]) -> None:
    """Store the arrays atomically; a cache that cannot be written only costs a warning."""
    path = _cache_file(image_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError as err:
        warnings.warn(f"shapes cache not written to '{path.parent}': {err}", stacklevel=3)


def for_normal_class(train: Pool, test: Pool, normal: str) -> tuple[Pool, Pool]:
    """Keep what the protocol needs: other shapes become "object" anomalies.

    Style and local variants of the other shapes are dropped, since they would be object and
    style (or local) anomalies at once.
    """
    pools = []
    for pool, split in ((train, "train"), (test, "test")):
        keep, kinds, seen = [], [], dict.fromkeys(CLASSES, 0)
        for i, (cls, kind) in enumerate(zip(pool.classes, pool.kinds or [], strict=True)):
            if cls == normal:
                keep.append(i)
                kinds.append(kind)
            elif not kind and (split == "train" or seen[cls] < OBJECT_TEST_PER_CLASS):
                seen[cls] += 1
                keep.append(i)
                kinds.append("object")
        picked = pool.take(keep)
        picked.kinds = kinds
        pools.append(picked)
    return pools[0], pools[1]


def _render(rng: np.random.Generator, class_id: int, n: int, size: int, variant: str
            ) -> dict[str, np.ndarray]:
    """Draw `n` images of one class and variant: uint8 (n, 3, size, size), masks, edge flags."""
    ss = 2  # supersampling for anti-aliased edges
    grid = (np.arange(size * ss) + 0.5) / (size * ss)
    y, x = np.meshgrid(grid, grid, indexing="ij")  # (S, S) in [0, 1]

    edge = np.zeros(n, dtype=bool)
    if variant == "":
        edge = rng.random(n) < EDGE_SHARE
    radius = rng.uniform(0.24, 0.32, n)
    tiny = edge & (rng.random(n) < 0.5)
    radius[tiny] = rng.uniform(0.13, 0.16, tiny.sum())
    cx = rng.uniform(0.5 - (0.46 - radius), 0.5 + (0.46 - radius))
    cy = rng.uniform(0.5 - (0.46 - radius), 0.5 + (0.46 - radius))
    angle = rng.uniform(0, 2 * np.pi, n)

    # Rotated, radius-normalised coordinates, (n, S, S).
    dx = (x[None] - cx[:, None, None]) / radius[:, None, None]
    dy = (y[None] - cy[:, None, None]) / radius[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    inside = _shape_mask(class_id, u, v).astype(np.float32)

    hue = rng.uniform(0.0, 0.12, n)  # warm: red to yellow
    sat = rng.uniform(0.6, 0.9, n)
    val = rng.uniform(0.8, 1.0, n)
    dim = edge & ~tiny
    val[dim] = rng.uniform(0.5, 0.58, dim.sum())
    stripes = np.zeros(n, dtype=bool)
    if variant == "style":
        stripes = rng.random(n) < 0.5
        cool = ~stripes
        hue[cool] = rng.uniform(0.45, 0.7, cool.sum())
    colour = np.array([colorsys.hsv_to_rgb(h, s, b) for h, s, b in zip(hue, sat, val,
                                                                       strict=True)])
    colour = colour.astype(np.float32)[:, :, None, None]  # (n, 3, 1, 1)

    shade = 0.85 + 0.15 * np.clip((v + 1) / 2, 0, 1)  # soft light from one side
    texture = np.ones_like(u)
    if stripes.any():
        phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
        band = np.sin(2 * np.pi * 2.5 * (u + v) / np.sqrt(2) + phase) > 0
        texture = np.where(stripes[:, None, None] & ~band, 0.3, 1.0)
    fg = colour * (shade * texture)[:, None]

    background = rng.uniform(0.12, 0.28, n).astype(np.float32)[:, None, None, None]
    bg = np.broadcast_to(background, (n, 3, size * ss, size * ss))
    image = bg * (1 - inside[:, None]) + fg * inside[:, None]

    defect = np.zeros((n, size * ss, size * ss), dtype=np.float32)
    if variant == "local":
        defect = _defects(rng, x, y, inside) * inside  # a defect lies on the shape
        hole = rng.random(n) < 0.5
        speck = np.array([0.2, 0.9, 1.0], dtype=np.float32)[None, :, None, None]
        ink = np.where(hole[:, None, None, None], bg, np.broadcast_to(speck, image.shape))
        image = image * (1 - defect[:, None]) + ink * defect[:, None]

    image = image.reshape(n, 3, size, ss, size, ss).mean(axis=(3, 5))
    defect = defect.reshape(n, size, ss, size, ss).mean(axis=(2, 4))
    image = image + rng.normal(0, 0.02, image.shape)
    images = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    masks = (defect >= 0.5).astype(np.uint8)
    return {"images": images, "masks": masks, "edge": edge}


def _shape_mask(class_id: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    name = CLASSES[class_id]
    if name == "circle":
        return u**2 + v**2 <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if name == "triangle":
        return (v >= -0.55) & (v <= 1.0 - np.sqrt(3) * np.abs(u))
    if name == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) &
                                                             (np.abs(u) <= 0.95))
    raise ValueError(f"unknown shape id {class_id}")


def _defects(rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
             inside: np.ndarray) -> np.ndarray:
    """One small disk per image, centred on a random pixel well inside the shape."""
    n = len(inside)
    out = np.zeros_like(inside)
    r = rng.uniform(0.07, 0.1, n)
    for i in range(n):
        ys, xs = np.nonzero(inside[i])
        j = rng.integers(len(ys))
        cy, cx = y[ys[j], xs[j]], x[ys[j], xs[j]]
        out[i] = ((x - cx) ** 2 + (y - cy) ** 2 <= r[i] ** 2).astype(np.float32)
    return out
