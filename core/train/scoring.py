"""Scoring a set of images with a fitted model, in batches: what evaluation and the app use."""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    # What the Teach page needs to foresee a lesson's effect (core/model/lessons.py): the image
    # scores before any lesson the model has, and each image's look-alike descriptor
    untaught: np.ndarray | None = None  # (N,)
    descriptors: np.ndarray | None = None  # (N, dim)


@torch.no_grad()
def taught(scored: ScoredSet, model: AnoMem) -> ScoredSet:
    """A scored set (with its scores before any lesson and its descriptors) with `model`'s
    lessons applied to its image scores: what `model` would score, without scoring again."""
    assert model.lessons is not None and scored.untaught is not None \
        and scored.descriptors is not None
    image = model.lessons(torch.from_numpy(scored.untaught),
                          torch.from_numpy(scored.descriptors)).numpy()
    return replace(scored, image=image)


@torch.no_grad()
def score_images(model: AnoMem, images: torch.Tensor, device: torch.device | str = "cpu",
                 batch_size: int | None = None, with_maps: bool = True,
                 progress: ProgressFn | None = None) -> ScoredSet:
    """Score uint8 images (N, C, H, W) in batches."""
    device = torch.device(device)
    model.eval().to(device)
    batch_size = batch_size or model.inference_batch()
    image, maps, untaught, descriptors = [], [], [], []
    per_scale: dict[str, list] = {s: [] for s in model.scales}
    terms: dict[str, list] = {}
    for i in range(0, len(images), batch_size):
        out, described = model.score_and_describe(to_float(images[i:i + batch_size].to(device)))
        untaught.append(out.image.cpu())
        descriptors.append(described.cpu())
        if model.lessons is not None:
            out = out._replace(image=model.lessons(out.image, described))
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
        untaught=torch.cat(untaught).numpy(),
        descriptors=torch.cat(descriptors).numpy(),
    )


def _half(x: torch.Tensor) -> torch.Tensor:
    """float16 for storage, clamped to its range: a map far outside every normal image (a
    scale whose normal maps barely vary) saturates instead of becoming infinite."""
    limit = torch.finfo(torch.float16).max
    return x.clamp(-limit, limit).half()
