"""Teach page: marks made on the other pages become a new run's lessons, shown before/after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.refit import REFIT
from core.runs import list_runs, run_lock
from tests.app.helpers import copy_run, open_page, texts


@pytest.fixture
def own_runs(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A runs folder of this test's own (a refit adds a run to it)."""
    root = tmp_path / "runs"
    root.mkdir()
    copy_run(tiny_run, root, "tiny")
    monkeypatch.setenv("ANOMEM_RUNS", str(root))
    return root


def _mark(at, prefix: str, label: str | None = None, new_type: str | None = None) -> None:
    (box,) = [s for s in at.selectbox if s.key and s.key.startswith(prefix)
              and s.key.endswith("_label")]
    if label is not None:
        box.set_value(label).run()
    if new_type is not None:
        box.set_value("another type…").run()
        (typed,) = [t for t in at.text_input if t.key and t.key.startswith(prefix)]
        typed.input(new_type).run()
    (button,) = [b for b in at.button if b.key and b.key.startswith(prefix)
                 and b.key.endswith("_mark")]
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]


def test_marks_from_two_pages_refit_into_a_new_run_shown_before_and_after(own_runs: Path):
    at = open_page("views/deviations.py")
    sample = int(at.selectbox(key=[s.key for s in at.selectbox if s.label == "Sample"][0])
                 .value)
    _mark(at, "dev_mark_")
    assert "Marked as normal (1 new)" in texts(at)

    at.switch_page("views/compare_types.py")
    at.run()
    _mark(at, "cmp_mark_", new_type="odd shape")
    assert "Marked as odd shape (1 new)" in texts(at)
    assert [link.label for link in at.sidebar.get("page_link")] == ["2 marked image(s): refit"]

    at.switch_page("views/teach.py")
    at.run()
    assert not at.exception
    assert "Marked images (2)" in texts(at)
    captions = [c for img in at.main.image for c in img.captions]
    assert f"normal · test image #{sample}" in captions
    assert any(c.startswith("anomaly: odd shape · test image #") for c in captions)

    (foresee,) = [b for b in at.button if b.key and b.key.startswith("teach_foresee_")]
    foresee.click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "would score differently" in texts(at) and "2 of them marked" in texts(at)

    (name,) = [t for t in at.text_input if t.key and t.key.startswith("teach_name_")]
    assert name.value == "tiny-taught"
    name.input("taught").run()
    at.button(key="teach_refit").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    runs = {r.name: r for r in list_runs(own_runs)}
    assert set(runs) == {"tiny", "taught"} and runs["taught"].complete
    assert at.sidebar.selectbox(key="run_path").value == str(own_runs / "taught")
    # The new run is opened: its before-and-after report, and no marks left to use.
    assert "Taught from tiny" in texts(at)
    assert "Marked images (0)" in texts(at)
    assert "The 2 marked test image(s)" in texts(at)
    (name,) = [t for t in at.text_input if t.key and t.key.startswith("teach_name_")]
    assert name.value == "taught-taught"  # the next refit proposes a name of its own
    report = json.loads((own_runs / "taught" / REFIT).read_text())
    assert report["n_normal_marks"] == 1 and report["n_anomaly_marks"] == 1
    assert "changed verdict" in texts(at)
    assert at.dataframe[0].value["type"].tolist() == sorted(
        report["after"]["auroc_by_type"])
    config = json.loads((own_runs / "taught" / "config.json").read_text())
    assert config["lineage"]["parent"] == "tiny"
    assert [m["source"] for m in config["lineage"]["marks"]][0] == f"test:{sample}"

    # Compare runs opened on the refit puts its parent first (the Teach page's signs) and
    # flags the marked images among those the two runs disagree on
    at.switch_page("views/compare_runs.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="runs_a").value == str(own_runs / "tiny")
    assert at.selectbox(key="runs_b").value == str(own_runs / "taught")


def test_a_mark_can_be_removed_and_marking_again_relabels(own_runs: Path):
    at = open_page("views/deviations.py")
    _mark(at, "dev_mark_")
    _mark(at, "dev_mark_", new_type="blob")  # the same image again: relabelled, not doubled
    assert "Marked as blob (0 new)" in texts(at)
    at.switch_page("views/teach.py")
    at.run()
    assert "Marked images (1)" in texts(at)
    assert [c for img in at.main.image for c in img.captions][0].startswith("anomaly: blob")
    (remove,) = [b for b in at.button if b.key and b.key.startswith("teach_remove_")]
    remove.click().run()
    assert "Marked images (0)" in texts(at)
    assert at.button(key="teach_refit").disabled


def test_a_refit_refused_shows_why_and_writes_nothing(own_runs: Path):
    at = open_page("views/teach.py")
    assert "No image marked yet" in texts(at)
    assert at.button(key="teach_refit").disabled  # nothing to refit with
    at.switch_page("views/deviations.py")
    at.run()
    _mark(at, "dev_mark_")
    at.switch_page("views/teach.py")
    at.run()
    with run_lock(own_runs / "tiny"):  # as if a CLI were training into the parent's folder
        at.button(key="teach_refit").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "Not refitted" in errors[0] and "training" in errors[0]
    assert sorted(p.name for p in own_runs.iterdir()) == ["tiny"]
    assert "Marked images (1)" in texts(at)  # the marks are kept for another try
