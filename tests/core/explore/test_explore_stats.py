"""core/explore/stats.py: edge cases, per-type statistics, spread examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from core import explore as ex


def test_edge_cases_ordering():
    scores = np.array([0.1, 2.0, 0.5, 3.0, -1.0, 1.05, 0.8])
    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    out = ex.edge_cases(scores, labels, threshold=1.0, k=2)
    assert out["normal_highest"] == [1, 6]
    assert out["anomaly_lowest"] == [4, 5]
    assert out["near_threshold"] == [5, 6]


def test_type_stats_against_sklearn():
    rng = np.random.default_rng(0)
    types = ["normal"] * 40 + ["style"] * 20 + ["local"] * 15
    labels = np.array([0 if t == "normal" else 1 for t in types])
    scores = rng.normal(size=75) + labels * np.where(np.array(types) == "style", 2.0, 0.5)
    stats = ex.type_stats(scores, labels, types, threshold=0.8)
    assert list(stats.table["type"]) == ["local", "style"]
    normal = np.array(types) == "normal"
    for _, row in stats.table.iterrows():
        keep = normal | (np.array(types) == row["type"])
        assert row["auroc"] == pytest.approx(roc_auc_score(labels[keep], scores[keep]))
        of_type = np.array(types) == row["type"]
        assert row["n"] == of_type.sum()
        assert row["detection_rate"] == pytest.approx((scores[of_type] > 0.8).mean())
    assert stats.false_positive_rate == pytest.approx((scores[normal] > 0.8).mean())
    assert stats.n_normal == 40


def test_median_scale_profile_puts_normal_first_and_ignores_one_outlier():
    types = ["style", "normal", "local", "normal", "local", "local"]
    per_scale = {"layer2": np.array([1.0, 0.0, 3.0, 2.0, 4.0, 900.0]),
                 "layer3": np.array([5, 1, 1, 1.0, 2.0, 3.0])}
    df = ex.median_scale_profile(per_scale, types)
    assert list(df.index) == ["normal", "local", "style"]
    assert df.loc["normal", "layer2"] == pytest.approx(1.0)
    assert df.loc["local", "layer2"] == pytest.approx(4.0)  # not the mean, 302.3
    assert df.loc["style", "layer3"] == pytest.approx(5.0)


def test_spread_examples_and_sample_groups():
    scores = np.arange(10.0)[::-1]
    assert ex.spread_examples(scores, np.arange(10), 3) == [9, 5, 0]
    assert ex.spread_examples(scores, np.array([2, 5]), 3) == [5, 2]
    groups = ex.sample_groups(["normal", "normal", "style"], torch.tensor([False, True, False]))
    assert groups == ["normal", ex.EDGE_CASE, "style"]


def test_display_cap_cuts_a_far_tail_and_keeps_an_ordinary_one():
    scores = np.r_[np.linspace(-1, 1, 95), np.linspace(2, 3, 4), 3000.0]
    cap = ex.display_cap(scores, threshold=1.0)
    assert 3.0 < cap < 3000  # every score but the far one stays below it
    ordinary = np.linspace(-1, 3, 100)
    assert ex.display_cap(ordinary, threshold=1.0) == pytest.approx(3.0)  # nothing cut


def test_term_table_weighs_and_scores_each_term():
    labels = np.array([0, 0, 0, 1, 1, 1])
    terms = {"layer2/layout": np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.7]),  # perfect
             "pixels/knn": np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])}  # perfectly inverted
    table = ex.term_table(["layer2/layout", "pixels/knn"], np.array([0.75, 0.25]), terms, labels)
    assert list(table["term"]) == ["layer2/layout", "pixels/knn"]
    assert list(table["weight"]) == [0.75, 0.25]
    assert list(table["auroc"]) == [1.0, 0.0]
    only_normals = ex.term_table(["pixels/knn"], np.array([1.0]), terms, np.zeros(6))
    assert only_normals["auroc"].isna().all()


def test_check_table_and_summary_follow_the_rule_of_stage2():
    report = {"combine": "checked", "chosen": "learned", "check": {
        "jigsaw": {"learned": 1.0, "fixed": 1.0},  # perfect either way: does not count
        "scar": {"learned": 0.90, "fixed": 0.85},
        "blend": {"learned": 0.80, "fixed": 0.79}}}
    table = ex.check_table(report)
    assert list(table["counted"]) == [False, True, True]
    assert table["gain"].tolist() == pytest.approx([0.0, 0.05, 0.01])
    summary = ex.weighing_summary(report)
    assert summary.startswith("Learnt weights") and "2 kinds" in summary and "+0.030" in summary
    refused = ex.weighing_summary({**report, "chosen": "fixed"})
    assert refused.startswith("Fixed weights") and "did not confirm" in refused
    assert ex.check_table({"combine": "fixed", "chosen": "fixed"}) is None
    assert "as configured" in ex.weighing_summary({"combine": "fixed", "chosen": "fixed"})
    assert "predates" in ex.weighing_summary(None)
    assert "no check" in ex.weighing_summary({"combine": "checked", "chosen": "fixed"})
    tiny_loss = {**report, "check": {"scar": {"learned": 0.8499, "fixed": 0.85}}}
    assert "(worst +0.000)" in ex.weighing_summary(tiny_loss)  # not "-0.000"
