"""UMAP page: every test sample and every prototype of the scale in one plot."""

from __future__ import annotations

import json
from pathlib import Path

from tests.app.helpers import TINY_MEMORY, open_page, texts

N_TEST = 700  # shapes test split for one normal class


def _traces(at) -> dict[str, int]:
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    spec = json.loads(charts[0].proto.spec)
    return {d["name"]: len(d["text"]) for d in spec["data"]}


def test_umap_shows_samples_by_group_and_prototypes(runs_dir: Path):
    at = open_page("views/embedding.py")
    assert [t.value for t in at.title] == ["UMAP"]
    traces = _traces(at)
    assert traces.pop("prototypes") == TINY_MEMORY
    assert sum(traces.values()) == N_TEST
    assert {"normal", "object", "style", "local"} <= set(traces)
    assert any("Select points" in i.value for i in at.info)
    at.segmented_control(key="umap_scale").set_value("stage7_s32").run()
    assert not at.exception
    assert _traces(at)["prototypes"] == TINY_MEMORY


def test_a_selection_on_the_plot_can_be_marked(runs_dir: Path):
    """AppTest cannot drag a lasso over a plotly chart: the page's selection state stands in
    for what the chart reports."""
    at = open_page("views/embedding.py")
    scale = at.segmented_control(key="umap_scale").value
    at.session_state[f"umap_selection_{scale}"] = [3, 5, -1]  # two samples, prototype 0
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "2 selected samples" in texts(at) and "1 selected prototypes" in texts(at)
    captions = [c for img in at.main.image for c in img.captions]
    assert captions[0].startswith("#3 · ") and captions[1].startswith("#5 · ")
    (label,) = [s for s in at.selectbox if s.key and s.key.startswith(f"umap_mark_{scale}")]
    label.set_value("normal").run()
    (button,) = [b for b in at.button if b.key and b.key.startswith(f"umap_mark_{scale}")
                 and b.key.endswith("_mark")]
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Marked as normal (2 new)" in texts(at)
    assert [link.label for link in at.sidebar.get("page_link")] == ["2 marked image(s): refit"]
