"""Does teaching generalise? Mark some test images, measure on the others of their kind.

    python benchmarks/teach_protocol.py OUT_DIR RUN_DIR [RUN_DIR ...] [--seeds 3]
        [--anomaly-sight queries|encoder|both] [--only all|misses]

For each finished run (one of each data set to measure) and each seed of the marking:

- false alarms: the test normals scoring above the run's threshold; a seeded random half of
  them (ten at most) is marked normal, and the false-positive rate is read on the *other*
  false alarms, never on the marked ones; also on all unmarked normals, with every anomaly
  type's AUROC;
- misses: for each anomaly type, five of its test images are marked with the type; its AUROC
  is read on its unmarked images, the other types' AUROCs beside it;
- one and two marks: the largest AUROC change and how many verdicts changed beyond the marks;
- beside the anomalies caught after the lesson, those the parent would catch with its threshold
  raised until it flags as few unmarked normals: a lesson is worth more than that raise only if
  it keeps more;
- the ceiling of the false alarms' lesson in each sight: with the test labels, the share of the
  other false alarms inside the widest ball about the marks that holds at most 1 % of the caught
  anomalies. No rule that relieves the marks' look-alikes in that sight, whatever its reach,
  clears more at so small a cost: a bound on the method, not a result.

The sight and reach of marked normals are chosen as a refit chooses them, on held-out training
normals (core/refit.py `lesson_context`), once per run. The taught scores are computed by the
lessons the refit adds (`with_lessons`) on the parent's scores and descriptors of the test
images, computed once per run: the same arithmetic `AnoMem.score` does, without scoring the
test set again for every marking. One real `refit_run` per run, with ten marks, times the
teaching and checks that its saved model scores the test set as this computation does. Writes
OUT_DIR/results.md and results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from core.data import NORMAL, load_split
from core.files import write_atomic
from core.metrics import at_threshold, image_metrics
from core.model.lessons import ANOMALY_SIGHT, SIGHTS, Lessons, encoder_whitening, in_sight
from core.refit import (
    VIEWS,
    _views,
    describe_images,
    lesson_context,
    mark_kinds,
    mark_test_image,
    refit_run,
    with_lessons,
)
from core.runs import load_run

MAX_NORMAL_MARKS = 10
ANOMALY_MARKS = 5
CEILING_BUDGET = 0.01  # caught anomalies a ceiling's ball may hold


class Trial:
    """One run's test set, scored once, and the means to teach it any marks."""

    def __init__(self, run_dir: Path) -> None:
        self.run = load_run(run_dir)
        self.split = load_split(self.run.config.data)
        self.model = self.run.model.eval()
        test = self.split.test
        self.labels = test.labels.numpy()
        self.types = np.array(test.types)
        self.scores, self.descriptors = describe_images(self.model, test.images, "cpu")
        self.context = lesson_context(self.model, self.split, self.run.config,
                                      torch.device("cpu"))
        self.threshold = float(self.model.detector.threshold)

    def taught(self, marked: np.ndarray, label: str, seed: int) -> np.ndarray:
        """Test scores after marking test images `marked` with `label`."""
        marks = [mark_test_image(self.run.config, self.split, int(i), label) for i in marked]
        _, keys = describe_images(self.model, _views(marks, seed), "cpu")
        anomalous = torch.full((len(keys),), label != NORMAL)
        kinds, _ = mark_kinds(marks, keys, self.context.references, seed)
        child = with_lessons(self.model, keys, anomalous, self.context, kinds)
        assert child.lessons is not None
        return child.lessons(self.scores, self.descriptors).numpy()

    def metrics(self, scores: np.ndarray, keep: np.ndarray) -> dict:
        m = image_metrics(self.labels[keep], scores[keep], list(self.types[keep]))
        rates = at_threshold(self.labels[keep], scores[keep], self.threshold)
        return {"auroc": m["auroc"], "auroc_by_type": m["auroc_by_type"],
                "fpr": rates["fpr_at_threshold"], "tpr": rates["tpr_at_threshold"]}


