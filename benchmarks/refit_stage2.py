"""Measure a change to stage 2 on the encoders a benchmark already trained.

    python benchmarks/refit_stage2.py BENCH_OUT --set model.pixel_layout=true [--match general-]

Stage 2 (the detector) is fitted in seconds on a trained encoder and its memories; stage 1 is
the part that takes minutes. So a change that only touches stage 2 is measured best on the very
encoders of a finished benchmark: every run folder under `BENCH_OUT/runs/` is rebuilt with the
settings given (`--set`, as `anomem train --set`), keeps its stage-1 weights, has stage 2
fitted again on its own split and seed, and is evaluated again. The difference is the change
and nothing else (no second stage-1 run, no timing noise).

Each run is locked while it is rewritten (its weights, config.json and metrics.json; the
explorer's cached pages are removed, the app computes them again). Its AnoMem row is then
dropped from `BENCH_OUT/results.csv`, so that rerunning the same `anomem bench` command
rewrites that row and its ablations from the refitted run, without training. Before and after
AUROCs are printed and written to `BENCH_OUT/refit.md`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from core.artefacts import ARTEFACTS
from core.bench.results import ANOMEM, Results
from core.bench.suites import Cell
from core.config import RunConfig, with_overrides
from core.data import load_split
from core.files import write_atomic
from core.model.anomem import AnoMem
from core.pipeline import evaluate
from core.runs import (
    FINISHED,
    METRICS,
    load_model,
    read_config,
    read_json,
    run_lock,
    run_state,
    save_model,
    write_json,
)
from core.train.stage2 import fit_stage2
from core.train.trainer import resolve_device


def refit(run: Path, overrides: list[str], device: str) -> tuple[float, float]:
    """Stage 2 of the finished run `run` fitted again under `overrides`; (AUROC before, after)."""
    with run_lock(run):
        old = read_json(run / METRICS)
        cfg: RunConfig = with_overrides(read_config(run), overrides)
        split = load_split(cfg.data)
        model = AnoMem(cfg.model)
        # the encoder, memories and heads; the detector and the image-level terms are fitted
        missing, unexpected = model.load_state_dict(load_model(run).stage1_state(),
                                                    strict=False)
        assert not unexpected and set(missing) == set(model.state_dict()) - set(
            model.stage1_state()), (missing, unexpected)
        dev = resolve_device(device)
        model = model.to(dev, memory_format=torch.channels_last)
        start = time.perf_counter()
        report = fit_stage2(model, split.train, cfg.train, dev)
        seconds = time.perf_counter() - start
        model = model.cpu().to(memory_format=torch.contiguous_format).eval()
        metrics, _ = evaluate(model, split, device)
        kept = {k: old[k] for k in ("train_seconds", "data_seconds", "n_train",
                                    "n_train_anomalies", "dataset", "normal_class", "setting",
                                    "processes", "stage1") if k in old}
        save_model(run, cfg, model)
        write_json(run / METRICS, {**metrics, **kept, "stage2": report,
                                   "stage2_refit": {"settings": overrides,
                                                    "seconds": seconds,
                                                    "auroc_before": old["auroc"]}})
        (run / ARTEFACTS).unlink(missing_ok=True)  # computed from the old detector
    return old["auroc"], metrics["auroc"]


def drop_anomem_rows(results_csv: Path, slugs: set[str]) -> int:
    """Remove the AnoMem rows of the refitted runs' cells; returns how many were removed."""
    results = Results.load(results_csv)
    before = len(results.rows)
    results.rows = {key: row for key, row in results.rows.items()
                    if row["method"] != ANOMEM or _slug(row) not in slugs}
    results.save()
    return before - len(results.rows)


def _slug(row: dict) -> str:
    """The run folder name of a results.csv row's cell."""
    labelled = tuple(c for c in row["anomaly_classes"].split(",") if c)
    return Cell(row["suite"], row["dataset"], None, row["normal_class"], row["setting"],
                float(row["ratio"] or 0), labelled).slug


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a benchmark's folder (holds runs/, results.csv)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="a setting of the refitted runs")
    parser.add_argument("--match", default="", help="only run folders whose name contains this")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    runs = sorted(p for p in (args.out / "runs").iterdir()
                  if p.is_dir() and args.match in p.name and run_state(p) == FINISHED)
    lines = ["| run | AUROC before | after | change |", "|---|---|---|---|"]
    done = set()
    for i, run in enumerate(runs, 1):
        before, after = refit(run, args.overrides, args.device)
        done.add(run.name)
        line = f"| {run.name} | {100 * before:.2f} | {100 * after:.2f} | " \
               f"{100 * (after - before):+.2f} |"
        lines.append(line)
        print(f"[{i}/{len(runs)}] {line}", flush=True)
    dropped = drop_anomem_rows(args.out / "results.csv", done)
    text = (f"Stage 2 refitted with {' '.join(args.overrides) or 'no change'} on the encoders "
            f"of {len(done)} runs:\n\n" + "\n".join(lines) + "\n")
    write_atomic(args.out / "refit.md", text)
    print(text + f"\n{dropped} AnoMem rows dropped from results.csv: rerun the same "
          "`anomem bench` command to write them (and their ablations) from the refitted runs.")


if __name__ == "__main__":
    main()
