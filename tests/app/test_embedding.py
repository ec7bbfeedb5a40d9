"""UMAP page: every test sample and every prototype of the scale in one plot."""

from __future__ import annotations

import json
from pathlib import Path

from tests.app.helpers import TINY_MEMORY, open_page

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
