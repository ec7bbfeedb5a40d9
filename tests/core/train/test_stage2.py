"""core/train/stage2.py: the combination of terms, its check, the labelled-anomaly head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import SHIFTS, ModelConfig, TrainConfig
from core.model.anomem import AnoMem
from core.train import stage2
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


def test_kinds_both_weightings_separate_perfectly_do_not_dilute_the_check() -> None:
    """Four kinds at AUROC 1.0 either way and two where the learnt weights gain 0.03: the mean
    over all six (0.01 margin) would refuse them, the mean over the two confirms them."""
    check = {k: {"learned": 1.0, "fixed": 1.0} for k in ("jigsaw", "rotate", "colour", "blend")}
    check |= {"cutpaste": {"learned": 0.83, "fixed": 0.80},
              "scar": {"learned": 0.73, "fixed": 0.70}}
    assert stage2.confirms(check)
    # a perfect kind is still evidence when only one weighting is perfect on it
    check["colour"] = {"learned": 0.97, "fixed": 1.0}
    assert not stage2.confirms(check)  # a 0.03 loss on one kind: over the tolerance
    assert not stage2.confirms({k: {"learned": 1.0, "fixed": 1.0} for k in SHIFTS})


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


def test_positive_offset_logistic_learns_to_raise_the_labelled_class() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(600, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 1.0).double()
    coef, bias = stage2.fit_offset_logistic(x, torch.zeros(600), y, positive=True)
    lift = torch.nn.functional.softplus(x @ coef + bias)
    assert float(lift[y > 0.5].mean()) > 5 * float(lift[y < 0.5].mean())
    assert bool((lift >= 0).all())


def test_offset_logistic_is_scikit_learns_balanced_logistic_without_an_offset() -> None:
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] - 0.5 * x[:, 3] + 0.8 * torch.randn(300, generator=g, dtype=torch.float64)
         > 1.2).double()  # unbalanced classes
    coef, bias = stage2.fit_offset_logistic(x, torch.zeros(300), y, c=0.5)
    ref = LogisticRegression(C=0.5, class_weight="balanced", tol=1e-10, max_iter=10_000)
    ref.fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(coef.numpy(), ref.coef_[0], atol=1e-4)
    assert bias == pytest.approx(float(ref.intercept_[0]), abs=1e-4)


def test_offset_logistic_fits_only_what_the_offset_misses() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    y = (torch.rand(4000, generator=g, dtype=torch.float64)
         < torch.sigmoid(2 * x[:, 0] + x[:, 1])).double()
    alone, _ = stage2.fit_offset_logistic(x, torch.zeros(4000), y, c=10.0)
    given, _ = stage2.fit_offset_logistic(x, 2 * x[:, 0], y, c=10.0)
    assert alone[0] == pytest.approx(2.0, abs=0.25) and alone[1] == pytest.approx(1.0, abs=0.2)
    assert given[0] == pytest.approx(0.0, abs=0.2) and given[1] == pytest.approx(1.0, abs=0.2)


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
