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
  too), and only their arrangement gives it away. Measured on the built-in shapes, this term
  on the query map beats the same term on the deviation map (see the README's ablation).

Each score is standardised on held-out normal images. A scale's score weighs its two terms by
`ModelConfig.local_weight`, and the image score averages the scales. The pixel map averages
the scales' standardised distance maps, or only those stage 2 kept for outlining pasted defects
best (`map_weights`, with `ModelConfig.map_weights`). The local term's default
weight is 0: on the built-in shapes its image-level score trails the layout term on every
anomaly kind, local defects included (see the README), while its map stays the best guide to
where the anomaly is.

Why Gaussians: their negative log-likelihood is the detector's training objective, fitted in
closed form (Ledoit-Wolf shrinkage; PPCA for the high-dimensional layouts). Unlike a Deep SVDD
distance, whose minimum is reached by a network that maps everything to one centre, the
log-determinant term makes a constant detector infinitely costly: it cannot collapse. With
labelled anomalies, a logistic head on the standardised scores and pooled deviations adds what
the labels teach (see the trainer).

Everything fitted is a buffer: `.to()`, `state_dict()` and safetensors checkpoints just work.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.model.memory import MemoryRead

TERMS = ("local", "layout")  # per scale: top-k deviation distances, coarse-map distance
N_SCORES = len(TERMS)
PIXEL_TERM = "pixels/knn"  # the pixel scale's terms (core/model/pixels.py), when present
PIXEL_LAYOUT_TERM = "pixels/layout"
ROTATION_TERM = "rotation/loss"  # the rotation head's loss over an image's rotations, when present
# The least variance a positional Gaussian allows in any direction, relative to the mean
# variance over all positions (see `fit_positional_gaussians`). Chosen on the defects stage 2
# pastes into held-out normals (benchmarks/README.md): of 0, 1e-3 ... 100, the smallest whose
# mean pseudo-defect pixel AUROC on MVTec AD bottle and KolektorSDD is within 0.005 of the best
POSITIONAL_FLOOR = 1.0


class Scores(NamedTuple):
    image: torch.Tensor  # (B,) anomaly score; above `threshold` means anomalous
    per_scale: dict[str, torch.Tensor]  # (B,) standardised score of each scale
    pixel_map: torch.Tensor  # (B, H, W) at input resolution, standardised on normal data
    maps: dict[str, torch.Tensor]  # (B, h, w) standardised distance map of each scale
    terms: dict[str, torch.Tensor]  # "layer2/local", "layer2/layout", ...: (B,) standardised


def fit_gaussian(x: torch.Tensor, max_rows: int = 50_000, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and shrunk precision (D, D) of the rows of x (M, D), fitted in float64."""
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(
            f"fit_gaussian needs at least two rows of shape (M, D), got {tuple(x.shape)}"
        )
    rows = x.detach().double().cpu()
    if len(rows) > max_rows:
        g = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(len(rows), generator=g)[:max_rows]]
    mean, precision = _ledoit_wolf(rows[None])
    return mean[0].float(), precision[0].float()


def fit_positional_gaussians(x: torch.Tensor, chunk: int = 64
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gaussian per position of maps x (N, D, H, W): mean (H*W, D), precision (H*W, D, D).

    The same estimator as `fit_gaussian`, batched over positions, so the shrinkage comes from
    the training maps alone even with fewer images than dimensions. Every covariance gets a
    floor of POSITIONAL_FLOOR times the mean variance over all positions: where the training
    images barely vary (a plain background), the Gaussian would otherwise be so narrow that
    float rounding alone, magnified by its precision, lit up the map (an exported model and
    PyTorch disagreed there by hundreds of standard deviations).
    """
    if x.ndim != 4 or len(x) < 2:
        raise ValueError(f"expected at least two maps (N, D, H, W), got {tuple(x.shape)}")
    n, dim, h, w = x.shape
    rows = x.detach().double().cpu().permute(2, 3, 0, 1).reshape(h * w, n, dim)
    floor = POSITIONAL_FLOOR * float(rows.var(1, correction=0).mean())
    fitted = [_ledoit_wolf(part, floor) for part in rows.split(chunk)]
    return (torch.cat([m for m, _ in fitted]).float(),
            torch.cat([p for _, p in fitted]).float())


def _ledoit_wolf(rows: torch.Tensor, floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Means (P, D) and precisions (P, D, D) of P sets of rows (P, N, D), in float64.

    Each covariance is shrunk towards a scaled identity by the Ledoit-Wolf formula (as
    scikit-learn's `ledoit_wolf`), plus a 1e-6 relative ridge so it always inverts, plus
    `floor` (an absolute variance) on its diagonal. Written
    here because it is batched over the P sets (one per map position): scikit-learn fits one.
    """
    n, dim = rows.shape[1:]
    eye = torch.eye(dim, dtype=torch.float64)
    mean = rows.mean(1, keepdim=True)
    xc = rows - mean
    cov = xc.transpose(1, 2) @ xc / n  # (P, D, D), the maximum-likelihood estimate
    mu = cov.diagonal(dim1=1, dim2=2).mean(1)  # (P,)
    sq = xc.pow(2)
    beta = ((sq.transpose(1, 2) @ sq).sum((1, 2)) / n - cov.pow(2).sum((1, 2))) / (n * dim)
    delta = (cov - mu[:, None, None] * eye).pow(2).sum((1, 2)) / dim
    shrink = torch.where(delta > 0, torch.minimum(beta, delta) / delta.clamp_min(1e-300),
                         torch.zeros_like(delta))
    shrunk = (1 - shrink)[:, None, None] * cov + (shrink * mu)[:, None, None] * eye
    shrunk = shrunk + eye * (1e-6 * mu.clamp_min(1e-12) + floor)[:, None, None]
    return mean[:, 0], torch.linalg.inv(shrunk)


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Distance of each row of x (..., D) to the Gaussian; returns (...)."""
    d = x - mean
    return ((d @ precision) * d).sum(-1).clamp_min(0).sqrt()


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N, M) between the rows of a (N, D) and b (M, D). Written
    out rather than `torch.cdist`, which the ONNX exporter cannot translate. Squared: the root
    of a distance near zero (an image and its own key) would magnify float rounding."""
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.T).clamp_min(0)


def fit_ppca(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, ...]:
    """Probabilistic PCA (Tipping & Bishop 1999) of the rows of x (M, L).

    Returns mean (L,), basis (L, rank), variances (rank,) and the isotropic noise variance of
    the remaining directions. With fewer rows than `rank`, unused columns are zero (they then
    add nothing to the distance). Written here because the distance needs the noise term kept
    apart from the basis, with a floor, and as buffers: scikit-learn's PCA returns neither.
    """
    if x.ndim != 2 or len(x) < 3:
        raise ValueError(
            f"fit_ppca needs at least three rows of shape (M, L), got {tuple(x.shape)}"
        )
    x = x.detach().float().cpu()
    n, dim = x.shape
    mean = x.mean(0)
    xc = x - mean
    vh, var = _principal_directions(xc)
    var = var / (n - 1)
    r = min(rank, len(var) - 1, dim - 1)
    total = var.sum()
    noise = ((total - var[:r].sum()) / (dim - r)).clamp_min(1e-8 * float(total) / dim + 1e-12)
    basis = torch.zeros(dim, rank)
    basis[:, :r] = vh[:r].T
    variances = torch.ones(rank)
    variances[:r] = var[:r].clamp_min(noise)
    return mean, basis, variances, noise


def _principal_directions(xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal directions (K, L) and their sums of squares (K,), largest first, of centred
    rows xc (M, L), K = min(M, L): the eigenvectors of the smaller of the Gram matrix (M, M)
    and the scatter matrix (L, L), the eigenproblem solved in float64. What an SVD gives, several
    times faster than LAPACK's SVD of a wide matrix on a CPU."""
    x = xc.float()
    if len(x) < x.shape[1]:
        val, vec = torch.linalg.eigh((x @ x.T).double())  # ascending
        val, vec = val.flip(0).clamp_min(0), vec.flip(1).float()
        # directions of (numerically) zero variance are left zero: dividing by their root
        # would blow float noise up into huge basis columns (duplicate rows make them)
        inv = torch.where(val > 1e-10 * val[0], val.clamp_min(1e-300).rsqrt(),
                          torch.zeros_like(val))
        directions = (vec.T @ x) * inv.float()[:, None]
    else:
        val, vec = torch.linalg.eigh((x.T @ x).double())
        val, directions = val.flip(0).clamp_min(0), vec.flip(1).T.float()
    return directions, val.float()


def ppca_distance(x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor,
                  variances: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of the rows of x (B, L) under a fitted PPCA Gaussian; (B,).

    The part outside the principal subspace is measured on the residual itself, not as
    |x|^2 - |proj|^2: that difference of two near-equal sums loses the digits the division by
    a small noise variance then magnifies (one float rounding apart, two runtimes disagreed)."""
    xc = x - mean
    proj = xc @ basis  # (B, rank)
    inside = (proj.pow(2) / variances).sum(1)
    outside = (xc - proj @ basis.T).pow(2).sum(1) / noise
    return (inside + outside).sqrt()


class ScaleDetector(nn.Module):
    """Fitted distances for one scale; all state is buffers."""

    def __init__(self, dim: int, topk_ratio: float, grid: int, rank: int,
                 positions: int = 0) -> None:
        super().__init__()
        self.topk_ratio = topk_ratio
        self.grid = grid
        layout = dim * grid * grid
        # positions > 0: one local Gaussian per map position (ModelConfig.local_map)
        self.positional = positions > 0
        shape = (positions,) if self.positional else ()
        self.register_buffer("mean", torch.zeros(*shape, dim))
        self.register_buffer("precision", torch.eye(dim).expand(*shape, dim, dim).clone())
        self.register_buffer("layout_mean", torch.zeros(layout))
        self.register_buffer("layout_basis", torch.zeros(layout, rank))
        self.register_buffer("layout_var", torch.ones(rank))
        self.register_buffer("layout_noise", torch.ones(()))
        self.register_buffer("map_loc", torch.zeros(()))  # normal distance per position
        self.register_buffer("map_scale", torch.ones(()))
        self.register_buffer("score_loc", torch.zeros(N_SCORES))  # normal image scores
        self.register_buffer("score_scale", torch.ones(N_SCORES))

    def distance_map(self, deviation: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, H, W) Mahalanobis distance of each position."""
        x = deviation.permute(0, 2, 3, 1)  # (B, H, W, D)
        if not self.positional:
            return mahalanobis(x, self.mean, self.precision)
        b, h, w, dim = x.shape
        d = x.reshape(b, h * w, dim) - self.mean  # (B, P, D) against (P, D)
        dist = torch.einsum("bpd,pde,bpe->bp", d, self.precision, d)
        return dist.clamp_min(0).sqrt().reshape(b, h, w)

    def layout(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, D * g * g): a map on a coarse grid, flattened."""
        return F.adaptive_avg_pool2d(maps, self.grid).flatten(1)

    def raw_scores(self, layout_map: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """(B, 2): mean of the top-k distances of `dist`, and the layout's distance."""
        flat = dist.flatten(1)
        k = max(1, round(self.topk_ratio * int(flat.shape[1])))
        local = flat.topk(k, dim=1).values.mean(1)
        layout = ppca_distance(self.layout(layout_map), self.layout_mean, self.layout_basis,
                               self.layout_var, self.layout_noise)
        return torch.stack([local, layout], dim=1)

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.score_loc) / self.score_scale


class AnomalyDetector(nn.Module):
    """Per-scale detectors, their combination, an optional classifier, the thresholds.

    Image-level terms follow the per-scale ones as the last columns of `features`: with
    `pixel` and `pixel_layout`, the pixel scale's distances (core/model/pixels.py); with
    `rotation`, the rotation head's loss (`AnoMem.rotation_loss`). Each is standardised on its
    own and weighs like a scale.
    """

    def __init__(self, dim: int, topk_ratio: float, grids: dict[str, int], rank: int,
                 local_weight: float = 0.0, layout_source: str = "query",
                 positions: dict[str, int] | None = None, pixel: bool = False,
                 rotation: bool = False, map_weights: bool = False,
                 pixel_layout: bool = False) -> None:
        super().__init__()
        self.scales = tuple(grids)
        self.layout_source = layout_source
        self.local_weight = local_weight
        self.pixel, self.pixel_layout, self.rotation = pixel, pixel_layout, rotation
        positions = positions or {}
        self.per_scale = nn.ModuleDict({
            s: ScaleDetector(dim, topk_ratio, g, rank, positions.get(s, 0))
            for s, g in grids.items()})
        for name, _ in self._extras():  # each image-level term's normal value and spread
            self.register_buffer(f"{name}_loc", torch.zeros(()))
            self.register_buffer(f"{name}_scale", torch.ones(()))
        self.register_buffer("weights", self.fixed_weights())
        if map_weights:  # each scale's share of the pixel map (stage 2 chooses; else equal)
            self.register_buffer("map_weights", torch.full((len(self.scales),),
                                                           1 / len(self.scales)))
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
        return [f"{s}/{t}" for s in self.scales for t in TERMS] + self.extra_terms

    @property
    def extra_terms(self) -> list[str]:
        """The image-level terms, in the order of `AnoMem.read`'s extra columns."""
        return [term for _, term in self._extras()]

    def _extras(self) -> list[tuple[str, str]]:
        """(buffer prefix, term name) of each image-level term this detector has, in order."""
        every = (("pixel", PIXEL_TERM, self.pixel),
                 ("pixel_layout", PIXEL_LAYOUT_TERM, self.pixel_layout),
                 ("rotation", ROTATION_TERM, self.rotation))
        return [(prefix, term) for prefix, term, present in every if present]

    @property
    def n_terms(self) -> int:
        return N_SCORES * len(self.scales) + len(self.extra_terms)

    @property
    def units(self) -> int:
        """What the fixed weights share equally: the scales and each image-level term."""
        return len(self.scales) + len(self.extra_terms)

    def fixed_weights(self) -> torch.Tensor:
        """`local_weight` within a scale, then every scale and image-level term equally."""
        term = torch.tensor([self.local_weight, 1.0 - self.local_weight])
        w = torch.cat([term.repeat(len(self.scales)), torch.ones(len(self.extra_terms))])
        return w / self.units

    def standardise_extra(self, extra: torch.Tensor) -> torch.Tensor:
        """Raw image-level terms (B, E) -> standardised on normal images."""
        return (extra - torch.stack(self.extra_buffers("loc"))) / torch.stack(
            self.extra_buffers("scale"))

    def extra_buffers(self, kind: str) -> list[torch.Tensor]:
        """The image-level terms' "loc" or "scale" buffers, in column order."""
        return [getattr(self, f"{name}_{kind}") for name, _ in self._extras()]

    def features(self, reads: dict[str, MemoryRead], extra: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Standardised term scores (B, n_terms) and raw distance maps {scale: (B, h, w)}.

        `extra`: the raw image-level terms (B, E) of `AnoMem.read`, needed when the detector
        has any.
        """
        z, maps = [], {}
        for s in self.scales:
            det = self.per_scale[s]
            dist = det.distance_map(reads[s].deviation)
            z.append(det.standardise(det.raw_scores(self.layout_input(reads[s]), dist)))
            maps[s] = dist
        if self.extra_terms:
            if extra is None or extra.shape[1:] != (len(self.extra_terms),):
                raise ValueError(f"this detector has the terms {self.extra_terms}: pass their "
                                 "raw values (B, E) from AnoMem.read")
            z.append(self.standardise_extra(extra))
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
        weights = getattr(self, "map_weights", None)
        if weights is None:
            return up.mean(0)
        return torch.einsum("s,sbhw->bhw", weights, up)
