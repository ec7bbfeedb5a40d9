"""Prototypes: what each memory slot stands for, shown by the training patches that read it."""

from __future__ import annotations

import streamlit as st

from app import state, widgets
from core import explore

PER_PAGE = 66  # 22 rows of 3: the quick preset's 64 prototypes fit on one page
COLUMNS = 3

st.title("Prototypes")
run = widgets.require_run()
widgets.require_split(run)
model = run.model

st.caption(
    "Each prototype is shown by the normal training patches that read it most strongly "
    "(receptive-field crops, one per image, strongest first). Usage counts the map positions "
    "whose strongest prototype it is."
)
left, mid, right = st.columns([4, 2, 3])  # room for three stage names
scale = left.segmented_control("Scale", model.scales, default=model.scales[0],
                               key="proto_scale", required=True) or model.scales[0]
order = mid.segmented_control("Order", ["usage", "index"], default="usage",
                              key="proto_order", required=True) or "usage"
k = right.slider("Patches per prototype", 3, 8, 5, key="proto_k")
st.caption(explore.describe_scale(model, scale))

patches = state.prototype_patches(run, scale, k)
images = state.gallery_images(run)
dead = set(patches.dead)

cols = st.columns(4)
cols[0].metric("Prototypes", patches.size)
cols[1].metric("In use", patches.size - len(dead))
cols[2].metric("Dead", len(dead), help="Never the strongest match of any position.")
cols[3].metric("Near-duplicate pairs", len(patches.duplicates),
               help=f"Cosine similarity above {explore.DUPLICATE_COSINE}.")
if patches.duplicates:
    pairs = ", ".join(f"#{i}–#{j} ({c:.3f})" for i, j, c in patches.duplicates[:20])
    st.warning(f"Near-duplicate prototypes: {pairs}")

ordered = patches.by_usage() if order == "usage" else list(range(patches.size))
n_pages = -(-len(ordered) // PER_PAGE)
page = 1
if n_pages > 1:
    page = st.columns(4)[0].number_input(f"Page (of {n_pages})", 1, n_pages, 1,
                                         key=f"proto_page_{scale}")
shown = ordered[(page - 1) * PER_PAGE:page * PER_PAGE]

for n, p in enumerate(shown):
    if n % COLUMNS == 0:
        row = st.columns(COLUMNS)
    flags = []
    if p in dead:
        flags.append("dead")
    twins = patches.duplicate_of(p)
    if twins:
        flags.append("near-duplicate of " + ", ".join(f"#{j}" for j in twins))
    caption = f"#{p} · used by {int(patches.usage[p])} positions"
    if flags:
        caption += " · ⚠ " + "; ".join(flags)
    with row[n % COLUMNS]:
        st.image(explore.patch_strip(images, patches.hits[p], patches.stride), caption=caption)
