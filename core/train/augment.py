"""Batched view augmentations on tensors: no per-image PIL work inside the training loop.

One call draws independent parameters for every image of the batch and applies random resized
crop and horizontal flip (one `grid_sample` through a per-image affine grid), then colour jitter
(brightness, contrast, saturation, hue) and optional grayscale as tensor arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.config import AugmentConfig

_GRAY = (0.299, 0.587, 0.114)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1]; float input passes through."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def resized_crop_flip(x: torch.Tensor, scale: tuple[float, float], flip: bool,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop a random area share in `scale` (aspect 3/4..4/3), resize back, maybe mirror."""
    b, dev = len(x), x.device
    rand = torch.rand(b, 5, generator=generator).to(dev)
    area = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
    log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand[:, 1]
    # Keep the aspect ratio within what the drawn area allows, so w and h never exceed 1
    # and the crop covers exactly the area drawn.
    ratio = torch.minimum(torch.maximum(log_r.exp(), area), 1 / area)
    w = (area * ratio).sqrt()
    h = (area / ratio).sqrt()
    tx = (1 - w) * (2 * rand[:, 2] - 1)
    ty = (1 - h) * (2 * rand[:, 3] - 1)
    sign = torch.where(rand[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=dev)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def colour_jitter(x: torch.Tensor, strength: float, hue: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image brightness, contrast, saturation in 1 +- strength, hue shift in +- hue turns."""
    if x.shape[1] != 3 or (strength == 0 and hue == 0):
        return x
    b = len(x)
    rand = (2 * torch.rand(b, 4, generator=generator) - 1).to(x.device, x.dtype)
    factors = 1 + strength * rand[:, :3]
    x = x * factors[:, 0].view(b, 1, 1, 1)
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factors[:, 1].view(b, 1, 1, 1) + mean
    gray = grayscale(x)
    x = (x - gray) * factors[:, 2].view(b, 1, 1, 1) + gray
    if hue:
        x = rotate_hue(x, 2 * math.pi * hue * rand[:, 3])
    return x.clamp(0, 1)


def rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate chroma in YIQ space by a per-image angle (radians)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                           [0.211, -0.523, 0.312]], device=x.device, dtype=x.dtype)
    from_yiq = torch.linalg.inv(to_yiq)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(len(x), 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    m = from_yiq @ rot @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x)


def augment(images: torch.Tensor, cfg: AugmentConfig,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of each image: (B, C, H, W) uint8 or [0, 1] float -> float in [0, 1]."""
    x = to_float(images)
    x = resized_crop_flip(x, cfg.crop_scale, cfg.flip, generator)
    x = colour_jitter(x, cfg.jitter, cfg.hue, generator)
    if cfg.grayscale_p > 0 and x.shape[1] == 3:
        pick = (torch.rand(len(x), generator=generator) < cfg.grayscale_p).to(x.device)
        x = torch.where(pick.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    return x.clamp(0, 1)
