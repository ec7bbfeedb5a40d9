"""results.md: the benchmark's Markdown tables, rendered from the rows of results.csv.

One table per suite (AUROC in %), the general suite as per-data-set means beside the peers, and
the speed report from speed.json.
"""

from __future__ import annotations

import json

import numpy as np

from core.bench.feature_peers import FEATURE_PEERS
from core.bench.results import ANOMEM, Results
from core.bench.suites import BenchOptions

# Published mean AUROC (%), quoted beside ours: GPU-scale training, original CIFAR files.
PUBLISHED = {
    "cifar10": [("CSI (Tack et al. 2020)", 94.3), ("Deep SVDD (Ruff et al. 2018)", 64.8)],
    "cifar100": [("CSI (Tack et al. 2020)", 89.6)],
    "cifar10-unbalanced": [("Deep SAD (Ruff et al. 2020)", {0.01: 72.6, 0.05: 77.9, 0.1: 79.8})],
}
def _pct(v: object) -> str:
    if v in (None, ""):
        return "–"
    return f"{100 * float(v):.1f}"


def _methods(rows: list[dict]) -> list[str]:
    order = {"ours": 0, "ablation": 1, "peer": 2}
    seen: dict[str, int] = {}
    for r in rows:
        seen.setdefault(r["method"], order.get(r["kind"], 3))
    return sorted(seen, key=lambda m: (seen[m], list(seen).index(m)))


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _by_class_table(rows: list[dict], suite: str) -> str:
    classes = list(dict.fromkeys(r["normal_class"] for r in rows))
    body = []
    for m in _methods(rows):
        vals = {r["normal_class"]: r["auroc"] for r in rows if r["method"] == m}
        got = [float(vals[c]) for c in classes if vals.get(c)]
        mean = _pct(np.mean(got)) + ("" if len(got) == len(classes) else f" ({len(got)})")
        body.append([m, *(_pct(vals.get(c)) for c in classes), mean if got else "–"])
    for name, value in PUBLISHED.get(suite, []):
        body.append([f"{name}, published, GPU-scale", *("" for _ in classes), f"{value:.1f}"])
    return _table(["method", *classes, "mean"], body)


def _unbalanced_table(rows: list[dict], one_class: list[dict]) -> str:
    ratios = sorted({float(r["ratio"]) for r in rows})
    normal = rows[0]["normal_class"]
    body = []
    for m in _methods(rows):
        vals = {float(r["ratio"]): r["auroc"] for r in rows if r["method"] == m}
        ref = next((r["auroc"] for r in one_class
                    if r["normal_class"] == normal and r["method"] == m), None)
        body.append([m, _pct(ref), *(_pct(vals.get(x)) for x in ratios)])
    for name, values in PUBLISHED["cifar10-unbalanced"]:
        body.append([f"{name}, published, GPU-scale (mean over classes)", "",
                     *(f"{values[x]:.1f}" if x in values else "" for x in ratios)])
    return _table(["method", "one-class (0%)", *(f"{x:.0%}" for x in ratios)], body)


def _types_table(rows: list[dict]) -> str:
    types = sorted({t for r in rows for t in json.loads(r["by_type"] or "{}")})
    body = []
    for m in _methods(rows):
        r = next(r for r in rows if r["method"] == m)
        by_type = json.loads(r["by_type"] or "{}")
        secs = f"{float(r['train_s']):.0f}" if r["train_s"] else ""
        body.append([m, _pct(r["auroc"]), *(_pct(by_type.get(t)) for t in types),
                     _pct(r["pixel_auroc"]), secs])
    return _table(["method", "AUROC", *types, "pixel AUROC", "train s"], body)


GENERAL_COLUMNS = ("AnoMem", "AnoMem, fixed weights", "AnoMem, learned weights",
                   "AnoMem, pixels/knn only", "AnoMem, pixels/layout only", *FEATURE_PEERS,
                   "kNN (pixels, k=2)", "IForest (16x16 px)",
                   "OCSVM (16x16 px, nu=0.1)", "Deep SVDD")
SHALLOW = ("kNN (pixels, k=2)", "IForest (16x16 px)", "OCSVM (16x16 px, nu=0.1)")


def _means(auroc: dict[tuple[str, str], float], classes: list[str], methods: tuple[str, ...]
           ) -> list[float]:
    """Each method's mean AUROC over the classes it ran on; methods that ran on none left out."""
    return [float(np.mean([auroc[(c, m)] for c in classes if (c, m) in auroc]))
            for m in methods if any((c, m) in auroc for c in classes)]


def _above(ours: list[float], peers: list[float]) -> str:
    """Whether AnoMem's mean beats the best of the peers' means: yes, tie, no, or – if either
    side is missing."""
    if not (ours and peers):
        return "–"
    mean, best = np.mean(ours), max(peers)
    return "yes" if mean > best else "tie" if mean == best else "no"


