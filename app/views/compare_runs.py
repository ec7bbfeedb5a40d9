"""Compare runs: two runs side by side, e.g. one-class vs unbalanced, two budgets, a refit.

The comparisons are computed by core/explore/runs.py; the runs are loaded from their folders
(core/runs.py) through app/state.py.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import charts, state, widgets
from core import explore
from core.data import DataError
from core.refit import data_identity, test_index
from core.runs import RunError

SHARED_SHOWN = 6

st.title("Compare runs")
widgets.require_run()
usable = [s for s in state.saved_runs() if state.selectable(s)]
if len(usable) < 2:
    st.info("Train or refit a second run to compare it with this one.")
    st.stop()
labels = {str(s.path): f"{s.name} · {s.dataset} · {s.normal_class} · {s.setting}"
          for s in usable}
paths = list(labels)
first = st.session_state.get(state.RUN_KEY)
# A refit opens beside its parent, the parent as A: the signs then read as the Teach page's
parent = None
if first in paths:
    name = state.load_run_at(first).config.lineage.parent
    parent = next((p for p in paths if name is not None and p != first
                   and Path(p).name == name), None)
default_a = parent or first
left, right = st.columns(2)
path_a = left.selectbox("Run A", paths,
                        index=paths.index(default_a) if default_a in paths else 0,
                        format_func=labels.get, key="runs_a")
others = [p for p in paths if p != path_a]
path_b = right.selectbox("Run B", others,
                         index=others.index(first) if parent and first in others else 0,
                         format_func=labels.get, key="runs_b")
try:
    run_a, run_b = state.load_run_at(path_a), state.load_run_at(path_b)
except RunError as err:
    st.error(f"A run cannot be loaded: {err}")
    st.stop()

st.subheader("Settings that differ")
diff = explore.config_diff(run_a.config, run_b.config)
if diff.empty:
    st.caption("Same settings: the runs differ only by chance (or were trained on other "
               "machines).")
else:
    st.dataframe(diff, hide_index=True, key="runs_diff", column_config={
        "field": "Setting", "a": f"A · {run_a.path.name}", "b": f"B · {run_b.path.name}"})

st.subheader("Metrics")
table = explore.metrics_side_by_side(run_a.metrics, run_b.metrics)
st.dataframe(table, hide_index=True, key="runs_metrics", column_config={
    "metric": "Metric",
    "a": st.column_config.NumberColumn(f"A · {run_a.path.name}", format="%.3f"),
    "b": st.column_config.NumberColumn(f"B · {run_b.path.name}", format="%.3f"),
    "change": st.column_config.NumberColumn("B − A", format="%+.3f")})

try:
    split_a, split_b = state.split_of(run_a), state.split_of(run_b)
except DataError as err:
    st.error(f"The test data of a run cannot be loaded: {err}")
    st.stop()
scored_a, scored_b = state.scored_test_set(run_a), state.scored_test_set(run_b)
st.subheader("Score distributions")
cols = st.columns(2)
for col, name, run, split, scored in ((cols[0], "A", run_a, split_a, scored_a),
                                      (cols[1], "B", run_b, split_b, scored_b)):
    with col:
        st.markdown(f"**{name} · {run.path.name}**")
        st.plotly_chart(charts.score_distributions(scored.image, split.test.types,
                                                   float(run.model.detector.threshold)),
                        key=f"runs_dist_{name}")

st.subheader("The test images they disagree on most")
if data_identity(run_a.config) != data_identity(run_b.config):
    st.info("The two runs were trained on different data (data set, folder, normal class or "
            "image size), so they share no test image.")
    st.stop()
test = split_a.test
normal = test.labels.numpy() == 0
picks = explore.disagreements(scored_a.image, scored_b.image, normal, SHARED_SHOWN)
marked = {i: f"marked {m['label']} in {run.path.name}"
          for run in (run_a, run_b) for m in run.config.lineage.marks
          if (i := test_index(m["source"])) is not None}
st.caption("Ranked by how far apart the two runs place each image among the test normals "
           "(the scores' scales differ). Each row: the image, A's map, B's map; ▲ is above that "
           "run's threshold; ✎ an image marked to teach one of them.")
standings = {"A": explore.standing(scored_a.image, normal),
             "B": explore.standing(scored_b.image, normal)}
maps_a = state.combined_maps_of(run_a, tuple(picks))
maps_b = state.combined_maps_of(run_b, tuple(picks))
for i in picks:
    row = []
    captions = []
    for name, run, scored, maps in (("A", run_a, scored_a, maps_a),
                                    ("B", run_b, scored_b, maps_b)):
        vmin, vmax = explore.heat_range(run.model)
        row.append(widgets.thumb(explore.overlay(test.images[i], maps[i], vmin, vmax, 0.5),
                                 widgets.MAP_TILE))
        above = scored.image[i] > float(run.model.detector.threshold)
        captions.append(f"{name}: {'▲' if above else '·'} {scored.image[i]:.2f} "
                        f"(above {standings[name][i]:.0%} of the test normals)")
    st.image([widgets.thumb(test.images[i], widgets.MAP_TILE), *row],
             caption=[f"#{i} · {test.types[i]}" + (f" · ✎ {marked[i]}" if i in marked else ""),
                      *captions], width=widgets.MAP_TILE)
