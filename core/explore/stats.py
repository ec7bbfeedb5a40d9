"""Scores by sample and by anomaly type: edge cases, per-type tables and ROC curves, and how
stage 2 weighed the detector's terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from core.data.base import NORMAL
from core.metrics import auroc
from core.train.weighting import CHECK_MARGIN, CHECK_TOLERANCE, uninformative


def edge_cases(scores: np.ndarray, labels: np.ndarray, threshold: float, k: int = 8
               ) -> dict[str, list[int]]:
    """Indices worth a look: the highest-scoring normals, the lowest-scoring anomalies, and
    the samples of either kind closest to the threshold (each list in that order)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    normal, anomaly = np.flatnonzero(~labels), np.flatnonzero(labels)
    return {
        "normal_highest": normal[np.argsort(-scores[normal], kind="stable")][:k].tolist(),
        "anomaly_lowest": anomaly[np.argsort(scores[anomaly], kind="stable")][:k].tolist(),
        "near_threshold": np.argsort(np.abs(scores - threshold), kind="stable")[:k].tolist(),
    }


class TypeStats(NamedTuple):
    table: pd.DataFrame  # type, n, auroc, detection_rate: one row per anomaly type
    false_positive_rate: float | None  # share of normals above the threshold
    n_normal: int


def type_stats(scores: np.ndarray, labels: np.ndarray, types: list[str], threshold: float
               ) -> TypeStats:
    """Per anomaly type: AUROC against the normal samples and detection rate at `threshold`."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    types_arr = np.asarray(types)
    normal = types_arr == NORMAL
    flagged = scores > threshold
    rows = []
    for t in sorted(set(types) - {NORMAL}):
        of_type = types_arr == t
        keep = normal | of_type
        rows.append({
            "type": t,
            "n": int(of_type.sum()),
            "auroc": auroc(labels[keep], scores[keep]) if normal.any() else None,
            "detection_rate": float(flagged[of_type].mean()),
        })
    table = pd.DataFrame(rows, columns=["type", "n", "auroc", "detection_rate"])
    fpr = float(flagged[normal].mean()) if normal.any() else None
    return TypeStats(table, fpr, int(normal.sum()))


@dataclass
class TypeRoc:
    """One anomaly type against the normal images: its ROC curve and where a threshold sits."""

    kind: str
    fpr: np.ndarray
    tpr: np.ndarray
    auroc: float | None
    at_threshold: tuple[float, float]  # (false-positive rate, detection rate) at the threshold


def roc_by_type(scores: np.ndarray, labels: np.ndarray, types: list[str], threshold: float
                ) -> list[TypeRoc]:
    """Per anomaly type, its ROC curve against every normal test image, and the point the
    threshold picks on it (the same false-positive rate on every curve)."""
    from sklearn.metrics import roc_curve

    scores, labels, kinds = np.asarray(scores), np.asarray(labels), np.asarray(types)
    normal = labels == 0
    out = []
    if not normal.any():
        return out
    fpr_at = float((scores[normal] > threshold).mean())
    for kind in type_order(types):
        keep = normal | (kinds == kind)
        if kind == NORMAL or not (kinds == kind).any():
            continue
        fpr, tpr, _ = roc_curve(labels[keep], scores[keep])
        tpr_at = float((scores[kinds == kind] > threshold).mean())
        out.append(TypeRoc(kind, fpr, tpr, auroc(labels[keep], scores[keep]), (fpr_at, tpr_at)))
    return out


def type_order(types: list[str]) -> list[str]:
    """Normal first, then the anomaly types alphabetically."""
    present = set(types)
    return ([NORMAL] if NORMAL in present else []) + sorted(present - {NORMAL})


def median_scale_profile(per_scale: dict[str, np.ndarray], types: list[str]) -> pd.DataFrame:
    """Median standardised score of every scale (columns) for every type (rows, normal first).

    The median, not the mean: one image a thousand deviations away (a contamination on MVTec
    AD bottle) would otherwise set its type's bar and flatten every other one.
    """
    types_arr = np.asarray(types)
    order = type_order(types)
    data = {s: [float(np.median(np.asarray(v)[types_arr == t])) for t in order]
            for s, v in per_scale.items()}
    return pd.DataFrame(data, index=pd.Index(order, name="type"))


def display_cap(scores: np.ndarray, threshold: float, reach: float = 3.0) -> float:
    """Where a plot of `scores` may stop: `reach` times the 5-95 % spread beyond the larger of
    the 95th percentile and the threshold, or the largest score if that is nearer."""
    scores = np.asarray(scores, dtype=float)
    low, high = np.quantile(scores, [0.05, 0.95])
    return float(min(scores.max(), max(high, threshold) + reach * max(high - low, 1e-6)))


def spread_examples(scores: np.ndarray, index: np.ndarray, k: int) -> list[int]:
    """k of `index`, evenly spread from the lowest to the highest score: a fair sample."""
    index = np.asarray(index)
    if len(index) <= k:
        return index[np.argsort(np.asarray(scores)[index], kind="stable")].tolist()
    ordered = index[np.argsort(np.asarray(scores)[index], kind="stable")]
    return ordered[np.unique(np.linspace(0, len(ordered) - 1, k).round().astype(int))].tolist()


def term_table(names: list[str], weights: np.ndarray, terms: dict[str, np.ndarray],
               labels: np.ndarray) -> pd.DataFrame:
    """Each detector term (`AnomalyDetector.term_names`): its weight in the image score and its
    AUROC alone on these images (None without both normal and anomalous ones)."""
    labels = np.asarray(labels).astype(int)
    both = 0 < labels.sum() < len(labels)
    return pd.DataFrame({
        "term": names,
        "weight": np.asarray(weights, dtype=float),
        "auroc": [auroc(labels, np.asarray(terms[n], dtype=float)) if both else None
                  for n in names],
    })


def check_table(stage2: dict | None) -> pd.DataFrame | None:
    """The held-out check of stage 2 (metrics.json's "stage2"), one row per kind of
    pseudo-anomaly: AUROC of weights learnt without that kind and of the fixed weights, their
    difference, and whether the kind counted (kinds both separate perfectly do not). None when
    the run's weights were not checked."""
    check = (stage2 or {}).get("check")
    if not check:
        return None
    return pd.DataFrame([{"kind": kind, "learned": c["learned"], "fixed": c["fixed"],
                          "gain": c["learned"] - c["fixed"], "counted": not uninformative(c)}
                         for kind, c in check.items()])


def weighing_summary(stage2: dict | None) -> str:
    """One sentence on how stage 2 weighed the terms, from metrics.json's "stage2"."""
    stage2 = stage2 or {}
    chosen, combine = stage2.get("chosen"), stage2.get("combine")
    if chosen is None:
        return "This run does not record how its terms were weighed (it predates the record)."
    if combine == "fixed":
        return "Fixed weights, as configured (`train.combine = \"fixed\"`)."
    if combine == "learned":
        return "Weights learnt against pseudo-anomalies of held-out normals, not checked."
    table = check_table(stage2)
    if table is None:
        return f"{'Learnt' if chosen == 'learned' else 'Fixed'} weights; no check is recorded."
    counted = table[table["counted"]]
    if counted.empty:
        evidence = "no kind of pseudo-anomaly told the two weightings apart"
    else:
        mean, worst = (round(float(x), 3) + 0.0 for x in (counted["gain"].mean(),
                                                          counted["gain"].min()))  # no "-0.000"
        evidence = (f"on the {len(counted)} kinds of pseudo-anomaly that count, weights learnt "
                    f"without each kind gain {mean:+.3f} AUROC on it on average (worst "
                    f"{worst:+.3f})")
    rule = (f"the check asks for {CHECK_MARGIN:+.3f} on average and no kind below "
            f"{-CHECK_TOLERANCE:+.3f}")
    if chosen == "learned":
        return f"Learnt weights, kept by the held-out check: {evidence}; {rule}."
    return (f"Fixed weights (each scale and pixel term alike): the held-out check did not "
            f"confirm the learnt ones ({evidence}; {rule}).")
