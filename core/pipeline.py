"""One place that trains, saves and evaluates a run: the CLI and the app both call it.

Because both front ends go through `train_run` with the same `RunConfig`, a run trained from the
app and one trained from the CLI with the same seed give the same metrics.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from core.config import RunConfig
from core.data import DataError, Split, load_split
from core.metrics import at_threshold, image_metrics, pixel_auroc
from core.model.anomem import AnoMem
from core.runs import (
    CONFIG,
    METRICS,
    STOPPED,
    WEIGHTS,
    RunError,
    append_history,
    load_run,
    read_config,
    run_lock,
    run_state,
    save_model,
    write_history,
    write_json,
)
from core.train.checkpoint import CHECKPOINT, read_checkpoint
from core.train.distributed import Dist
from core.train.scoring import ScoredSet, score_images
from core.train.trainer import (
    Progress,
    ProgressFn,
    StopFn,
    resolve_device,
    split_normals,
    train,
)


def read_at_data_shape(cfg: RunConfig, split: Split) -> None:
    """Set the model's image shape to the one the data set was read at (not square for a data
    set read at its aspect, core/data/mvtec.py); the shorter side is the config's."""
    h, w = split.train.images.shape[-2:]
    if min(h, w) != cfg.model.image_size:
        raise DataError(f"the data set was read at {h} x {w} px, but the model expects a "
                        f"shorter side of {cfg.model.image_size} px (model.image_size)")
    cfg.model.image_shape = () if h == w else (h, w)


def evaluate(model: AnoMem, split: Split, device: str = "cpu",
             progress: ProgressFn | None = None) -> tuple[dict, ScoredSet]:
    """metrics.json's content for `split.test`, and the scores it was computed from."""
    test = split.test
    if tuple(test.images.shape[-2:]) != model.cfg.shape:
        raise DataError("the test images were read at {} x {} px, but the model reads {} x {} "
                        "px: the data set's images changed since the run was trained".format(
                            *test.images.shape[-2:], *model.cfg.shape))
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
    metrics["threshold"] = threshold
    metrics.update(at_threshold(test.labels.numpy(), scored.image, threshold))
    metrics["n_test"] = len(test)
    return metrics, scored


def train_run(cfg: RunConfig, out: Path, progress: ProgressFn | None = None,
              should_stop: StopFn | None = None, split: Split | None = None,
              resume: bool = False, dist: Dist | None = None, explore: bool = True) -> dict:
    """Load the data, train both stages, save the run, evaluate it; returns the metrics.

    With `explore`, what the app's pages show is computed and saved too (core/artefacts.py).

    config.json is written first and history rows as each epoch ends, so a run cut short still
    shows its curves; stage 1 keeps `checkpoint.safetensors` until the weights are saved, so a
    stopped run can be resumed (`resume_run`). Under torchrun only rank 0 writes and
    evaluates; the other ranks return an empty dict.
    """
    dist = dist or Dist()
    out = Path(out)
    t0 = time.perf_counter()
    split = split or load_split(cfg.data)  # before creating anything: bad data writes nothing
    split_normals(split.train, cfg.train.holdout, cfg.train.seed)  # enough images to train?
    if not resume:
        read_at_data_shape(cfg, split)
    load_s = time.perf_counter() - t0
    cfg.data.normal_class = split.normal_class  # the run names its class even when defaulted
    with run_lock(out) if dist.is_main else nullcontext():
        if dist.is_main and not resume:
            if (out / CONFIG).exists():
                raise RunError(f"{out}: already holds a run (choose a new folder)")
            write_json(out / CONFIG, cfg.to_dict())
        if dist.is_main and resume:  # an epoch finished after the checkpoint is redone
            write_history(out, read_checkpoint(out)[1].history)
        return _train_locked(cfg, out, split, load_s, progress, should_stop, resume, dist,
                             explore)


