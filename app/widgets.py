"""Pieces several pages share: the "train a run first" guard, legends, image reports."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import streamlit as st
import torch

from app import state
from app.jobs import JobStatus
from app.marks import add_marks, marks_of
from core import explore
from core.data import NORMAL, DataError, Split, imageio
from core.refit import Marked, mark_upload
from core.runs import STOPPED, TRAINING, Run, RunError, RunSummary

TRAIN_PAGE = "views/train.py"
TEACH_PAGE = "views/teach.py"
NEW_TYPE = "another type…"  # the mark menu's entry that asks for a type name
MARK_FLASH = "mark_flash"  # session key: (controls key, message) of the mark just made
THUMB = 96  # displayed size of a sample thumbnail, pixels
MAP_TILE = 160  # displayed size of an overlay


def require_run() -> Run:
    """The selected run; otherwise a message (and a way to the Train page) and stop."""
    if not any(state.selectable(s) for s in state.saved_runs()):
        st.info(f"Train a run first: no saved run under `{state.runs_root()}` yet.")
        st.page_link(TRAIN_PAGE, label="Go to Train", icon=":material/model_training:")
        st.stop()
    try:
        run = state.selected_run()
    except RunError as err:
        st.error(f"This run cannot be loaded: {err}")
        st.stop()
    if run is None:
        st.info("Pick a run in the sidebar.")
        st.stop()
    return run


def require_split(run: Run) -> Split:
    """The run's data split, or the loader's message and stop."""
    try:
        return state.split_of(run)
    except DataError as err:
        st.error(f"The data of run {run.path.name!r} cannot be loaded: {err}")
        st.stop()


def thumb(image: torch.Tensor | np.ndarray, size: int = THUMB) -> np.ndarray:
    """An image upscaled (nearest) for display."""
    return explore.upscale(explore.to_rgb(image), size)


def colour_legend(run: Run) -> None:
    """The shared colour bar of every overlay, with the pixel threshold in its middle."""
    vmin, vmax = explore.heat_range(run.model)
    st.image(explore.colour_bar(vmin, vmax), width=256)
    st.caption(
        f"Colour scale of every map: {vmin:.1f} (dark: as normal as an average normal "
        f"position) · {(vmin + vmax) / 2:.2f} (middle: the pixel threshold) · {vmax:.2f} and "
        "above (bright). Maps are standardised on normal images."
    )


def overlays(run: Run, image: torch.Tensor, report: explore.ImageReport, alpha: float) -> None:
    """The image, then the deviation map of each scale and the combined map, side by side."""
    vmin, vmax = explore.heat_range(run.model)
    names = ["image", *run.model.scales, "combined"]
    for col, name in zip(st.columns(len(names)), names, strict=True):
        with col:
            if name == "image":
                st.image(thumb(image, MAP_TILE), caption="image")
            else:
                img = explore.overlay(image, report.maps[name], vmin, vmax, alpha)
                peak = float(report.maps[name].max())
                label = name
                if name == "combined" and (kept := explore.combined_scales(run.model)) != list(
                        run.model.scales):
                    label = f"combined ({' + '.join(kept)})"
                st.image(thumb(img, MAP_TILE), caption=f"{label} · peak {peak:.2f}")


def verdict(report: explore.ImageReport) -> None:
    cols = st.columns([1, 1.3] + [1] * len(report.per_scale))
    cols[0].metric("Anomaly score", f"{report.score:.3f}",
                   help=f"Above the threshold {report.threshold:.3f} means anomalous.")
    cols[1].metric("Verdict", "anomalous" if report.anomalous else "normal",
                   delta=f"{report.score - report.threshold:+.3f} vs threshold",
                   delta_color="inverse")
    for col, (scale, value) in zip(cols[2:], report.per_scale.items(), strict=True):
        col.metric(f"{scale} score", f"{value:.2f}", help="Standardised on normal images.")
    moved = report.moved_by_lessons
    if abs(moved) > 1e-6:
        like = ("images marked normal on the Teach page, or is of their sort" if moved < 0
                else "images marked anomalous on the Teach page, or is of their kind")
        st.caption(f"This run's lessons moved the score {'down' if moved < 0 else 'up'} from "
                   f"{report.untaught:.3f} to {report.score:.3f}: the image looks like {like}. "
                   "The maps and the scales' scores are the detector's own, before the lessons.")


def nearest_prototypes(run: Run, report: explore.ImageReport) -> None:
    """Per scale: the most deviant position and the prototypes nearest to its query."""
    images = state.gallery_images(run)
    for scale, near in report.nearest.items():
        patches = state.prototype_patches(run, scale)
        st.markdown(f"**{scale}** · most deviant position (row {near.row}, col {near.col})")
        for proto, cos in zip(near.prototypes, near.cosine, strict=True):
            st.image(explore.patch_strip(images, patches.hits[proto], patches.stride, tile=40),
                     caption=f"prototype #{proto} · cosine {cos:.2f} · "
                             f"used by {int(patches.usage[proto])} positions")


def show_upload(run: Run, name: str, data: bytes) -> bool:
    """Validate, score and explain one uploaded file; False (with an error) when refused."""
    cfg = run.config.model
    try:
        array = imageio.validate_upload(data, name, size=cfg.shape,
                                        channels=cfg.in_channels)
    except DataError as err:
        st.error(str(err))
        return False
    image = explore.hwc_to_chw(array)
    report = explore.inspect_image(run.model, image)
    with st.container(border=True):
        st.subheader(name)
        verdict(report)
        overlays(run, image, report, alpha=0.5)
        with st.expander("Nearest prototypes", expanded=False):
            nearest_prototypes(run, report)
        digest = hashlib.sha256(data).hexdigest()[:12]
        mark_controls(run, f"score_mark_{digest}",
                      lambda label: [mark_upload(name, data, label, run.config)], [],
                      what=name)
    return True


def _run_label(summary: RunSummary) -> str:
    auroc = "no metrics" if summary.auroc is None else f"AUROC {summary.auroc:.3f}"
    return f"{summary.name} · {auroc}"


def run_picker() -> list[RunSummary]:
    """Sidebar: pick any loadable run; broken ones are listed with their error."""
    summaries = state.saved_runs()
    usable = [s for s in summaries if state.selectable(s)]
    job = state.job_board().current
    pending = [s for s in summaries if not state.selectable(s) and s.error is None
               and s.state in (TRAINING, STOPPED)]
    broken = [s for s in summaries if not state.selectable(s) and s not in pending]
    labels = {str(s.path): _run_label(s) for s in usable}
    by_path = {str(s.path): s for s in usable}
    if job is not None:  # a run that just finished training becomes the selected one
        snap = job.snapshot()
        if snap.status == JobStatus.DONE and str(snap.path) not in st.session_state.announced_jobs:
            st.session_state.announced_jobs.append(str(snap.path))
            if str(snap.path) in labels:
                st.session_state[state.RUN_KEY] = str(snap.path)
    chosen_next = st.session_state.pop(state.SELECT_NEXT, None)
    if chosen_next in labels:
        st.session_state[state.RUN_KEY] = chosen_next
    if st.session_state.get(state.RUN_KEY) not in labels:
        st.session_state[state.RUN_KEY] = next(iter(labels), None)
    with st.sidebar:
        if labels:
            path = st.selectbox("Run", list(labels), key=state.RUN_KEY, format_func=labels.get)
            chosen = by_path[path]
            st.caption(f"{chosen.dataset} · normal class **{chosen.normal_class}** · "
                       f"{chosen.setting}")
        else:
            st.caption("No saved run yet.")
        for s in pending:
            what = "training…" if s.state == TRAINING else "stopped, resume it on the Train page"
            st.caption(f"{s.name}: {what}")
        if broken:
            with st.expander(f"{len(broken)} run folder(s) cannot be loaded"):
                for s in broken:
                    st.error(f"{s.name}: {s.error or 'no weights (training did not finish)'}")
        marks_badge(st.session_state.get(state.RUN_KEY))
        st.caption(f"Runs folder: `{state.runs_root()}`")
    return usable


def mark_controls(run: Run, key: str, make: Callable[[str], list[Marked]], types: list[str],
                  what: str = "this image") -> None:
    """Mark images as normal (a false alarm) or as an anomaly of a type, for the Teach page.

    `make(label)` builds the marks (it may raise DataError: shown, nothing marked); `types` are
    the anomaly types offered besides a new one.
    """
    options = [NORMAL, *[t for t in types if t != NORMAL], NEW_TYPE]
    left, mid, right = st.columns([2, 2, 1], vertical_alignment="bottom")
    choice = left.selectbox(f"Mark {what} as", options, key=f"{key}_label",
                            format_func=lambda o: "normal (a false alarm)" if o == NORMAL else
                            o if o == NEW_TYPE else f"anomaly: {o}")
    label = choice
    if choice == NEW_TYPE:
        label = mid.text_input("Anomaly type", key=f"{key}_type", placeholder="e.g. scratch")
    if right.button("Mark", key=f"{key}_mark", icon=":material/bookmark_add:",
                    disabled=choice == NEW_TYPE and not label.strip()):
        try:
            added = add_marks(run.path, make(label))
        except DataError as err:
            st.error(f"Not marked: {err}")
            return
        total = len(marks_of(run.path))
        # Shown after a rerun, so that the sidebar's count (drawn first) is up to date too
        st.session_state[MARK_FLASH] = (key, f"Marked as {label.strip()} ({added} new). "
                                             f"{total} mark(s) wait on the Teach page.")
        st.rerun()
    flash = st.session_state.get(MARK_FLASH)
    if flash is not None and flash[0] == key:
        st.success(flash[1])
        del st.session_state[MARK_FLASH]


def marks_badge(run_path: str | None) -> None:
    """Sidebar: how many marks the selected run holds, and the way to the Teach page."""
    marks = marks_of(run_path)
    if marks:
        st.page_link(TEACH_PAGE, label=f"{len(marks)} marked image(s): refit",
                     icon=":material/school:")
