"""Detection metrics: AUROC overall and per anomaly type, AUPR, FPR at 95% TPR, pixel AUROC."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from core.data.base import NORMAL


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, scores))


def fpr_at_tpr(labels: np.ndarray, scores: np.ndarray, tpr: float = 0.95) -> float | None:
    """Share of normal images flagged when the threshold catches `tpr` of the anomalies."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return None
    fpr, tprs, _ = roc_curve(labels, scores)
    return float(fpr[np.searchsorted(tprs, tpr, side="left")])


def image_metrics(labels: np.ndarray, scores: np.ndarray, types: list[str]) -> dict:
    """The image-level part of metrics.json."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    types_arr = np.asarray(types)
    normal = types_arr == NORMAL
    by_type = {}
    for t in sorted(set(types) - {NORMAL}):
        keep = normal | (types_arr == t)
        by_type[t] = auroc(labels[keep], scores[keep])
    return {
        "auroc": auroc(labels, scores),
        "auroc_by_type": by_type,
        "aupr": float(average_precision_score(labels, scores)) if labels.max() > labels.min()
        else None,
        "fpr_at_95_tpr": fpr_at_tpr(labels, scores),
    }


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """The share of anomalies and of normal images scoring above `threshold` (None for a
    class the labels do not hold)."""
    labels, flagged = np.asarray(labels).astype(bool), np.asarray(scores) > threshold
    return {"tpr_at_threshold": float(flagged[labels].mean()) if labels.any() else None,
            "fpr_at_threshold": float(flagged[~labels].mean()) if (~labels).any() else None}


def pixel_auroc(maps: np.ndarray, masks: np.ndarray, types: list[str],
                max_pixels: int = 4_000_000, seed: int = 0) -> dict:
    """Pixel AUROC over normal images and the types that carry masks.

    Types without any mask pixel (object and style anomalies) are left out: their anomaly is
    not located anywhere in particular, so none of their pixels is a fair negative or positive.
    """
    types_arr = np.asarray(types)
    masked_types = sorted({t for t in set(types) - {NORMAL} if masks[types_arr == t].any()})
    if not masked_types:
        return {"pixel_auroc": None, "pixel_auroc_by_type": {}}

    def score(keep: np.ndarray) -> float | None:
        y = masks[keep].reshape(-1).astype(np.uint8)
        s = maps[keep].reshape(-1).astype(np.float32)
        if len(y) > max_pixels:
            pick = np.random.default_rng(seed).choice(len(y), max_pixels, replace=False)
            y, s = y[pick], s[pick]
        return auroc(y, s)

    normal = types_arr == NORMAL
    keep_all = normal | np.isin(types_arr, masked_types)
    return {
        "pixel_auroc": score(keep_all),
        "pixel_auroc_by_type": {t: score(normal | (types_arr == t)) for t in masked_types},
    }
