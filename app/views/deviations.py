"""Deviation maps: the edge cases of the test set, where each scale deviates, and why."""

from __future__ import annotations

import streamlit as st

from app import state, widgets
from core import explore
from core.refit import mark_test_image

CASES = {
    "normal_highest": "Normal, highest scores",
    "anomaly_lowest": "Anomalies, lowest scores",
    "near_threshold": "Nearest the threshold",
}
PER_CASE = 12

st.title("Deviation maps")
run = widgets.require_run()
split = widgets.require_split(run)
model, test = run.model, split.test
scored = state.scored_test_set(run)
threshold = float(model.detector.threshold)
tag = state.run_tag(run)  # for widget keys whose range depends on the run

cases = explore.edge_cases(scored.image, test.labels.numpy(), threshold, PER_CASE)
groups = explore.sample_groups(test.types, test.edge)

case = st.segmented_control("Edge cases", list(CASES), format_func=CASES.get,
                            default="normal_highest", key="dev_case",
                            required=True) or "normal_highest"
left, right = st.columns([3, 1])
alpha = right.slider("Overlay opacity", 0.0, 1.0, 0.55, 0.05, key="dev_alpha")
index = left.selectbox(
    "Sample", cases[case], key=f"dev_sample_{case}_{tag}",
    format_func=lambda i: f"#{i} · {groups[i]} · score {scored.image[i]:.3f} · {test.names[i]}",
)
if index is None:
    st.info("No sample of this kind in the test set.")
    st.stop()

image = test.images[index]
report = explore.inspect_image(model, image)
widgets.verdict(report)
widgets.overlays(run, image, report, alpha)
widgets.colour_legend(run)
widgets.mark_controls(run, f"dev_mark_{index}",
                      lambda label: [mark_test_image(run.config, split, index, label)],
                      explore.type_order(test.types), what=f"sample #{index}")

st.subheader("Which prototype did a position read?")
c1, c2, c3 = st.columns([2, 3, 3])
scale = c1.selectbox("Scale", model.scales, key="dev_pos_scale")
st.caption(explore.describe_scale(model, scale))
h, w = report.maps[scale].shape
near = report.nearest[scale]
row = c2.slider("Row", 0, h - 1, near.row, key=f"dev_row_{scale}_{tag}_{index}")
col = c3.slider("Column", 0, w - 1, near.col, key=f"dev_col_{scale}_{tag}_{index}")
match = explore.match_position(model, image, scale, row, col)
stride = model.stride(scale)
top, left_px, side = explore.crop_window(row, col, stride, *image.shape[-2:])

patches = state.prototype_patches(run, scale)
show, info = st.columns([1, 3])
with show:
    boxed = explore.draw_box(explore.to_rgb(image), top, left_px, side)
    st.image(widgets.thumb(boxed, widgets.MAP_TILE), caption=f"receptive field of ({row}, {col})")
with info:
    value = float(report.maps[scale][row, col])
    st.markdown(
        f"Position ({row}, {col}) of **{scale}** reads **prototype #{match.prototype}** with "
        f"attention **{match.weight:.2f}**; its deviation there is **{value:.2f}** "
        f"(pixel threshold {float(model.detector.pixel_threshold):.2f}). "
        "For each image the sliders start at the scale's most deviant position."
    )
    st.image(explore.patch_strip(state.gallery_images(run), patches.hits[match.prototype],
                                 patches.stride),
             caption=f"prototype #{match.prototype}: its top training patches · used by "
                     f"{int(patches.usage[match.prototype])} positions")