def false_alarms(t: Trial, seed: int) -> dict | None:
    alarms = np.flatnonzero((t.labels == 0) & (t.scores.numpy() > t.threshold))
    k = min(MAX_NORMAL_MARKS, len(alarms) // 2)
    if k == 0:
        return None
    rng = np.random.default_rng(seed)
    marked = np.sort(rng.choice(alarms, k, replace=False))
    others = np.setdiff1d(alarms, marked)
    after = t.taught(marked, NORMAL, seed)
    keep = np.ones(len(t.labels), bool)
    keep[marked] = False
    before = t.scores.numpy()
    caught = np.flatnonzero((t.labels == 1) & (before > t.threshold))
    return {"marks": int(k), "others": len(others),
            "ceiling": {sight: ceiling(t, marked, others, caught, sight) for sight in SIGHTS},
            "tpr_raised_threshold": raised_threshold(t, before, after, keep),
            "others_fpr_before": float((before[others] > t.threshold).mean()),
            "others_fpr_after": float((after[others] > t.threshold).mean()),
            "before": t.metrics(before, keep), "after": t.metrics(after, keep)}


def raised_threshold(t: Trial, before: np.ndarray, after: np.ndarray, keep: np.ndarray
                     ) -> float:
    """The anomalies the parent catches (true-positive rate) with its threshold raised until
    it flags as few of the unmarked normals as the taught run does: what a lesson is worth
    beyond lowering every score near the threshold. A lesson that keeps more anomalies at that
    false-positive rate has told its look-alikes apart."""
    normals = np.sort(before[keep & (t.labels == 0)])[::-1]
    flagged = int((after[keep & (t.labels == 0)] > t.threshold).sum())
    raised = max(t.threshold, normals[flagged] if flagged < len(normals) else -np.inf)
    return float((before[keep & (t.labels == 1)] > raised).mean())


def ceiling(t: Trial, marked: np.ndarray, others: np.ndarray, caught: np.ndarray,
            sight: str) -> float:
    """The most any lesson of balls around the marked images could do in `sight`, read with
    the test labels (a bound, not a result): one radius about every mark, the largest that
    holds at most CEILING_BUDGET of the caught anomalies; the share of the other false alarms
    inside it."""
    if not len(others) or not len(caught):
        return float("nan")
    probe = Lessons(len(marked), t.model.descriptor_blocks)
    probe.keys.copy_(t.descriptors[marked])
    probe.whiten.copy_(encoder_whitening(t.model.descriptor_blocks, t.context.references))
    probe.sight.copy_(in_sight(probe.names, sight).expand(len(marked), -1))
    nearest = probe.distances(t.descriptors).amin(1).numpy()
    radius = np.quantile(nearest[caught], CEILING_BUDGET)
    return float((nearest[others] < radius).mean())


def misses(t: Trial, kind: str, seed: int) -> dict | None:
    of_kind = np.flatnonzero(t.types == kind)
    if len(of_kind) <= ANOMALY_MARKS:
        return None
    marked = np.sort(np.random.default_rng(seed).choice(of_kind, ANOMALY_MARKS, replace=False))
    after = t.taught(marked, kind, seed)
    keep = np.ones(len(t.labels), bool)
    keep[marked] = False
    return {"type": kind, "marks": ANOMALY_MARKS, "before": t.metrics(t.scores.numpy(), keep),
            "after": t.metrics(after, keep)}


def few_marks(t: Trial, n: int, seed: int) -> dict | None:
    """n marked false alarms: the largest AUROC change and the verdicts changed elsewhere."""
    alarms = np.flatnonzero((t.labels == 0) & (t.scores.numpy() > t.threshold))
    if len(alarms) < n:
        return None
    marked = np.random.default_rng(seed).choice(alarms, n, replace=False)
    after = t.taught(marked, NORMAL, seed)
    keep = np.ones(len(t.labels), bool)
    keep[marked] = False
    before = t.scores.numpy()
    b, a = t.metrics(before, keep), t.metrics(after, keep)
    flips = ((before > t.threshold) != (after > t.threshold)) & keep
    drop = max([b["auroc"] - a["auroc"]] + [b["auroc_by_type"][k] - a["auroc_by_type"][k]
                                           for k in b["auroc_by_type"]])
    # a marked normal only lowers scores: its flips are normals cleared or anomalies passed
    return {"marks": n, "auroc_drop": float(drop), "verdicts_changed": int(flips.sum()),
            "normals_cleared": int((flips & (t.labels == 0)).sum()),
            "anomalies_passed": int((flips & (t.labels == 1)).sum())}


def timed_refit(t: Trial, run_dir: Path, out_dir: Path) -> dict:
    """The real refit with (up to) ten marked false alarms; its scores must match ours."""
    alarms = np.flatnonzero((t.labels == 0) & (t.scores.numpy() > t.threshold))
    marked = np.sort(np.random.default_rng(0).choice(
        alarms, min(MAX_NORMAL_MARKS, len(alarms)), replace=False))
    marks = [mark_test_image(t.run.config, t.split, int(i), NORMAL) for i in marked]
    out = out_dir / "runs" / f"{run_dir.name}-taught"
    start = time.perf_counter()
    report = refit_run(run_dir, marks, out)
    wall = time.perf_counter() - start
    child = load_run(out).model
    assert child.lessons is not None
    ours = t.taught(marked, NORMAL, int(t.run.config.train.seed))
    saved = child.lessons(t.scores, t.descriptors).numpy()
    return {"marks": len(marks), "teach_seconds": report.seconds, "refit_wall_seconds": wall,
            "agrees": bool(np.allclose(ours, saved, atol=1e-5))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--anomaly-sight", choices=SIGHTS, default=ANOMALY_SIGHT,
                    help="what marked anomalies compare images on (default: the refit's)")
    ap.add_argument("--only", choices=("all", "misses"), default="all",
                    help="misses: measure marked misses alone (no refit, no false alarms)")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for run_dir in args.runs:
        start = time.perf_counter()
        t = Trial(run_dir)
        t.context = dataclasses.replace(t.context, anomaly_sight=args.anomaly_sight)
        kinds = sorted(set(t.types[t.labels == 1]))
        seeds = range(args.seeds)
        everything = args.only == "all"
        results[run_dir.name] = r = {
            "false_alarms": [false_alarms(t, s) for s in seeds] if everything else [],
            "misses": [misses(t, k, s) for k in kinds for s in seeds],
            "few": [few_marks(t, n, s) for n in (1, 2) for s in seeds] if everything else [],
            "refit": timed_refit(t, run_dir, args.out_dir) if everything else {},
            "views": VIEWS, "sight": t.context.sight, "reach": t.context.reach,
            "anomaly_sight": args.anomaly_sight, "evidence": t.context.evidence}
        print(f"{run_dir.name}: {time.perf_counter() - start:.0f} s", flush=True)
        print(json.dumps(r["refit"]), f"sight {t.context.sight}, reach {t.context.reach}",
              flush=True)
        write_atomic(args.out_dir / "results.json", json.dumps(results, indent=1))
    write_atomic(args.out_dir / "results.md", table(results))
    print(table(results))


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def table(results: dict) -> str:
    lines = ["| run | marks | sight, reach | other false alarms: FPR before -> after | "
             "all normals: FPR before -> after | anomalies caught: TPR before -> after "
             "(threshold raised instead) | "
             "worst type AUROC "
             "change | refit (teach / wall s) | ceiling: encoder / queries / both |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if not r["refit"]:  # --only misses
            continue
        fa = [x for x in r["false_alarms"] if x]
        worst = [min(x["after"]["auroc_by_type"][k] - x["before"]["auroc_by_type"][k]
                     for k in x["before"]["auroc_by_type"]) for x in fa]
        lines.append(
            f"| {name} | {_mean([x['marks'] for x in fa]):.1f} | "
            f"{r.get('sight', 'queries')}, {r['reach']:g} | "
            f"{100 * _mean([x['others_fpr_before'] for x in fa]):.1f} -> "
            f"{100 * _mean([x['others_fpr_after'] for x in fa]):.1f} % | "
            f"{100 * _mean([x['before']['fpr'] for x in fa]):.2f} -> "
            f"{100 * _mean([x['after']['fpr'] for x in fa]):.2f} % | "
            f"{100 * _mean([x['before']['tpr'] for x in fa]):.1f} -> "
            f"{100 * _mean([x['after']['tpr'] for x in fa]):.1f} % "
            f"({100 * _mean([x['tpr_raised_threshold'] for x in fa]):.1f} %) | "
            f"{_mean(worst):+.4f} | {r['refit']['teach_seconds']:.1f} / "
            f"{r['refit']['refit_wall_seconds']:.0f} | "
            + " / ".join(f"{100 * _mean([x['ceiling'][s] for x in fa if 'ceiling' in x]):.0f} %"
                         for s in SIGHTS) + " |")
    lines += ["", "Marked misses (five of one type; AUROC on its unmarked images, mean over "
              "seeds; gain as a share of the distance to 1; other types' worst change):", "",
              "| run | type | AUROC before -> after | share of the gap closed | "
              "other types' worst change |", "|---|---|---|---|---|"]
    for name, r in results.items():
        by_type: dict[str, list] = {}
        for x in r["misses"]:
            if x:
                by_type.setdefault(x["type"], []).append(x)
        for kind, xs in by_type.items():
            b = _mean([x["before"]["auroc_by_type"][kind] for x in xs])
            a = _mean([x["after"]["auroc_by_type"][kind] for x in xs])
            others = [x["after"]["auroc_by_type"][k] - x["before"]["auroc_by_type"][k]
                      for x in xs for k in x["before"]["auroc_by_type"] if k != kind]
            share = (a - b) / (1 - b) if b < 1 else float("nan")
            lines.append(f"| {name} | {kind} | {b:.4f} -> {a:.4f} | {share:.2f} | "
                         f"{min(others, default=0.0):+.4f} |")
    lines += ["", "One or two marks: largest AUROC drop (any type) and verdicts changed beyond "
              "the marks, worst over seeds (of them, normals cleared / anomalies passed, in the "
              "seed that changed most):", "",
              "| run | marks | AUROC drop | verdicts (normals cleared / anomalies passed) |",
              "|---|---|---|---|"]
    for name, r in results.items():
        for n in (1, 2):
            xs = [x for x in r["few"] if x and x["marks"] == n]
            if xs:
                most = max(xs, key=lambda x: x["verdicts_changed"])
                split = (f" ({most['normals_cleared']} / {most['anomalies_passed']})"
                         if "normals_cleared" in most else "")
                lines.append(f"| {name} | {n} | {max(x['auroc_drop'] for x in xs):+.4f} | "
                             f"{most['verdicts_changed']}{split} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
