"""Distribution-shifted copies of images: the pseudo-anomalies of both stages.

Stage 1 takes them as extra contrastive negatives (the "distributionally shifted instances" of
CSI, Tack et al. 2020); stage 2 fits its combination of terms against some kinds and checks it
on others. Each kind mimics one family of real anomaly:

- jigsaw: the four quadrants swapped; every part is normal, their arrangement is not (object).
- rotate: turned by 90, 180 or 270 degrees (CSI's shift for CIFAR; object).
- cutpaste: a rectangle of the image, brightness-jittered, pasted elsewhere in it (CutPaste,
  Li et al. 2021; local defects).
- scar: a thin rotated strip of the image pasted elsewhere (CutPaste's "scar"; cracks).
- blend: a soft-edged patch of *another* normal image blended in, with no hard seam (after
  NSA, Schlueter et al. 2022; local defects that look like normal texture).
- colour: a global change of tone (gamma) and, on colour images, of hue (style).

Every function works on a whole batch at once on the batch's device, draws its parameters per
image from `generator`, and returns the input's dtype (uint8 in, uint8 out).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from core.config import SHIFTS  # the names the config checks
from core.train.augment import rotate_hue, to_float

__all__ = ["SHIFTS", "shift"]

Shift = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


def jigsaw(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Swap the four quadrants of each image by a random non-identity permutation.

    Every local patch stays normal-looking, only their arrangement breaks: a pseudo-anomaly
    that forces the encoder to represent how parts are laid out (shape), not just what they are.
    """
    b, c, h, w = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, :, :2 * h2, :2 * w2]
    quads = x.reshape(b, c, 2, h2, 2, w2).permute(0, 2, 4, 1, 3, 5).reshape(b, 4, c, h2, w2)
    perms = torch.stack([torch.randperm(4, generator=generator) for _ in range(b)])
    identity = (perms == torch.arange(4)).all(1)
    perms[identity] = torch.tensor([3, 2, 1, 0])  # never the original image
    perms = perms.to(x.device)
    quads = quads[torch.arange(b, device=x.device)[:, None], perms]
    out = quads.reshape(b, 2, 2, c, h2, w2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * h2, 2 * w2)
    return F.pad(out, (0, w - 2 * w2, 0, h - 2 * h2), mode="replicate") if (h % 2 or w % 2) \
        else out


