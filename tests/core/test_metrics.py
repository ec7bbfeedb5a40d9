"""core/metrics.py: AUROC overall and per type, FPR at a TPR, pixel AUROC."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from core.metrics import auroc, fpr_at_tpr, image_metrics, pixel_auroc


def test_auroc_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = labels + rng.normal(0, 1.0, 200)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], [0]])
def test_auroc_is_none_for_one_class(labels: list[int]) -> None:
    assert auroc(np.array(labels), np.arange(len(labels), dtype=float)) is None
    assert fpr_at_tpr(np.array(labels), np.arange(len(labels), dtype=float)) is None


def test_fpr_at_tpr_hand_computed() -> None:
    # 4 anomalies (scores 0.9, 0.8, 0.6, 0.3) and 5 normals (0.7, 0.5, 0.4, 0.2, 0.1).
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1])
    # Catching all 4 anomalies needs a threshold at 0.3: normals 0.7, 0.5, 0.4 pass -> 3/5.
    assert fpr_at_tpr(labels, scores, 0.95) == pytest.approx(0.6)
    assert fpr_at_tpr(labels, scores, 1.0) == pytest.approx(0.6)
    # 3 of 4 (75%) at threshold 0.6: only normal 0.7 passes -> 1/5.
    assert fpr_at_tpr(labels, scores, 0.75) == pytest.approx(0.2)
    # 2 of 4 at threshold 0.8: no normal passes.
    assert fpr_at_tpr(labels, scores, 0.5) == pytest.approx(0.0)


def per_type_case() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """object anomalies score above every normal, style ones exactly like the normals."""
    normal = np.linspace(0.0, 1.0, 10)
    obj = np.linspace(2.0, 3.0, 5)
    style = normal.copy()
    scores = np.concatenate([normal, obj, style])
    labels = np.r_[np.zeros(10), np.ones(15)].astype(int)
    types = ["normal"] * 10 + ["object"] * 5 + ["style"] * 10
    return labels, scores, types


def test_image_metrics_per_type_uses_normals_and_that_type_only() -> None:
    labels, scores, types = per_type_case()
    m = image_metrics(labels, scores, types)
    assert m["auroc_by_type"] == {"object": 1.0, "style": pytest.approx(0.5)}
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["aupr"] == pytest.approx(average_precision_score(labels, scores))
    assert m["fpr_at_95_tpr"] == pytest.approx(fpr_at_tpr(labels, scores))


def test_image_metrics_with_normals_only() -> None:
    m = image_metrics(np.zeros(4, dtype=int), np.arange(4.0), ["normal"] * 4)
    assert m == {"auroc": None, "auroc_by_type": {}, "aupr": None, "fpr_at_95_tpr": None}


def pixel_case() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Normals, one local anomaly with a mask, one object anomaly without any."""
    rng = np.random.default_rng(1)
    maps = rng.normal(0, 1, (3, 8, 8)).astype(np.float32)
    masks = np.zeros((3, 8, 8), dtype=np.uint8)
    masks[1, 2:4, 2:4] = 1
    maps[1, 2:4, 2:4] += 1.5  # the defect lights up, not perfectly
    maps[2] += 10.0  # the object anomaly is hot everywhere, with no mask to say where
    return maps, masks, ["normal", "local", "object"]


def test_pixel_auroc_excludes_types_without_mask_pixels() -> None:
    maps, masks, types = pixel_case()
    out = pixel_auroc(maps, masks, types)
    expected = roc_auc_score(masks[:2].reshape(-1), maps[:2].reshape(-1))
    assert out["pixel_auroc"] == pytest.approx(expected)
    assert set(out["pixel_auroc_by_type"]) == {"local"}
    assert out["pixel_auroc_by_type"]["local"] == pytest.approx(expected)
    with_object = roc_auc_score(masks.reshape(-1), maps.reshape(-1))
    assert abs(with_object - expected) > 0.05  # leaving the object out matters here


def test_pixel_auroc_by_type_uses_normals_and_that_type() -> None:
    maps, masks, _ = pixel_case()
    maps = np.concatenate([maps, maps[1:2] * 0 + 5.0])  # a "hole" whose map is flat
    masks = np.concatenate([masks, masks[1:2]])
    types = ["normal", "local", "object", "hole"]
    out = pixel_auroc(maps, masks, types)
    assert set(out["pixel_auroc_by_type"]) == {"local", "hole"}
    keep = [0, 3]
    expected = roc_auc_score(masks[keep].reshape(-1), maps[keep].reshape(-1))
    assert out["pixel_auroc_by_type"]["hole"] == pytest.approx(expected)


def test_pixel_auroc_is_none_without_masks() -> None:
    maps, masks, types = pixel_case()
    masks[:] = 0
    assert pixel_auroc(maps, masks, types) == {"pixel_auroc": None, "pixel_auroc_by_type": {}}


def test_pixel_auroc_subsamples_beyond_max_pixels() -> None:
    maps, masks, types = pixel_case()
    full = pixel_auroc(maps, masks, types)["pixel_auroc"]
    sampled = pixel_auroc(maps, masks, types, max_pixels=100, seed=0)["pixel_auroc"]
    again = pixel_auroc(maps, masks, types, max_pixels=100, seed=0)["pixel_auroc"]
    assert sampled == again
    assert sampled != pytest.approx(full, abs=1e-9)
    assert abs(sampled - full) < 0.25
