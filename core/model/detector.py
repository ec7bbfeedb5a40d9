"""Stage 2: the anomaly distance detector on the deviation maps.

Per scale, the deviation vector at every position (query minus memory read-out) is scored by
its Mahalanobis distance under a Gaussian fitted to normal deviations: this is the per-position
distance map. Two image-level numbers come out of each scale: the mean of the top-k positions
(local anomalies light up a few positions) and the Mahalanobis distance of the spatially pooled
deviation under a second Gaussian (object and style anomalies shift the whole map). Each is
standardised on held-out normal images, and a weighted sum across scales is the image score.

Why a Gaussian: its negative log-likelihood is the training objective of the detector, fitted in
closed form (Ledoit-Wolf shrinkage). Unlike a Deep SVDD distance, whose minimum is reached by a
network that maps everything to the centre, the log-determinant term makes a constant detector
infinitely costly, so it cannot collapse. With labelled anomalies, a logistic head on the
standardised scale scores and pooled deviations adds what the labels teach (see the trainer).

Everything fitted is a buffer: `.to()`, `state_dict()` and safetensors checkpoints just work.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_SCORES = 2  # per scale: local (top-k positions) and global (pooled deviation)


class Scores(NamedTuple):
    image: torch.Tensor  # (B,) anomaly score; above `threshold` means anomalous
    per_scale: dict[str, torch.Tensor]  # (B,) standardised score of each scale
    pixel_map: torch.Tensor  # (B, H, W) at input resolution, standardised on normal data
    maps: dict[str, torch.Tensor]  # (B, h, w) standardised distance map of each scale


def fit_gaussian(x: torch.Tensor, max_rows: int = 50_000, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and shrunk precision (D, D) of the rows of x (M, D), fitted in float64."""
    from sklearn.covariance import ledoit_wolf

    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"fit_gaussian needs at least two rows of shape (M, D), got {tuple(x.shape)}")
    rows = x.detach().double().cpu()
    if len(rows) > max_rows:
        g = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(len(rows), generator=g)[:max_rows]]
    mean = rows.mean(0)
    cov, _ = ledoit_wolf(rows.numpy(), assume_centered=False)
    cov = cov + np.eye(len(cov)) * 1e-6 * max(float(np.trace(cov)) / len(cov), 1e-12)
    precision = torch.from_numpy(np.linalg.inv(cov))
    return mean.float(), precision.float()


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Distance of each row of x (..., D) to the Gaussian; returns (...)."""
    d = x - mean
    return ((d @ precision) * d).sum(-1).clamp_min(0).sqrt()


class ScaleDetector(nn.Module):
    """Fitted distances for one scale; all state is buffers."""

    def __init__(self, dim: int, topk_ratio: float) -> None:
        super().__init__()
        self.topk_ratio = topk_ratio
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("precision", torch.eye(dim))
        self.register_buffer("global_mean", torch.zeros(dim))
        self.register_buffer("global_precision", torch.eye(dim))
        self.register_buffer("map_loc", torch.zeros(()))  # normal distance per position
        self.register_buffer("map_scale", torch.ones(()))
        self.register_buffer("score_loc", torch.zeros(N_SCORES))  # normal image scores
        self.register_buffer("score_scale", torch.ones(N_SCORES))

    def distance_map(self, deviation: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, H, W) Mahalanobis distance of each position."""
        return mahalanobis(deviation.permute(0, 2, 3, 1), self.mean, self.precision)

    def raw_scores(self, deviation: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """(B, 2): mean of the top-k positions, and the pooled deviation's distance."""
        flat = dist.flatten(1)
        k = max(1, int(round(self.topk_ratio * flat.shape[1])))
        local = flat.topk(k, dim=1).values.mean(1)
        pooled = deviation.mean(dim=(2, 3))
        glob = mahalanobis(pooled, self.global_mean, self.global_precision)
        return torch.stack([local, glob], dim=1)

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.score_loc) / self.score_scale


class AnomalyDetector(nn.Module):
    """Per-scale detectors, their learned combination, an optional classifier, a threshold."""

    def __init__(self, scales: tuple[str, ...], dim: int, topk_ratio: float) -> None:
        super().__init__()
        self.scales = scales
        self.per_scale = nn.ModuleDict({s: ScaleDetector(dim, topk_ratio) for s in scales})
        n = N_SCORES * len(scales)
        self.register_buffer("weights", torch.full((n,), 1.0 / n))
        # Logistic head over [standardised scores, pooled deviations]; zero = one-class.
        self.register_buffer("clf_weight", torch.zeros(n + dim * len(scales)))
        self.register_buffer("clf_bias", torch.zeros(()))
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("pixel_threshold", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def features(self, deviations: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Standardised scale scores (B, 2S) and raw distance maps {scale: (B, h, w)}."""
        z, maps = [], {}
        for s in self.scales:
            det = self.per_scale[s]
            dist = det.distance_map(deviations[s])
            z.append(det.standardise(det.raw_scores(deviations[s], dist)))
            maps[s] = dist
        return torch.cat(z, dim=1), maps

    def classifier_input(self, z: torch.Tensor, deviations: dict[str, torch.Tensor]
                         ) -> torch.Tensor:
        pooled = [F.normalize(deviations[s].mean(dim=(2, 3)), dim=1) for s in self.scales]
        return torch.cat([z, *pooled], dim=1)

    def forward(self, deviations: dict[str, torch.Tensor], out_size: tuple[int, int]) -> Scores:
        z, dist_maps = self.features(deviations)
        image = z @ self.weights
        if bool(self.clf_weight.any()):
            image = image + self.classifier_input(z, deviations) @ self.clf_weight + self.clf_bias
        per_scale = {s: z[:, N_SCORES * i:N_SCORES * (i + 1)].mean(1)
                     for i, s in enumerate(self.scales)}
        maps = {}
        for s in self.scales:
            det = self.per_scale[s]
            maps[s] = (dist_maps[s] - det.map_loc) / det.map_scale
        stacked = torch.stack([
            F.interpolate(m[:, None], size=out_size, mode="bilinear", align_corners=False)[:, 0]
            for m in maps.values()
        ])
        return Scores(image=image, per_scale=per_scale, pixel_map=stacked.mean(0), maps=maps)
