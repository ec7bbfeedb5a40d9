"""A run's findings as one self-contained HTML file, and its per-image scores as CSV.

For someone who does not run the app: the metrics, a table per anomaly type, the score
distributions and ROC curves, the normal test images the detector finds most anomalous (edge
cases) and the anomalies it scores lowest (missed), each beside its deviation map, and the
config. Images and plots are inlined as PNG, so the file opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
from PIL import Image

from core import explore
from core.data import NORMAL, Split, load_split
from core.files import write_atomic
from core.refit import read_refit_report
from core.runs import Run
from core.train.scoring import ScoredSet, score_images

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EXAMPLES = 8  # edge cases and missed anomalies shown
TILE = 112  # displayed size of a thumbnail, pixels


@dataclass
class Report:
    html: str
    csv: str


def scores_table(run: Run, split: Split, scored: ScoredSet) -> pd.DataFrame:
    """One row per test image: its name, type, label, score, per-scale scores and verdict."""
    test = split.test
    threshold = float(run.model.detector.threshold)
    table = pd.DataFrame({
        "index": np.arange(len(test)), "name": test.names, "type": test.types,
        "label": np.where(test.labels.numpy() == 1, "anomaly", NORMAL),
        "edge_case": np.asarray(test.edge, dtype=bool), "score": scored.image})
    for scale, values in scored.per_scale.items():
        table[f"score_{scale}"] = values
    table["verdict"] = np.where(scored.image > threshold, "anomalous", NORMAL)
    return table


def build_report(run: Run, split: Split | None = None, scored: ScoredSet | None = None,
                 device: str = "cpu") -> Report:
    """The HTML report and the CSV of per-image scores of a finished run (`split` and the
    test set's `scored` are computed when not given)."""
    split = split or load_split(run.config.data)
    test, model = split.test, run.model
    if scored is None:
        scored = score_images(model, test.images, device, with_maps=False)
    table = scores_table(run, split, scored)
    threshold = float(model.detector.threshold)
    labels = test.labels.numpy()
    cases = explore.edge_cases(scored.image, labels, threshold, EXAMPLES)
    picked = cases["normal_highest"] + cases["anomaly_lowest"]
    maps = explore.combined_maps(model, test.images[torch.as_tensor(picked, dtype=torch.long)]) \
        if picked else np.zeros((0,))
    by_index = dict(zip(picked, maps, strict=True))
    vmin, vmax = explore.heat_range(model)

    def gallery(indices: list[int]) -> str:
        if not indices:
            return "<p>None in the test set.</p>"
        cells = []
        for i in indices:
            image = test.images[i]
            over = explore.overlay(image, by_index[i], vmin, vmax, 0.5)
            cells.append(
                f"<figure>{_img(explore.to_rgb(image))}{_img(over)}<figcaption>#{i} · "
                f"{html.escape(test.types[i])} · score {scored.image[i]:.3f}<br>"
                f"{html.escape(str(test.names[i]))}</figcaption></figure>")
        return f"<div class='gallery'>{''.join(cells)}</div>"

    metrics = run.metrics or {}
    stats = explore.type_stats(scored.image, labels, test.types, threshold)
    by_type = stats.table.rename(columns={"type": "Anomaly type", "n": "Images",
                                          "auroc": "AUROC vs normal",
                                          "detection_rate": "Detected at threshold"})
    cfg = run.config
    sections = [
        f"<h1>AnoMem report · {html.escape(run.path.name)}</h1>",
        f"<p>{html.escape(cfg.data.dataset)} · normal class "
        f"<b>{html.escape(str(split.normal_class))}</b> · {cfg.data.setting} · preset "
        f"{cfg.preset} · {len(test)} test images · written "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC</p>",
        "<h2>Metrics</h2>", _metrics_table(metrics, stats.false_positive_rate),
        "<h2>By anomaly type</h2>", by_type.to_html(index=False, float_format="%.3f",
                                                     border=0),
        "<h2>Scores</h2>", _plots(scored.image, labels, test.types, threshold),
    ]
    if metrics.get("auroc_by_scale"):
        sections += ["<h3>AUROC of each scale alone</h3>", pd.DataFrame(
            [metrics["auroc_by_scale"]]).to_html(index=False, float_format="%.3f", border=0)]
    det = model.detector
    terms = explore.term_table(det.term_names, det.weights.cpu().numpy(), scored.terms, labels)
    sections += ["<h2>How the score is made</h2>",
                 f"<p>{html.escape(explore.weighing_summary(metrics.get('stage2')))}</p>",
                 terms.rename(columns={"term": "Term", "weight": "Weight in the score",
                                       "auroc": "AUROC alone"}).to_html(
                     index=False, float_format="%.3f", border=0)]
    refit = read_refit_report(run.path)
    if refit is not None:
        sections += [
            f"<h2>Taught from {html.escape(refit['parent'])}</h2>",
            f"<p>{refit['n_normal_marks']} image(s) marked normal, "
            f"{refit['n_anomaly_marks']} marked anomalous; compared on {refit['n_test']} test "
            f"images (the marked ones left out): AUROC {refit['before']['auroc']:.3f} → "
            f"{refit['after']['auroc']:.3f}; {len(refit['changed'])} verdict(s) changed.</p>"]
    sections += [
        f"<h2>Edge cases: the {EXAMPLES} normal images scored highest</h2>",
        gallery(cases["normal_highest"]),
        f"<h2>Missed: the {EXAMPLES} anomalies scored lowest</h2>",
        gallery(cases["anomaly_lowest"]),
        f"<p class='note'>Each image is shown beside its combined deviation map; colours go "
        f"from {vmin:.1f} (as normal as an average normal position) to {vmax:.2f} (twice the "
        "pixel threshold).</p>",
        "<h2>Config</h2>",
        f"<pre>{html.escape(json.dumps(cfg.to_dict(), indent=2))}</pre>",
    ]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>AnoMem report · "
            f"{html.escape(run.path.name)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(sections) + "</body></html>")
    return Report(html=page, csv=table.to_csv(index=False, float_format="%.6g"))


def _metrics_table(metrics: dict, fpr: float | None) -> str:
    rows = [("Image AUROC", metrics.get("auroc")), ("Pixel AUROC", metrics.get("pixel_auroc")),
            ("AUPR", metrics.get("aupr")), ("FPR at 95 % TPR", metrics.get("fpr_at_95_tpr")),
            ("False alarms at threshold", fpr),
            ("Anomalies caught at threshold", metrics.get("tpr_at_threshold")),
            ("Threshold", metrics.get("threshold"))]
    body = "".join(f"<tr><th>{name}</th><td>{'n/a' if v is None else f'{v:.3f}'}</td></tr>"
                   for name, v in rows)
    return f"<table>{body}</table>"


def _plots(scores: np.ndarray, labels: np.ndarray, types: list[str], threshold: float) -> str:
    """Score histograms per type and ROC curves per type, one PNG."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-9, 40)
    for t in explore.type_order(types):
        left.hist(scores[np.asarray(types) == t], bins=bins, histtype="step", density=True,
                  lw=1.5, label=t)
    left.axvline(threshold, color="k", ls="--", lw=1, label="threshold")
    left.set(xlabel="anomaly score", ylabel="density", title="Score distributions")
    left.legend(fontsize=7)
    for curve in explore.roc_by_type(scores, labels, types, threshold):
        right.plot(curve.fpr, curve.tpr, lw=1.5, label=f"{curve.kind} ({curve.auroc or 0:.3f})")
    right.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    right.set(xlabel="false-positive rate", ylabel="true-positive rate",
              title="ROC of each type vs normal")
    right.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return f"<img alt='plots' src='data:image/png;base64,{_b64(buf.getvalue())}'>"


def _img(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(explore.upscale(array, TILE)).save(buf, format="PNG")
    return f"<img alt='' width='{TILE}' src='data:image/png;base64,{_b64(buf.getvalue())}'>"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_report(run: Run, out: Path, device: str = "cpu") -> tuple[Path, Path]:
    """report.html at `out` and the CSV beside it (same name, .csv); returns both paths."""
    out = Path(out)
    report = build_report(run, device=device)
    csv_path = out.with_suffix(".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, report.html)
    write_atomic(csv_path, report.csv)
    return out, csv_path


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; text-align: left; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; font-size: 0.8em; }
figure img { margin-right: 2px; image-rendering: pixelated; }
pre { background: #f6f6f6; padding: 1em; font-size: 0.8em; overflow-x: auto; }
.note { color: #666; font-size: 0.9em; }
"""
