"""core/explore/runs.py: two runs' configs, metrics and disagreements."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import RunConfig, with_overrides
from core.explore import (
    config_diff,
    disagreements,
    flat_config,
    metrics_side_by_side,
    standing,
)


def test_config_diff_lists_only_the_fields_that_differ():
    a = RunConfig()
    b = with_overrides(a, ["train.lr=0.01", "train.augment.flip=false",
                           "model.scales=[\"layer3\"]"])
    diff = config_diff(a, b)
    assert list(diff["field"]) == ["model.scales", "train.augment.flip", "train.lr"]
    assert diff.set_index("field").loc["model.scales"].tolist() == [
        "layer2, layer3, layer4", "layer3"]
    assert config_diff(a, a).empty
    assert len(flat_config(a)) > 40 and "train.augment.flip" in flat_config(a)


def test_metrics_side_by_side_keeps_what_only_one_run_has():
    a = {"auroc": 0.8, "auroc_by_type": {"local": 0.7}, "auroc_by_scale": {"layer2": 0.6}}
    b = {"auroc": 0.9, "auroc_by_type": {"local": 0.75, "style": 1.0}}
    table = metrics_side_by_side(a, b).set_index("metric")
    assert table.loc["image AUROC", "change"] == pytest.approx(0.1)
    assert np.isnan(table.loc["AUROC · type style", "a"])
    assert table.loc["AUROC · type style", "b"] == 1.0
    assert np.isnan(table.loc["AUROC · scale layer2", "b"])
    assert metrics_side_by_side(None, None)["a"].isna().all()


def test_disagreements_are_the_largest_differences_in_standing_among_the_normals():
    a = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    b = 100 * a  # the same order on another scale
    b[0], b[4] = b[4], b[0]  # the two runs swap the lowest and the highest image
    everyone = np.ones(5, dtype=bool)
    assert sorted(disagreements(a, b, everyone, 2)) == [0, 4]
    with pytest.raises(ValueError, match="length"):
        disagreements(a, b[:3], everyone)
    # a refit that raises one anomaly (#3) past the others (#4-#6) moves them down the whole
    # set's ranking, not among the normals (#0-#2): only #3's standing changes
    normal = np.array([True, True, True, False, False, False, False])
    a = np.array([0.1, 0.2, 0.3, 0.25, 0.5, 0.6, 0.7])
    b = a.copy()
    b[3] = 5.0
    assert np.allclose(standing(a, normal), [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    assert np.allclose(standing(b, normal)[4:], standing(a, normal)[4:])
    assert disagreements(a, b, normal, 1) == [3]
