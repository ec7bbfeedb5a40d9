"""core/model/gaussians.py: the Gaussian, positional Gaussians and PPCA modules, their fits and
distances, and the estimators they are written with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.model.detector import ScaleDetector
from core.model.gaussians import (
    POSITIONAL_FLOOR,
    PPCA,
    Gaussian,
    PositionalGaussians,
    ledoit_wolf,
    mahalanobis,
    principal_directions,
    squared_distances,
)

TOPK = 0.1


def known_gaussian(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mean = np.array([1.0, -2.0, 0.5])
    a = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.2, 0.5]])
    cov = a @ a.T
    return rng.multivariate_normal(mean, cov, size=n), mean, cov


def fitted_gaussian(rows: torch.Tensor, **options) -> Gaussian:
    gaussian = Gaussian(rows.shape[1])
    gaussian.fit(rows, **options)
    return gaussian


def test_gaussian_fit_recovers_mean_and_precision() -> None:
    samples, mean, cov = known_gaussian(20_000)
    gaussian = fitted_gaussian(torch.from_numpy(samples))
    fitted_mean, precision = gaussian.mean, gaussian.precision
    assert fitted_mean.dtype == torch.float32 and precision.shape == (3, 3)
    assert precision.dtype == torch.float32
    np.testing.assert_allclose(fitted_mean.numpy(), mean, atol=0.05)
    expected = np.linalg.inv(cov)
    error = np.linalg.norm(precision.numpy() - expected) / np.linalg.norm(expected)
    assert error < 0.05
    np.testing.assert_allclose(precision.numpy(), precision.numpy().T, atol=1e-5)


def test_gaussian_fit_is_scikit_learns_ledoit_wolf_with_a_small_ridge() -> None:
    from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

    rows = torch.from_numpy(known_gaussian(30, seed=2)[0])  # few rows: the shrinkage matters
    gaussian = fitted_gaussian(rows)
    cov, shrinkage = sklearn_ledoit_wolf(rows.numpy())
    assert 0 < shrinkage < 1
    cov = cov + np.eye(3) * 1e-6 * np.trace(cov) / 3
    np.testing.assert_allclose(gaussian.mean.numpy(), rows.mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(gaussian.precision.numpy(), np.linalg.inv(cov), rtol=1e-4,
                               atol=1e-5)
    means, precisions = ledoit_wolf(rows[None].double())  # the batched estimator it uses
    assert means.shape == (1, 3) and precisions.shape == (1, 3, 3)
    assert means.dtype == precisions.dtype == torch.float64
    torch.testing.assert_close(precisions[0].float(), gaussian.precision)


def test_gaussian_fit_subsamples_beyond_max_rows() -> None:
    samples, mean, _ = known_gaussian(6_000, seed=1)
    a = fitted_gaussian(torch.from_numpy(samples), max_rows=2_000, seed=3)
    b = fitted_gaussian(torch.from_numpy(samples), max_rows=2_000, seed=3)
    full = fitted_gaussian(torch.from_numpy(samples))
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.precision, b.precision)
    assert not torch.equal(a.mean, full.mean)  # only 2000 of the rows were used
    np.testing.assert_allclose(a.mean.numpy(), mean, atol=0.1)


@pytest.mark.parametrize("shape", [(1, 3), (5,), (2, 3, 4)])
def test_gaussian_fit_rejects_bad_input(shape: tuple[int, ...]) -> None:
    gaussian = Gaussian(3)
    with pytest.raises(ValueError, match="a Gaussian needs at least two rows"):
        gaussian.fit(torch.randn(shape))
    torch.testing.assert_close(gaussian.precision, torch.eye(3))  # left as it was


def test_mahalanobis_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3))
    mean = rng.normal(size=3)
    a = rng.normal(size=(3, 3))
    precision = a @ a.T + np.eye(3)
    expected = np.empty((2, 5))
    for i in range(2):
        for j in range(5):
            d = x[i, j] - mean
            expected[i, j] = np.sqrt(d @ precision @ d)
    got = mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(precision))
    assert got.shape == (2, 5)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_mahalanobis_with_identity_precision_is_euclidean() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    got = mahalanobis(x, torch.zeros(2), torch.eye(2))
    torch.testing.assert_close(got, torch.tensor([5.0, 0.0]))


def test_gaussian_distance_is_the_mahalanobis_distance_under_its_buffers() -> None:
    g = torch.Generator().manual_seed(0)
    gaussian = fitted_gaussian(torch.randn(50, 4, generator=g) * torch.arange(1, 5.0))
    x = torch.randn(2, 3, 4, generator=g)
    got = gaussian.distance(x)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, mahalanobis(x, gaussian.mean, gaussian.precision))
    assert float(gaussian.distance(gaussian.mean[None])[0]) == pytest.approx(0.0, abs=1e-6)


def test_squared_distances_are_cdists_squares() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    got = squared_distances(a, b)
    assert got.shape == (5, 3)
    torch.testing.assert_close(got, torch.cdist(a, b).pow(2), rtol=1e-5, atol=1e-5)
    assert bool((squared_distances(a, a).diagonal() >= 0).all())  # rounding never goes below 0


# --- probabilistic PCA ---------------------------------------------------------------------

def reference_ppca(x: np.ndarray, rank: int) -> dict[str, np.ndarray]:
    """Tipping & Bishop's maximum-likelihood PPCA from numpy's eigen-decomposition of the
    sample covariance, as a full (L, L) covariance: kept directions at their variance, every
    other direction at the mean of the discarded eigenvalues."""
    n, dim = x.shape
    mean = x.mean(0)
    xc = x - mean
    eigval, eigvec = np.linalg.eigh(xc.T @ xc / (n - 1))
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    r = min(rank, n - 1, dim - 1)  # beyond n - 1 the centred rows have no variance
    noise = eigval[r:].sum() / (dim - r)
    u, var = eigvec[:, :r], eigval[:r]
    cov = u @ np.diag(var) @ u.T + noise * (np.eye(dim) - u @ u.T)
    return {"mean": mean, "basis": u, "var": var, "noise": noise, "cov": cov}


def full_mahalanobis(y: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    d = y - mean
    return np.sqrt(np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov), d))


def correlated_rows(n: int, dim: int, seed: int, decay: float = 0.1) -> np.ndarray:
    """Rows with a spread-out spectrum (the largest std 2, the smallest `decay`)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) * np.linspace(2.0, decay, dim)
    return rng.normal(size=(n, dim)) @ mix.T + rng.normal(size=dim)


