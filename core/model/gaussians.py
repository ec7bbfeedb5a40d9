"""Gaussians of normal data, each a small module that fits itself and measures a distance.

Stage 2 scores what it sees by its distance under a Gaussian fitted to normal images:

- `Gaussian`: one full-covariance Gaussian of vectors, shrunk by the Ledoit-Wolf formula (a
  scale's deviation vectors, or the image on the pixel scale's layout grid);
- `PositionalGaussians`: one such Gaussian at every position of a map, for aligned images
  (what is normal at a bottle's rim is not what is normal at its centre);
- `PPCA`: probabilistic PCA (Tipping & Bishop 1999), a Gaussian for vectors of thousands of
  dimensions fitted on fewer images (a scale's query map on the layout grid).

Why Gaussians: their negative log-likelihood is the detector's training objective, fitted in
closed form. Unlike a Deep SVDD distance, whose minimum is reached by a network that maps
everything to one centre, the log-determinant term makes a constant detector infinitely
costly: it cannot collapse. Every fitted tensor is a buffer, so `.to()`, `state_dict()` and
safetensors checkpoints just work. The estimators are written here rather than taken from
scikit-learn because they are batched over positions (scikit-learn fits one Gaussian at a
time) and PPCA needs its noise variance kept apart from its basis, with a floor.
"""

from __future__ import annotations

import torch
from torch import nn

# The least variance a positional Gaussian allows in any direction, relative to the mean
# variance over all positions (see `PositionalGaussians.fit`). Chosen on the defects stage 2
# pastes into held-out normals (benchmarks/README.md, "Which data each default was chosen on"):
# of 0, 1e-3 ... 100, the smallest whose mean pseudo-defect pixel AUROC on MVTec AD bottle and
# KolektorSDD is within 0.005 of the best
POSITIONAL_FLOOR = 1.0


class Gaussian(nn.Module):
    """A Gaussian of D-dimensional rows: mean (D,) and shrunk precision (D, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("precision", torch.eye(dim))

    @torch.no_grad()
    def fit(self, rows: torch.Tensor, max_rows: int = 50_000, seed: int = 0) -> None:
        """Fit to the rows (M, D), in float64; a seeded sample of `max_rows` if M is larger."""
        if rows.ndim != 2 or len(rows) < 2:
            raise ValueError(
                f"a Gaussian needs at least two rows of shape (M, D), got {tuple(rows.shape)}")
        x = rows.detach().double().cpu()
        if len(x) > max_rows:
            g = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(len(x), generator=g)[:max_rows]]
        mean, precision = ledoit_wolf(x[None])
        self.mean.copy_(mean[0])
        self.precision.copy_(precision[0])

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each row of x (..., D); returns (...)."""
        return mahalanobis(x, self.mean, self.precision)


class PositionalGaussians(nn.Module):
    """One Gaussian per position of (D, H, W) maps: mean (H*W, D), precision (H*W, D, D)."""

    def __init__(self, positions: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(positions, dim))
        self.register_buffer("precision", torch.eye(dim).expand(positions, dim, dim).clone())

    @torch.no_grad()
    def fit(self, maps: torch.Tensor, chunk: int = 64) -> None:
        """Fit to maps (N, D, H, W), position by position, with the same estimator as
        `Gaussian`, so the shrinkage comes from the training maps alone even with fewer
        images than dimensions. Every covariance gets a floor of POSITIONAL_FLOOR times the
        mean variance over all positions: where the training images barely vary (a plain
        background), the Gaussian would otherwise be so narrow that float rounding alone,
        magnified by its precision, lit up the map (an exported model and PyTorch disagreed
        there by hundreds of standard deviations)."""
        if maps.ndim != 4 or len(maps) < 2:
            raise ValueError(f"expected at least two maps (N, D, H, W), got {tuple(maps.shape)}")
        n, dim, h, w = maps.shape
        rows = maps.detach().double().cpu().permute(2, 3, 0, 1).reshape(h * w, n, dim)
        floor = POSITIONAL_FLOOR * float(rows.var(1, correction=0).mean())
        fitted = [ledoit_wolf(part, floor) for part in rows.split(chunk)]
        self.mean.copy_(torch.cat([m for m, _ in fitted]))
        self.precision.copy_(torch.cat([p for _, p in fitted]))

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, H, W): each position's distance under its own Gaussian."""
        b, dim, h, w = x.shape
        d = x.permute(0, 2, 3, 1).reshape(b, h * w, dim) - self.mean  # (B, P, D)
        dist = torch.einsum("bpd,pde,bpe->bp", d, self.precision, d)
        return dist.clamp_min(0).sqrt().reshape(b, h, w)