def rotate90(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate each image by 90, 180 or 270 degrees (CSI's shifting transformation); a quarter
    turn of a non-square image is resized back to its shape."""
    k = torch.randint(1, 4, (len(x),), generator=generator)
    out = x.clone()
    for turns in (1, 2, 3):
        pick = (k == turns).nonzero().flatten().to(x.device)
        if len(pick):
            turned = torch.rot90(x[pick], turns, dims=(2, 3))
            if turned.shape != out[pick].shape:
                turned = _float_op(turned, lambda f: F.interpolate(
                    f, size=x.shape[-2:], mode="bilinear", align_corners=False, antialias=True))
            out[pick] = turned
    return out


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates as fractions of the side: ys (1, 1, H, 1), xs (1, 1, 1, W)."""
    h, w = x.shape[-2:]
    ys = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5) / w
    return ys.view(1, 1, h, 1), xs.view(1, 1, 1, w)


def _moved(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Each image translated so that the content at `src` (B, 2: x, y fractions) lands at
    `dst`; float (B, C, H, W), edges reflected."""
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = 2 * (src - dst).to(x.device)  # grid_sample reads output + (src - dst)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _patch_centres(size: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, 2) random centres keeping a (B, 2) patch of `size` (fractions) inside the image."""
    half = (size / 2).clamp(max=0.5)
    return half + (1 - 2 * half) * torch.rand(len(size), 2, generator=generator)


def _paste(x: torch.Tensor, mask_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           size: torch.Tensor, source: torch.Tensor, gain: torch.Tensor,
           generator: torch.Generator | None) -> torch.Tensor:
    """Paste a region of `source` (float, like x) shaped by `mask_fn(dy, dx)` (offsets from the
    region's centre, broadcast to (B, 1, H, W)) from one random place to another."""
    src, dst = _patch_centres(size, generator), _patch_centres(size, generator)
    patch = _moved(source, src, dst) * gain.to(x.device).view(-1, 1, 1, 1)
    ys, xs = _grid(x)
    centre = dst.to(x.device)
    alpha = mask_fn(ys - centre[:, 1].view(-1, 1, 1, 1), xs - centre[:, 0].view(-1, 1, 1, 1))
    return x * (1 - alpha) + patch.clamp(0, 1) * alpha


def cutpaste(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """CutPaste (Li et al. 2021): a rectangle of 2-15 % of the image (aspect 0.3-3.3),
    brightness scaled by 0.8-1.2, pasted at another place of the same image."""
    b = len(x)
    area = _uniform(b, 0.02, 0.15, generator)
    aspect = torch.exp(_uniform(b, math.log(0.3), math.log(1 / 0.3), generator))
    size = torch.stack([(area * aspect).sqrt(), (area / aspect).sqrt()], 1).clamp(max=0.9)
    half = (size / 2).to(x.device)

    def box(dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        return ((dx.abs() < half[:, 0].view(-1, 1, 1, 1))
                & (dy.abs() < half[:, 1].view(-1, 1, 1, 1))).float()

    return _float_op(x, lambda f: _paste(f, box, size, f, _uniform(b, 0.8, 1.2, generator),
                                         generator))


def scar(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """CutPaste-scar: a strip 10-30 % of the side long and at least 1.5 pixels thick, at a
    random angle, cut from the image and pasted elsewhere, brightness scaled by 0.7-1.3."""
    b, side = len(x), min(x.shape[-2:])
    length = _uniform(b, 0.1, 0.3, generator)
    thick = torch.maximum(_uniform(b, 0.02, 0.06, generator), torch.full((b,), 1.5 / side))
    angle = _uniform(b, 0, math.pi, generator)
    size = torch.stack([length, length], 1)  # the strip fits in a length x length square
    cos, sin, half_l, half_t = (v.to(x.device).view(-1, 1, 1, 1)
                                for v in (angle.cos(), angle.sin(), length / 2, thick / 2))

    def strip(dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        along, across = dx * cos + dy * sin, -dx * sin + dy * cos
        return ((along.abs() < half_l) & (across.abs() < half_t)).float()

    return _float_op(x, lambda f: _paste(f, strip, size, f, _uniform(b, 0.7, 1.3, generator),
                                         generator))


def blend(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A soft-edged patch (4-15 % of the image) of another image of the batch, blended in at
    60-100 % opacity: no hard seam for the detector to find, only content out of place."""
    b = len(x)
    side = _uniform(b, 0.2, 0.39, generator)
    size = torch.stack([side, side], 1)
    soft = 0.03  # edge width, as a fraction of the side
    half, opacity = (v.to(x.device).view(-1, 1, 1, 1)
                     for v in (side / 2, _uniform(b, 0.6, 1.0, generator)))
    other = (torch.arange(b) + torch.randint(1, max(2, b), (1,), generator=generator)) % b

    def soft_box(dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        return opacity * torch.sigmoid((half - dx.abs()) / soft) * torch.sigmoid(
            (half - dy.abs()) / soft)

    ones = torch.ones(b)
    return _float_op(x, lambda f: _paste(f, soft_box, size, f[other.to(f.device)], ones,
                                         generator))


def colour(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A global change of look: gamma of 0.45-0.67 or 1.5-2.2 and, on colour images, the hue
    turned by a fifth to a half of the colour circle."""
    b = len(x)
    log_gamma = _uniform(b, 0.4, 0.8, generator) * torch.where(
        torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    turn = _uniform(b, 0.2, 0.5, generator) * torch.where(
        torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)

    def op(f: torch.Tensor) -> torch.Tensor:
        out = f.clamp_min(1e-6).pow(log_gamma.exp().to(f.device).view(-1, 1, 1, 1))
        if f.shape[1] == 3:
            out = rotate_hue(out, 2 * math.pi * turn.to(f.device))
        return out

    return _float_op(x, op)


def _float_op(x: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply `op` to x as floats in [0, 1]; uint8 input comes back as uint8."""
    out = op(to_float(x.clone()) if x.dtype == torch.uint8 else x.float()).clamp(0, 1)
    return out.mul(255).round().to(torch.uint8) if x.dtype == torch.uint8 else out.to(x.dtype)


FUNCTIONS: dict[str, Shift] = {"jigsaw": jigsaw, "rotate": rotate90, "cutpaste": cutpaste,
                               "scar": scar, "blend": blend, "colour": colour}


def shift(x: torch.Tensor, kinds: tuple[str, ...], generator: torch.Generator | None = None
          ) -> torch.Tensor:
    """A distribution-shifted copy of each image: a pseudo-anomaly.

    Each image gets one transformation drawn from `kinds` (a subset of SHIFTS).
    """
    unknown = set(kinds) - set(SHIFTS)
    if unknown or not kinds:
        raise ValueError(f"shift kinds {kinds}: expected a non-empty subset of {SHIFTS}")
    if len(kinds) == 1:
        return FUNCTIONS[kinds[0]](x, generator)
    choice = torch.randint(len(kinds), (len(x),), generator=generator).to(x.device)
    out = x.clone()
    for i, kind in enumerate(kinds):
        pick = (choice == i).nonzero().flatten()
        if len(pick):
            out[pick] = FUNCTIONS[kind](x[pick], generator)
    return out
