"""Comparing two runs, for the Compare runs page (app/views/compare_runs.py): what differs in
their configs, their metrics row by row, and the test images they disagree on most (when they
share a data set). Saving, loading and listing run folders is core/runs.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from core.config import RunConfig


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """{"model.image_size": 32, "train.augment.flip": True, ...}: every field of a config."""
    out: dict[str, Any] = {}

    def walk(section: dict, prefix: str) -> None:
        for name, value in section.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")
            else:
                out[f"{prefix}{name}"] = value

    walk(cfg.to_dict(), "")
    return out


def config_diff(a: RunConfig, b: RunConfig) -> pd.DataFrame:
    """The fields whose values differ: columns field, a, b (values as text)."""
    fa, fb = flat_config(a), flat_config(b)
    rows = [(k, _text(fa.get(k)), _text(fb.get(k))) for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k)]
    return pd.DataFrame(rows, columns=["field", "a", "b"])


def _text(value: Any) -> str:
    if isinstance(value, list | tuple) and value and isinstance(value[0], dict):
        return f"{len(value)} item(s)"  # e.g. a refit's marks: their list is in config.json
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) if value else "(none)"
    return "(none)" if value is None else str(value)


def metrics_side_by_side(a: dict | None, b: dict | None) -> pd.DataFrame:
    """Image and pixel AUROC, then each anomaly type's and each scale's, for both runs.

    Columns: metric, a, b, change (b - a); a metric one run lacks is NaN there.
    """
    a, b = a or {}, b or {}
    rows: list[tuple[str, float | None, float | None]] = []
    for key, name in (("auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"),
                      ("fpr_at_threshold", "false alarms at threshold"),
                      ("tpr_at_threshold", "anomalies caught at threshold")):
        rows.append((name, a.get(key), b.get(key)))
    for group, label in (("auroc_by_type", "type"), ("auroc_by_scale", "scale")):
        names = sorted(set(a.get(group) or {}) | set(b.get(group) or {}))
        rows += [(f"AUROC · {label} {n}", (a.get(group) or {}).get(n),
                  (b.get(group) or {}).get(n)) for n in names]
    table = pd.DataFrame(rows, columns=["metric", "a", "b"]).astype(
        {"a": "float64", "b": "float64"})
    table["change"] = table["b"] - table["a"]
    return table


def standing(scores: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """(N,) the share of the test normals (`normal`, (N,) bool) each image scores above: where
    a run places it for detection. Over the whole set when there is no normal."""
    reference = np.sort(scores[normal] if normal.any() else scores)
    return np.searchsorted(reference, scores, side="left") / len(reference)


def disagreements(scores_a: np.ndarray, scores_b: np.ndarray, normal: np.ndarray, k: int = 6
                  ) -> list[int]:
    """The `k` test images whose standing among the test normals (`standing`) differs most
    between two runs.

    Standings, not raw scores: two detectors' scores live on different scales. Among the
    normals, not the whole set: a run that raises one anomaly type (a refit taught it) moves
    every other anomaly down the whole set's ranking without changing what it says of them.
    """
    if not len(scores_a) == len(scores_b) == len(normal):
        raise ValueError(f"score arrays differ in length: {len(scores_a)} vs {len(scores_b)} "
                         f"(and {len(normal)} labels)")
    gap = np.abs(standing(scores_a, normal) - standing(scores_b, normal))
    return np.argsort(-gap, kind="stable")[:k].tolist()
