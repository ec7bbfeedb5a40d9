"""Compare anomaly types: which types the model catches, at which scale, at which threshold."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import charts, state, widgets
from core import explore, report
from core.model.terms import RotationTerm
from core.refit import mark_test_image

EXAMPLES = 8

st.title("Compare anomaly types")
run = widgets.require_run()
split = widgets.require_split(run)
model, test = run.model, split.test
scored = state.scored_test_set(run)
scores, labels = scored.image, test.labels.numpy()

lo, hi = float(scores.min()), float(scores.max())
if hi <= lo:
    hi = lo + 1.0
default = float(np.clip(float(model.detector.threshold), lo, hi))
threshold = st.slider(
    "Threshold", lo, hi, default, (hi - lo) / 400, format="%.3f",
    key=f"cmp_threshold_{state.run_tag(run)}",
    help=f"Starts at the model's threshold ({float(model.detector.threshold):.3f}), a "
         "quantile of held-out normal scores.",
)
stats = explore.type_stats(scores, labels, test.types, threshold)

with st.sidebar:  # the findings of this run for someone who does not run the app
    st.download_button(
        "Report (HTML)", lambda: report.build_report(run, split, scored).html,
        file_name=f"{run.path.name}-report.html", mime="text/html", key="cmp_report_html",
        icon=":material/download:", on_click="ignore",
        help="One self-contained file: metrics, per-type table, plots, edge cases and missed "
             "anomalies with their maps, the config. Takes a few seconds to prepare.")
    st.download_button(
        "Per-image scores (CSV)",
        lambda: report.scores_table(run, split, scored).to_csv(index=False),  # on click only
        file_name=f"{run.path.name}-scores.csv", mime="text/csv", key="cmp_report_csv",
        icon=":material/download:", on_click="ignore")

cols = st.columns(4)
auroc = (run.metrics or {}).get("auroc")
cols[0].metric("Test AUROC", "n/a" if auroc is None else f"{auroc:.3f}")
fpr = stats.false_positive_rate
cols[1].metric("False-positive rate", "n/a" if fpr is None else f"{fpr:.1%}",
               help=f"Share of the {stats.n_normal} normal test images above the threshold.")
flagged = scores > threshold
cols[2].metric("Anomalies detected", f"{flagged[labels == 1].mean():.1%}")
cols[3].metric("Test images", f"{len(scores)}")

st.dataframe(
    stats.table.assign(detection_rate=100 * stats.table["detection_rate"]), hide_index=True,
    key="cmp_table",
    column_config={
        "type": "Anomaly type",
        "n": st.column_config.NumberColumn("Images"),
        "auroc": st.column_config.NumberColumn("AUROC vs normal", format="%.3f"),
        "detection_rate": st.column_config.ProgressColumn(
            "Detected at threshold", format="%.0f%%", min_value=0.0, max_value=100.0),
    },
)

left, right = st.columns(2)
left.plotly_chart(charts.score_distributions(scores, test.types, threshold), key="cmp_dist")
profile = explore.median_scale_profile(scored.per_scale, test.types)
right.plotly_chart(charts.scale_profile(profile), key="cmp_profile")

st.plotly_chart(charts.roc_by_type(explore.roc_by_type(scores, labels, test.types, threshold),
                                   threshold), key="cmp_roc")

st.subheader("How the score is made")
det = model.detector
stage2 = (run.metrics or {}).get("stage2")  # how stage 2 weighed the terms, and its check
st.caption(
    "The image score is a weighted sum of standardised terms: per scale, `local` (its largest "
    "deviations from memory) and `layout` (its coarse arrangement); `pixels/knn` and "
    "`pixels/layout` read the image itself"
    + ("; `rotation/loss` is the rotation head's doubt about which way up the image is. "
       if RotationTerm.name in det.term_names else ". ")
    + explore.weighing_summary(stage2)
    + (" The labelled-anomaly head adds to it, and can only raise a score."
       if bool(det.clf_weight.any()) else ""))
st.dataframe(
    explore.term_table(det.term_names, det.weights.cpu().numpy(), scored.terms, labels),
    hide_index=True, key="cmp_terms",
    column_config={
        "term": "Term",
        "weight": st.column_config.ProgressColumn("Weight in the score", format="%.2f",
                                                  min_value=0.0, max_value=1.0),
        "auroc": st.column_config.NumberColumn("AUROC alone on the test images", format="%.3f"),
    },
)
check = explore.check_table(stage2)
if check is not None:
    with st.expander("The held-out check, kind by kind"):
        st.caption("Normal images stage 1 never saw, against pseudo-anomalies made from them. "
                   "For each kind, weights learnt on the other kinds are scored on it, beside "
                   "the fixed weights; a kind both separate perfectly does not count.")
        st.dataframe(check, hide_index=True, key="cmp_check", column_config={
            "kind": "Pseudo-anomaly",
            "learned": st.column_config.NumberColumn("AUROC, learnt without it", format="%.3f"),
            "fixed": st.column_config.NumberColumn("AUROC, fixed weights", format="%.3f"),
            "gain": st.column_config.NumberColumn("Gain", format="%+.3f"),
            "counted": "Counts",
        })

st.subheader("Side by side")
st.caption(f"Up to {EXAMPLES} images per type, spread from the lowest to the highest score, "
           "each beside its combined deviation map; ▲ marks those above the threshold; #: "
           "the image's number, as in the list of examples to mark below.")
widgets.colour_legend(run)
types_arr = np.asarray(test.types)
order = explore.type_order(test.types)
picks = {t: explore.spread_examples(scores, np.flatnonzero(types_arr == t), EXAMPLES)
         for t in order}
maps = state.combined_maps_of(run, tuple(i for t in order for i in picks[t]))
vmin, vmax = explore.heat_range(model)
for col, t in zip(st.columns(len(order)), order, strict=True):
    with col:
        st.markdown(f"**{t}**")
        for i in picks[t]:
            tiles = [widgets.thumb(test.images[i], widgets.THUMB),
                     widgets.thumb(explore.overlay(test.images[i], maps[i], vmin, vmax, 0.5),
                                   widgets.THUMB)]
            st.image(tiles, caption=[
                f"#{i} · {'▲ ' if scores[i] > threshold else ''}{scores[i]:.2f}", "map"])

shown = [i for t in order for i in picks[t]]
pick = st.selectbox("Example to mark", shown, key=f"cmp_mark_pick_{state.run_tag(run)}",
                    format_func=lambda i: f"#{i} · {test.types[i]} · score {scores[i]:.3f}")
if pick is not None:
    widgets.mark_controls(run, f"cmp_mark_{pick}",
                          lambda label: [mark_test_image(run.config, split, pick, label)],
                          order, what=f"example #{pick}")
