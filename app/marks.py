"""Marks: the images a user marked normal (a false alarm) or anomalous (with a type) while
browsing a run on the Deviation maps, Compare types, UMAP and Score pages.

They live in the session, one list per run folder in the order they were made, until the Teach
page refits a copy of the run with them (core/refit.py) or the user removes them. An image
marked again (same source and content) takes its new label instead of being listed twice.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.refit import Marked

KEY = "marks"  # session key: {run folder: [Marked, ...]}


def _store() -> dict[str, list[Marked]]:
    if KEY not in st.session_state:
        st.session_state[KEY] = {}
    return st.session_state[KEY]


def marks_of(run: Path | str | None) -> list[Marked]:
    """The marks made on the run in folder `run` in this session (none for no run)."""
    if not run:
        return []
    return list(_store().get(str(run), []))


def add_marks(run: Path | str, new: list[Marked]) -> int:
    """Add marks to the run's list, relabelling an image marked before; how many were new."""
    marks = marks_of(run)
    added = 0
    for m in new:
        same = [i for i, old in enumerate(marks)
                if (old.mark.source, old.mark.sha256) == (m.mark.source, m.mark.sha256)]
        if same:
            marks[same[0]] = m
        else:
            marks.append(m)
            added += 1
    _store()[str(run)] = marks
    return added


def remove_mark(run: Path | str, index: int) -> None:
    """Drop the run's mark at `index` (in `marks_of` order); an index out of range does nothing."""
    marks = marks_of(run)
    if 0 <= index < len(marks):
        del marks[index]
    _store()[str(run)] = marks


def clear_marks(run: Path | str) -> None:
    """Forget every mark of the run (after a refit used them, or on request)."""
    _store().pop(str(run), None)
