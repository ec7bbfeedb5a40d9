"""One place that trains, saves and evaluates a run: the CLI and the app both call it.

Because both front ends go through `train_run` with the same `RunConfig`, a run trained from the
app and one trained from the CLI with the same seed give the same metrics.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from core.config import RunConfig
from core.data import Split, load_split
from core.metrics import image_metrics, pixel_auroc
from core.model.anomem import AnoMem
from core.runs import (
    METRICS,
    append_history,
    load_run,
    save_model,
    write_json,
)
from core.train.trainer import (
    Progress,
    ProgressFn,
    ScoredSet,
    StopFn,
    resolve_device,
    score_images,
    split_normals,
    train,
)


def evaluate(model: AnoMem, split: Split, device: str = "cpu",
             progress: ProgressFn | None = None) -> tuple[dict, ScoredSet]:
    """metrics.json's content for `split.test`, and the scores it was computed from."""
    test = split.test
    scored = score_images(model, test.images, resolve_device(device), progress=progress,
                          with_maps=test.masks is not None)
    metrics = image_metrics(test.labels.numpy(), scored.image, test.types)
    if test.masks is not None and scored.pixel_maps is not None:
        metrics.update(pixel_auroc(scored.pixel_maps.astype(np.float32), test.masks.numpy(),
                                   test.types))
    else:
        metrics.update({"pixel_auroc": None, "pixel_auroc_by_type": {}})
    metrics["auroc_by_scale"] = {
        s: image_metrics(test.labels.numpy(), v, test.types)["auroc"]
        for s, v in scored.per_scale.items()
    }
    metrics["auroc_by_term"] = {
        k: image_metrics(test.labels.numpy(), v, test.types)["auroc_by_type"]
        for k, v in scored.terms.items()
    }
    threshold = float(model.detector.threshold)
    flagged = scored.image > threshold
    labels = test.labels.numpy().astype(bool)
    metrics["threshold"] = threshold
    metrics["tpr_at_threshold"] = float(flagged[labels].mean()) if labels.any() else None
    metrics["fpr_at_threshold"] = float(flagged[~labels].mean()) if (~labels).any() else None
    metrics["n_test"] = len(test)
    return metrics, scored


def train_run(cfg: RunConfig, out: Path, progress: ProgressFn | None = None,
              should_stop: StopFn | None = None, split: Split | None = None) -> dict:
    """Load the data, train both stages, save the run, evaluate it; returns the metrics.

    History rows are written as each epoch ends, so a run cut short still shows its curves.
    """
    out = Path(out)
    t0 = time.perf_counter()
    split = split or load_split(cfg.data)  # before creating anything: bad data writes nothing
    split_normals(split.train, cfg.train.holdout, cfg.train.seed)  # enough images to train?
    load_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    cfg.data.normal_class = split.normal_class  # the run names its class even when defaulted

    def on_progress(p: Progress) -> None:
        if p.row is not None:
            append_history(out, p.row)
        if progress:
            progress(p)

    result = train(cfg, split.train, on_progress, should_stop)  # may raise TrainingCancelled
    save_model(out, cfg, result.model)
    metrics, _ = evaluate(result.model, split, cfg.train.device, progress)
    metrics.update({
        "train_seconds": result.seconds,
        "data_seconds": load_s,
        "n_train": len(split.train),
        "n_train_anomalies": int(split.train.labels.sum()),
        "dataset": cfg.data.dataset,
        "normal_class": split.normal_class,
        "setting": cfg.data.setting,
    })
    write_json(out / METRICS, metrics)
    return metrics


def evaluate_run(path: Path, device: str = "cpu", progress: ProgressFn | None = None) -> dict:
    """Recompute a saved run's metrics.json from its weights and its data set."""
    run = load_run(path, device)
    split = load_split(run.config.data)
    metrics, _ = evaluate(run.model, split, device, progress)
    old = run.metrics or {}
    for key in ("train_seconds", "data_seconds"):
        if key in old:
            metrics[key] = old[key]
    metrics.update({
        "n_train": len(split.train),
        "n_train_anomalies": int(split.train.labels.sum()),
        "dataset": run.config.data.dataset,
        "normal_class": split.normal_class,
        "setting": run.config.data.setting,
    })
    write_json(Path(path) / METRICS, metrics)
    return metrics
