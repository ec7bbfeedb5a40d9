"""core/report.py and `anomem report`: one self-contained HTML file and a CSV of scores."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.cli import EXIT_BAD_INPUT, main
from core.data import load_split
from core.pipeline import train_run
from core.refit import mark_test_image, refit_run
from core.runs import load_run
from tests.app.helpers import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "reported"
    train_run(tiny_config(), out)
    return out


def test_the_cli_writes_a_self_contained_report_and_its_scores(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out" / "report.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"{metrics['auroc']:.3f}" in page
    for heading in ("By anomaly type", "How the score is made", "Edge cases", "Missed",
                    "Config"):
        assert heading in page
    for term in load_run(run_dir).model.detector.term_names:  # one row per detector term
        assert f"<td>{term}</td>" in page
    # Everything is inlined: no file or address is fetched when it opens.
    sources = re.findall(r"src='([^']*)'", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http" not in "".join(re.findall(r"(?:href|src)=['\"][^'\"]*", page))
    run = load_run(run_dir)
    split = load_split(run.config.data)
    table = pd.read_csv(out.with_suffix(".csv"))
    assert len(table) == len(split.test)
    assert list(table["type"]) == list(split.test.types)
    assert {f"score_{s}" for s in run.model.scales} <= set(table.columns)
    above = table["score"] > float(run.model.detector.threshold)
    assert (table["verdict"] == np.where(above, "anomalous", "normal")).all()


def test_a_refitted_run_reports_its_parent(run_dir: Path, tmp_path: Path):
    run = load_run(run_dir)
    split = load_split(run.config.data)
    child = tmp_path / "child"
    refit_run(run_dir, [mark_test_image(run.config, split, 0, "normal")], child)
    assert main(["report", str(child), "--out", str(tmp_path / "child.html")]) == 0
    assert f"Taught from {run_dir.name}" in (tmp_path / "child.html").read_text()


@pytest.mark.parametrize(("args", "needle"), [
    (["--out", "report.pdf"], "expected an .html file"),
])
def test_bad_report_arguments_are_refused(run_dir: Path, tmp_path: Path, args: list[str],
                                          needle: str, capsys: pytest.CaptureFixture[str]):
    assert main(["report", str(run_dir), *args]) == EXIT_BAD_INPUT
    assert needle in capsys.readouterr().err


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == EXIT_BAD_INPUT
    assert str(tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
