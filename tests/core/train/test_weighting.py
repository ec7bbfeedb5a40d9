"""core/train/weighting.py: how stage 2 weighs the terms, and the check learnt weights must
pass. Stage 2's use of it on a model: tests/core/train/test_stage2.py."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from core.config import SHIFTS
from core.train.weighting import (
    CHECK_MARGIN,
    CHECK_TOLERANCE,
    auroc,
    choose_weights,
    confirms,
    uninformative,
)

NAMES = ["layer2/local", "layer2/layout", "layer3/local", "layer3/layout"]
FIXED = torch.tensor([0.0, 0.5, 0.0, 0.5])


def terms(shifts: dict[str, list[float]], n: int = 200, seed: int = 0
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Standardised terms of held-out normals, and of pseudo-anomalies of every kind of SHIFTS
    shifted from them by `shifts[kind]` (one offset per term)."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return normal, {k: torch.randn(n, 4, generator=g, dtype=torch.float64)
                    + torch.tensor(shifts[k], dtype=torch.float64) for k in SHIFTS}


def test_kinds_both_weightings_separate_perfectly_do_not_dilute_the_check() -> None:
    """Four kinds at AUROC 1.0 either way and two where the learnt weights gain 0.03: the mean
    over all six (0.01 margin) would refuse them, the mean over the two confirms them."""
    check = {k: {"learned": 1.0, "fixed": 1.0} for k in ("jigsaw", "rotate", "colour", "blend")}
    check |= {"cutpaste": {"learned": 0.83, "fixed": 0.80},
              "scar": {"learned": 0.73, "fixed": 0.70}}
    assert confirms(check)
    # a perfect kind is still evidence when only one weighting is perfect on it
    check["colour"] = {"learned": 0.97, "fixed": 1.0}
    assert not confirms(check)  # a 0.03 loss on one kind: over the tolerance
    assert not confirms({k: {"learned": 1.0, "fixed": 1.0} for k in SHIFTS})


def test_the_check_asks_a_mean_gain_of_the_margin_and_no_loss_over_the_tolerance() -> None:
    assert (CHECK_MARGIN, CHECK_TOLERANCE) == (0.01, 0.02)
    at_margin = {"a": {"learned": 0.81, "fixed": 0.80}, "b": {"learned": 0.71, "fixed": 0.70}}
    assert confirms(at_margin)
    below = {"a": {"learned": 0.805, "fixed": 0.80}, "b": {"learned": 0.71, "fixed": 0.70}}
    assert not confirms(below)  # a mean gain of 0.0075
    losing = {"a": {"learned": 0.90, "fixed": 0.80}, "b": {"learned": 0.675, "fixed": 0.70}}
    assert not confirms(losing)  # a mean gain of 0.0375, but a loss of 0.025 on one kind
    tolerated = {"a": {"learned": 0.90, "fixed": 0.80}, "b": {"learned": 0.685, "fixed": 0.70}}
    assert confirms(tolerated)
    assert not confirms({})  # no evidence at all
    assert uninformative({"learned": 1.0, "fixed": 1.0})
    assert not uninformative({"learned": 1.0, "fixed": 0.99})


def test_auroc_is_scikit_learns_with_normals_as_the_negatives() -> None:
    g = torch.Generator().manual_seed(1)
    normal, anomalous = torch.randn(50, generator=g), torch.randn(30, generator=g) + 1
    expected = roc_auc_score([0] * 50 + [1] * 30, torch.cat([normal, anomalous]).numpy())
    assert auroc(normal, anomalous) == pytest.approx(expected)
    assert auroc(normal, normal + 100) == 1.0 and auroc(normal + 100, normal) == 0.0


def test_fixed_weights_are_chosen_without_looking_at_any_evidence() -> None:
    weights, report = choose_weights(torch.zeros(0), {}, FIXED, NAMES, "fixed")
    torch.testing.assert_close(weights, FIXED)
    assert report == {"combine": "fixed", "chosen": "fixed",
                      "weights": {"fixed": dict(zip(NAMES, FIXED.tolist(), strict=True))}}


def test_learned_weights_are_convex_and_favour_the_informative_term() -> None:
    normal, pseudo = terms({k: [0, 0, 3, 0] for k in SHIFTS})
    weights, report = choose_weights(normal, pseudo, FIXED, NAMES, "learned")
    assert weights.dtype == torch.float32 and weights.shape == (4,)
    assert bool((weights >= 0).all()) and float(weights.sum()) == pytest.approx(1.0, abs=1e-5)
    assert int(weights.argmax()) == 2 and float(weights[2]) > 0.6
    assert report["chosen"] == "learned" and "check" not in report
    assert list(report["weights"]["learned"]) == NAMES
    assert set(report["pseudo_auroc"]) == set(SHIFTS)
    for kind, x in pseudo.items():
        row = report["pseudo_auroc"][kind]
        assert set(row) == {*NAMES, "fixed", "learned"}
        assert row["layer3/local"] == pytest.approx(auroc(normal[:, 2], x[:, 2]))
        assert row["layer3/local"] > 0.95
        assert row["fixed"] == pytest.approx(auroc(normal @ FIXED.double(),
                                                   x @ FIXED.double()))
        assert row["learned"] > row["fixed"]


def test_checked_keeps_learnt_weights_that_hold_on_every_unseen_kind() -> None:
    normal, pseudo = terms({k: [3, 0, 0, 0] for k in SHIFTS})  # the local term sees all
    weights, report = choose_weights(normal, pseudo, FIXED, NAMES, "checked")
    assert report["chosen"] == "learned" and int(weights.argmax()) == 0
    assert set(report["check"]) == set(SHIFTS) and report["check_uninformative"] == []
    assert all(c["learned"] > c["fixed"] for c in report["check"].values())
    torch.testing.assert_close(weights, torch.tensor(list(report["weights"]["learned"].values())))


def test_checked_falls_back_to_fixed_weights_when_a_kind_is_missed() -> None:
    """The local term wins on five kinds, but weights fitted without `rotate` miss rotations,
    which only the layout terms see: the learnt weights are not trusted."""
    shifts = {k: [3, 0.3, 0, 0.3] for k in SHIFTS}
    shifts["rotate"] = [0, 3, 0, 3]
    normal, pseudo = terms(shifts)
    weights, report = choose_weights(normal, pseudo, FIXED, NAMES, "checked")
    assert report["check"]["rotate"]["learned"] < report["check"]["rotate"]["fixed"] - 0.02
    assert report["chosen"] == "fixed"
    torch.testing.assert_close(weights, FIXED)
    assert "learned" in report["weights"]  # what was refused stays in the report
