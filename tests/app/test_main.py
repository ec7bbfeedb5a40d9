"""The entry point: first-run screen, the "train a run first" guard, the sidebar's run picker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.helpers import copy_run, open_page, texts

OTHER_PAGES = ["views/prototypes.py", "views/embedding.py", "views/deviations.py",
               "views/compare_types.py", "views/score.py"]


def test_first_run_screen_offers_one_click_training(empty_runs: Path):
    at = open_page()
    assert [t.value for t in at.title] == ["Train"]
    assert "No saved run yet" in texts(at)
    button = at.button(key="train_first_run")
    assert "quick" in button.label and "shapes" in button.label
    assert "No saved run yet." in [c.value for c in at.sidebar.caption]


@pytest.mark.parametrize("page", OTHER_PAGES)
def test_other_pages_ask_for_a_run_first(empty_runs: Path, page: str):
    at = open_page(page)
    assert any("Train a run first" in i.value for i in at.info)
    links = at.get("page_link")
    assert len(links) == 1 and links[0].proto.label == "Go to Train"
    assert len(at.title) == 1  # the page stopped after its title
    assert not at.metric and not at.main.image and not at.get("plotly_chart")


def test_sidebar_lists_runs_and_shows_broken_ones(tiny_run: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "runs"
    root.mkdir()
    copy_run(tiny_run, root, "first")
    second = copy_run(tiny_run, root, "second")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    monkeypatch.setenv("ANOMEM_RUNS", str(root))

    at = open_page("views/compare_types.py")
    picker = at.sidebar.selectbox(key="run_path")
    assert sorted(label.split(" · ")[0] for label in picker.options) == ["first", "second"]
    assert "shapes · normal class **circle** · one-class" in [c.value for c in at.sidebar.caption]
    errors = [e.value for e in at.sidebar.error]
    assert len(errors) == 1 and errors[0].startswith("broken:") and "not valid JSON" in errors[0]
    assert [t.value for t in at.title] == ["Compare anomaly types"]

    picker.set_value(str(second)).run()
    assert not at.exception
    assert at.sidebar.selectbox(key="run_path").value == str(second)
    assert [t.value for t in at.title] == ["Compare anomaly types"]
