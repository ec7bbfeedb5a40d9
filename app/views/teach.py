"""Teach: the images marked on the other pages become lessons of a new run.

Marks are made on the Deviation maps, Compare types, UMAP and Score pages
(`widgets.mark_controls`) and kept per run in the session (app/marks.py). Before teaching, the
page foresees which test images the marks would move (their look-alikes); a refit
(core/refit.py) keeps everything the run fitted, adds the lessons, takes seconds, and saves a
new run; the page then opens it and shows before and after, the marked images apart from the
others.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import state, widgets
from app.marks import clear_marks, marks_of, remove_mark
from core.data import NORMAL, DataError, Split
from core.refit import (
    known_context,
    lesson_story,
    read_refit_report,
    refit_new_run,
    taught,
    teach,
    test_index,
)
from core.runs import Run, RunError
from core.train.trainer import resolve_device

PER_ROW = 6
CHANGED_SHOWN = 24


def before_after(run: Run, report: dict, split: Split | None) -> None:
    """What the refit changed on the test set (its marked images left out of both)."""
    before, after = report["before"], report["after"]
    st.subheader(f"Taught from {report['parent']}")
    st.caption(f"{report['n_normal_marks']} image(s) marked normal and "
               f"{report['n_anomaly_marks']} marked anomalous, taught in "
               f"{report['seconds']:.1f} s. Everything the parent fitted is kept as it was "
               "(its Gaussians, the weighting of its terms, the scales of its map and its "
               "thresholds): only the look-alikes of the marks score differently, and images "
               "that differ from normal ones as the marks of an anomaly type, or normal marks "
               "of one sort, do. Compared on "
               f"{report['n_test']} test images, the marked ones left out of both runs.")
    lessons = report.get("lessons") or {}
    if lessons:
        st.caption(f"{lessons['keys']} lesson keys. {lesson_story(lessons)}")
    cols = st.columns(3)
    for col, key, name, better in (
            (cols[0], "auroc", "Test AUROC", 1),
            (cols[1], "fpr_at_threshold", "False alarms at threshold", -1),
            (cols[2], "tpr_at_threshold", "Anomalies caught at threshold", 1)):
        b, a = before.get(key), after.get(key)
        if a is None or b is None:
            col.metric(name, "n/a")
            continue
        pct = key != "auroc"
        col.metric(name, f"{a:.1%}" if pct else f"{a:.3f}",
                   delta=f"{a - b:+.1%}" if pct else f"{a - b:+.3f}",
                   delta_color="normal" if better > 0 else "inverse",
                   help=f"before: {b:.1%}" if pct else f"before: {b:.3f}")
    types = sorted(set(before.get("auroc_by_type", {})) | set(after.get("auroc_by_type", {})))
    if types:
        table = pd.DataFrame({
            "type": types,
            "before": [before["auroc_by_type"].get(t) for t in types],
            "after": [after["auroc_by_type"].get(t) for t in types]})
        table["change"] = table["after"] - table["before"]
        st.dataframe(table, hide_index=True, key="teach_by_type", column_config={
            "type": "Anomaly type",
            "before": st.column_config.NumberColumn("AUROC before", format="%.3f"),
            "after": st.column_config.NumberColumn("AUROC after", format="%.3f"),
            "change": st.column_config.NumberColumn("Change", format="%+.3f")})
    marked = report.get("marked", [])
    if marked:
        st.markdown(f"**The {len(marked)} marked test image(s)**, before → after:")
        changes(marked, split)
    changed = report["changed"]
    st.markdown(f"**{len(changed)} other test image(s) changed verdict** at the thresholds "
                f"({before['threshold']:.3f} before, {after['threshold']:.3f} after).")
    changes(changed, split)


def changes(entries: list[dict], split: Split | None) -> None:
    """Thumbnails of test images with their scores before and after and their verdict."""
    if not entries or split is None:
        return
    shown = entries[:CHANGED_SHOWN]
    st.image([widgets.thumb(split.test.images[c["index"]]) for c in shown],
             caption=[f"#{c['index']} · {c['type']} · {c['before']:.2f}→{c['after']:.2f}"
                      f" · now {c['verdict']}" for c in shown], width=widgets.THUMB)
    if len(entries) > CHANGED_SHOWN:
        st.caption(f"Showing the first {CHANGED_SHOWN} of {len(entries)}.")


def foresee(run: Run) -> None:
    """Which test images the marks would move, before anything is saved: the lessons are
    made as a refit would make them and applied to the test set's cached descriptors."""
    marks = marks_of(run.path)
    if not marks:
        return
    st.subheader("What the marks would change")
    scored = state.scored_test_set(run)
    if scored.untaught is None or scored.descriptors is None:
        st.info("This run's saved explorer data predates lessons; open the Deviation maps page "
                "once to compute it again.")
        return
    if not st.button("Foresee", key=f"teach_foresee_{state.run_tag(run)}",
                     icon=":material/visibility:"):
        st.caption("Finds the test images the marks would reach (their look-alikes) and the "
                   "verdicts that would change, without saving anything.")
        return
    try:
        split = state.split_of(run)
        device = resolve_device(run.config.train.device)
        with st.spinner("Making the lessons…"):
            context = known_context(run.path, run.model, split, run.config, device)
            child, _ = teach(run.model, marks, split, run.config, device, context)
    except (DataError, RunError) as err:
        st.error(f"Cannot foresee: {err}")
        return
    after = taught(scored, child).image
    threshold = float(run.model.detector.threshold)
    marked = {test_index(m.mark.source) for m in marks} - {None}
    moved = np.flatnonzero(np.abs(after - scored.image) > 1e-6)
    entries = [{"index": int(i), "type": split.test.types[i], "before": float(scored.image[i]),
                "after": float(after[i]),
                "verdict": "anomalous" if after[i] > threshold else "normal"} for i in moved]
    flips = [e for e in entries if (e["before"] > threshold) != (e["after"] > threshold)]
    st.markdown(f"**{len(moved)} test image(s) would score differently**, "
                f"{sum(e['index'] in marked for e in entries)} of them marked; "
                f"**{len(flips)} would change verdict**:")
    changes([e for e in flips if e["index"] in marked], split)
    changes([e for e in flips if e["index"] not in marked], split)
    look_alikes = sorted((e for e in entries if e["index"] not in marked),
                         key=lambda e: -abs(e["after"] - e["before"]))
    if look_alikes:
        st.markdown("The unmarked images moved most (the marks' closest look-alikes, and "
                    "images of the marked normals' sort or along a marked type's kind):")
        changes(look_alikes, split)