def general_tables(rows: list[dict]) -> str:
    """The general suite: one-class means per data set beside the peers, counting the classes
    where AnoMem is at or above pixel kNN and at or above the best peer on its own pretrained
    features; then the unbalanced pairs."""
    one = [r for r in rows if r["setting"] == "one-class"]
    sets = list(dict.fromkeys(r["suite"] for r in one))
    body, wins, total, same_wins, same_total = [], 0, 0, 0, 0
    for suite in sets:
        mine = [r for r in one if r["suite"] == suite]
        classes = list(dict.fromkeys(r["normal_class"] for r in mine))
        auroc = {(r["normal_class"], r["method"]): float(r["auroc"]) for r in mine}
        cells = []
        for m in GENERAL_COLUMNS:
            got = [auroc[(c, m)] for c in classes if (c, m) in auroc]
            cells.append(_pct(np.mean(got)) if got else "–")
        pairs = [(auroc[(c, ANOMEM)], auroc[(c, SHALLOW[0])]) for c in classes
                 if (c, ANOMEM) in auroc and (c, SHALLOW[0]) in auroc]
        beat = sum(a >= k for a, k in pairs)
        wins, total = wins + beat, total + len(pairs)
        same = [(auroc[(c, ANOMEM)], max(auroc[(c, m)] for m in FEATURE_PEERS if (c, m) in auroc))
                for c in classes
                if (c, ANOMEM) in auroc and any((c, m) in auroc for m in FEATURE_PEERS)]
        same_beat = sum(a >= p for a, p in same)
        same_wins, same_total = same_wins + same_beat, same_total + len(same)
        ours = [auroc[(c, ANOMEM)] for c in classes if (c, ANOMEM) in auroc]
        body.append([suite.removeprefix("general/"), ", ".join(classes), *cells,
                     f"{beat}/{len(pairs)}", _above(ours, _means(auroc, classes, SHALLOW)),
                     f"{same_beat}/{len(same)}",
                     _above(ours, _means(auroc, classes, FEATURE_PEERS))])
    header = ["data set", "normal classes", *GENERAL_COLUMNS, "AnoMem >= kNN",
              "above best shallow", "AnoMem >= best same-backbone",
              "above best same-backbone"]
    text = ("## General suite, one-class\n\nMean AUROC (%) over the normal classes listed; "
            "`fixed` / `learned` weights and the pixel term alone are ablations of the same "
            f"model. AnoMem at or above pixel kNN on {wins} of {total} classes, and at or above "
            "the best same-backbone peer (DN2, PaDiM, PatchCore on the frozen EfficientNet-Lite0 "
            f"features AnoMem reads) on {same_wins} of {same_total}.\n\n"
            + _table(header, body) + "\n")
    unb = [r for r in rows if r["setting"] == "unbalanced"]
    if unb:
        ref = {(r["suite"], r["normal_class"]): float(r["auroc"]) for r in one
               if r["method"] == ANOMEM}
        suites = {suite: i for i, suite in enumerate(dict.fromkeys(r["suite"] for r in rows))}
        unb.sort(key=lambda r: (suites[r["suite"]], r["normal_class"], r["anomaly_classes"],
                                float(r["ratio"]), r["method"]))
        body = []
        for r in unb:
            if r["method"] not in (ANOMEM, "Deep SAD"):
                continue
            by_type = json.loads(r["by_type"] or "{}")
            seen = [v for k, v in by_type.items() if k in r["anomaly_classes"].split(",")]
            unseen = [v for k, v in by_type.items() if k not in r["anomaly_classes"].split(",")]
            one_class = ref.get((r["suite"], r["normal_class"]))
            body.append([r["suite"].removeprefix("general/"), r["normal_class"],
                         r["anomaly_classes"], f"{float(r['ratio']):.0%}", r["method"],
                         _pct(one_class) if r["method"] == ANOMEM else "",
                         _pct(r["auroc"]), _pct(np.mean(seen)) if seen else "–",
                         _pct(np.mean(unseen)) if unseen else "–"])
        text += ("\n## General suite, unbalanced\n\nAUROC (%); seen: the labelled class, "
                 "unseen: mean over the anomaly classes no label came from.\n\n" + _table(
                     ["data set", "normal", "labelled from", "ratio", "method",
                      "one-class AUROC", "AUROC", "seen", "unseen"], body) + "\n")
    return text


