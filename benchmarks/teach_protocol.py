"""Does teaching generalise? Mark some test images, measure on the others of their kind.

    python benchmarks/teach_protocol.py OUT_DIR RUN_DIR [RUN_DIR ...] [--seeds 3]
        [--anomaly-sight queries|encoder|both] [--only all|false-alarms|misses|sorts]

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
- false alarms of one sort: copies of test images made darker, turned a quarter, blurred or
  washed out (SORTS; a darker batch, a rotated part, a camera out of focus, a bleached
  print), as a user meets a new sort of normal image. Up to ten of a sort's normal copies that
  the run flags are marked normal; the other flagged copies are read, with the sort's
  anomalous copies (which a lesson should still catch, against the same threshold raise) and
  the test set itself;
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
import torchvision.transforms.functional as TF

from core.data import NORMAL, load_split
from core.files import write_atomic
from core.metrics import at_threshold, image_metrics
from core.model.lessons import ANOMALY_SIGHT, SIGHTS, Lessons, encoder_whitening, in_sight
from core.refit import (
    VIEWS,
    Mark,
    Marked,
    _views,
    describe_images,
    lesson_context,
    mark_test_image,
    marked_kinds,
    refit_run,
    with_lessons,
)
from core.runs import load_run

MAX_NORMAL_MARKS = 10
ANOMALY_MARKS = 5
CEILING_BUDGET = 0.01  # caught anomalies a ceiling's ball may hold
SORTS = ("darker", "rotated", "blurred", "washed")
SORT_IMAGES = 500  # test normals, and as many test anomalies, copied into each sort


def sort_copies(images: torch.Tensor, sort: str) -> torch.Tensor:
    """uint8 images (N, C, H, W) as a sort of look SORTS names: 60 % as bright, turned a
    quarter, blurred (sigma of a 32nd of the side) or washed out (half the contrast, lifted)."""
    x = images.float()
    if sort == "darker":
        x = x * 0.6
    elif sort == "rotated":
        x = torch.rot90(x, 1, (2, 3))
    elif sort == "blurred":
        sigma = max(0.8, images.shape[-1] / 32)
        k = 2 * round(2 * sigma) + 1
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    elif sort == "washed":
        x = x * 0.5 + 100
    else:
        raise ValueError(f"sort {sort!r}: expected one of {', '.join(SORTS)}")
    return x.round().clamp(0, 255).to(torch.uint8).contiguous()


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
        self._sorts: dict[str, dict] = {}
        self.summary: dict = {}  # what the last marks taught beyond their keys (sort, kinds)

    def taught(self, marked: np.ndarray, label: str, seed: int) -> np.ndarray:
        """Test scores after marking test images `marked` with `label`."""
        marks = [mark_test_image(self.run.config, self.split, int(i), label) for i in marked]
        return self.lessons(marks, seed)(self.scores, self.descriptors).numpy()

    def lessons(self, marks: list[Marked], seed: int) -> Lessons:
        """The lessons a refit would teach the run with `marks`."""
        scores, keys = describe_images(self.model, _views(marks, seed), "cpu")
        anomalous = torch.tensor([m.mark.label != NORMAL for m in marks]).repeat(VIEWS)
        kinds, self.summary = marked_kinds(marks, scores, keys, self.context, seed)
        child = with_lessons(self.model, keys, anomalous, self.context, kinds,
                             sum(m.mark.label == NORMAL for m in marks))
        assert child.lessons is not None
        return child.lessons

    def sort(self, sort: str) -> dict:
        """A seeded SORT_IMAGES of the test normals and of the anomalies as `sort` copies,
        scored: images (uint8), scores before any lesson and descriptors of each."""
        if sort not in self._sorts:
            rng = np.random.default_rng(0)
            out = {}
            for name, label in (("normal", 0), ("anomaly", 1)):
                idx = np.flatnonzero(self.labels == label)
                idx = np.sort(rng.choice(idx, min(SORT_IMAGES, len(idx)), replace=False))
                images = sort_copies(self.split.test.images[idx], sort)
                scores, descriptors = describe_images(self.model, images, "cpu")
                out[name] = {"images": images, "scores": scores, "descriptors": descriptors}
            self._sorts[sort] = out
        return self._sorts[sort]

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
    return {"marks": int(k), "others": len(others), "sort": t.summary.get("sort"),
            "ceiling": {sight: ceiling(t, marked, others, caught, sight) for sight in SIGHTS},
            "tpr_raised_threshold": raised_threshold(t, before, after, keep),
            "others_fpr_before": float((before[others] > t.threshold).mean()),
            "others_fpr_after": float((after[others] > t.threshold).mean()),
            "before": t.metrics(before, keep), "after": t.metrics(after, keep)}


def sorted_false_alarms(t: Trial, sort: str, seed: int) -> dict:
    """Up to ten of a sort's normal copies that the run flags, marked normal: the other flagged
    copies, the sort's anomalous copies and the test set, before and after (no marks when the
    run flags fewer than four copies: not a sort of false alarm there)."""
    copies = t.sort(sort)
    normal, anomaly = copies["normal"], copies["anomaly"]
    before_n, before_a = normal["scores"].numpy(), anomaly["scores"].numpy()
    alarms = np.flatnonzero(before_n > t.threshold)
    k = min(MAX_NORMAL_MARKS, len(alarms) // 2)
    flagged_copies = float((before_n > t.threshold).mean())
    if k < 2:
        return {"sort": sort, "marks": 0, "copies_flagged": flagged_copies}
    marked = np.sort(np.random.default_rng(seed).choice(alarms, k, replace=False))
    marks = [Marked(Mark(f"{sort}:{i}", "", NORMAL),
                    normal["images"][i].permute(1, 2, 0).contiguous().numpy()) for i in marked]
    lessons = t.lessons(marks, seed)
    after_n = lessons(normal["scores"], normal["descriptors"]).numpy()
    after_a = lessons(anomaly["scores"], anomaly["descriptors"]).numpy()
    after = lessons(t.scores, t.descriptors).numpy()
    others = np.setdiff1d(alarms, marked)
    keep = np.ones(len(before_n), bool)
    keep[marked] = False
    everything = np.ones(len(t.labels), bool)
    return {"sort": sort, "marks": int(k), "others": len(others),
            "copies_flagged": flagged_copies, "evidence": t.summary.get("sort"),
            "others_fpr_before": float((before_n[others] > t.threshold).mean()),
            "others_fpr_after": float((after_n[others] > t.threshold).mean()),
            "sort_tpr_before": float((before_a > t.threshold).mean()),
            "sort_tpr_after": float((after_a > t.threshold).mean()),
            # the parent's threshold raised until it flags as few of the sort's unmarked
            # normal copies as the taught run
            "sort_tpr_raised_threshold": raised_tpr(t.threshold, before_n[keep], after_n[keep],
                                                    before_a),
            "before": t.metrics(t.scores.numpy(), everything),
            "after": t.metrics(after, everything)}


def raised_threshold(t: Trial, before: np.ndarray, after: np.ndarray, keep: np.ndarray
                     ) -> float:
    """The anomalies the parent catches (true-positive rate) with its threshold raised until
    it flags as few of the unmarked normals as the taught run does: what a lesson is worth
    beyond lowering every score near the threshold. A lesson that keeps more anomalies at that
    false-positive rate has told its look-alikes apart."""
    normal, anomaly = keep & (t.labels == 0), keep & (t.labels == 1)
    return raised_tpr(t.threshold, before[normal], after[normal], before[anomaly])


def raised_tpr(threshold: float, normals_before: np.ndarray, normals_after: np.ndarray,
               anomalies_before: np.ndarray) -> float:
    """The share of `anomalies_before` above `threshold` raised until the parent's scores
    `normals_before` flag as few normals as the taught run's `normals_after` do."""
    ranked = np.sort(normals_before)[::-1]
    flagged = int((normals_after > threshold).sum())
    raised = max(threshold, ranked[flagged] if flagged < len(ranked) else -np.inf)
    return float((anomalies_before > raised).mean())


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
    lessons = t.lessons([mark_test_image(t.run.config, t.split, int(i), NORMAL) for i in marked],
                        seed)
    after = lessons(t.scores, t.descriptors).numpy()
    keep = np.ones(len(t.labels), bool)
    keep[marked] = False
    before = t.scores.numpy()
    b, a = t.metrics(before, keep), t.metrics(after, keep)
    flips = ((before > t.threshold) != (after > t.threshold)) & keep
    beyond = flips & ~look_alikes(lessons, t.descriptors, t.context.references)
    drop = max([b["auroc"] - a["auroc"]] + [b["auroc_by_type"][k] - a["auroc_by_type"][k]
                                           for k in b["auroc_by_type"]])
    # a marked normal only lowers scores: its flips are normals cleared or anomalies passed
    return {"marks": n, "sort": t.summary.get("sort"), "auroc_drop": float(drop),
            "verdicts_changed": int(flips.sum()), "beyond_look_alikes": int(beyond.sum()),
            "normals_cleared": int((flips & (t.labels == 0)).sum()),
            "anomalies_passed": int((flips & (t.labels == 1)).sum())}


