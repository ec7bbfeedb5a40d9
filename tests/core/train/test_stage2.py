"""core/train/stage2.py: fitting and calibrating the detector and the image-level terms, the
combination of terms on a model, the labelled-anomaly head, the pixel map's scales. The
weighting and its check: test_weighting.py; the logistic fits: test_logistic.py."""

from __future__ import annotations

import pytest
import torch

from core.config import SHIFTS, ModelConfig, TrainConfig
from core.data.base import ImageSet
from core.model.anomem import AnoMem
from core.model.pixels import PixelLayout
from core.train import stage2, trainer
from core.train.augment import to_float
from core.train.distributed import Dist

TINY = dict(image_size=16, width=0.125, memory_size=4, memory_dim=4, head_dim=4,
            scales=("layer2", "layer3"), pixel_memory=0, pixel_layout=False)


def fake_terms(monkeypatch: pytest.MonkeyPatch, shifts: dict[str, list[float]], n: int = 200,
               seed: int = 0) -> None:
    """standardised_terms answers held-out normals first, then one set per kind of SHIFTS,
    each shifted from the normals by `shifts[kind]` (one offset per term)."""
    g = torch.Generator().manual_seed(seed)
    answers = iter([torch.randn(n, 4, generator=g)] + [
        torch.randn(n, 4, generator=g) + torch.tensor(shifts[k]) for k in SHIFTS])
    monkeypatch.setattr(stage2, "standardised_terms", lambda *args, **kw: next(answers))


def combine(rule: str) -> tuple[AnoMem, dict]:
    model = AnoMem(ModelConfig(**TINY))
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, 256, (200, 3, 16, 16), dtype=torch.uint8, generator=g)
    report = stage2.fit_combination(model, calibration, TrainConfig(combine=rule),
                                    torch.device("cpu"), g, Dist())
    return model, report


