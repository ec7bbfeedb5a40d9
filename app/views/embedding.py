"""UMAP: test samples and the memory's prototypes of one scale in one 2-D map."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import charts, state, widgets
from core import explore
from core.refit import mark_test_image

MAX_THUMBS = 24


def selection_key(scale: str) -> str:
    return f"umap_selection_{scale}"


st.title("UMAP")
run = widgets.require_run()
split = widgets.require_split(run)
model, test = run.model, split.test

st.caption(
    "Each dot is a test image (its spatially pooled, unit-norm queries); stars are the "
    "memory's prototypes, which live in the same space. Select points with the box or lasso "
    f"tool to see them below. At most {state.MAX_UMAP_POINTS} samples are shown."
)
scale = st.segmented_control("Scale", model.scales, default=model.scales[-1],
                             key="umap_scale", required=True) or model.scales[-1]

points = state.umap_points(run, scale)
scored = state.scored_test_set(run)
patches = state.prototype_patches(run, scale)
groups_all = explore.sample_groups(test.types, test.edge)
groups = [groups_all[i] for i in points.index]
hover = [f"#{i} · {test.names[i]}<br>{groups_all[i]} · score {scored.image[i]:.3f}"
         for i in points.index]
fig, trace_index = charts.umap_figure(points, groups, hover, patches.usage)
event = st.plotly_chart(fig, key=f"umap_chart_{scale}", on_select="rerun",
                        selection_mode=("points", "box", "lasso"))

clicked = []
for point in (event.selection.points if event else []):
    curve, i = point.get("curve_number"), point.get("point_index")
    if curve is not None and i is not None and curve < len(trace_index):
        clicked.append(int(trace_index[curve][i]))
# The page's selection: what the chart last reported, kept until the chart reports another
# (sample indices >= 0, prototypes as -1 - index)
if st.session_state.get(f"umap_event_{scale}") != clicked:
    st.session_state[f"umap_event_{scale}"] = clicked
    st.session_state[selection_key(scale)] = clicked
selected = list(st.session_state.get(selection_key(scale), []))
samples = [i for i in selected if i >= 0]
protos = sorted({-1 - i for i in selected if i < 0})

if not selected:
    st.info("Select points on the plot (box or lasso) to see their images here.")
if samples:
    st.subheader(f"{len(samples)} selected samples")
    shown = samples[:MAX_THUMBS]
    st.image([widgets.thumb(test.images[i]) for i in shown],
             caption=[f"#{i} · {groups_all[i]} · {scored.image[i]:.2f}" for i in shown])
    if len(samples) > MAX_THUMBS:
        st.caption(f"Showing the first {MAX_THUMBS}.")
    counts = {g: int(np.sum(np.asarray(groups_all)[samples] == g)) for g in set(groups_all)}
    st.caption(" · ".join(f"{g}: {n}" for g, n in sorted(counts.items()) if n))
    widgets.mark_controls(
        run, f"umap_mark_{scale}",
        lambda label: [mark_test_image(run.config, split, i, label) for i in samples],
        explore.type_order(test.types), what=f"the {len(samples)} selected samples")
if protos:
    st.subheader(f"{len(protos)} selected prototypes")
    images = state.gallery_images(run)
    for p in protos[:MAX_THUMBS]:
        st.image(explore.patch_strip(images, patches.hits[p], patches.stride),
                 caption=f"prototype #{p} · used by {int(patches.usage[p])} positions")
