"""The app's shared state: where runs live, which run is selected, and cached loads.

Models and data sets are `st.cache_resource` (one shared copy, never mutated); scores and other
derived arrays are `st.cache_data`. Every cache key holds the run folder and the modification
time of its weights, so a run retrained or re-evaluated under the same name is reloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from app.jobs import JobBoard
from core import explore
from core.config import DataConfig
from core.data import Split, load_split
from core.refit import Marked
from core.runs import METRICS, WEIGHTS, Run, RunSummary, list_runs, load_run
from core.train.scoring import ScoredSet, score_images

RUN_KEY = "run_path"  # session key of the sidebar's run picker
SELECT_NEXT = "select_next"  # a run the picker selects at the next rerun (a page just made it)
MAX_GALLERY_IMAGES = 2000  # normal training images searched for prototype patches
MAX_UMAP_POINTS = 5000


def runs_root() -> Path:
    """$ANOMEM_RUNS (read now, so tests and users can point the app elsewhere) or ./runs."""
    return Path(os.environ.get("ANOMEM_RUNS", "runs"))


def init_session() -> None:
    for key, value in ((RUN_KEY, None), ("announced_jobs", [])):
        if key not in st.session_state:
            st.session_state[key] = value


@st.cache_resource
def job_board() -> JobBoard:
    return JobBoard()


def saved_runs() -> list[RunSummary]:
    return list_runs(runs_root())


def selectable(summary: RunSummary) -> bool:
    """A run that loads: a valid config and weights (metrics may still be missing)."""
    return summary.error is None and (summary.path / WEIGHTS).is_file()


def stamp(path: Path) -> float:
    """Changes whenever the run's weights or metrics are rewritten."""
    total = 0
    for part in (path / WEIGHTS, path / METRICS):
        try:
            total += part.stat().st_mtime_ns
        except OSError:  # absent, or deleted by another process meanwhile
            continue
    return total / 1e9


@st.cache_resource(max_entries=4, show_spinner="Loading the run…")
def _load_run(path: str, stamp: float) -> Run:
    return load_run(Path(path))


def selected_run() -> Run | None:
    """The run chosen in the sidebar (RunError propagates: the caller shows it)."""
    path = st.session_state.get(RUN_KEY)
    if not path:
        return None
    return load_run_at(path)


def load_run_at(path: str) -> Run:
    """The run in folder `path`, cached until its weights or metrics change."""
    return _load_run(path, stamp(Path(path)))


def run_key(run: Run) -> tuple[str, float]:
    return str(run.path), stamp(run.path)


def run_tag(run: Run) -> str:
    """A short id of the run's folder and version, for widget keys whose range depends on it."""
    return hashlib.sha1(repr(run_key(run)).encode()).hexdigest()[:10]


@st.cache_resource(max_entries=2, show_spinner="Loading the data set…")
def _load_split(data_json: str) -> Split:
    return load_split(DataConfig(**json.loads(data_json)))


def split_of(run: Run) -> Split:
    """The run's data split (DataError propagates: the caller shows it)."""
    return _load_split(json.dumps(run.config.to_dict()["data"], sort_keys=True))


@st.cache_data(max_entries=8, show_spinner="Scoring the test set…")
def _scored_test_set(path: str, stamp_: float) -> ScoredSet:
    run = _load_run(path, stamp_)
    return score_images(run.model, split_of(run).test.images, with_maps=False)


def scored_test_set(run: Run) -> ScoredSet:
    """Image and per-scale scores of the run's test set, in test-set order."""
    return _scored_test_set(*run_key(run))


@st.cache_data(max_entries=8, show_spinner="Drawing deviation maps…")
def _combined_maps(path: str, stamp_: float, index: tuple[int, ...]) -> dict[int, np.ndarray]:
    run = _load_run(path, stamp_)
    images = split_of(run).test.images[torch.as_tensor(index, dtype=torch.long)]
    return dict(zip(index, explore.combined_maps(run.model, images), strict=True))


def combined_maps_of(run: Run, index: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Combined deviation maps of the test images at `index`, by index."""
    return _combined_maps(*run_key(run), tuple(int(i) for i in index))


def gallery_images(run: Run) -> torch.Tensor:
    """Normal training images (at most MAX_GALLERY_IMAGES) that prototype patches come from."""
    train = split_of(run).train
    normal = torch.nonzero(train.labels == 0).flatten().numpy()
    keep = normal[explore.subsample(len(normal), MAX_GALLERY_IMAGES, run.config.data.seed)]
    return train.images[torch.as_tensor(keep)]


@st.cache_data(max_entries=16, show_spinner="Finding each prototype's top patches…")
def _prototype_patches(path: str, stamp_: float, scale: str, k: int
                       ) -> explore.PrototypePatches:
    run = _load_run(path, stamp_)
    return explore.top_patches(run.model, gallery_images(run), scale, per_prototype=k)


def prototype_patches(run: Run, scale: str, k: int = 5) -> explore.PrototypePatches:
    return _prototype_patches(*run_key(run), scale, k)


@st.cache_data(max_entries=16, show_spinner="Computing the UMAP (first time only)…")
def _umap_points(path: str, stamp_: float, scale: str, max_points: int) -> explore.UmapPoints:
    run = _load_run(path, stamp_)
    return explore.umap_points(run.model, split_of(run).test.images, scale,
                               seed=run.config.data.seed, max_points=max_points)


def umap_points(run: Run, scale: str) -> explore.UmapPoints:
    return _umap_points(*run_key(run), scale, MAX_UMAP_POINTS)


# ---------------------------------------------------------------------------------------------
# marks: images the user marked while browsing a run, until a refit uses them (core/refit.py)

MARKS_KEY = "marks"


def marks_of(run: Run) -> list[Marked]:
    """The marks made on `run` in this session, in the order they were made."""
    return st.session_state.setdefault(MARKS_KEY, {}).get(str(run.path), [])


def add_marks(run: Run, new: list[Marked]) -> int:
    """Add marks to `run`'s list; an image marked again (same source and content) takes its
    new label instead of being listed twice. Returns how many images were new."""
    marks = list(marks_of(run))
    added = 0
    for m in new:
        same = [i for i, old in enumerate(marks)
                if (old.mark.source, old.mark.sha256) == (m.mark.source, m.mark.sha256)]
        if same:
            marks[same[0]] = m
        else:
            marks.append(m)
            added += 1
    st.session_state[MARKS_KEY][str(run.path)] = marks
    return added


def remove_mark(run: Run, index: int) -> None:
    marks = list(marks_of(run))
    if 0 <= index < len(marks):
        del marks[index]
    st.session_state.setdefault(MARKS_KEY, {})[str(run.path)] = marks


def clear_marks(run: Run) -> None:
    st.session_state.setdefault(MARKS_KEY, {}).pop(str(run.path), None)
