"""Compare anomaly types page: per-type table, live threshold, distributions, profile, galleries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.app.helpers import images, open_page


def test_one_row_per_anomaly_type_and_a_live_threshold(runs_dir: Path, tiny_run: Path):
    at = open_page("views/compare_types.py")
    table = at.dataframe[0].value
    assert list(table["type"]) == ["local", "object", "style"]
    assert list(table["n"]) == [100, 300, 100]
    assert all(0.0 <= a <= 1.0 for a in table["auroc"])
    # At the model's threshold the page agrees with the run's own evaluation.
    saved = json.loads((tiny_run / "metrics.json").read_text())
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["False-positive rate"] == f"{saved['fpr_at_threshold']:.1%}"
    assert metrics["Anomalies detected"] == f"{saved['tpr_at_threshold']:.1%}"
    assert metrics["Test AUROC"] == f"{saved['auroc']:.3f}"
    auroc_by_type = dict(zip(table["type"], table["auroc"], strict=True))
    assert auroc_by_type == pytest.approx(saved["auroc_by_type"], abs=1e-4)
    slider = at.slider[0]
    assert slider.label == "Threshold"
    assert slider.value == pytest.approx(_model_threshold(tiny_run), abs=1e-6)

    slider.set_value(slider.max).run()  # nothing is above the highest score
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["False-positive rate"] == "0.0%"
    assert np.allclose(at.dataframe[0].value["detection_rate"], 0.0)
    slider.set_value(slider.min).run()  # everything but the lowest score is flagged
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["False-positive rate"].rstrip("%")) > 99
    assert (at.dataframe[0].value["detection_rate"] >= 99).all()  # percent

    assert len(at.get("plotly_chart")) == 3  # distributions, scale profile, ROC by type
    # How the score is made: one row per detector term, weights as the model holds them
    terms = at.dataframe[1].value
    weights = _model_weights(tiny_run)
    assert list(terms["term"]) == list(weights)
    assert terms["weight"].tolist() == pytest.approx(list(weights.values()), abs=1e-6)
    assert all(0.0 <= a <= 1.0 for a in terms["auroc"])
    assert any("weighted sum of standardised terms" in c.value for c in at.caption)
    check = saved["stage2"]["check"]  # the held-out check, one row per kind of pseudo-anomaly
    assert list(at.dataframe[2].value["kind"]) == list(check)
    assert not at.tabs  # the types stand side by side, one column each
    headings = [m.value for m in at.markdown if m.value.startswith("**")]
    assert headings == ["**normal**", "**local**", "**object**", "**style**"]
    pairs = [img for img in images(at) if len(img.captions) == 2]  # image and its map
    assert len(pairs) == 4 * 8 and all(img.captions[1] == "map" for img in pairs)


def test_roc_of_each_type_marks_the_threshold() -> None:
    from core import explore

    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.35, 0.5])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    types = ["normal"] * 4 + ["object", "object", "local", "local"]
    curves = explore.roc_by_type(scores, labels, types, threshold=0.32)
    assert [c.kind for c in curves] == ["local", "object"]
    local, obj = curves
    assert obj.auroc == 1.0 and local.auroc == pytest.approx(7 / 8)
    # one normal of four is above 0.32; both objects and both local images are detected
    assert obj.at_threshold == (0.25, 1.0) and local.at_threshold == (0.25, 1.0)
    assert explore.roc_by_type(scores, labels, types, threshold=0.45)[0].at_threshold == \
        (0.0, 0.5)


def _model_threshold(run: Path) -> float:
    from core.runs import load_run

    return float(load_run(run).model.detector.threshold)


def _model_weights(run: Path) -> dict[str, float]:
    from core.runs import load_run

    det = load_run(run).model.detector
    return dict(zip(det.term_names, det.weights.tolist(), strict=True))


def test_the_report_and_the_scores_download_from_the_sidebar(runs_dir: Path):
    at = open_page("views/compare_types.py")
    buttons = at.sidebar.get("download_button")
    assert [b.proto.label for b in buttons] == ["Report (HTML)", "Per-image scores (CSV)"]
