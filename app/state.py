"""The app's shared state: where runs live, which run is selected, and cached loads.

Models and data sets are `st.cache_resource` (one shared copy, never mutated); scores and other
derived arrays are `st.cache_data`. Every cache key holds the run folder and the modification
time of its weights, so a run retrained or re-evaluated under the same name is reloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from app.jobs import JobBoard
from core import artefacts, explore
from core.config import DataConfig
from core.data import Split, load_split
from core.runs import METRICS, WEIGHTS, Run, RunSummary, list_runs, load_run
from core.train.scoring import ScoredSet

RUN_KEY = "run_path"  # session key of the sidebar's run picker
SELECT_NEXT = "select_next"  # a run the picker selects at the next rerun (a page just made it)
MAX_GALLERY_IMAGES = artefacts.MAX_GALLERY_IMAGES
MAX_UMAP_POINTS = artefacts.MAX_UMAP_POINTS


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


@st.cache_resource(max_entries=4, show_spinner=False)
def _saved_artefacts(path: str, stamp_: float) -> artefacts.Artefacts | None:
    return artefacts.load(Path(path))


@st.cache_resource
def _computed_artefacts() -> dict[tuple[str, float], artefacts.Artefacts]:
    """Artefacts this app computed (and saved, unless another process held the run)."""
    return {}


def artefacts_of(run: Run) -> artefacts.Artefacts:
    """The run's test scores, UMAPs and prototype galleries: read from the run folder, or
    computed once (with a progress bar) and saved there for every later visit."""
    key = run_key(run)
    art = _saved_artefacts(*key) or _computed_artefacts().get(key)
    if art is not None:
        return art
    bar = st.progress(0.0, text="First visit of this run: computing what the pages show…")

    def say(what: str, done: float) -> None:
        bar.progress(min(1.0, done), text=f"First visit of this run: {what}…")

    art = artefacts.ensure(run.path, run.model, split_of(run), run.config.data.seed, say)
    bar.empty()
    _computed_artefacts()[key] = art
    return art


def scored_test_set(run: Run) -> ScoredSet:
    """Image and per-scale scores of the run's test set, in test-set order."""
    return artefacts_of(run).scored


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
    split = split_of(run)
    return split.train.images[torch.as_tensor(artefacts.gallery_index(split,
                                                                      run.config.data.seed))]


def prototype_patches(run: Run, scale: str, k: int = 5) -> explore.PrototypePatches:
    """Each prototype of `scale`: its top `k` patches among `gallery_images`, its usage."""
    saved = artefacts_of(run).patches[scale]
    return dataclasses.replace(saved, hits=[h[:k] for h in saved.hits])


def umap_points(run: Run, scale: str) -> explore.UmapPoints:
    """Test images (at most MAX_UMAP_POINTS) and prototypes of `scale` in one 2-D map."""
    return artefacts_of(run).umap[scale]

