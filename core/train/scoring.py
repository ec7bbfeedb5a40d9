"""Scoring a set of images with a fitted model, in batches: what evaluation and the app use."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.model.anomem import AnoMem
from core.train.augment import to_float
from core.train.progress import Progress, ProgressFn


@dataclass
class ScoredSet:
    """Scores of every image of a set, in the order of the set."""

    image: np.ndarray  # (N,)
    per_scale: dict[str, np.ndarray]  # scale -> (N,)
    terms: dict[str, np.ndarray]  # "layer2/local", ... -> (N,) standardised term scores
    pixel_maps: np.ndarray | None  # (N, H, W) float16, or None when not asked for


@torch.no_grad()
def score_images(model: AnoMem, images: torch.Tensor, device: torch.device | str = "cpu",
                 batch_size: int | None = None, with_maps: bool = True,
                 progress: ProgressFn | None = None) -> ScoredSet:
    """Score uint8 images (N, C, H, W) in batches."""
    device = torch.device(device)
    model.eval().to(device)
    batch_size = batch_size or model.inference_batch()
    image, maps = [], []
    per_scale: dict[str, list] = {s: [] for s in model.scales}
    terms: dict[str, list] = {}
    for i in range(0, len(images), batch_size):
        out = model.score(to_float(images[i:i + batch_size].to(device)))
        image.append(out.image.cpu())
        for s, v in out.per_scale.items():
            per_scale[s].append(v.cpu())
        for k, v in out.terms.items():
            terms.setdefault(k, []).append(v.cpu())
        if with_maps:
            maps.append(_half(out.pixel_map).cpu())
        if progress:
            progress(Progress("evaluate", min(1.0, (i + batch_size) / len(images)),
                              "scoring"))
    return ScoredSet(
        image=torch.cat(image).numpy(),
        per_scale={s: torch.cat(v).numpy() for s, v in per_scale.items()},
        terms={k: torch.cat(v).numpy() for k, v in terms.items()},
        pixel_maps=torch.cat(maps).numpy() if with_maps else None,
    )


def _half(x: torch.Tensor) -> torch.Tensor:
    """float16 for storage, clamped to its range: a map far outside every normal image (a
    scale whose normal maps barely vary) saturates instead of becoming infinite."""
    limit = torch.finfo(torch.float16).max
    return x.clamp(-limit, limit).half()
