"""Prototypes page: one gallery entry per memory slot, with usage and flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from core import artefacts
from core.runs import load_run
from tests.app.helpers import TINY_MEMORY, copy_run, images, open_page


def _gallery(at) -> list[str]:
    return [c for img in images(at) for c in img.captions]


def test_gallery_shows_every_prototype_sorted_by_usage(runs_dir: Path, tiny_run: Path):
    at = open_page("views/prototypes.py")
    assert [t.value for t in at.title] == ["Prototypes"]
    captions = _gallery(at)
    assert len(captions) == TINY_MEMORY
    assert sorted(int(c.split(" ")[0][1:]) for c in captions) == list(range(TINY_MEMORY))
    usage = [int(c.split("used by ")[1].split(" ")[0]) for c in captions]
    assert usage == sorted(usage, reverse=True)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Prototypes"] == str(TINY_MEMORY)
    n_dead = sum("dead" in c for c in captions)
    assert metrics["Dead"] == str(n_dead) == str(usage.count(0))
    assert int(metrics["In use"]) == TINY_MEMORY - n_dead
    # Every scale of the model has a gallery; ordering by index starts at #0.
    scales = load_run(tiny_run).model.scales
    at.segmented_control(key="proto_order").set_value("index").run()
    at.segmented_control(key="proto_scale").set_value(scales[-1]).run()
    assert not at.exception
    captions = _gallery(at)
    assert captions[0].startswith("#0 ·") and len(captions) == TINY_MEMORY
    at.slider(key="proto_k").set_value(3).run()
    assert not at.exception and len(_gallery(at)) == TINY_MEMORY


def test_an_older_run_gets_its_artefacts_on_first_visit(tiny_run: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "runs"
    run = copy_run(tiny_run, root, "older")
    (run / artefacts.ARTEFACTS).unlink()  # as a run trained before they were saved
    monkeypatch.setenv("ANOMEM_RUNS", str(root))
    at = open_page("views/prototypes.py")
    assert not at.exception and [t.value for t in at.title] == ["Prototypes"]
    assert artefacts.load(run) is not None  # computed once and saved for every later visit