def test_learned_combination_is_convex_and_favours_the_informative_term(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_terms(monkeypatch, {k: [0, 0, 3, 0] for k in SHIFTS})
    model, report = combine("learned")
    w = model.detector.weights
    assert bool((w >= 0).all()) and float(w.sum()) == pytest.approx(1.0, abs=1e-5)
    assert int(w.argmax()) == 2 and float(w[2]) > 0.6
    assert report["chosen"] == "learned"
    assert report["pseudo_auroc"]["blend"]["layer3/local"] > 0.95


def test_checked_keeps_learnt_weights_that_hold_on_every_unseen_kind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_terms(monkeypatch, {k: [3, 0, 0, 0] for k in SHIFTS})  # the local term sees all
    model, report = combine("checked")
    assert report["chosen"] == "learned" and int(model.detector.weights.argmax()) == 0
    assert all(c["learned"] > c["fixed"] for c in report["check"].values())


def test_checked_falls_back_to_fixed_weights_when_a_kind_is_missed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The local term wins on five kinds, but weights fitted without `rotate` miss rotations,
    which only the layout terms see: the learnt weights are not trusted."""
    shifts = {k: [3, 0.3, 0, 0.3] for k in SHIFTS}
    shifts["rotate"] = [0, 3, 0, 3]
    fake_terms(monkeypatch, shifts)
    model, report = combine("checked")
    assert report["check"]["rotate"]["learned"] < report["check"]["rotate"]["fixed"] - 0.02
    assert report["chosen"] == "fixed"
    torch.testing.assert_close(model.detector.weights, model.detector.fixed_weights())


def test_fixed_combination_is_the_configured_one() -> None:
    model, report = combine("fixed")
    torch.testing.assert_close(model.detector.weights, torch.tensor([0, 0.5, 0, 0.5]))
    assert report["chosen"] == "fixed" and "learned" not in report["weights"]


def test_the_labelled_head_never_lowers_a_one_class_score() -> None:
    """softplus link: the head's term is >= 0 whatever its weights."""
    model = AnoMem(ModelConfig(**TINY)).eval()
    det = model.detector
    g = torch.Generator().manual_seed(3)
    det.clf_weight.copy_(torch.randn(det.clf_weight.shape, generator=g) * 5)
    det.clf_bias.fill_(-20.0)
    x = torch.rand(6, 3, 16, 16, generator=g)
    with torch.no_grad():
        reads = model(x)
        z, _ = det.features(reads)
        score = model.score(x).image
    assert bool((score >= z @ det.weights - 1e-6).all())


def pasted_top_left(x: torch.Tensor, kinds: tuple[str, ...], g: torch.Generator) -> torch.Tensor:
    """A stand-in for every local shift: a white square pasted into the top-left quadrant."""
    out = x.clone()
    out[:, :, :8, :8] = 255
    return out


def top_left_map(deviation: torch.Tensor) -> torch.Tensor:
    """A distance map that finds the pasted square exactly (plus a little noise)."""
    b, _, h, w = deviation.shape
    dmap = torch.rand(b, h, w) * 0.1
    dmap[:, :h // 2, :w // 2] += 1
    return dmap


@pytest.mark.parametrize(("finders", "chosen"), [
    (("layer2",), "layer2"),  # layer3 sees noise: the map keeps layer2 alone
    (("layer2", "layer3"), "layer2+layer3"),  # both find it: nothing to gain, all scales stay
])
def test_the_pixel_map_keeps_the_scales_that_outline_pasted_defects(
        monkeypatch: pytest.MonkeyPatch, finders: tuple[str, ...], chosen: str) -> None:
    torch.manual_seed(0)
    model = AnoMem(ModelConfig(**TINY)).eval()
    det = model.detector
    monkeypatch.setattr(stage2, "shift", pasted_top_left)
    for s in model.scales:
        noise = lambda d: 4 * torch.rand(len(d), *d.shape[2:])  # noqa: E731
        monkeypatch.setattr(det.per_scale[s], "distance_map",
                            top_left_map if s in finders else noise)
    calibration = torch.randint(0, 200, (24, 3, 16, 16), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(1))
    report = stage2.fit_map_weights(model, calibration, torch.device("cpu"),
                                    torch.Generator().manual_seed(2), Dist())
    assert report["chosen"] == chosen
    assert set(report["pseudo_pixel_auroc"]) == {"layer2+layer3", "layer2", "layer3"}
    assert report["pseudo_pixel_auroc"]["layer2"] == pytest.approx([1.0] * 3)
    expected = torch.tensor([float(s in chosen.split("+")) for s in model.scales])
    torch.testing.assert_close(det.map_weights, expected / expected.sum())


def test_fit_stage2_fits_on_the_normals_stage1_trained_on_and_calibrates_on_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert trainer.split_normals is stage2.split_normals  # the trainer's split is this one
    labels = [0] * 30 + [1] * 4 + [0] * 6
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 4, 4)
    train = ImageSet(images=images, labels=torch.tensor(labels),
                     types=["normal" if y == 0 else "object" for y in labels],
                     names=[str(i) for i in range(40)], edge=torch.zeros(40, dtype=torch.bool))
    seen = {}

    def fit_detector(model, fit, calibration, anomalies, tc, device, progress, should_stop,
                     dist):
        seen.update(fit=fit, calibration=calibration, anomalies=anomalies)
        return {"chosen": "fixed"}

    monkeypatch.setattr(stage2, "fit_detector", fit_detector)
    tc = TrainConfig(holdout=0.2, seed=3)
    report = stage2.fit_stage2(None, train, tc, torch.device("cpu"))
    assert report == {"chosen": "fixed"}
    fit_idx, cal_idx = stage2.split_normals(train, 0.2, 3)
    index = {name: seen[name][:, 0, 0, 0].tolist() for name in seen}
    assert index["fit"] == fit_idx.tolist() and index["calibration"] == cal_idx.tolist()
    assert index["anomalies"] == [30, 31, 32, 33]
    assert len(index["calibration"]) == 7  # 20 % of the 36 normals
    assert not set(index["fit"]) & set(index["calibration"])


def test_stage2_fits_every_part_and_calibrates_every_term_on_the_held_out_normals() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "pixel_memory": 16, "pixel_layout": True, "rotation": True,
                         "map_weights": False})
    model = AnoMem(cfg).eval()
    g = torch.Generator().manual_seed(1)
    fit = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=g)
    calibration = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8, generator=g)
    tc = TrainConfig(combine="fixed")
    stage2.fit_detector(model, fit, calibration, fit[:0], tc, torch.device("cpu"))
    det = model.detector
    assert bool(det.fitted)
    assert list(model.terms) == ["pixels", "pixel_layout", "rotation"]
    # the image-level terms: fitted on the `fit` images (the rotation head has nothing to fit)
    assert int(model.terms["pixels"].count) == 16
    layout = PixelLayout(3, model.terms["pixel_layout"].grid)
    layout.fit(fit)
    torch.testing.assert_close(model.terms["pixel_layout"].gaussian.precision,
                               layout.gaussian.precision)
    for s in model.scales:  # each scale's Gaussians fitted
        sd = det.per_scale[s]
        assert not torch.equal(sd.local.precision, torch.eye(cfg.memory_dim))
        assert torch.count_nonzero(sd.layout.basis) > 0
    # every column standardised on the held-out normals: mean 0, std 1 there
    z = stage2.standardised_terms(model, calibration, torch.device("cpu"))
    assert z.shape == (20, len(det.term_names))
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(z.shape[1]), atol=1e-4, rtol=0)
    for term in model.terms.values():
        assert float(term.scale) != 1.0 and float(term.loc) != 0.0, term.name
    with torch.no_grad():
        maps = model.score(to_float(calibration)).maps
    for s, m in maps.items():
        assert float(m.mean()) == pytest.approx(0.0, abs=1e-4), s
        assert float(m.std()) == pytest.approx(1.0, abs=1e-3), s
    torch.testing.assert_close(det.weights, det.fixed_weights())

