"""Prototype galleries: which training patches read each prototype most strongly.

A position (row, col) of a scale with stride s is shown as the square of side
`clip(3 * s, 8, image side)` centred on ((row + 0.5) * s, (col + 0.5) * s), shifted to stay
inside the image so every crop of a scale has the same size. Three strides is about the span a
position's features mostly look at (its theoretical receptive field is larger); eight pixels
keeps the finest scale's crops recognisable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from core.explore.images import _batch, to_rgb
from core.model.anomem import AnoMem

DUPLICATE_COSINE = 0.95  # prototypes closer than this (cosine) are reported as near-duplicates
RF_STRIDES = 3  # receptive-field crop side, in strides of the scale
MIN_CROP = 8  # pixels


@dataclass(frozen=True)
class PatchHit:
    """One map position that reads a prototype: image index, map row and column, weight."""

    image: int
    row: int
    col: int
    weight: float


@dataclass
class PrototypePatches:
    """For each prototype of one scale, the positions that read it most strongly."""

    scale: str
    stride: float  # image pixels per map position (the encoder may see the image resized)
    map_size: tuple[int, int]  # (h, w) of the scale's maps
    hits: list[list[PatchHit]]  # per prototype, strongest first
    usage: np.ndarray  # (N,) positions whose strongest prototype it is
    duplicates: list[tuple[int, int, float]] = field(default_factory=list)  # (i, j, cosine)

    @property
    def size(self) -> int:
        return len(self.hits)

    @property
    def dead(self) -> list[int]:
        """Prototypes that are never any position's strongest match."""
        return np.flatnonzero(self.usage == 0).tolist()

    def duplicate_of(self, index: int) -> list[int]:
        """Prototypes reported as near-duplicates of `index`."""
        return sorted({j if i == index else i for i, j, _ in self.duplicates if index in (i, j)})

    def by_usage(self) -> list[int]:
        """Prototype indices, most used first (ties by index)."""
        return sorted(range(self.size), key=lambda i: (-int(self.usage[i]), i))

    def crop(self, images: torch.Tensor, hit: PatchHit) -> np.ndarray:
        return crop(images, hit, self.stride)


def describe_scale(model: AnoMem, scale: str) -> str:
    """What a scale is, in words: the encoder stage, its stride, and what a map position
    covers of the image (the encoder may see the image resized)."""
    cfg = model.cfg
    net_stride = model.backbone.stride[scale]
    h, w = model.map_size(scale)
    image, seen = "{} x {}".format(*cfg.shape), "{} x {}".format(*cfg.encoder_shape)
    where = (f"the encoder sees {image} px images at {seen} px" if seen != image
             else f"{image} px images")
    return (f"{scale}: {cfg.backbone} stage of stride {net_stride}, a {h} x {w} map; "
            f"one position per {model.stride(scale):g} image pixels ({where})")


def crop_window(row: int, col: int, stride: float, height: int, width: int
                ) -> tuple[int, int, int]:
    """(top, left, side) of the receptive-field crop of a map position (see module doc)."""
    side = int(min(max(RF_STRIDES * stride, MIN_CROP), height, width))

    def start(index: int, extent: int) -> int:
        centre = (index + 0.5) * stride
        return int(min(max(round(centre - side / 2), 0), extent - side))

    return start(row, height), start(col, width), side


def crop(images: torch.Tensor, hit: PatchHit, stride: float) -> np.ndarray:
    """Receptive-field crop of `hit` in images (N, C, H, W) as uint8 (side, side, 3)."""
    image = images[hit.image]
    top, left, side = crop_window(hit.row, hit.col, stride, image.shape[-2], image.shape[-1])
    return to_rgb(image[:, top:top + side, left:left + side])


def patch_strip(images: torch.Tensor, hits: list[PatchHit], stride: float, tile: int = 48,
                gap: int = 2) -> np.ndarray:
    """The crops of `hits` side by side, each upscaled to `tile` pixels: one image per prototype."""
    if not hits:
        return np.full((tile, tile, 3), 40, dtype=np.uint8)
    tiles = []
    for hit in hits:
        c = torch.from_numpy(crop(images, hit, stride)).permute(2, 0, 1)[None].float()
        tiles.append(F.interpolate(c, size=(tile, tile), mode="nearest")[0].permute(1, 2, 0))
    out = np.full((tile, len(tiles) * (tile + gap) - gap, 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        out[:, i * (tile + gap):i * (tile + gap) + tile] = t.byte().numpy()
    return out


def near_duplicates(prototypes: torch.Tensor, threshold: float = DUPLICATE_COSINE
                    ) -> list[tuple[int, int, float]]:
    """Pairs (i < j) of prototypes (N, D) whose cosine similarity exceeds `threshold`."""
    p = F.normalize(prototypes.detach().float(), dim=1)
    cos = (p @ p.T).cpu().numpy()
    i, j = np.nonzero(np.triu(cos > threshold, k=1))
    return [(int(a), int(b), float(cos[a, b])) for a, b in zip(i, j, strict=True)]


@torch.no_grad()
def top_patches(model: AnoMem, images: torch.Tensor, scale: str, per_prototype: int = 5,
                batch_size: int | None = None, one_per_image: bool = True
                ) -> PrototypePatches:
    """For each prototype of `scale`, the `per_prototype` positions with the highest attention.

    images: uint8 (N, C, H, W). With `one_per_image` each image contributes at most its best
    position to a prototype, so a gallery shows k different images rather than k neighbouring
    positions of one. Usage counts every position once, for its strongest prototype.
    """
    if scale not in model.scales:
        raise ValueError(f"scale {scale!r}: expected one of {', '.join(model.scales)}")
    model.eval()
    n = model.memories[scale].size
    best_w = torch.empty(n, 0)
    best_idx = torch.empty(n, 0, dtype=torch.long)
    usage = torch.zeros(n, dtype=torch.long)
    h = w = 0
    batch_size = batch_size or model.inference_batch()
    for start in range(0, len(images), batch_size):
        att = model(_batch(images[start:start + batch_size]))[scale].attention.cpu()  # (b,N,h,w)
        b, _, h, w = att.shape
        usage += torch.bincount(att.argmax(1).flatten(), minlength=n)
        flat = att.permute(1, 0, 2, 3).reshape(n, b, h * w)  # (N, b, hw)
        if one_per_image:
            weight, pos = flat.max(dim=2)  # (N, b)
            index = (start + torch.arange(b))[None] * (h * w) + pos  # global flat position
        else:
            weight = flat.reshape(n, b * h * w)
            index = (start * h * w + torch.arange(b * h * w))[None].expand(n, -1)
        cand_w = torch.cat([best_w, weight], dim=1)
        cand_i = torch.cat([best_idx, index], dim=1)
        top = cand_w.topk(min(per_prototype, cand_w.shape[1]), dim=1)
        best_w, best_idx = top.values, cand_i.gather(1, top.indices)
    hits = [
        [PatchHit(int(i) // (h * w), int(i) % (h * w) // w, int(i) % w, float(v))
         for v, i in zip(best_w[p].tolist(), best_idx[p].tolist(), strict=True)]
        for p in range(n)
    ]
    return PrototypePatches(
        scale=scale,
        stride=model.stride(scale),
        map_size=(h, w),
        hits=hits,
        usage=usage.numpy(),
        duplicates=near_duplicates(model.memories[scale].normalized_prototypes()),
    )