def as_float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).float()


def fitted_ppca(rows: torch.Tensor, rank: int) -> PPCA:
    ppca = PPCA(rows.shape[1], rank)
    ppca.fit(rows)
    return ppca


@pytest.mark.parametrize(("n", "dim", "rank"), [(40, 6, 3), (50, 12, 5), (8, 20, 4)],
                         ids=["more-rows", "many-dims", "fewer-rows-than-dims"])
def test_ppca_matches_a_numpy_reference(n: int, dim: int, rank: int) -> None:
    x = correlated_rows(n, dim, seed=dim)
    ref = reference_ppca(x, rank)
    ppca = fitted_ppca(torch.from_numpy(x), rank)
    mean, basis, variances, noise = ppca.mean, ppca.basis, ppca.variances, ppca.noise
    assert basis.shape == (dim, rank) and variances.shape == (rank,) and noise.ndim == 0
    np.testing.assert_allclose(mean.numpy(), ref["mean"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variances.numpy(), ref["var"], rtol=1e-4)
    assert float(noise) == pytest.approx(ref["noise"], rel=1e-4)
    # Same principal directions, up to sign: the projectors agree.
    np.testing.assert_allclose(basis.double().numpy() @ basis.double().numpy().T,
                               ref["basis"] @ ref["basis"].T, atol=1e-4)
    probe = np.random.default_rng(1).normal(size=(9, dim)) * 2 + ref["mean"]
    probe[0] = ref["mean"]  # distance 0 at the mean
    got = ppca.distance(as_float(probe))
    assert got.shape == (9,)
    expected = full_mahalanobis(probe, ref["mean"], ref["cov"])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-3, atol=1e-3)