def render_markdown(results: Results, opts: BenchOptions) -> str:
    """results.md: one table per suite (AUROC, %), then the speed report."""
    rows = list(results.rows.values())
    parts = [f"# Benchmark\n\nAUROC in %, {opts.minutes:g} min training budget per cell on "
             f"this machine; `–`: not run yet. Ablations reuse the benchmarked model.\n"]
    general = [r for r in rows if r["suite"].startswith("general/")]
    if general:
        parts.append(general_tables(general))
    suites = list(dict.fromkeys(r["suite"] for r in rows if r not in general))
    for suite in suites:
        mine = [r for r in rows if r["suite"] == suite]
        if suite == "cifar10":
            parts.append(f"## CIFAR-10, one-class\n\n{_by_class_table(mine, suite)}\n")
        elif suite == "cifar10-unbalanced":
            one = [r for r in rows if r["suite"] == "cifar10"]
            anomaly = mine[0]["normal_class"]
            parts.append(f"## CIFAR-10, unbalanced (normal: {anomaly}; labelled anomalies from "
                         f"one class)\n\n{_unbalanced_table(mine, one)}\n")
        elif suite.startswith("path:") and len({r["normal_class"] for r in mine}) > 1:
            parts.append(f"## {suite[5:]}\n\n{_by_class_table(mine, suite)}\n")
        else:
            title = {"shapes": "shapes (built-in)", "mvtec": "MVTec AD bottle"}.get(
                suite, suite.removeprefix("path:"))
            parts.append(f"## {title}\n\n{_types_table(mine)}\n")
    speed = opts.out / "speed.json"
    if speed.is_file():
        parts.append(speed_section(json.loads(speed.read_text())))
    return "\n".join(parts)


def speed_section(s: dict) -> str:
    """The speed report of speed.json (`anomem bench --suites speed`)."""
    return (
        "## Speed\n\n"
        f"On {s['device']} ({s['threads']} threads), {s['dataset']} at {s['image_size']} px, "
        f"batches of {s['batch']} training images:\n\n" + _table(["", "value"], [
            ["bare backbone, forward + backward of two views",
             f"{s['backbone_images_per_s']:.0f} images/s"],
            ["AnoMem stage-1 step (shifted negatives included)",
             f"{s['anomem_images_per_s']:.0f} images/s "
             f"({s['step_cost_ratio']:.2f}x the backbone's cost per image)"],
            ["AnoMem stage-1 step without shifted negatives",
             f"{s['anomem_no_shift_images_per_s']:.0f} images/s "
             f"({s['step_cost_ratio_no_shift']:.2f}x)"],
            *([f"AnoMem stage-1 step, shifted copies of {float(f):.0%} of the normals",
               f"{s['backbone_images_per_s'] / r:.0f} images/s ({r:.2f}x)"]
              for f, r in s.get("step_cost_ratio_by_shift_fraction", {}).items()
              if float(f) < 1),
            ["inference (scores and maps), from-scratch encoder",
             f"{s['inference_images_per_s']:.0f} images/s"],
            *([f"inference (scores and maps), pretrained encoder at "
               f"{s['pretrained']['input_size']} px",
               f"{s['pretrained']['inference_images_per_s']:.0f} images/s"]
              for _ in [0] if "pretrained" in s),
            *_deployed_rows(s.get("deployed", {})),
            ["share of a step spent making batches and views", f"{s['data_share']:.1%}"],
            ["peak memory", f"{s['peak_memory_mb']:.0f} MB"],
        ]) + "\n" + _deployed_note(s.get("deployed", {})))


ENCODERS = {"scratch": "from-scratch", "pretrained": "pretrained"}  # speed.json's "deployed"


def _deployed_rows(deployed: dict) -> list[list[str]]:
    """One row per encoder and batch size: a saved detector's images/s with PyTorch and with
    onnxruntime, side by side (`core.bench.speed.deployed_rate`)."""
    rows = []
    for name, d in deployed.items():
        rates = d["images_per_s"]
        for batch in d["images"]:
            torch_rate, onnx_rate = rates["pytorch"][batch], rates["onnxruntime"][batch]
            rows.append([f"saved detector, {ENCODERS.get(name, name)} encoder "
                         f"({d['backbone']}), batch {batch}",
                         f"PyTorch {torch_rate:.0f} images/s, onnxruntime {onnx_rate:.0f} "
                         f"images/s ({onnx_rate / torch_rate:.2f}x)"])
    return rows


def _deployed_note(deployed: dict) -> str:
    """What the saved-detector rows time, under the speed table."""
    if not deployed:
        return ""
    d = next(iter(deployed.values()))
    counts = " and ".join(f"{n} images at batch {b}" for b, n in d["images"].items())
    threads = f"{d['threads']} thread{'s' if d['threads'] != 1 else ''}"
    return (f"\nSaved detector: `Detector.score` (resizing, scores and maps) on each preset's "
            f"model saved as a run without training, which costs the same to score (PyTorch on "
            f"{d['pytorch_device']}, {threads}), and on its checked ONNX export (onnxruntime on "
            f"the CPU, as many threads); images/s over {counts}, after a warm-up "
            f"batch; (Nx): onnxruntime's rate over PyTorch's.\n")
