"""core/model/detector.py: each scale's detector (its Gaussians, fit and calibration) and the
assembled detector. The Gaussians themselves: tests/core/model/test_gaussians.py."""

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
)
from core.model.gaussians import PPCA, Gaussian, PositionalGaussians, mahalanobis
from core.model.memory import MemoryRead

SCALES = ("layer2", "layer3")
DIM = 4
GRIDS = {"layer2": 4, "layer3": 2}  # maps of 8 x 8 and 4 x 4 pooled by two
SIZES = {"layer2": 8, "layer3": 4}
RANK = 5
TOPK = 0.1


def full_mahalanobis(y: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    d = y - mean
    return np.sqrt(np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov), d))


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
            sd.local.precision.copy_(a @ a.T + torch.eye(DIM))
            sd.local.mean.copy_(torch.randn(DIM, generator=g))
            layout = DIM * GRIDS[s] ** 2
            q, _ = torch.linalg.qr(torch.randn(layout, RANK, generator=g))
            sd.layout.basis.copy_(q)
            sd.layout.mean.copy_(0.1 * torch.randn(layout, generator=g))
            sd.layout.variances.copy_(torch.rand(RANK, generator=g) + 0.2)
            sd.layout.noise.fill_(0.05)
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
        rows = dev.transpose(0, 2, 3, 1).reshape(b, h * w, d) - buf["local.mean"]
        dist = np.sqrt(np.einsum("bpi,ij,bpj->bp", rows, buf["local.precision"], rows))
        k = max(1, round(TOPK * h * w))
        local = np.sort(dist, axis=1)[:, ::-1][:, :k].mean(1)
        source = reads[s].query if det.layout_source == "query" else reads[s].deviation
        g = GRIDS[s]
        cells = source.double().numpy().reshape(b, d, g, h // g, g, w // g).mean(axis=(3, 5))
        u = buf["layout.basis"]
        cov = (u * buf["layout.variances"]) @ u.T + buf["layout.noise"] * (np.eye(len(u))
                                                                           - u @ u.T)
        layout = full_mahalanobis(cells.reshape(b, -1), buf["layout.mean"], cov)
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
        assert state[f"per_scale.{s}.layout.basis"].shape == (layout, RANK)
        assert state[f"per_scale.{s}.layout.mean"].shape == (layout,)
        assert state[f"per_scale.{s}.layout.variances"].shape == (RANK,)
        assert state[f"per_scale.{s}.layout.noise"].shape == ()
        assert state[f"per_scale.{s}.local.precision"].shape == (DIM, DIM)
        assert state[f"per_scale.{s}.local.mean"].shape == (DIM,)
        assert isinstance(det.per_scale[s].local, Gaussian)
        assert isinstance(det.per_scale[s].layout, PPCA)
    fitted = random_detector(seed=4)
    det.load_state_dict(fitted.state_dict())
    reads = make_reads(2)
    torch.testing.assert_close(det(reads, (8, 8)).image, fitted(reads, (8, 8)).image)


def test_scale_detector_pools_the_map_to_its_grid() -> None:
    sd = ScaleDetector(DIM, TOPK, grid=2, rank=RANK)
    x = torch.arange(DIM * 16, dtype=torch.float32).view(1, DIM, 4, 4)
    cells = x.view(1, DIM, 2, 2, 2, 2).mean(dim=(3, 5))  # (B, D, g, g): 2 x 2 blocks
    torch.testing.assert_close(sd.pooled(x), cells.flatten(1))
    one = ScaleDetector(DIM, TOPK, grid=1, rank=RANK)
    torch.testing.assert_close(one.pooled(x), x.mean(dim=(2, 3)))


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
    assert (det.map_weights is None) == (map_weights is None)
    assert ("map_weights" in det.state_dict()) == (map_weights is not None)
    with torch.no_grad():  # spatially constant deviation: every map is constant
        for s in SCALES:
            det.per_scale[s].local.precision.copy_(torch.eye(DIM))
            det.per_scale[s].local.mean.zero_()
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
    for s, r in normal.items():
        sd = det.per_scale[s]
        sd.fit(r.deviation.permute(0, 2, 3, 1).reshape(-1, DIM), sd.pooled(r.query))
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


def test_a_positional_scales_distance_map_is_each_positions_own_mahalanobis() -> None:
    det = ScaleDetector(dim=3, topk_ratio=0.5, grid=1, rank=2, positions=4)
    assert det.positional and isinstance(det.local, PositionalGaussians)
    g = torch.Generator().manual_seed(1)
    det.local.mean.copy_(torch.randn(4, 3, generator=g))
    a = torch.randn(4, 3, 3, generator=g)
    det.local.precision.copy_(a @ a.transpose(1, 2) + torch.eye(3))
    dev = torch.randn(2, 3, 2, 2, generator=g)
    got = det.distance_map(dev)
    assert got.shape == (2, 2, 2)
    x = dev.permute(0, 2, 3, 1).reshape(2, 4, 3)
    for b in range(2):
        for p in range(4):
            ref = mahalanobis(x[b, p], det.local.mean[p], det.local.precision[p])
            assert float(got[b].flatten()[p]) == pytest.approx(float(ref), rel=1e-5)


def test_positional_term_tells_a_normal_value_in_the_wrong_place() -> None:
    """A deviation normal at one position but not at another: only per-position Gaussians see it."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 2, 1, 2, generator=g) * 0.1
    x[:, 0, 0, 0] += 1.0  # position 0 normally holds +1, position 1 holds 0
    shared = ScaleDetector(dim=2, topk_ratio=0.5, grid=1, rank=1)
    shared.fit(x.permute(0, 2, 3, 1).reshape(-1, 2), shared.pooled(x))  # rows of every map
    positional = ScaleDetector(dim=2, topk_ratio=0.5, grid=1, rank=1, positions=2)
    positional.fit(x, positional.pooled(x))  # the maps themselves
    swapped = torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]]]])  # +1 at position 1 instead of 0
    normal = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]])
    assert float(positional.distance_map(swapped).max()) > 5 * float(
        positional.distance_map(normal).max())
    assert float(shared.distance_map(swapped).max()) < 2 * float(
        shared.distance_map(normal).max())


@pytest.mark.parametrize("positions", [0, 16])
def test_scale_detector_fit_fits_its_local_gaussian_and_its_layout_ppca(positions: int) -> None:
    g = torch.Generator().manual_seed(3)
    maps = torch.randn(30, DIM, 4, 4, generator=g) * torch.arange(1, DIM + 1.0)[:, None, None]
    sd = ScaleDetector(DIM, TOPK, grid=2, rank=RANK, positions=positions)
    local = maps if positions else maps.permute(0, 2, 3, 1).reshape(-1, DIM)
    sd.fit(local, sd.pooled(maps))
    expected_local = PositionalGaussians(positions, DIM) if positions else Gaussian(DIM)
    expected_local.fit(local)
    expected_layout = PPCA(DIM * 4, RANK)
    expected_layout.fit(sd.pooled(maps))
    for name, value in {**{f"local.{k}": v for k, v in expected_local.state_dict().items()},
                        **{f"layout.{k}": v
                           for k, v in expected_layout.state_dict().items()}}.items():
        torch.testing.assert_close(sd.state_dict()[name], value, rtol=0, atol=0)
    assert not torch.equal(sd.local.precision, ScaleDetector(
        DIM, TOPK, grid=2, rank=RANK, positions=positions).local.precision)  # fitted
    # the standardisation is calibration's, not the fit's
    torch.testing.assert_close(sd.score_loc, torch.zeros(N_SCORES))
    torch.testing.assert_close(sd.map_scale, torch.ones(()))


def test_calibrate_standardises_the_calibration_data_to_mean_0_std_1() -> None:
    g = torch.Generator().manual_seed(4)
    det = AnomalyDetector(DIM, TOPK, GRIDS, rank=4)
    fit, calibration = make_reads(40, seed=5), make_reads(30, seed=6)
    for s in SCALES:
        sd = det.per_scale[s]
        sd.fit(fit[s].deviation.permute(0, 2, 3, 1).reshape(-1, DIM),
               sd.pooled(det.layout_input(fit[s])))
    for s in SCALES:  # as stage 2 does: raw scores and distance maps of held-out normals
        sd = det.per_scale[s]
        dmap = sd.distance_map(calibration[s].deviation)
        raw = sd.raw_scores(det.layout_input(calibration[s]), dmap)
        assert raw.shape == (30, N_SCORES)
        sd.calibrate(raw, dmap)
        torch.testing.assert_close(sd.score_loc, raw.mean(0))
        torch.testing.assert_close(sd.score_scale, raw.std(0))
        torch.testing.assert_close(sd.map_loc, dmap.mean())
        torch.testing.assert_close(sd.map_scale, dmap.std())
    scores = det(calibration, (8, 8))
    for name, z in scores.terms.items():
        assert float(z.mean()) == pytest.approx(0.0, abs=1e-5), name
        assert float(z.std()) == pytest.approx(1.0, abs=1e-5), name
    for s, m in scores.maps.items():
        assert float(m.mean()) == pytest.approx(0.0, abs=1e-4), s
        assert float(m.std()) == pytest.approx(1.0, abs=1e-4), s
    # a term that never varies keeps a tiny, not a zero, spread: standardised it stays finite
    sd = ScaleDetector(DIM, TOPK, grid=2, rank=RANK)
    raw = torch.stack([torch.full((10,), 3.0), torch.randn(10, generator=g)], dim=1)
    sd.calibrate(raw, torch.full((10, 4, 4), 2.0))
    assert float(sd.score_scale[0]) == pytest.approx(1e-6, rel=1e-6)
    assert float(sd.map_scale) == pytest.approx(1e-6, rel=1e-6)
    assert bool(torch.isfinite(sd.standardise(raw + 1)).all())


def test_image_terms_are_the_last_columns_passed_through_as_given() -> None:
    names = ["pixels/knn", "pixels/layout", "rotation/loss"]
    det = random_detector(seed=2)
    with_terms = AnomalyDetector(DIM, TOPK, GRIDS, RANK, 0.3, image_terms=names)
    with_terms.per_scale.load_state_dict(det.per_scale.state_dict())  # the same scales
    assert with_terms.image_terms == names
    assert with_terms.term_names == det.term_names + names
    assert with_terms.n_terms == det.n_terms + 3 and with_terms.units == len(SCALES) + 3
    w = with_terms.fixed_weights()
    assert float(w.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(w[-3:], torch.full((3,), 1 / (len(SCALES) + 3)))
    reads = make_reads(4)
    extra = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    z, _ = with_terms.features(reads, extra)
    base, _ = det.features(reads)
    torch.testing.assert_close(z, torch.cat([base, extra], dim=1))  # standardised already
    scores = with_terms(reads, (8, 8), extra)
    for j, name in enumerate(names):
        torch.testing.assert_close(scores.terms[name], extra[:, j])
    torch.testing.assert_close(scores.image, z @ w)
    for bad in (None, extra[:, :2]):
        with pytest.raises(ValueError, match="rotation/loss"):
            with_terms.features(reads, bad)
    # the terms' own state (location, spread) is theirs (core/model/terms.py), not the detector's
    assert set(with_terms.state_dict()) == set(det.state_dict())
