"""Plotly figures of the app; data in, figure out, nothing computed here."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core import explore
from core.data.base import NORMAL

NOT_LOSSES = {"epoch", "stage", "lr", "seconds", "images_per_s", "planned_steps"}
NORMAL_COLOURS = {NORMAL: "#4c78a8", explore.EDGE_CASE: "#9ecae9"}
ANOMALY_COLOURS = ("#e45756", "#f58518", "#54a24b", "#b279a2", "#eeca3b", "#9d755d", "#ff9da6",
                   "#72b7b2", "#79706e", "#d37295")  # no blue: blues are the normal samples


def group_colours(groups: list[str]) -> dict[str, str]:
    """Fixed colours: blues for normal samples, a qualitative palette for anomaly types."""
    palette = ANOMALY_COLOURS
    others = sorted(set(groups) - set(NORMAL_COLOURS))
    return {**NORMAL_COLOURS, **{g: palette[i % len(palette)] for i, g in enumerate(others)}}


def _layout(fig: go.Figure, title: str, height: int = 320, legend_below: bool = True
            ) -> go.Figure:
    legend = dict(orientation="h", y=-0.15, yanchor="top") if legend_below else {}
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=40, b=10),
                      legend=legend)
    return fig


def _epoch_axis(fig: go.Figure, rows: list[dict]) -> None:
    fig.update_xaxes(title="epoch", dtick=max(1, len(rows) // 8))


def loss_curves(rows: list[dict]) -> go.Figure:
    """Total loss and each named term per epoch."""
    fig = go.Figure()
    if rows:
        epochs = [r["epoch"] for r in rows]
        keys = [k for k in rows[-1] if k not in NOT_LOSSES and not k.startswith("usage_")]
        for k in sorted(keys, key=lambda k: (k != "loss", k)):
            fig.add_trace(go.Scatter(x=epochs, y=[r.get(k) for r in rows], name=k,
                                     mode="lines+markers",
                                     line=dict(width=3 if k == "loss" else 1.5)))
    _epoch_axis(fig, rows)
    return _layout(fig, "Training loss", legend_below=False)


def usage_curves(rows: list[dict]) -> go.Figure:
    """Share of each memory's prototypes that some position read most strongly, per epoch."""
    fig = go.Figure()
    if rows:
        epochs = [r["epoch"] for r in rows]
        for k in (k for k in rows[-1] if k.startswith("usage_")):
            fig.add_trace(go.Scatter(x=epochs, y=[r.get(k) for r in rows],
                                     name=k.removeprefix("usage_"), mode="lines+markers"))
    _epoch_axis(fig, rows)
    fig.update_yaxes(title="prototypes in use", range=[0, 1.05], tickformat=".0%")
    return _layout(fig, "Memory usage", legend_below=False)


def umap_figure(points: explore.UmapPoints, groups: list[str], hover: list[str],
                usage: np.ndarray) -> tuple[go.Figure, list[np.ndarray]]:
    """Samples coloured by group, prototypes as stars; also each trace's sample indices.

    `groups` and `hover` are per kept sample (aligned with points.samples). Prototype traces
    carry negative indices: -1 - prototype.
    """
    colours = group_colours(groups)
    fig, trace_index = go.Figure(), []
    groups_arr = np.asarray(groups)
    for g in explore.type_order([g for g in groups if g != explore.EDGE_CASE]) + (
            [explore.EDGE_CASE] if explore.EDGE_CASE in groups else []):
        sel = np.flatnonzero(groups_arr == g)
        fig.add_trace(go.Scattergl(
            x=points.samples[sel, 0], y=points.samples[sel, 1], mode="markers", name=g,
            marker=dict(size=6, color=colours[g], opacity=0.75),
            text=[hover[i] for i in sel], hovertemplate="%{text}<extra></extra>",
        ))
        trace_index.append(sel)
    n = len(points.prototypes)
    fig.add_trace(go.Scatter(
        x=points.prototypes[:, 0], y=points.prototypes[:, 1], mode="markers",
        name="prototypes",
        marker=dict(symbol="star", size=13, color="#ffb000", line=dict(width=1, color="black")),
        text=[f"prototype #{p} · used by {int(usage[p])} positions" for p in range(n)],
        hovertemplate="%{text}<extra></extra>",
    ))
    trace_index.append(-1 - np.arange(n))
    fig.update_layout(dragmode="lasso", xaxis=dict(showticklabels=False, title=None),
                      yaxis=dict(showticklabels=False, title=None))
    return _layout(fig, "", height=560), trace_index


def score_distributions(scores: np.ndarray, types: list[str], threshold: float) -> go.Figure:
    """One violin of image scores per type (normal included) and the threshold line.

    A few scores far out in the tail (see `explore.display_cap`) are drawn at the cap, and the
    axis title says how many, so they do not squeeze every other violin into a line.
    """
    colours = group_colours(types)
    types_arr = np.asarray(types)
    cap = explore.display_cap(scores, threshold)
    shown = np.minimum(scores, cap)
    fig = go.Figure()
    for t in reversed(explore.type_order(types)):  # normal on top
        fig.add_trace(go.Violin(x=shown[types_arr == t], name=t, orientation="h",
                                line_color=colours[t], box_visible=True, points=False,
                                spanmode="hard"))
    fig.add_vline(x=threshold, line_dash="dash", line_color="black",
                  annotation_text="threshold", annotation_position="top")
    above = int((scores > cap).sum())
    fig.update_xaxes(title="anomaly score" if not above else
                     f"anomaly score ({above} above {cap:.1f}, up to {scores.max():.0f}, "
                     "drawn at it)")
    fig.update_layout(showlegend=False)
    return _layout(fig, "Score distribution by type", height=80 + 60 * len(set(types)))


def scale_profile(profile: pd.DataFrame) -> go.Figure:
    """Median standardised score of each scale, grouped by type."""
    colours = group_colours(list(profile.index))
    fig = go.Figure()
    for t, row in profile.iterrows():
        fig.add_trace(go.Bar(x=list(profile.columns), y=row.to_numpy(), name=str(t),
                             marker_color=colours[str(t)]))
    fig.update_layout(barmode="group")
    fig.update_yaxes(title="median standardised score")
    return _layout(fig, "Which scale sees each type")


def roc_by_type(curves: list[explore.TypeRoc], threshold: float) -> go.Figure:
    """Each anomaly type's ROC curve on one plot, the threshold's point marked on each."""
    fig = go.Figure()
    colours = group_colours([c.kind for c in curves])
    for c in curves:
        label = f"{c.kind} (AUROC {c.auroc:.3f})" if c.auroc is not None else c.kind
        fig.add_trace(go.Scatter(x=c.fpr, y=c.tpr, mode="lines", name=label,
                                 line=dict(color=colours[c.kind], width=2)))
        fig.add_trace(go.Scatter(x=[c.at_threshold[0]], y=[c.at_threshold[1]], mode="markers",
                                 marker=dict(color=colours[c.kind], size=11, symbol="diamond",
                                             line=dict(color="black", width=1)),
                                 showlegend=False,
                                 hovertemplate=f"{c.kind} at threshold {threshold:.3f}<br>"
                                               "false positives %{x:.1%}<br>"
                                               "detected %{y:.1%}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", showlegend=False,
                             line=dict(color="#bbbbbb", dash="dot", width=1), hoverinfo="skip"))
    fig.update_xaxes(title="false-positive rate (normal images)", range=[0, 1],
                     tickformat=".0%")
    fig.update_yaxes(title="detection rate", range=[0, 1.02], tickformat=".0%")
    return _layout(fig, "ROC of each anomaly type (◆: the threshold)", height=380)