class PPCA(nn.Module):
    """Probabilistic PCA of L-dimensional rows: mean (L,), a basis (L, rank) of principal
    directions with their variances (rank,), and one noise variance for the rest."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("basis", torch.zeros(dim, rank))
        self.register_buffer("variances", torch.ones(rank))
        self.register_buffer("noise", torch.ones(()))

    @torch.no_grad()
    def fit(self, rows: torch.Tensor) -> None:
        """Fit to the rows (M, L). With fewer rows than the rank, the unused columns of the
        basis stay zero (they then add nothing to the distance)."""
        if rows.ndim != 2 or len(rows) < 3:
            raise ValueError(
                f"PPCA needs at least three rows of shape (M, L), got {tuple(rows.shape)}")
        x = rows.detach().float().cpu()
        n, dim = x.shape
        rank = self.basis.shape[1]
        mean = x.mean(0)
        directions, var = principal_directions(x - mean)
        var = var / (n - 1)
        r = min(rank, len(var) - 1, dim - 1)
        total = var.sum()
        noise = ((total - var[:r].sum()) / (dim - r)).clamp_min(1e-8 * float(total) / dim + 1e-12)
        self.mean.copy_(mean)
        self.basis.zero_()
        self.basis[:, :r] = directions[:r].T
        self.variances.fill_(1.0)
        self.variances[:r] = var[:r].clamp_min(noise)
        self.noise.copy_(noise)

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of the rows of x (B, L); (B,).

        The part outside the principal subspace is measured on the residual itself, not as
        |x|^2 - |proj|^2: that difference of two near-equal sums loses the digits the division
        by a small noise variance then magnifies (one float rounding apart, two runtimes
        disagreed)."""
        xc = x - self.mean
        proj = xc @ self.basis  # (B, rank)
        inside = (proj.pow(2) / self.variances).sum(1)
        outside = (xc - proj @ self.basis.T).pow(2).sum(1) / self.noise
        return (inside + outside).sqrt()


def ledoit_wolf(rows: torch.Tensor, floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Means (P, D) and precisions (P, D, D) of P sets of rows (P, N, D), in float64.

    Each covariance is shrunk towards a scaled identity by the Ledoit-Wolf formula (as
    scikit-learn's `ledoit_wolf`), plus a 1e-6 relative ridge so it always inverts, plus
    `floor` (an absolute variance) on its diagonal.
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


def principal_directions(xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal directions (K, L) and their sums of squares (K,), largest first, of centred
    rows xc (M, L), K = min(M, L): the eigenvectors of the smaller of the Gram matrix (M, M)
    and the scatter matrix (L, L), the eigenproblem solved in float64. What an SVD gives,
    several times faster than LAPACK's SVD of a wide matrix on a CPU."""
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


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Distance of each row of x (..., D) to the Gaussian (mean, precision); returns (...)."""
    d = x - mean
    return ((d @ precision) * d).sum(-1).clamp_min(0).sqrt()


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N, M) between the rows of a (N, D) and b (M, D). Written
    out rather than `torch.cdist`, which the ONNX exporter cannot translate. Squared: the root
    of a distance near zero (an image and its own key) would magnify float rounding."""
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.T).clamp_min(0)
