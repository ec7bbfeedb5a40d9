"""Teach runs their edge cases: mark the highest-scoring edge-case normals of each test set as
normal, refit stage 2, and compare on the test set's other edge-case normals.

    python benchmarks/refit_edge_cases.py OUT_DIR RUN_DIR [RUN_DIR ...] [--marks N]

Each RUN_DIR must be a finished run of a data set with flagged edge-case normals (the built-in
`shapes`, e.g. `anomem train --dataset shapes --normal-class square --out runs/square`). A
`shapes` test set holds about ten edge-case normals, so by default half of each run's are marked
(the highest-scoring) and the other half, pooled over the runs, is where the effect is read.
Prints the refit time of each run, the false-positive rate at the threshold on those other
edge-case normals and on all normals before and after, and each anomaly type's AUROC before and
after. Nothing is timed in the tests; this script is the figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from core.data import load_split
from core.refit import mark_test_image, refit_run
from core.runs import load_run
from core.train.scoring import score_images


def teach(run_dir: Path, out_dir: Path, n_marks: int | None) -> dict:
    """Refit one run with its top edge cases marked; scores of the others before and after."""
    run = load_run(run_dir)
    split = load_split(run.config.data)
    test = split.test
    edge = np.flatnonzero(test.edge.numpy() & (test.labels.numpy() == 0))
    k = len(edge) // 2 if n_marks is None else n_marks
    if not 0 < k < len(edge):
        raise SystemExit(f"{run_dir}: {len(edge)} edge-case normals in the test set, cannot "
                         f"mark {k} and keep some apart")
    before = score_images(run.model, test.images, with_maps=False).image
    marked = edge[np.argsort(-before[edge])[:k]]
    others = np.setdiff1d(edge, marked)
    marks = [mark_test_image(run.config, split, int(i), "normal") for i in marked]
    report = refit_run(run_dir, marks, out_dir / run_dir.name)
    after_run = load_run(out_dir / run_dir.name)
    after = score_images(after_run.model, test.images, with_maps=False).image
    return {"name": run_dir.name, "seconds": report.seconds, "marked": len(marked),
            "others_before": before[others] > float(run.model.detector.threshold),
            "others_after": after[others] > float(after_run.model.detector.threshold),
            "report": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--marks", type=int, help="edge cases marked per run (default: half)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = [teach(run, args.out_dir, args.marks) for run in args.runs]
    for r in results:
        rep = r["report"]
        print(f"{r['name']}: {r['marked']} marks, refit {r['seconds']:.1f} s (stage 2 alone); "
              f"all normals (marked left out): {rep.before['fpr_at_threshold']:.1%} -> "
              f"{rep.after['fpr_at_threshold']:.1%}")
        for kind, value in rep.after["auroc_by_type"].items():
            was = rep.before["auroc_by_type"][kind]
            print(f"  AUROC {kind}: {was:.4f} -> {value:.4f} ({value - was:+.4f})")
    before = np.concatenate([r["others_before"] for r in results])
    after = np.concatenate([r["others_after"] for r in results])
    print(f"other edge-case normals ({len(before)}, pooled): false-positive rate at the "
          f"threshold {before.mean():.1%} -> {after.mean():.1%}")


if __name__ == "__main__":
    main()
