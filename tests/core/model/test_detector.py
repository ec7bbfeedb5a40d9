"""core/model/detector.py: Gaussian and PPCA fits, their distances, and the assembled detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.model.detector import (
    N_SCORES,
    TERMS,
    AnomalyDetector,
    ScaleDetector,
    Scores,
    fit_gaussian,
    fit_positional_gaussians,
    fit_ppca,
    mahalanobis,
    ppca_distance,
)
from core.model.memory import MemoryRead

SCALES = ("layer2", "layer3")
DIM = 4
GRIDS = {"layer2": 4, "layer3": 2}  # maps of 8 x 8 and 4 x 4 pooled by two
SIZES = {"layer2": 8, "layer3": 4}
RANK = 5
TOPK = 0.1


def known_gaussian(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mean = np.array([1.0, -2.0, 0.5])
    a = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.2, 0.5]])
    cov = a @ a.T
    return rng.multivariate_normal(mean, cov, size=n), mean, cov


def test_fit_gaussian_recovers_mean_and_precision() -> None:
    samples, mean, cov = known_gaussian(20_000)
    fitted_mean, precision = fit_gaussian(torch.from_numpy(samples))
    assert fitted_mean.dtype == torch.float32 and precision.shape == (3, 3)
    np.testing.assert_allclose(fitted_mean.numpy(), mean, atol=0.05)
    expected = np.linalg.inv(cov)
    error = np.linalg.norm(precision.numpy() - expected) / np.linalg.norm(expected)
    assert error < 0.05
    np.testing.assert_allclose(precision.numpy(), precision.numpy().T, atol=1e-5)


def test_fit_gaussian_subsamples_beyond_max_rows() -> None:
    samples, mean, _ = known_gaussian(6_000, seed=1)
    a = fit_gaussian(torch.from_numpy(samples), max_rows=2_000, seed=3)
    b = fit_gaussian(torch.from_numpy(samples), max_rows=2_000, seed=3)
    full = fit_gaussian(torch.from_numpy(samples))
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert not torch.equal(a[0], full[0])  # only 2000 of the rows were used
    np.testing.assert_allclose(a[0].numpy(), mean, atol=0.1)


@pytest.mark.parametrize("shape", [(1, 3), (5,), (2, 3, 4)])
def test_fit_gaussian_rejects_bad_input(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="fit_gaussian"):
        fit_gaussian(torch.randn(shape))


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


@pytest.mark.parametrize(("n", "dim", "rank"), [(40, 6, 3), (50, 12, 5), (8, 20, 4)],
                         ids=["more-rows", "many-dims", "fewer-rows-than-dims"])
def test_ppca_matches_a_numpy_reference(n: int, dim: int, rank: int) -> None:
    x = correlated_rows(n, dim, seed=dim)
    ref = reference_ppca(x, rank)
    mean, basis, variances, noise = fit_ppca(torch.from_numpy(x), rank)
    assert basis.shape == (dim, rank) and variances.shape == (rank,) and noise.ndim == 0
    np.testing.assert_allclose(mean.numpy(), ref["mean"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variances.numpy(), ref["var"], rtol=1e-4)
    assert float(noise) == pytest.approx(ref["noise"], rel=1e-4)
    # Same principal directions, up to sign: the projectors agree.
    np.testing.assert_allclose(basis.double().numpy() @ basis.double().numpy().T,
                               ref["basis"] @ ref["basis"].T, atol=1e-4)
    probe = np.random.default_rng(1).normal(size=(9, dim)) * 2 + ref["mean"]
    probe[0] = ref["mean"]  # distance 0 at the mean
    got = ppca_distance(as_float(probe), mean, basis, variances, noise)
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
        got = ppca_distance(as_float(probe), *fit_ppca(torch.from_numpy(x), rank)).numpy()
        sample = full_mahalanobis(probe, x.mean(0), np.cov(x, rowvar=False))
        np.testing.assert_allclose(got, sample, rtol=1e-3)
        np.testing.assert_allclose(got, full_mahalanobis(probe, true_mean, true_cov), rtol=0.03)
    truncated = ppca_distance(as_float(probe), *fit_ppca(torch.from_numpy(x), 1)).numpy()
    assert np.abs(truncated / sample - 1).max() > 0.05  # low rank is an approximation


def test_fewer_rows_than_rank_pads_with_zero_columns_that_add_nothing() -> None:
    n, dim, rank = 6, 12, 9
    x = torch.from_numpy(correlated_rows(n, dim, seed=4))
    mean, basis, variances, noise = fit_ppca(x, rank)
    used = n - 1
    assert basis.shape == (dim, rank)
    assert torch.count_nonzero(basis[:, used:]) == 0
    torch.testing.assert_close(basis[:, :used].T @ basis[:, :used], torch.eye(used),
                               atol=1e-5, rtol=0)
    assert bool((variances > 0).all())  # the padding never divides by zero
    probe = torch.randn(7, dim, generator=torch.Generator().manual_seed(0)) + mean
    padded = ppca_distance(probe, mean, basis, variances, noise)
    trimmed = ppca_distance(probe, mean, basis[:, :used], variances[:used], noise)
    torch.testing.assert_close(padded, trimmed, rtol=1e-6, atol=1e-6)
    # ... and the buffers of a detector sized for `rank` take the padded fit as it is.
    sd = ScaleDetector(dim=3, topk_ratio=TOPK, grid=2, rank=rank)
    assert sd.layout_basis.shape == basis.shape and sd.layout_var.shape == variances.shape


def test_a_sample_off_the_fitted_subspace_scores_higher() -> None:
    dim, rng = 16, np.random.default_rng(5)
    span, _ = np.linalg.qr(rng.normal(size=(dim, 3)))  # the normal data live on 3 directions
    normal = rng.normal(size=(400, 3)) * [3.0, 2.0, 1.0] @ span.T + 0.05 * rng.normal(
        size=(400, dim))
    fitted = fit_ppca(torch.from_numpy(normal), rank=3)
    inside = rng.normal(size=(50, 3)) * [3.0, 2.0, 1.0] @ span.T  # held-out normal samples
    off = rng.normal(size=dim)
    off -= span @ (span.T @ off)  # orthogonal to every normal direction...
    off *= 1.0 / np.linalg.norm(off)  # ... and shorter than the spread of the normal data
    scores = ppca_distance(as_float(np.vstack([inside, off])), *fitted)
    assert float(scores[-1]) > 3 * float(scores[:-1].max())
    # Not just far away: the off-subspace sample is nearer the mean than most normal ones.
    assert np.linalg.norm(off) < np.median(np.linalg.norm(inside, axis=1))


@pytest.mark.parametrize("shape", [(2, 4), (6,), (3, 2, 2)])
def test_fit_ppca_rejects_bad_input(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="fit_ppca"):
        fit_ppca(torch.randn(shape), 2)


# --- the assembled detector ----------------------------------------------------------------

def random_detector(seed: int = 0, local_weight: float = 0.3, layout_source: str = "query",
                    map_weights: tuple[float, ...] | None = None) -> AnomalyDetector:
    """A detector with every fitted buffer set to something other than its default."""
    g = torch.Generator().manual_seed(seed)
    det = AnomalyDetector(DIM, TOPK, GRIDS, RANK, local_weight, layout_source,
                          map_weights=map_weights is not None)
    with torch.no_grad():
        if map_weights is not None:
            det.map_weights.copy_(torch.tensor(map_weights))
        for s in SCALES:
            sd = det.per_scale[s]
            a = torch.randn(DIM, DIM, generator=g)
            sd.precision.copy_(a @ a.T + torch.eye(DIM))
            sd.mean.copy_(torch.randn(DIM, generator=g))
            layout = DIM * GRIDS[s] ** 2
            q, _ = torch.linalg.qr(torch.randn(layout, RANK, generator=g))
            sd.layout_basis.copy_(q)
            sd.layout_mean.copy_(0.1 * torch.randn(layout, generator=g))
            sd.layout_var.copy_(torch.rand(RANK, generator=g) + 0.2)
            sd.layout_noise.fill_(0.05)
            sd.map_loc.fill_(0.7)
            sd.map_scale.fill_(1.9)
            sd.score_loc.copy_(torch.randn(N_SCORES, generator=g))
            sd.score_scale.copy_(torch.rand(N_SCORES, generator=g) + 0.5)
    return det


def make_reads(batch: int, seed: int = 1) -> dict[str, MemoryRead]:
    g = torch.Generator().manual_seed(seed)
    reads = {}
    for s in SCALES:
        h = SIZES[s]
        query = F.normalize(torch.randn(batch, DIM, h, h, generator=g), dim=1)
        readout = 0.8 * F.normalize(torch.randn(batch, DIM, h, h, generator=g), dim=1)
        reads[s] = MemoryRead(query, readout, torch.full((batch, 3, h, h), 1 / 3))
    return reads


def reference_terms(det: AnomalyDetector, reads: dict[str, MemoryRead]
                    ) -> dict[str, np.ndarray]:
    """(B, 2) standardised [top-k mean of the deviation's distance map, layout distance]."""
    out = {}
    for s in SCALES:
        sd = det.per_scale[s]
        buf = {k: v.double().numpy() for k, v in sd.state_dict().items()}
        dev = reads[s].deviation.double().numpy()
        b, d, h, w = dev.shape
        rows = dev.transpose(0, 2, 3, 1).reshape(b, h * w, d) - buf["mean"]
        dist = np.sqrt(np.einsum("bpi,ij,bpj->bp", rows, buf["precision"], rows))
        k = max(1, round(TOPK * h * w))
        local = np.sort(dist, axis=1)[:, ::-1][:, :k].mean(1)
        source = reads[s].query if det.layout_source == "query" else reads[s].deviation
        g = GRIDS[s]
        cells = source.double().numpy().reshape(b, d, g, h // g, g, w // g).mean(axis=(3, 5))
        u = buf["layout_basis"]
        cov = (u * buf["layout_var"]) @ u.T + buf["layout_noise"] * (np.eye(len(u)) - u @ u.T)
        layout = full_mahalanobis(cells.reshape(b, -1), buf["layout_mean"], cov)
        raw = np.stack([local, layout], axis=1)
        out[s] = (raw - buf["score_loc"]) / buf["score_scale"]
    return out


def test_detector_output_shapes() -> None:
    det = random_detector()
    scores = det(make_reads(3), (32, 24))
    assert isinstance(scores, Scores)
    assert scores.image.shape == (3,)
    assert set(scores.per_scale) == set(SCALES)
    assert all(v.shape == (3,) for v in scores.per_scale.values())
    assert scores.pixel_map.shape == (3, 32, 24)
    assert scores.maps["layer2"].shape == (3, 8, 8)
    assert scores.maps["layer3"].shape == (3, 4, 4)
    assert set(scores.terms) == {f"{s}/{t}" for s in SCALES for t in TERMS}
    assert all(v.shape == (3,) for v in scores.terms.values())


def test_every_fitted_statistic_is_a_buffer_sized_by_grid_and_rank() -> None:
    det = AnomalyDetector(DIM, TOPK, GRIDS, RANK)
    assert not list(det.parameters())
    state = det.state_dict()
    for s in SCALES:
        layout = DIM * GRIDS[s] ** 2
        assert det.per_scale[s].grid == GRIDS[s]
        assert state[f"per_scale.{s}.layout_basis"].shape == (layout, RANK)
        assert state[f"per_scale.{s}.layout_mean"].shape == (layout,)
        assert state[f"per_scale.{s}.layout_var"].shape == (RANK,)
        assert state[f"per_scale.{s}.precision"].shape == (DIM, DIM)
    fitted = random_detector(seed=4)
    det.load_state_dict(fitted.state_dict())
    reads = make_reads(2)
    torch.testing.assert_close(det(reads, (8, 8)).image, fitted(reads, (8, 8)).image)


def test_scale_detector_pools_the_map_to_its_grid() -> None:
    sd = ScaleDetector(DIM, TOPK, grid=2, rank=RANK)
    x = torch.arange(DIM * 16, dtype=torch.float32).view(1, DIM, 4, 4)
    cells = x.view(1, DIM, 2, 2, 2, 2).mean(dim=(3, 5))  # (B, D, g, g): 2 x 2 blocks
    torch.testing.assert_close(sd.layout(x), cells.flatten(1))
    one = ScaleDetector(DIM, TOPK, grid=1, rank=RANK)
    torch.testing.assert_close(one.layout(x), x.mean(dim=(2, 3)))


@pytest.mark.parametrize("local_weight", [0.0, 0.3, 1.0])
def test_image_score_weighs_the_standardised_terms(local_weight: float) -> None:
    det = random_detector(local_weight=local_weight)
    reads = make_reads(5)
    scores = det(reads, (32, 32))
    ref = reference_terms(det, reads)
    for s in SCALES:
        for j, t in enumerate(TERMS):
            np.testing.assert_allclose(scores.terms[f"{s}/{t}"].numpy(), ref[s][:, j],
                                       rtol=1e-4, atol=1e-4)
        per_scale = local_weight * ref[s][:, 0] + (1 - local_weight) * ref[s][:, 1]
        np.testing.assert_allclose(scores.per_scale[s].numpy(), per_scale, rtol=1e-4,
                                   atol=1e-4)
    image = np.mean([local_weight * ref[s][:, 0] + (1 - local_weight) * ref[s][:, 1]
                     for s in SCALES], axis=0)
    np.testing.assert_allclose(scores.image.numpy(), image, rtol=1e-4, atol=1e-4)


def test_local_term_reads_the_deviation_and_layout_term_the_query() -> None:
    det = random_detector()
    reads = make_reads(4)
    shifted = {s: MemoryRead(r.query + 0.3, r.readout + 0.3, r.attention)  # same deviation
               for s, r in reads.items()}
    other_memory = {s: MemoryRead(r.query, -r.readout, r.attention)  # same query
                    for s, r in reads.items()}
    base, moved, remembered = (det(x, (8, 8)) for x in (reads, shifted, other_memory))
    for s in SCALES:
        torch.testing.assert_close(moved.terms[f"{s}/local"], base.terms[f"{s}/local"])
        torch.testing.assert_close(moved.maps[s], base.maps[s])
        assert not torch.allclose(moved.terms[f"{s}/layout"], base.terms[f"{s}/layout"])
        torch.testing.assert_close(remembered.terms[f"{s}/layout"], base.terms[f"{s}/layout"])
        assert not torch.allclose(remembered.terms[f"{s}/local"], base.terms[f"{s}/local"])
    deviation_layout = random_detector(layout_source="deviation")
    ref = reference_terms(deviation_layout, shifted)
    got = deviation_layout(shifted, (8, 8))
    for s in SCALES:
        np.testing.assert_allclose(got.terms[f"{s}/layout"].numpy(), ref[s][:, 1], rtol=1e-4,
                                   atol=1e-4)
        torch.testing.assert_close(got.terms[f"{s}/layout"],
                                   deviation_layout(reads, (8, 8)).terms[f"{s}/layout"])


def test_default_image_score_ignores_the_local_term() -> None:
    det = random_detector(local_weight=0.0)
    reads = make_reads(3)
    other_memory = {s: MemoryRead(r.query, 0.5 * r.readout, r.attention) for s, r in reads.items()}
    a, b = det(reads, (8, 8)), det(other_memory, (8, 8))
    torch.testing.assert_close(a.image, b.image)
    assert not torch.allclose(a.pixel_map, b.pixel_map)  # the maps still show the deviation


def test_classifier_adds_the_softplus_of_its_logit_to_the_image_score() -> None:
    det = random_detector()
    reads = make_reads(4)
    base = det(reads, (32, 32)).image
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        det.clf_weight.copy_(torch.randn(len(det.clf_weight), generator=g))
        det.clf_bias.fill_(0.3)
    ref = reference_terms(det, reads)
    z = torch.from_numpy(np.concatenate([ref[s] for s in SCALES], axis=1)).float()
    pooled = [F.normalize(reads[s].deviation.mean(dim=(2, 3)), dim=1) for s in SCALES]
    logit = torch.cat([z, *pooled], dim=1) @ det.clf_weight + 0.3
    torch.testing.assert_close(det(reads, (32, 32)).image, base + F.softplus(logit), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("map_weights", [None, (0.0, 1.0), (0.25, 0.75)])
def test_maps_are_standardised_and_pixel_map_weighs_the_scales(
        map_weights: tuple[float, float] | None) -> None:
    det = random_detector(map_weights=map_weights)
    assert hasattr(det, "map_weights") == (map_weights is not None)
    with torch.no_grad():  # spatially constant deviation: every map is constant
        for s in SCALES:
            det.per_scale[s].precision.copy_(torch.eye(DIM))
            det.per_scale[s].mean.zero_()
    query = {"layer2": torch.full((1, DIM, 8, 8), 0.5), "layer3": torch.full((1, DIM, 4, 4), 0.5)}
    reads = {s: MemoryRead(q, q - (1.0 if s == "layer2" else 2.0), torch.ones(1, 1, *q.shape[2:]))
             for s, q in query.items()}
    scores = det(reads, (16, 16))
    expected = {"layer2": (2.0 - 0.7) / 1.9, "layer3": (4.0 - 0.7) / 1.9}  # |dev| = 2, 4
    for s in SCALES:
        torch.testing.assert_close(scores.maps[s], torch.full_like(scores.maps[s], expected[s]))
    if map_weights is None:  # an older detector: the scales count the same
        combined = (expected["layer2"] + expected["layer3"]) / 2
    else:
        combined = sum(w * expected[s] for w, s in zip(map_weights, SCALES, strict=True))
    torch.testing.assert_close(scores.pixel_map, torch.full((1, 16, 16), combined))


def fitted_detector(normal: dict[str, MemoryRead]) -> AnomalyDetector:
    """Both Gaussians of every scale fitted to `normal`, as stage 2 does (no standardising)."""
    det = AnomalyDetector(DIM, TOPK, GRIDS, rank=8, local_weight=0.5)
    with torch.no_grad():
        for s, r in normal.items():
            sd = det.per_scale[s]
            mean, precision = fit_gaussian(r.deviation.permute(0, 2, 3, 1).reshape(-1, DIM))
            sd.mean.copy_(mean)
            sd.precision.copy_(precision)
            for buf, value in zip(("layout_mean", "layout_basis", "layout_var", "layout_noise"),
                                  fit_ppca(sd.layout(r.query), 8), strict=True):
                getattr(sd, buf).copy_(value)
    return det


def test_far_deviation_scores_higher_than_the_fitted_normals() -> None:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(DIM, DIM, generator=g)

    def sample(batch: int, h: int) -> MemoryRead:
        dev = (torch.randn(batch, h, h, DIM, generator=g) @ mix).permute(0, 3, 1, 2)
        query = 0.1 * torch.randn(batch, DIM, h, h, generator=g)
        return MemoryRead(query, query - dev, torch.ones(batch, 1, h, h))

    det = fitted_detector({s: sample(64, SIZES[s]) for s in SCALES})
    test = {s: sample(9, SIZES[s]) for s in SCALES}
    for s, r in test.items():
        readout = r.readout.clone()
        readout[0] -= 6 * mix[0].view(DIM, 1, 1)  # image 0: far along a direction of the data
        test[s] = MemoryRead(r.query, readout, r.attention)
    scores = det(test, (32, 32))
    assert scores.image.argmax().item() == 0
    for s in SCALES:
        local = scores.terms[f"{s}/local"]
        assert local[0] > local[1:].max() + 1.0
        assert scores.per_scale[s].argmax().item() == 0


def test_layout_term_flags_normal_parts_in_the_wrong_place() -> None:
    """Every position of the anomaly looks like a normal one; only the arrangement is new.
    The local term cannot see it, the layout term does."""
    g = torch.Generator().manual_seed(1)
    pattern = {s: torch.randn(DIM, SIZES[s], SIZES[s], generator=g) for s in SCALES}

    def sample(batch: int) -> dict[str, MemoryRead]:
        reads = {}
        for s, p in pattern.items():
            query = p + 0.1 * torch.randn(batch, *p.shape, generator=g)
            readout = p + 0.1 * torch.randn(batch, *p.shape, generator=g)
            reads[s] = MemoryRead(query, readout, torch.ones(batch, 1, *p.shape[1:]))
        return reads

    det = fitted_detector(sample(200))
    test = sample(20)
    for s, r in test.items():  # image 0: the map upside down, deviations untouched
        query = r.query.clone()
        query[0] = r.query[0].flip(1)
        test[s] = MemoryRead(query, query - r.deviation, r.attention)
    scores = det(test, (8, 8))
    for s in SCALES:
        layout, local = scores.terms[f"{s}/layout"], scores.terms[f"{s}/local"]
        assert layout[0] > 3 * layout[1:].max()
        assert local[0] < local[1:].max()  # the local term sees nothing unusual
    assert scores.image.argmax().item() == 0


def test_positional_gaussians_are_ledoit_wolf_with_a_floor_at_every_position() -> None:
    from sklearn.covariance import ledoit_wolf

    from core.model.detector import POSITIONAL_FLOOR

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5, 3, 2, generator=g) * torch.arange(1, 6.0)[None, :, None, None]
    x[:, :, 0, 0] += 4.0  # positions differ
    x[:, :, 2, 1] *= 1e-4  # a position where the images barely vary (a plain background)
    mean, precision = fit_positional_gaussians(x, chunk=4)
    assert mean.shape == (6, 5) and precision.shape == (6, 5, 5)
    rows = x.permute(2, 3, 0, 1).reshape(6, 20, 5).double()
    floor = POSITIONAL_FLOOR * float(rows.var(1, correction=0).mean())
    for p in range(6):
        cov, _ = ledoit_wolf(rows[p].numpy())
        cov = cov + np.eye(5) * (floor + 1e-6 * np.trace(cov) / 5)
        np.testing.assert_allclose(mean[p].numpy(), rows[p].mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(precision[p].numpy(), np.linalg.inv(cov), rtol=1e-3,
                                   atol=1e-5)
    # the quiet position is no sharper than the floor allows: float noise stays noise
    assert float(torch.linalg.eigvalsh(precision[5].double()).max()) <= 1 / floor


def test_positional_distance_is_each_positions_own_mahalanobis() -> None:
    det = ScaleDetector(dim=3, topk_ratio=0.5, grid=1, rank=2, positions=4)
    g = torch.Generator().manual_seed(1)
    det.mean.copy_(torch.randn(4, 3, generator=g))
    a = torch.randn(4, 3, 3, generator=g)
    det.precision.copy_(a @ a.transpose(1, 2) + torch.eye(3))
    dev = torch.randn(2, 3, 2, 2, generator=g)
    got = det.distance_map(dev)
    x = dev.permute(0, 2, 3, 1).reshape(2, 4, 3)
    for b in range(2):
        for p in range(4):
            ref = mahalanobis(x[b, p], det.mean[p], det.precision[p])
            assert float(got[b].flatten()[p]) == pytest.approx(float(ref), rel=1e-5)


def test_positional_term_tells_a_normal_value_in_the_wrong_place() -> None:
    """A deviation normal at one position but not at another: only per-position Gaussians see it."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 2, 1, 2, generator=g) * 0.1
    x[:, 0, 0, 0] += 1.0  # position 0 normally holds +1, position 1 holds 0
    shared = ScaleDetector(dim=2, topk_ratio=0.5, grid=1, rank=1)
    mean, prec = fit_gaussian(x.permute(0, 2, 3, 1).reshape(-1, 2))
    shared.mean.copy_(mean)
    shared.precision.copy_(prec)
    positional = ScaleDetector(dim=2, topk_ratio=0.5, grid=1, rank=1, positions=2)
    mean, prec = fit_positional_gaussians(x)
    positional.mean.copy_(mean)
    positional.precision.copy_(prec)
    swapped = torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]]]])  # +1 at position 1 instead of 0
    normal = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]])
    assert float(positional.distance_map(swapped).max()) > 5 * float(
        positional.distance_map(normal).max())
    assert float(shared.distance_map(swapped).max()) < 2 * float(
        shared.distance_map(normal).max())


def test_fit_positional_gaussians_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least two maps"):
        fit_positional_gaussians(torch.zeros(1, 3, 2, 2))
