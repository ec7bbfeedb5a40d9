"""Stage 2: the anomaly distance detector on the multi-scale maps.

Two terms per scale, each a distance under a Gaussian fitted to normal training images:

- local: the deviation vector at every position (query minus memory read-out) is scored by its
  Mahalanobis distance. This is the per-position distance map that, upsampled, shows *where*
  an image departs from its memory of normality; the mean of its top-k positions is the local
  image score. The Gaussian is shared by all positions, or, for aligned images (every MVTec
  AD photo shows its object in the same place), fitted at each position: what is normal at a
  bottle's rim is not what is normal at its centre.
- layout: the query map average-pooled to a g x g grid and flattened, scored under a
  probabilistic-PCA Gaussian. It sees *what is where*: an object anomaly is often made of
  parts that are each normal-looking (the straight edges of a square occur on normal images
  too), and only their arrangement gives it away. On the built-in shapes this term beats
  the same term on the deviation map (`ModelConfig.layout_source` keeps both).

Each score is standardised on held-out normal images. A scale's score weighs its two terms by
`ModelConfig.local_weight`, and the image score averages the scales. The pixel map averages
the scales' standardised distance maps, or only those stage 2 kept for outlining pasted defects
best (`map_weights`, with `ModelConfig.map_weights`). The local term's default
weight is 0: on the built-in shapes its image-level score trails the layout term on every
anomaly kind, local defects included (benchmarks/README.md, "Which data each default was
chosen on"), while its map stays the best guide to where the anomaly is.

The Gaussians (core/model/gaussians.py) are fitted in closed form: Ledoit-Wolf shrinkage for
the local term, PPCA for the high-dimensional layouts. Image-level terms (core/model/terms.py)
follow the scales' terms as the last columns. With labelled anomalies, a logistic head on the
standardised scores and pooled deviations adds what the labels teach (core/train/stage2.py).

Everything fitted is a buffer: `.to()`, `state_dict()` and safetensors checkpoints just work.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.model.gaussians import PPCA, Gaussian, PositionalGaussians
from core.model.memory import MemoryRead

TERMS = ("local", "layout")  # per scale: top-k deviation distances, coarse-map distance
N_SCORES = len(TERMS)


class Scores(NamedTuple):
    image: torch.Tensor  # (B,) anomaly score; above `threshold` means anomalous
    per_scale: dict[str, torch.Tensor]  # (B,) standardised score of each scale
    pixel_map: torch.Tensor  # (B, H, W) at input resolution, standardised on normal data
    maps: dict[str, torch.Tensor]  # (B, h, w) standardised distance map of each scale
    terms: dict[str, torch.Tensor]  # "layer2/local", "layer2/layout", ...: (B,) standardised


class ScaleDetector(nn.Module):
    """One scale's two Gaussians, fitted on normal images, and the standardisation of its
    terms and distance map on held-out ones; all state is buffers."""

    def __init__(self, dim: int, topk_ratio: float, grid: int, rank: int,
                 positions: int = 0) -> None:
        super().__init__()
        self.topk_ratio = topk_ratio
        self.grid = grid
        # positions > 0: one local Gaussian per map position (ModelConfig.local_map)
        self.positional = positions > 0
        self.local = PositionalGaussians(positions, dim) if self.positional else Gaussian(dim)
        self.layout = PPCA(dim * grid * grid, rank)
        self.register_buffer("map_loc", torch.zeros(()))  # normal distance per position
        self.register_buffer("map_scale", torch.ones(()))
        self.register_buffer("score_loc", torch.zeros(N_SCORES))  # normal image scores
        self.register_buffer("score_scale", torch.ones(N_SCORES))

    def distance_map(self, deviation: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, H, W) Mahalanobis distance of each position."""
        if self.positional:
            return self.local.distance(deviation)
        return self.local.distance(deviation.permute(0, 2, 3, 1))  # (B, H, W, D) rows

    def pooled(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, D * g * g): a map on the coarse layout grid, flattened."""
        return F.adaptive_avg_pool2d(maps, self.grid).flatten(1)

    def raw_scores(self, layout_map: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """(B, 2): mean of the top-k distances of `dist`, and the layout's distance."""
        flat = dist.flatten(1)
        k = max(1, round(self.topk_ratio * int(flat.shape[1])))
        local = flat.topk(k, dim=1).values.mean(1)
        return torch.stack([local, self.layout.distance(self.pooled(layout_map))], dim=1)

    def fit(self, local: torch.Tensor, layouts: torch.Tensor) -> None:
        """Fit the Gaussians on normal images: `local`, deviation rows (M, D), or whole
        deviation maps (N, D, H, W) when positional; `layouts`, pooled maps (N, D * g * g)."""
        self.local.fit(local)
        self.layout.fit(layouts)

    @torch.no_grad()
    def calibrate(self, raw: torch.Tensor, distances: torch.Tensor) -> None:
        """Standardise on held-out normals: their raw scores (N, 2) and map distances (any
        shape)."""
        self.score_loc.copy_(raw.mean(0))
        self.score_scale.copy_(raw.std(0).clamp_min(1e-6))
        self.map_loc.copy_(distances.mean())
        self.map_scale.copy_(distances.std().clamp_min(1e-6))

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.score_loc) / self.score_scale


