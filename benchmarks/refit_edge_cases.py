"""Teach a run its edge cases: mark the ten highest-scoring edge-case normals of the test set as
normal, refit stage 2, and compare on the test set's other edge-case normals.

    python benchmarks/refit_edge_cases.py RUN_DIR OUT_DIR

RUN_DIR must be a finished run of a data set with flagged edge-case normals (the built-in
`shapes`, e.g. `anomem train --dataset shapes --out runs/shapes`). Prints the refit time, the
false-positive rate at the threshold on the other edge-case normals before and after, and each
anomaly type's AUROC before and after. Nothing is timed in the tests; this script is the figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from core.data import load_split
from core.refit import mark_test_image, refit_run
from core.runs import load_run
from core.train.scoring import score_images


def main(run_dir: str, out_dir: str, n_marks: int = 10) -> None:
    torch.set_num_threads(2)
    run = load_run(Path(run_dir))
    split = load_split(run.config.data)
    test = split.test
    edge = np.flatnonzero(test.edge.numpy() & (test.labels.numpy() == 0))
    if len(edge) <= n_marks:
        sys.exit(f"{run_dir}: {len(edge)} edge-case normals in the test set, need more than "
                 f"{n_marks}")
    before = score_images(run.model, test.images, with_maps=False).image
    marked = edge[np.argsort(-before[edge])[:n_marks]]
    others = np.setdiff1d(edge, marked)
    marks = [mark_test_image(run.config, split, int(i), "normal") for i in marked]
    report = refit_run(Path(run_dir), marks, Path(out_dir))
    after_run = load_run(Path(out_dir))
    after = score_images(after_run.model, test.images, with_maps=False).image
    fpr_before = float((before[others] > float(run.model.detector.threshold)).mean())
    fpr_after = float((after[others] > float(after_run.model.detector.threshold)).mean())
    print(f"refit: {report.seconds:.1f} s (stage 2 alone) for {n_marks} marks")
    print(f"other edge-case normals ({len(others)}): false-positive rate at the threshold "
          f"{fpr_before:.1%} -> {fpr_after:.1%}")
    print(f"all normals (marked left out): {report.before['fpr_at_threshold']:.1%} -> "
          f"{report.after['fpr_at_threshold']:.1%}")
    for kind, value in report.after["auroc_by_type"].items():
        was = report.before["auroc_by_type"][kind]
        print(f"AUROC {kind}: {was:.4f} -> {value:.4f} ({value - was:+.4f})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
