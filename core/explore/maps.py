"""Deviation maps and their overlays, and the report of one image.

One fixed colour scale for every image and every scale, from 0 (a position as normal as an
average normal one) to twice the detector's pixel threshold, so the threshold sits in the
middle of the colour bar and a colour means the same thing on every image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from core.explore.images import _batch, to_rgb
from core.model.anomem import AnoMem
from core.train.augment import to_float

DEFAULT_CMAP = "Inferno"


def combined_scales(model: AnoMem) -> list[str]:
    """The scales the combined map weighs: all of them, unless stage 2 kept a subset (the one
    that best outlined defects pasted into held-out normals)."""
    weights = model.detector.map_weights
    if weights is None:
        return list(model.scales)
    return [s for s, w in zip(model.scales, weights.tolist(), strict=True) if w > 0]


def heat_range(model: AnoMem) -> tuple[float, float]:
    """(vmin, vmax) of the shared colour scale: 0 to twice the pixel threshold."""
    thr = float(model.detector.pixel_threshold)
    return 0.0, 2 * thr if thr > 0 else 3.0


@functools.lru_cache(maxsize=8)
def colour_table(cmap: str = DEFAULT_CMAP, n: int = 256) -> np.ndarray:
    """(n, 3) uint8 colours of a plotly colour scale, so the app's colour bars match."""
    import plotly.colors as pc

    colours = pc.sample_colorscale(cmap, list(np.linspace(0, 1, n)), colortype="tuple")
    table = np.rint(np.array(colours, dtype=np.float64) * 255).astype(np.uint8)
    table.flags.writeable = False  # shared by every caller through the cache
    return table


def colourise(heat: np.ndarray, vmin: float, vmax: float, cmap: str = DEFAULT_CMAP
              ) -> np.ndarray:
    """(H, W) values -> (H, W, 3) colours, values clipped to [vmin, vmax]."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=vmin)
    t = np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    table = colour_table(cmap)
    return table[np.rint(t * (len(table) - 1)).astype(np.int64)]


def overlay(image: np.ndarray | torch.Tensor, heat: np.ndarray, vmin: float, vmax: float,
            alpha: float = 0.5, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Blend a heat map over an image: uint8 (H, W, 3); heat of any size is resized bilinearly.

    The colour of a value depends only on vmin and vmax, never on the image's own range.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha}: expected 0..1")
    rgb = to_rgb(image)
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != rgb.shape[:2]:
        t = torch.from_numpy(heat)[None, None]
        heat = F.interpolate(t, size=rgb.shape[:2], mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    colours = colourise(heat, vmin, vmax, cmap).astype(np.float32)
    out = (1 - alpha) * rgb.astype(np.float32) + alpha * colours
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def colour_bar(vmin: float, vmax: float, width: int = 256, height: int = 12,
               cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """A horizontal legend strip of the colour scale."""
    row = colourise(np.linspace(vmin, vmax, width)[None], vmin, vmax, cmap)
    return np.repeat(row, height, axis=0)


@torch.no_grad()
def deviation_maps(model: AnoMem, image: torch.Tensor) -> dict[str, np.ndarray]:
    """{scale: (h, w) standardised distance map, "combined": (H, W) pixel map} of one image."""
    model.eval()
    out = model.score(_batch(image))
    maps = {s: m[0].cpu().numpy() for s, m in out.maps.items()}
    maps["combined"] = out.pixel_map[0].cpu().numpy()
    return maps


class Match(NamedTuple):
    prototype: int
    weight: float  # attention weight of that prototype at the position


@torch.no_grad()
def match_position(model: AnoMem, image: torch.Tensor, scale: str, row: int, col: int
                   ) -> Match:
    """The prototype a position of `scale` reads most strongly, and its attention weight."""
    model.eval()
    att = model(_batch(image))[scale].attention[0]  # (N, h, w)
    h, w = att.shape[1:]
    if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"position ({row}, {col}) is outside the {h}x{w} map of {scale}")
    weights = att[:, row, col]
    best = int(weights.argmax())
    return Match(best, float(weights[best]))


class Nearest(NamedTuple):
    row: int
    col: int  # the scale's most deviant position
    prototypes: list[int]  # nearest prototypes to its query, closest first
    cosine: list[float]


@dataclass
class ImageReport:
    """Everything the app shows for one image."""

    score: float
    threshold: float
    per_scale: dict[str, float]
    maps: dict[str, np.ndarray]  # as `deviation_maps`
    nearest: dict[str, Nearest]
    untaught: float | None = None  # the score before a taught run's lessons moved it

    @property
    def moved_by_lessons(self) -> float:
        """How far the run's lessons moved the score (0 for a run never taught)."""
        return 0.0 if self.untaught is None else self.score - self.untaught

    @property
    def anomalous(self) -> bool:
        return self.score > self.threshold


@torch.no_grad()
def inspect_image(model: AnoMem, image: torch.Tensor, k: int = 3) -> ImageReport:
    """Score, maps, and per scale the prototypes nearest to the most deviant position."""
    model.eval()
    x = _batch(image)
    if model.lessons is None:
        scores, untaught = model.score(x), None
    else:
        scores, descriptors = model.score_and_describe(x)
        untaught = float(scores.image[0])
        scores = scores._replace(image=model.lessons(scores.image, descriptors))
    reads = model(x)
    maps = {s: m[0].cpu().numpy() for s, m in scores.maps.items()}
    nearest = {}
    for s in model.scales:
        row, col = np.unravel_index(int(np.argmax(maps[s])), maps[s].shape)
        q = reads[s].query[0, :, row, col]
        cos = model.memories[s].normalized_prototypes() @ q
        top = cos.topk(min(k, len(cos)))
        nearest[s] = Nearest(int(row), int(col), top.indices.tolist(),
                             [float(v) for v in top.values])
    maps["combined"] = scores.pixel_map[0].cpu().numpy()
    return ImageReport(
        score=float(scores.image[0]),
        threshold=float(model.detector.threshold),
        per_scale={s: float(v[0]) for s, v in scores.per_scale.items()},
        maps=maps,
        nearest=nearest,
        untaught=untaught,
    )


def combined_maps(model: AnoMem, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    """(N, H, W) combined deviation maps of uint8 images: what the overlays show."""
    model.eval()
    maps = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            maps.append(model.score(to_float(images[i:i + batch])).pixel_map.cpu().numpy())
    return np.concatenate(maps) if maps else np.zeros((0, *images.shape[-2:]))
