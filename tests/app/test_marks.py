"""app/marks.py: the session's marks, one list per run folder (the pages that make and use
them are tested in test_teach.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app import marks
from core.refit import Mark, Marked


@pytest.fixture(autouse=True)
def session(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A fresh session state of one user."""
    state: dict = {}
    monkeypatch.setattr(marks.st, "session_state", state)
    return state


def _marked(source: str, label: str, sha256: str | None = None) -> Marked:
    return Marked(Mark(source, sha256 or f"sha-{source}", label),
                  np.zeros((4, 4, 3), dtype=np.uint8))


def _listed(run: Path | str) -> list[tuple[str, str]]:
    return [(m.mark.source, m.mark.label) for m in marks.marks_of(run)]


def test_marks_are_kept_per_run_in_the_order_made(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert marks.marks_of(a) == [] and marks.marks_of(None) == []
    assert marks.add_marks(a, [_marked("test:3", "normal"), _marked("test:1", "scratch")]) == 2
    assert marks.add_marks(str(b), [_marked("test:3", "normal")]) == 1
    assert _listed(a) == [("test:3", "normal"), ("test:1", "scratch")]
    assert _listed(b) == _listed(str(b)) == [("test:3", "normal")]


def test_an_image_marked_again_is_relabelled_not_listed_twice(tmp_path: Path):
    run = tmp_path / "run"
    marks.add_marks(run, [_marked("test:3", "normal"), _marked("test:1", "normal")])
    assert marks.add_marks(run, [_marked("test:3", "blob"), _marked("test:4", "normal")]) == 1
    assert _listed(run) == [("test:3", "blob"), ("test:1", "normal"), ("test:4", "normal")]
    # Same source, other content (an upload of that name changed): a new mark.
    assert marks.add_marks(run, [_marked("test:3", "normal", sha256="other")]) == 1
    assert len(marks.marks_of(run)) == 4


def test_remove_and_clear_touch_only_their_run(tmp_path: Path):
    run, other = tmp_path / "run", tmp_path / "other"
    marks.add_marks(run, [_marked(f"test:{i}", "normal") for i in range(3)])
    marks.add_marks(other, [_marked("test:9", "normal")])
    marks.remove_mark(run, 1)
    marks.remove_mark(run, 7)  # out of range: nothing
    assert _listed(run) == [("test:0", "normal"), ("test:2", "normal")]
    marks.marks_of(run).clear()  # a copy: the caller cannot change the store by accident
    assert len(marks.marks_of(run)) == 2
    marks.clear_marks(run)
    assert marks.marks_of(run) == [] and _listed(other) == [("test:9", "normal")]