def test_ppca_of_full_rank_is_the_full_mahalanobis_distance() -> None:
    """With rank >= L - 1 nothing is discarded but the last direction, whose 'noise' is then
    its own variance: PPCA is the sample Gaussian, and with many rows the true one."""
    dim = 5
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(dim, dim))
    true_cov, true_mean = mix @ mix.T + 0.1 * np.eye(dim), rng.normal(size=dim)
    x = rng.multivariate_normal(true_mean, true_cov, size=40_000)
    probe = rng.multivariate_normal(true_mean, 4 * true_cov, size=50)
    for rank in (dim - 1, dim, 3 * dim):
        got = fitted_ppca(torch.from_numpy(x), rank).distance(as_float(probe)).numpy()
        sample = full_mahalanobis(probe, x.mean(0), np.cov(x, rowvar=False))
        np.testing.assert_allclose(got, sample, rtol=1e-3)
        np.testing.assert_allclose(got, full_mahalanobis(probe, true_mean, true_cov), rtol=0.03)
    truncated = fitted_ppca(torch.from_numpy(x), 1).distance(as_float(probe)).numpy()
    assert np.abs(truncated / sample - 1).max() > 0.05  # low rank is an approximation


def test_fewer_rows_than_rank_pads_with_zero_columns_that_add_nothing() -> None:
    n, dim, rank = 6, 12, 9
    x = torch.from_numpy(correlated_rows(n, dim, seed=4))
    padded = fitted_ppca(x, rank)
    mean, basis, variances = padded.mean, padded.basis, padded.variances
    used = n - 1
    assert basis.shape == (dim, rank)
    assert torch.count_nonzero(basis[:, used:]) == 0
    torch.testing.assert_close(basis[:, :used].T @ basis[:, :used], torch.eye(used),
                               atol=1e-5, rtol=0)
    assert bool((variances > 0).all())  # the padding never divides by zero
    trimmed = PPCA(dim, used)
    trimmed.load_state_dict({"mean": mean, "basis": basis[:, :used],
                             "variances": variances[:used], "noise": padded.noise})
    probe = torch.randn(7, dim, generator=torch.Generator().manual_seed(0)) + mean
    torch.testing.assert_close(padded.distance(probe), trimmed.distance(probe), rtol=1e-6,
                               atol=1e-6)
    # ... and the layout PPCA of a detector sized for `rank` takes the padded fit as it is.
    sd = ScaleDetector(dim=3, topk_ratio=TOPK, grid=2, rank=rank)
    assert sd.layout.basis.shape == basis.shape and sd.layout.variances.shape == variances.shape
    sd.layout.load_state_dict(padded.state_dict())
    torch.testing.assert_close(sd.layout.distance(probe), padded.distance(probe))


def test_a_sample_off_the_fitted_subspace_scores_higher() -> None:
    dim, rng = 16, np.random.default_rng(5)
    span, _ = np.linalg.qr(rng.normal(size=(dim, 3)))  # the normal data live on 3 directions
    normal = rng.normal(size=(400, 3)) * [3.0, 2.0, 1.0] @ span.T + 0.05 * rng.normal(
        size=(400, dim))
    ppca = fitted_ppca(torch.from_numpy(normal), rank=3)
    inside = rng.normal(size=(50, 3)) * [3.0, 2.0, 1.0] @ span.T  # held-out normal samples
    off = rng.normal(size=dim)
    off -= span @ (span.T @ off)  # orthogonal to every normal direction...
    off *= 1.0 / np.linalg.norm(off)  # ... and shorter than the spread of the normal data
    scores = ppca.distance(as_float(np.vstack([inside, off])))
    assert float(scores[-1]) > 3 * float(scores[:-1].max())
    # Not just far away: the off-subspace sample is nearer the mean than most normal ones.
    assert np.linalg.norm(off) < np.median(np.linalg.norm(inside, axis=1))


