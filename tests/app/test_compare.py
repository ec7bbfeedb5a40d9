"""Compare page: per-type table, live threshold, distributions, profile, galleries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.app.helpers import images, open_page


def test_one_row_per_anomaly_type_and_a_live_threshold(runs_dir: Path, tiny_run: Path):
    at = open_page("views/compare.py")
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

    assert len(at.get("plotly_chart")) == 2
    assert [t.label for t in at.tabs] == ["normal", "local", "object", "style"]
    assert [len(img.captions) for img in images(at)] == [8, 8, 8, 8]


def _model_threshold(run: Path) -> float:
    from core.runs import load_run

    return float(load_run(run).model.detector.threshold)
