"""Image helpers of the explorer: tensors (C, H, W) to displayable arrays (H, W, C), and back."""

from __future__ import annotations

import numpy as np
import torch

from core.train.augment import to_float


def _batch(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(C, H, W) or (N, C, H, W) uint8/float -> float (N, C, H, W) in [0, 1]."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected (C, H, W) or (N, C, H, W) images, got {tuple(x.shape)}")
    return to_float(x)


def to_rgb(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A displayable uint8 (H, W, 3) array from a (C, H, W) tensor or an (H, W[, C]) array."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu().numpy()
        arr = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
        if arr.ndim == 3:
            arr = arr.transpose(1, 2, 0)
    else:
        arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"cannot display an image of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def hwc_to_chw(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W[, C]) array -> uint8 (C, H, W) tensor, the model's layout."""
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def upscale(image: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour upscaling by a whole factor until the shorter side is >= min_side.

    Small images (32 px) would otherwise be blurred by the browser's smooth scaling.
    """
    factor = max(1, -(-min_side // min(image.shape[:2])))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image


def draw_box(image: np.ndarray, top: int, left: int, side: int,
             colour: tuple[int, int, int] = (0, 255, 255)) -> np.ndarray:
    """A copy of an (H, W, 3) image with a one-pixel square outline."""
    out = image.copy()
    h, w = out.shape[:2]
    b, r = min(h, top + side) - 1, min(w, left + side) - 1
    out[top, left:r + 1] = colour
    out[b, left:r + 1] = colour
    out[top:b + 1, left] = colour
    out[top:b + 1, r] = colour
    return out


def subsample(n: int, max_n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most max_n of n items, the same ones on every call."""
    if n <= max_n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))