@pytest.mark.parametrize("shape", [(2, 4), (6,), (3, 2, 2)])
def test_ppca_fit_rejects_bad_input(shape: tuple[int, ...]) -> None:
    ppca = PPCA(4, 2)
    with pytest.raises(ValueError, match="PPCA needs at least three rows"):
        ppca.fit(torch.randn(shape))
    assert torch.count_nonzero(ppca.basis) == 0  # left as it was


@pytest.mark.parametrize(("n", "dim"), [(6, 10), (30, 4)], ids=["gram", "scatter"])
def test_principal_directions_are_the_svds(n: int, dim: int) -> None:
    x = torch.from_numpy(correlated_rows(n, dim, seed=7)).float()
    xc = x - x.mean(0)
    directions, sums = principal_directions(xc)
    _, s, vh = torch.linalg.svd(xc.double(), full_matrices=False)
    k = min(n - 1, dim)  # the centred rows have rank n - 1 at most
    assert directions.shape == (min(n, dim), dim) and sums.shape == (min(n, dim),)
    np.testing.assert_allclose(sums[:k].numpy(), (s[:k] ** 2).numpy(), rtol=1e-4)
    # the same directions up to sign, each of unit length
    np.testing.assert_allclose(np.abs((directions[:k].double() @ vh[:k].T).diagonal().numpy()),
                               np.ones(k), atol=1e-4)


# --- positional Gaussians ------------------------------------------------------------------

def test_positional_gaussians_are_ledoit_wolf_with_a_floor_at_every_position() -> None:
    from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5, 3, 2, generator=g) * torch.arange(1, 6.0)[None, :, None, None]
    x[:, :, 0, 0] += 4.0  # positions differ
    x[:, :, 2, 1] *= 1e-4  # a position where the images barely vary (a plain background)
    gaussians = PositionalGaussians(6, 5)
    gaussians.fit(x, chunk=4)
    mean, precision = gaussians.mean, gaussians.precision
    assert mean.shape == (6, 5) and precision.shape == (6, 5, 5)
    rows = x.permute(2, 3, 0, 1).reshape(6, 20, 5).double()
    floor = POSITIONAL_FLOOR * float(rows.var(1, correction=0).mean())
    for p in range(6):
        cov, _ = sklearn_ledoit_wolf(rows[p].numpy())
        cov = cov + np.eye(5) * (floor + 1e-6 * np.trace(cov) / 5)
        np.testing.assert_allclose(mean[p].numpy(), rows[p].mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(precision[p].numpy(), np.linalg.inv(cov), rtol=1e-3,
                                   atol=1e-5)
    # the quiet position is no sharper than the floor allows: float noise stays noise
    assert float(torch.linalg.eigvalsh(precision[5].double()).max()) <= 1 / floor


def test_positional_distance_is_each_positions_own_mahalanobis() -> None:
    gaussians = PositionalGaussians(positions=4, dim=3)
    g = torch.Generator().manual_seed(1)
    gaussians.mean.copy_(torch.randn(4, 3, generator=g))
    a = torch.randn(4, 3, 3, generator=g)
    gaussians.precision.copy_(a @ a.transpose(1, 2) + torch.eye(3))
    dev = torch.randn(2, 3, 2, 2, generator=g)
    got = gaussians.distance(dev)
    assert got.shape == (2, 2, 2)
    x = dev.permute(0, 2, 3, 1).reshape(2, 4, 3)
    for b in range(2):
        for p in range(4):
            ref = mahalanobis(x[b, p], gaussians.mean[p], gaussians.precision[p])
            assert float(got[b].flatten()[p]) == pytest.approx(float(ref), rel=1e-5)


def test_positional_gaussians_fit_rejects_bad_input() -> None:
    gaussians = PositionalGaussians(4, 3)
    with pytest.raises(ValueError, match="at least two maps"):
        gaussians.fit(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="at least two maps"):
        gaussians.fit(torch.zeros(5, 3, 4))
