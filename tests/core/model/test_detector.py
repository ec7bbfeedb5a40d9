"""core/model/detector.py: Gaussian fit, Mahalanobis distance, and the assembled detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.model.detector import N_SCORES, AnomalyDetector, Scores, fit_gaussian, mahalanobis

SCALES = ("layer2", "layer3")
DIM = 4


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


def random_detector(seed: int = 0) -> AnomalyDetector:
    """A detector with every fitted buffer set to something other than its default."""
    g = torch.Generator().manual_seed(seed)
    det = AnomalyDetector(SCALES, DIM, topk_ratio=0.1)
    with torch.no_grad():
        for s in SCALES:
            sd = det.per_scale[s]
            for name in ("precision", "global_precision"):
                a = torch.randn(DIM, DIM, generator=g)
                getattr(sd, name).copy_(a @ a.T + torch.eye(DIM))
            sd.mean.copy_(torch.randn(DIM, generator=g))
            sd.global_mean.copy_(torch.randn(DIM, generator=g))
            sd.map_loc.fill_(0.7)
            sd.map_scale.fill_(1.9)
            sd.score_loc.copy_(torch.randn(N_SCORES, generator=g))
            sd.score_scale.copy_(torch.rand(N_SCORES, generator=g) + 0.5)
        det.weights.copy_(torch.rand(len(det.weights), generator=g))
    return det


def deviations(batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer2": torch.randn(batch, DIM, 8, 8, generator=g),
            "layer3": torch.randn(batch, DIM, 4, 4, generator=g)}


def reference_scale_scores(det: AnomalyDetector, dev: dict[str, torch.Tensor]
                           ) -> dict[str, np.ndarray]:
    """(B, 2) standardised [top-k mean of the distance map, pooled distance] per scale."""
    out = {}
    for s in SCALES:
        sd = det.per_scale[s]
        x = dev[s].double().numpy()
        b, d, h, w = x.shape
        rows = x.transpose(0, 2, 3, 1).reshape(b, h * w, d) - sd.mean.double().numpy()
        prec = sd.precision.double().numpy()
        dist = np.sqrt(np.einsum("bpi,ij,bpj->bp", rows, prec, rows))
        k = max(1, round(0.1 * h * w))
        local = np.sort(dist, axis=1)[:, ::-1][:, :k].mean(1)
        pooled = x.mean(axis=(2, 3)) - sd.global_mean.double().numpy()
        glob = np.sqrt(np.einsum("bi,ij,bj->b", pooled, sd.global_precision.double().numpy(),
                                 pooled))
        raw = np.stack([local, glob], axis=1)
        out[s] = (raw - sd.score_loc.double().numpy()) / sd.score_scale.double().numpy()
    return out


def test_detector_output_shapes() -> None:
    det = random_detector()
    scores = det(deviations(3), (32, 24))
    assert isinstance(scores, Scores)
    assert scores.image.shape == (3,)
    assert set(scores.per_scale) == set(SCALES)
    assert all(v.shape == (3,) for v in scores.per_scale.values())
    assert scores.pixel_map.shape == (3, 32, 24)
    assert scores.maps["layer2"].shape == (3, 8, 8)
    assert scores.maps["layer3"].shape == (3, 4, 4)


def test_image_score_is_the_weighted_sum_of_standardised_scale_scores() -> None:
    det = random_detector()
    dev = deviations(5)
    scores = det(dev, (32, 32))
    ref = reference_scale_scores(det, dev)
    z = np.concatenate([ref[s] for s in SCALES], axis=1)  # (B, 2S)
    np.testing.assert_allclose(scores.image.numpy(), z @ det.weights.double().numpy(),
                               rtol=1e-4, atol=1e-4)
    for s in SCALES:
        np.testing.assert_allclose(scores.per_scale[s].numpy(), ref[s].mean(1),
                                   rtol=1e-4, atol=1e-4)


def test_classifier_adds_its_logit_to_the_image_score() -> None:
    det = random_detector()
    dev = deviations(4)
    base = det(dev, (32, 32)).image
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        det.clf_weight.copy_(torch.randn(len(det.clf_weight), generator=g))
        det.clf_bias.fill_(0.3)
    z = torch.from_numpy(np.concatenate(
        [reference_scale_scores(det, dev)[s] for s in SCALES], axis=1)).float()
    pooled = [F.normalize(dev[s].mean(dim=(2, 3)), dim=1) for s in SCALES]
    logit = torch.cat([z, *pooled], dim=1) @ det.clf_weight + 0.3
    torch.testing.assert_close(det(dev, (32, 32)).image, base + logit, atol=1e-4, rtol=1e-4)


def test_maps_are_standardised_and_pixel_map_averages_the_scales() -> None:
    det = random_detector()
    with torch.no_grad():  # spatially constant deviation: every map is constant
        for s in SCALES:
            det.per_scale[s].precision.copy_(torch.eye(DIM))
            det.per_scale[s].mean.zero_()
    dev = {"layer2": torch.full((1, DIM, 8, 8), 1.0), "layer3": torch.full((1, DIM, 4, 4), 2.0)}
    scores = det(dev, (16, 16))
    expected = {"layer2": (2.0 - 0.7) / 1.9, "layer3": (4.0 - 0.7) / 1.9}  # |dev| = 2, 4
    for s in SCALES:
        torch.testing.assert_close(scores.maps[s], torch.full_like(scores.maps[s], expected[s]))
    mean = (expected["layer2"] + expected["layer3"]) / 2
    torch.testing.assert_close(scores.pixel_map, torch.full((1, 16, 16), mean))


def test_far_sample_scores_higher_than_samples_of_the_fitted_gaussian() -> None:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(DIM, DIM, generator=g)

    def sample(batch: int, h: int) -> torch.Tensor:
        x = torch.randn(batch, h, h, DIM, generator=g) @ mix  # correlated Gaussian
        return x.permute(0, 3, 1, 2).contiguous()

    det = AnomalyDetector(SCALES, DIM, topk_ratio=0.1)
    normal = {"layer2": sample(64, 8), "layer3": sample(64, 4)}
    with torch.no_grad():
        for s, dev in normal.items():
            sd = det.per_scale[s]
            mean, precision = fit_gaussian(dev.permute(0, 2, 3, 1).reshape(-1, DIM))
            sd.mean.copy_(mean)
            sd.precision.copy_(precision)
            gmean, gprecision = fit_gaussian(dev.mean(dim=(2, 3)))
            sd.global_mean.copy_(gmean)
            sd.global_precision.copy_(gprecision)
    test = {"layer2": sample(9, 8), "layer3": sample(9, 4)}
    for s in SCALES:
        test[s][0] += 6 * mix[0].view(DIM, 1, 1)  # image 0: far along a direction of the data
    scores = det(test, (32, 32))
    assert scores.image.argmax().item() == 0
    assert scores.image[0] > scores.image[1:].max() + 1.0
    for s in SCALES:
        assert scores.per_scale[s].argmax().item() == 0