class AnomalyDetector(nn.Module):
    """Per-scale detectors, their combination, an optional classifier, the thresholds.

    The image-level terms (`image_terms`, their names in the order of `AnoMem.terms`) follow
    the per-scale ones as the last columns of `features`; the model passes them standardised.
    Each weighs like a scale.
    """

    def __init__(self, dim: int, topk_ratio: float, grids: dict[str, int], rank: int,
                 local_weight: float = 0.0, layout_source: str = "query",
                 positions: dict[str, int] | None = None,
                 image_terms: tuple[str, ...] | list[str] = (),
                 map_weights: bool = False) -> None:
        super().__init__()
        self.scales = tuple(grids)
        self.layout_source = layout_source
        self.local_weight = local_weight
        self.image_terms = list(image_terms)
        positions = positions or {}
        self.per_scale = nn.ModuleDict({
            s: ScaleDetector(dim, topk_ratio, g, rank, positions.get(s, 0))
            for s, g in grids.items()})
        self.register_buffer("weights", self.fixed_weights())
        # each scale's share of the pixel map, when stage 2 chooses it (else None: equal)
        self.register_buffer("map_weights", torch.full((len(self.scales),),
                                                       1 / len(self.scales))
                             if map_weights else None)
        # Logistic head over [standardised scores, pooled deviations]; zero = one-class.
        n = self.n_terms
        self.register_buffer("clf_weight", torch.zeros(n + dim * len(self.scales)))
        self.register_buffer("clf_bias", torch.zeros(()))
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("pixel_threshold", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def term_names(self) -> list[str]:
        """Names of the columns of `features`: "layer2/local", ..., then the image-level terms."""
        return [f"{s}/{t}" for s in self.scales for t in TERMS] + self.image_terms

    @property
    def n_terms(self) -> int:
        return N_SCORES * len(self.scales) + len(self.image_terms)

    @property
    def units(self) -> int:
        """What the fixed weights share equally: the scales and each image-level term."""
        return len(self.scales) + len(self.image_terms)

    def fixed_weights(self) -> torch.Tensor:
        """`local_weight` within a scale, then every scale and image-level term equally."""
        term = torch.tensor([self.local_weight, 1.0 - self.local_weight])
        w = torch.cat([term.repeat(len(self.scales)), torch.ones(len(self.image_terms))])
        return w / self.units

    def features(self, reads: dict[str, MemoryRead], extra: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Standardised term scores (B, n_terms) and raw distance maps {scale: (B, h, w)}.

        `extra`: the standardised image-level terms (B, E) of `AnoMem.read`, needed when the
        detector has any.
        """
        z, maps = [], {}
        for s in self.scales:
            det = self.per_scale[s]
            dist = det.distance_map(reads[s].deviation)
            z.append(det.standardise(det.raw_scores(self.layout_input(reads[s]), dist)))
            maps[s] = dist
        if self.image_terms:
            if extra is None or extra.shape[1:] != (len(self.image_terms),):
                raise ValueError(f"this detector has the terms {self.image_terms}: pass their "
                                 "standardised values (B, E) from AnoMem.read")
            z.append(extra)
        return torch.cat(z, dim=1), maps

    def layout_input(self, read: MemoryRead) -> torch.Tensor:
        """The map the layout term reads: the query map (default) or the deviation map."""
        return read.query if self.layout_source == "query" else read.deviation

    def classifier_input(self, z: torch.Tensor, reads: dict[str, MemoryRead]) -> torch.Tensor:
        pooled = [F.normalize(reads[s].deviation.mean(dim=(2, 3)), dim=1) for s in self.scales]
        return torch.cat([z, *pooled], dim=1)

    def forward(self, reads: dict[str, MemoryRead], out_size: tuple[int, int],
                extra: torch.Tensor | None = None) -> Scores:
        z, dist_maps = self.features(reads, extra)
        image = z @ self.weights
        # Labels may only add evidence: the head raises what resembles a labelled anomaly and
        # never lowers an image the one-class score finds strange. An untrained head (all zero)
        # adds nothing; a mask rather than an `if`, so an exported graph keeps both cases.
        labelled = F.softplus(self.classifier_input(z, reads) @ self.clf_weight + self.clf_bias)
        image = image + torch.where(self.clf_weight.ne(0).any(), labelled,
                                    torch.zeros_like(labelled))
        per_scale = {s: z[:, N_SCORES * i:N_SCORES * (i + 1)] @ self.weights[
                         N_SCORES * i:N_SCORES * (i + 1)] * self.units
                     for i, s in enumerate(self.scales)}
        maps = {s: self.standardised_map(s, dist_maps[s]) for s in self.scales}
        terms = {name: z[:, j] for j, name in enumerate(self.term_names)}
        return Scores(image=image, per_scale=per_scale, pixel_map=self.pixel_map(maps, out_size),
                      maps=maps, terms=terms)

    def standardised_map(self, scale: str, dist: torch.Tensor) -> torch.Tensor:
        """A scale's raw distance map (B, h, w), standardised on normal images."""
        det = self.per_scale[scale]
        return (dist - det.map_loc) / det.map_scale

    def upsampled_maps(self, maps: dict[str, torch.Tensor], out_size: tuple[int, int]
                       ) -> torch.Tensor:
        """Maps {scale: (B, h, w)} upsampled to (S, B, H, W), in the order of `scales`."""
        return torch.stack([F.interpolate(maps[s][:, None], size=out_size, mode="bilinear",
                                          align_corners=False)[:, 0] for s in self.scales])

    def pixel_map(self, maps: dict[str, torch.Tensor], out_size: tuple[int, int]
                  ) -> torch.Tensor:
        """Standardised maps {scale: (B, h, w)} upsampled to (B, H, W) and weighed by
        `map_weights` where the detector has them (stage 2 chose them), else equally."""
        up = self.upsampled_maps(maps, out_size)
        if self.map_weights is None:
            return up.mean(0)
        return torch.einsum("s,sbhw->bhw", self.map_weights, up)