def _train_locked(cfg: RunConfig, out: Path, split: Split, load_s: float,
                  progress: ProgressFn | None, should_stop: StopFn | None, resume: bool,
                  dist: Dist, explore: bool) -> dict:
    """`train_run` once the run folder is locked by this process."""

    def on_progress(p: Progress) -> None:
        if p.row is not None and dist.is_main:
            append_history(out, p.row)
        if progress and dist.is_main:
            progress(p)

    result = train(cfg, split.train, on_progress, should_stop, run_dir=out, resume=resume,
                   dist=dist)  # may raise TrainingCancelled
    if not dist.is_main:
        return {}
    save_model(out, cfg, result.model)
    (out / CHECKPOINT).unlink(missing_ok=True)  # the weights supersede it
    try:
        metrics, _ = evaluate(result.model, split, cfg.train.device, progress)
    except Exception as err:  # the weights are saved: say so, and how to finish the run
        raise RunError(f"{out}: the model is trained and saved, but scoring its test set "
                       f"failed ({type(err).__name__}: {err}); `anomem evaluate {out}` "
                       "tries again") from err
    metrics.update({
        "train_seconds": result.seconds,
        "data_seconds": load_s,
        "n_train": len(split.train),
        "n_train_anomalies": int(split.train.labels.sum()),
        "dataset": cfg.data.dataset,
        "normal_class": split.normal_class,
        "setting": cfg.data.setting,
        "processes": dist.world,
        "stage1": stage1_summary(result.history),
        "stage2": result.stage2,
    })
    write_json(out / METRICS, metrics)
    if explore:
        save_artefacts(out, result.model.cpu(), split, cfg.data.seed, progress)
    return metrics


def save_artefacts(out: Path, model: AnoMem, split: Split, seed: int,
                   progress: ProgressFn | None = None) -> None:
    """Compute and save what the explorer's pages show (core/artefacts.py)."""
    from core import artefacts

    def say(what: str, done: float) -> None:
        if progress:
            progress(Progress("explore", done, what))

    artefacts.save(out, artefacts.compute(model, split, seed, say))


def stage1_summary(history: list[dict]) -> dict:
    """How far stage 1 went: epochs, steps planned, and each loss term first and last."""
    rows = [r for r in history if r.get("stage", 1) == 1]
    if not rows:
        return {}
    terms = [k for k in ("loss", "memory_contrast", "view_contrast", "align", "variance",
                         "usage", "anomaly", "rotation") if k in rows[0] and k in rows[-1]]
    return {"epochs": len(rows), "planned_steps": rows[-1].get("planned_steps"),
            "first": {k: rows[0][k] for k in terms}, "last": {k: rows[-1][k] for k in terms}}


def resume_run(path: Path, progress: ProgressFn | None = None,
               should_stop: StopFn | None = None, dist: Dist | None = None,
               explore: bool = True) -> dict:
    """Continue a stopped run from its checkpoint with its own config; returns the metrics."""
    dist = dist or Dist()
    path = Path(path)
    if (path / WEIGHTS).is_file():
        raise RunError(f"{path}: already finished ({WEIGHTS} exists), nothing to resume")
    cfg = read_config(path)
    read_checkpoint(path)  # refuse a damaged checkpoint before loading any data
    return train_run(cfg, path, progress, should_stop, resume=True, dist=dist,
                     explore=explore)


def resumable(path: Path) -> bool:
    """Whether `path` holds a stopped run that `resume_run` can continue: it has a checkpoint,
    no weights, and no process (this one included) is training it."""
    return run_state(path) == STOPPED


def evaluate_run(path: Path, device: str = "cpu", progress: ProgressFn | None = None) -> dict:
    """Recompute a saved run's metrics.json from its weights and its data set.

    Holds the run's lock while it reads and writes: a run another process trains is refused.
    """
    with run_lock(path, create=False):
        return _evaluate_locked(Path(path), device, progress)


def _evaluate_locked(path: Path, device: str, progress: ProgressFn | None) -> dict:
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
    save_artefacts(Path(path), run.model, split, run.config.data.seed, progress)
    return metrics