def look_alikes(lessons: Lessons, descriptors: torch.Tensor, references: torch.Tensor
                ) -> np.ndarray:
    """(N,) whether each image is a look-alike of a marked normal: nearer one (in its sight)
    than that mark is to any held-out normal, or of the marks' sort (a weight past its cut)."""
    normal = ~lessons.anomalous
    nearest = lessons.distances(references)[:, normal].amin(0)  # (K,) squared
    near = (lessons.distances(descriptors)[:, normal] < nearest).any(1)
    return (near | (lessons.reach(descriptors)[2] > 0)).numpy()


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
    ap.add_argument("--only", choices=("all", "false-alarms", "misses", "sorts"),
                    default="all", help="measure one part alone (false-alarms: the test set's "
                    "own false alarms, one and two marks and the timed refit)")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for run_dir in args.runs:
        start = time.perf_counter()
        t = Trial(run_dir)
        t.context = dataclasses.replace(t.context, anomaly_sight=args.anomaly_sight)
        kinds = sorted(set(t.types[t.labels == 1]))
        seeds = range(args.seeds)
        alarms = args.only in ("all", "false-alarms")
        results[run_dir.name] = r = {
            "false_alarms": [false_alarms(t, s) for s in seeds] if alarms else [],
            "misses": ([misses(t, k, s) for k in kinds for s in seeds]
                       if args.only in ("all", "misses") else []),
            "sorts": ([sorted_false_alarms(t, sort, s) for sort in SORTS for s in seeds]
                      if args.only in ("all", "sorts") else []),
            "few": [few_marks(t, n, s) for n in (1, 2) for s in seeds] if alarms else [],
            "refit": timed_refit(t, run_dir, args.out_dir) if alarms else {},
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


def _worst_changes(xs: list[dict]) -> list[float]:
    """Each marking's largest drop (or least rise) of a type's AUROC, after against before."""
    return [min(x["after"]["auroc_by_type"][k] - x["before"]["auroc_by_type"][k]
                for k in x["before"]["auroc_by_type"]) for x in xs]


def _taught(xs: list[dict], key: str) -> str:
    """How many of the markings `xs` taught a sort (their `key` holds its evidence)."""
    return f"{sum(bool((x.get(key) or {}).get('taught')) for x in xs)} / {len(xs)}"


def table(results: dict) -> str:
    lines = ["| run | marks | sight, reach | sort taught (seeds) | other false alarms: FPR "
             "before -> after | "
             "all normals: FPR before -> after | anomalies caught: TPR before -> after "
             "(threshold raised instead) | "
             "worst type AUROC "
             "change | refit (teach / wall s) | ceiling: encoder / queries / both |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if not r["refit"]:  # measured without the false alarms
            continue
        fa = [x for x in r["false_alarms"] if x]
        worst = _worst_changes(fa)
        lines.append(
            f"| {name} | {_mean([x['marks'] for x in fa]):.1f} | "
            f"{r.get('sight', 'queries')}, {r['reach']:g} | {_taught(fa, 'sort')} | "
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
    lines += ["", "False alarms of one sort (copies of test images; up to ten of the flagged "
              "normal copies marked; mean over seeds; the sort's anomalous copies caught, and in "
              "brackets those the parent catches with its threshold raised until it flags as "
              "few of the sort's unmarked normal copies; the test set after the lesson):", "",
              "| run | sort | copies flagged | marks | sort taught (seeds) | other flagged "
              "copies: flagged before -> "
              "after | the sort's anomalies caught (threshold raised instead) | test: all "
              "normals flagged | test: anomalies caught | test: worst type AUROC change |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for sort in SORTS:
            xs = [x for x in r.get("sorts", []) if x and x["sort"] == sort]
            if not xs:
                continue
            if not xs[0]["marks"]:
                lines.append(f"| {name} | {sort} | {100 * xs[0]['copies_flagged']:.1f} % | 0 "
                             "| | too few flagged to mark | | | | |")
                continue
            worst = _worst_changes(xs)
            lines.append(
                f"| {name} | {sort} | {100 * xs[0]['copies_flagged']:.1f} % | "
                f"{_mean([x['marks'] for x in xs]):.1f} | {_taught(xs, 'evidence')} | "
                f"{100 * _mean([x['others_fpr_before'] for x in xs]):.1f} -> "
                f"{100 * _mean([x['others_fpr_after'] for x in xs]):.1f} % | "
                f"{100 * _mean([x['sort_tpr_before'] for x in xs]):.1f} -> "
                f"{100 * _mean([x['sort_tpr_after'] for x in xs]):.1f} % "
                f"({100 * _mean([x['sort_tpr_raised_threshold'] for x in xs]):.1f} %) | "
                f"{100 * _mean([x['before']['fpr'] for x in xs]):.2f} -> "
                f"{100 * _mean([x['after']['fpr'] for x in xs]):.2f} % | "
                f"{100 * _mean([x['before']['tpr'] for x in xs]):.1f} -> "
                f"{100 * _mean([x['after']['tpr'] for x in xs]):.1f} % | "
                f"{_mean(worst):+.4f} |")
    lines += ["", "One or two marks: largest AUROC drop (any type) and verdicts changed beyond "
              "the marks, worst over seeds (of them, normals cleared / anomalies passed, in the "
              "seed that changed most), and of those beyond the marks' look-alikes (images "
              "nearer a mark than it is to any held-out normal, or of the marks' sort), the "
              "most over seeds:", "",
              "| run | marks | AUROC drop | verdicts (normals cleared / anomalies passed) | "
              "beyond look-alikes | sort taught (seeds) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for n in (1, 2):
            xs = [x for x in r["few"] if x and x["marks"] == n]
            if xs:
                most = max(xs, key=lambda x: x["verdicts_changed"])
                split = (f" ({most['normals_cleared']} / {most['anomalies_passed']})"
                         if "normals_cleared" in most else "")
                beyond = max(x.get("beyond_look_alikes", -1) for x in xs)
                lines.append(f"| {name} | {n} | {max(x['auroc_drop'] for x in xs):+.4f} | "
                             f"{most['verdicts_changed']}{split} | "
                             f"{beyond if beyond >= 0 else 'n/a'} | {_taught(xs, 'sort')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