def marks_panel(run: Run) -> None:
    """The marked images as thumbnails, each removable."""
    marks = marks_of(run.path)
    st.subheader(f"Marked images ({len(marks)})")
    if not marks:
        st.info("No image marked yet. Mark false alarms as normal, or missed anomalies with "
                "their type, on the Deviation maps, Compare, UMAP and Score pages.")
        return
    for start in range(0, len(marks), PER_ROW):
        for offset, col in enumerate(st.columns(PER_ROW)):
            i = start + offset
            if i >= len(marks):
                break
            m = marks[i]
            with col:
                source = m.mark.source
                index = test_index(source)
                where = source if index is None else f"test image #{index}"
                label = "normal" if m.mark.label == NORMAL else f"anomaly: {m.mark.label}"
                st.image(widgets.thumb(m.image), caption=f"{label} · {where}",
                         width=widgets.THUMB)
                if st.button("Remove", key=f"teach_remove_{i}_{m.mark.sha256[:12]}",
                             icon=":material/close:"):
                    remove_mark(run.path, i)
                    st.rerun()
    if st.button("Remove all marks", key="teach_clear", icon=":material/delete_sweep:"):
        clear_marks(run.path)
        st.rerun()


def refit_form(run: Run) -> None:
    marks = marks_of(run.path)
    st.subheader("Refit")
    st.caption("Teaches a copy of this run its marks: each marked image (and a few mildly "
               "augmented views of it) becomes a lesson for its look-alikes, the images about "
               "as near to it as its nearest normal training image, or, for three marked "
               "normals or more, a little further where a rehearsal on held-out normals shows "
               "that it pays (the rehearsal also chooses "
               "what a marked normal compares images on). A marked normal's look-alikes "
               "score like a typical normal, a marked anomaly's at least like an alarm; "
               "normal marks of one sort (a darker batch, a turned part) lower the rest of "
               "their sort by what it added to them, and anomaly marks of one type raise its "
               "kind; everything else keeps its score. This run is not changed; the result is "
               "a new run, opened here once saved.")
    name = st.text_input("New run name", f"{run.path.name}-taught",
                         key=f"teach_name_{state.run_tag(run)}")
    if st.button(f"Refit with {len(marks)} mark(s)", key="teach_refit", type="primary",
                 icon=":material/school:", disabled=not marks or not name.strip()):
        try:
            with st.spinner("Refitting stage 2 and scoring the test set…"):
                out, _ = refit_new_run(run.path, marks, state.runs_root(), name.strip())
        except (DataError, RunError) as err:
            st.error(f"Not refitted: {err}")
            return
        clear_marks(run.path)
        st.session_state[state.SELECT_NEXT] = str(out)
        st.rerun()


st.title("Teach")
run = widgets.require_run()
try:
    refit_report = read_refit_report(run.path)
except RunError as err:
    st.error(f"The refit report of this run cannot be read: {err}")
    refit_report = None
if refit_report is not None:
    try:
        split = state.split_of(run)
    except DataError:
        split = None
    with st.container(border=True):
        before_after(run, refit_report, split)
marks_panel(run)
foresee(run)
refit_form(run)
