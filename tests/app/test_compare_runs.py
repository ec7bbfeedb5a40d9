"""Compare runs page: settings that differ, metrics side by side, images both runs score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.data import load_split
from core.refit import mark_test_image, refit_run
from core.runs import load_run
from tests.app.helpers import copy_run, open_page, texts


@pytest.fixture
def two_runs(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny run and a refit of it (same data, another detector)."""
    root = tmp_path / "runs"
    root.mkdir()
    parent = copy_run(tiny_run, root, "tiny")
    run = load_run(parent)
    split = load_split(run.config.data)
    marks = [mark_test_image(run.config, split, i, "normal") for i in range(5)]
    refit_run(parent, marks, root / "taught")
    monkeypatch.setenv("ANOMEM_RUNS", str(root))
    return root


def test_two_runs_of_one_data_set_side_by_side(two_runs: Path):
    at = open_page("views/compare_runs.py")
    assert not at.exception and not at.error, [e.value for e in at.error]
    a, b = at.selectbox(key="runs_a"), at.selectbox(key="runs_b")
    assert {a.value, b.value} == {str(two_runs / "tiny"), str(two_runs / "taught")}
    diff, metrics = at.dataframe[0].value, at.dataframe[1].value
    assert "lineage.parent" in set(diff["field"])
    assert "model.image_size" not in set(diff["field"])  # only what differs
    saved = {name: json.loads((two_runs / name / "metrics.json").read_text())
             for name in ("tiny", "taught")}
    names = {str(two_runs / n): n for n in saved}
    row = metrics.set_index("metric").loc["image AUROC"]
    assert row["a"] == pytest.approx(saved[names[a.value]]["auroc"])
    assert row["b"] == pytest.approx(saved[names[b.value]]["auroc"])
    assert row["change"] == pytest.approx(row["b"] - row["a"])
    assert {f"AUROC · type {t}" for t in ("local", "object", "style")} <= set(metrics["metric"])
    assert len(at.get("plotly_chart")) == 2  # one score distribution per run
    rows = [img for img in at.main.image if len(img.captions) == 3]  # image, A's map, B's map
    assert len(rows) == 6
    assert all(img.captions[1].startswith("A: ") and img.captions[2].startswith("B: ")
               for img in rows)


def test_runs_of_different_data_share_no_image(tiny_run: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "runs"
    root.mkdir()
    copy_run(tiny_run, root, "circle")
    other = copy_run(tiny_run, root, "square")
    cfg = json.loads((other / "config.json").read_text())
    cfg["data"]["normal_class"] = "square"
    (other / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("ANOMEM_RUNS", str(root))
    at = open_page("views/compare_runs.py")
    assert not at.exception
    assert "data.normal_class" in set(at.dataframe[0].value["field"])
    assert "share no test image" in texts(at)


def test_one_run_asks_for_a_second(runs_dir: Path):
    at = open_page("views/compare_runs.py")
    assert not at.exception
    assert "Train or refit a second run" in texts(at)
