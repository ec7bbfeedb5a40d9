"""Ablations of a trained AnoMem model, scored without retraining it.

Each removes one part of the method from the same trained encoder, so the difference to the
full model is that part's contribution (one scale only comes from the model's own per-scale
scores, see `core.pipeline.evaluate`):

- no memory: the encoder's pooled, unit-norm queries scored by cosine kNN to the training
  normals, so neither the prototypes nor the detector take part;
- no stage 2: the raw deviation norm |q - r| averaged over positions and scales, so the memory
  takes part but the fitted detector does not.
"""

from __future__ import annotations

import numpy as np
import torch

from core.model.anomem import AnoMem
from core.train.augment import to_float


@torch.no_grad()
def pooled_queries(model: AnoMem, images: torch.Tensor, device: torch.device | str = "cpu",
                   batch: int = 256) -> torch.Tensor:
    """(N, S*D): each scale's pooled unit-norm query, concatenated, unit norm overall."""
    model.eval().to(device)
    parts = []
    for i in range(0, len(images), batch):
        emb = model.embed(to_float(images[i:i + batch].to(device)))
        parts.append(torch.cat([emb[s] for s in model.scales], 1).cpu())
    return torch.nn.functional.normalize(torch.cat(parts), dim=1)


def encoder_knn_scores(model: AnoMem, normals: torch.Tensor, images: torch.Tensor,
                       k: int = 2, device: torch.device | str = "cpu") -> np.ndarray:
    """Mean cosine distance of each image's pooled queries to its k nearest training normals."""
    bank = pooled_queries(model, normals, device)
    test = pooled_queries(model, images, device)
    k = min(k, len(bank))
    out = []
    for i in range(0, len(test), 1024):
        sims = test[i:i + 1024] @ bank.T
        out.append(1 - sims.topk(k, dim=1).values.mean(1))
    return torch.cat(out).double().numpy()


@torch.no_grad()
def deviation_norm_scores(model: AnoMem, images: torch.Tensor,
                          device: torch.device | str = "cpu", batch: int = 256) -> np.ndarray:
    """Mean over scales of the mean |q - r| over positions: the memory with no detector."""
    model.eval().to(device)
    out = []
    for i in range(0, len(images), batch):
        reads = model(to_float(images[i:i + batch].to(device)))
        per_scale = [r.deviation.norm(dim=1).mean(dim=(1, 2)) for r in reads.values()]
        out.append(torch.stack(per_scale).mean(0).cpu())
    return torch.cat(out).double().numpy()
