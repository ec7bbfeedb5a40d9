"""Training glue: stage 1 (memory-augmented contrastive learning), stage 2 (fit the detector).

The model never sees this module; it only receives gradients (stage 1) and fitted buffers
(stage 2). Normal training images are split once: `fit` images train stage 1 and the detector's
Gaussians, the held-out `calibration` images standardise the scores and set the threshold, so
the threshold is not fitted on images the memory has already learnt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.config import ConfigError, RunConfig, TrainConfig
from core.data.base import DataError, ImageSet
from core.model.anomem import AnoMem
from core.model.detector import fit_gaussian, fit_positional_gaussians, fit_ppca
from core.model.memory import MemoryRead
from core.train.allocator import keep_freed_memory
from core.train.augment import augment, shift, to_float
from core.train.checkpoint import (
    CHECKPOINT,
    Stage1State,
    read_checkpoint,
    restore,
    save_checkpoint,
)
from core.train.distributed import Dist
from core.train.losses import LossTerms, MemoryContrastLoss

GAUSSIAN_ROWS = 60_000  # deviation vectors sampled per scale to fit a detector's Gaussian


@dataclass
class Progress:
    stage: str  # "stage1", "stage2" or "evaluate"
    done: float  # fraction of the stage in [0, 1]
    message: str
    row: dict[str, Any] | None = None  # a finished epoch's history row


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


class TrainingCancelled(RuntimeError):
    """`should_stop` asked the trainer to stop; the partial history is attached, and the
    checkpoint's folder when one was written (the run can be resumed from it)."""

    def __init__(self, history: list[dict], checkpoint_dir: Path | None = None) -> None:
        super().__init__("training cancelled")
        self.history = history
        self.checkpoint_dir = checkpoint_dir


@dataclass
class TrainOutput:
    model: AnoMem
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def split_normals(train: ImageSet, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of normal training images for fitting and for calibration."""
    normal = np.flatnonzero(train.labels.numpy() == 0)
    rng = np.random.default_rng(seed)
    normal = rng.permutation(normal)
    n_cal = max(2, int(round(holdout * len(normal))))
    if len(normal) - n_cal < 2:
        raise DataError(
            f"need at least {n_cal + 2} normal training images, got {len(normal)}"
        )
    return np.sort(normal[n_cal:]), np.sort(normal[:n_cal])


def train(cfg: RunConfig, train_set: ImageSet, progress: ProgressFn | None = None,
          should_stop: StopFn | None = None, run_dir: Path | None = None,
          resume: bool = False, dist: Dist | None = None) -> TrainOutput:
    """Both stages on `train_set` (normal images, plus labelled anomalies if unbalanced).

    With `run_dir`, stage 1 keeps a resumable checkpoint there (rank 0 writes it); `resume`
    continues from it. Under torchrun (`dist`), each rank trains on its shard of the images.
    """
    tc = cfg.train
    dist = dist or Dist()
    keep_freed_memory()
    torch.manual_seed(tc.seed)
    device = dist.device(resolve_device(tc.device))
    # channels_last: about 20% faster convolutions on CPU (oneDNN), the GPU default of choice
    model = AnoMem(cfg.model).to(device, memory_format=torch.channels_last)
    fit_idx, cal_idx = split_normals(train_set, tc.holdout, tc.seed)
    anomaly_idx = np.flatnonzero(train_set.labels.numpy() == 1)
    budget = None if tc.max_minutes is None else tc.max_minutes * 60
    history, stage1_s = train_stage1(
        model, train_set.images[fit_idx], train_set.images[anomaly_idx], tc, device,
        budget_s=None if budget is None else budget * tc.stage1_share,
        progress=progress, should_stop=should_stop, run_dir=run_dir, resume=resume, dist=dist,
    )
    stage2_start = time.perf_counter()
    try:
        fit_detector(model, train_set.images[fit_idx], train_set.images[cal_idx],
                     train_set.images[anomaly_idx], tc, device, progress, should_stop, dist)
    except TrainingCancelled:  # stage 1's last checkpoint is the resume point
        raise TrainingCancelled(history, run_dir if run_dir and dist.is_main else None
                                ) from None
    model = model.cpu().eval()
    if dist.enabled and not dist.all_equal(_fingerprint(model)):
        raise RuntimeError("model replicas differ across ranks after training")
    # stage 1's seconds include those before an interruption
    return TrainOutput(model=model, history=history,
                       seconds=stage1_s + time.perf_counter() - stage2_start)


def _fingerprint(model: AnoMem) -> torch.Tensor:
    """Every parameter and buffer, flattened: equal on all ranks when replicas agree."""
    return torch.cat([v.detach().double().flatten() for v in model.state_dict().values()])


def _param_groups(model: AnoMem, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 and "prototypes" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class ContrastStep(nn.Module):
    """Stage 1's forward pass: two views of a batch in, the loss out.

    A module of its own so that `DistributedDataParallel` can wrap the whole computation
    (encoder, memories and projection heads) and average every gradient across ranks.
    """

    def __init__(self, model: AnoMem, loss_fn: MemoryContrastLoss) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, views: torch.Tensor, is_anomaly: torch.Tensor, is_shifted: torch.Tensor
                ) -> tuple[LossTerms, dict[str, torch.Tensor]]:
        """views (2B, C, H, W): view a of B images, then view b -> loss, view a's attention."""
        model, b = self.model, len(is_anomaly)
        reads = model(views)
        reads_a = {s: type(r)(*(t[:b] for t in r)) for s, r in reads.items()}
        reads_b = {s: type(r)(*(t[b:] for t in r)) for s, r in reads.items()}
        out = self.loss_fn(reads_a, reads_b, model.heads,
                           {s: model.memories[s].prototypes for s in model.scales}, is_anomaly,
                           is_shifted)
        return out, {s: r.attention for s, r in reads_a.items()}


def make_batch(normals: torch.Tensor, anomalies: torch.Tensor, n_anom: int,
               shifts: tuple[str, ...], g: torch.Generator, shift_fraction: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stage-1 batch: normals, sampled labelled anomalies, shifted copies of the normals.

    Only the first `shift_fraction` of the normals (in random order already) get a copy.
    Returns uint8 images and their (B,) is_anomaly and is_shifted flags.
    """
    device = normals.device
    batch = normals
    is_anom = torch.zeros(len(batch), dtype=torch.bool, device=device)
    if n_anom:
        pick = torch.randint(len(anomalies), (n_anom,), generator=g).to(device)
        batch = torch.cat([batch, anomalies[pick]])
        is_anom = torch.cat([is_anom, torch.ones(n_anom, dtype=torch.bool, device=device)])
    is_shift = torch.zeros_like(is_anom)
    if shifts:  # the normals are the first rows: no mask, no host synchronisation
        n_shift = max(1, round(shift_fraction * len(normals)))
        batch = torch.cat([batch, shift(normals[:n_shift], shifts, g)])
        is_shift = torch.cat([is_shift, torch.ones(n_shift, dtype=torch.bool, device=device)])
        is_anom = torch.cat([is_anom, torch.zeros(n_shift, dtype=torch.bool, device=device)])
    return batch, is_anom, is_shift


def train_stage1(model: AnoMem, normals: torch.Tensor, anomalies: torch.Tensor,
                 tc: TrainConfig, device: torch.device, budget_s: float | None = None,
                 progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                 run_dir: Path | None = None, resume: bool = False, dist: Dist | None = None
                 ) -> tuple[list[dict], float]:
    """Memory-augmented contrastive learning on uint8 images -> (one row per epoch, seconds).

    The learning rate follows a cosine over the larger of the step and the time fractions, so
    a time budget ends on a low learning rate whatever the machine's speed. With `run_dir`, a
    checkpoint is written after every epoch and when `should_stop` fires (then
    TrainingCancelled is raised); `resume` starts from that checkpoint.
    """
    dist = dist or Dist()
    model.train()
    step_fn: nn.Module = ContrastStep(model, MemoryContrastLoss(tc))
    if dist.enabled:
        step_fn = nn.parallel.DistributedDataParallel(
            step_fn, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr)
    normals = dist.shard(normals).to(device)
    anomalies = anomalies.to(device)
    n = len(normals)
    bs = min(max(2, tc.batch_size // dist.world), n)  # the global batch stays batch_size
    n_anom = 0 if len(anomalies) == 0 else max(1, bs // 8)  # labelled anomalies per batch
    steps_per_epoch = max(1, n // bs)
    if dist.enabled:  # every rank must take the same number of steps
        steps_per_epoch = int(dist.gather(torch.tensor([steps_per_epoch])).min())
    total_steps = steps_per_epoch * tc.epochs
    warmup = min(50, total_steps // 10)
    g = torch.Generator().manual_seed(tc.seed + 1000 * dist.rank)
    state = Stage1State()
    if resume:
        assert run_dir is not None
        tensors, state = read_checkpoint(run_dir)
        restore(tensors, Path(run_dir) / CHECKPOINT, model, opt, g)
        if dist.enabled:  # rank 0's weights for all; each rank its own stream and order
            g.manual_seed(tc.seed + 1000 * dist.rank + 7919 * state.step)
            if state.perm is not None:
                state.perm = torch.randperm(n, generator=g)
    writes = run_dir is not None and dist.is_main

    def checkpoint() -> None:
        if writes:
            save_checkpoint(run_dir, model, opt, g, state)

    session = time.perf_counter()
    elapsed0 = state.elapsed_s
    lr = tc.lr
    while not state.finished and state.epoch < tc.epochs:
        if state.perm is None:
            state.perm = torch.randperm(n, generator=g)
            state.index, state.sums, state.epoch_s = 0, {}, 0.0
            state.counts = {s: torch.zeros(model.cfg.memory_size) for s in model.scales}
        t0 = time.perf_counter() - state.epoch_s
        perm = state.perm.to(device)
        counts = {s: c.to(device) for s, c in state.counts.items()}
        # loss sums stay on the device: no host synchronisation per step
        sums = {k: torch.tensor(v, device=device) for k, v in state.sums.items()}
        stop = out_of_time = False
        while state.index < steps_per_epoch:
            i = state.index
            batch, is_anom, is_shift = make_batch(normals[perm[i * bs:(i + 1) * bs]],
                                                  anomalies, n_anom, tc.shift_negatives, g,
                                                  tc.shift_fraction)
            views = torch.cat([augment(batch, tc.augment, g), augment(batch, tc.augment, g)])
            views = views.contiguous(memory_format=torch.channels_last)
            out, attention = step_fn(views, is_anom, is_shift)

            state.elapsed_s = elapsed0 + time.perf_counter() - session
            frac = state.step / total_steps
            if budget_s:
                frac = max(frac, state.elapsed_s / budget_s)
            lr = tc.lr * (min(1.0, (state.step + 1) / warmup) if warmup else 1.0)
            lr *= 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            out.total.backward()
            opt.step()
            state.step += 1
            state.index += 1

            with torch.no_grad():  # which prototype answers each normal position
                normal = (~is_anom & ~is_shift).float()
                for s, att in attention.items():
                    top = att.argmax(1)  # (B, H, W)
                    counts[s].scatter_add_(0, top.flatten(),
                                           normal[:, None, None].expand_as(top).flatten())
            for k, v in (*out.terms.items(), ("loss", out.total)):
                sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()
            out_of_time = budget_s is not None and state.elapsed_s > budget_s
            stop = bool(should_stop and should_stop())
            if dist.enabled:  # all ranks stop at the same step, or none does
                stop, out_of_time = dist.any_of(stop, out_of_time, device=device)
            if stop or out_of_time:
                break
        state.counts = {s: c.cpu() for s, c in counts.items()}
        state.sums = {k: float(v) for k, v in sums.items()}
        state.epoch_s = time.perf_counter() - t0
        if stop and state.index < steps_per_epoch:
            checkpoint()  # mid-epoch: resumes at the next batch of this epoch
            raise TrainingCancelled(state.history, run_dir if writes else None)
        done_steps = max(1, state.index)
        row = {"epoch": state.epoch + 1, "stage": 1,
               **{k: v / done_steps for k, v in state.sums.items()}, "lr": lr,
               "seconds": state.epoch_s,
               # training images per second (each also costs its shifted copy and two views)
               "images_per_s": done_steps * (bs + n_anom) * dist.world / state.epoch_s}
        for s, c in state.counts.items():
            row[f"usage_{s}"] = float((c > 0).float().mean())
        state.history.append(row)
        state.epoch += 1
        state.perm, state.index = None, 0
        state.finished = out_of_time or state.epoch >= tc.epochs
        checkpoint()
        if progress:
            done = max(state.epoch / tc.epochs, state.elapsed_s / budget_s if budget_s else 0)
            progress(Progress("stage1", min(done, 1.0),
                              f"epoch {state.epoch}: loss {row['loss']:.3f}", row))
        if stop:
            raise TrainingCancelled(state.history, run_dir if writes else None)
    dist.broadcast_buffers(model)
    model.eval()
    return state.history, state.elapsed_s


@torch.no_grad()
def _reads(model: AnoMem, images: torch.Tensor, device: torch.device, bs: int = 256,
           dist: Dist | None = None) -> Iterator[tuple[int, dict[str, MemoryRead]]]:
    """Yields (start index, {scale: MemoryRead}) batch by batch, model in eval mode.

    Under torchrun each rank reads only its shard of `images`.
    """
    model.eval()
    if dist is not None:
        images = dist.shard(images)
    for i in range(0, len(images), bs):
        yield i, model(to_float(images[i:i + bs].to(device)))


@torch.no_grad()
def fit_detector(model: AnoMem, fit: torch.Tensor, calibration: torch.Tensor,
                 anomalies: torch.Tensor, tc: TrainConfig, device: torch.device,
                 progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                 dist: Dist | None = None) -> None:
    """Stage 2: fit each scale's Gaussians, standardise on held-out normals, set thresholds.

    Under torchrun each rank passes its shard of the images through the model and the results
    are gathered, so every rank fits the same detector. Raises TrainingCancelled when
    `should_stop` fires between phases.
    """
    dist = dist or Dist()
    det = model.detector
    g = torch.Generator().manual_seed(tc.seed + 1000 * dist.rank)

    def check_stop() -> None:
        if dist.any(bool(should_stop and should_stop()), device):
            raise TrainingCancelled([])

    check_stop()
    rows: dict[str, list] = {s: [] for s in model.scales}
    layouts: dict[str, list] = {s: [] for s in model.scales}
    for i, reads in _reads(model, fit, device, dist=dist):
        for s, r in reads.items():
            d = r.deviation
            if det.per_scale[s].positional:  # every position of every map
                rows[s].append(d.cpu())
                layouts[s].append(det.per_scale[s].layout(det.layout_input(r)).cpu())
                continue
            flat = d.permute(0, 2, 3, 1).reshape(-1, d.shape[1])  # (b*h*w, D)
            per_image = d.shape[2] * d.shape[3]
            keep = max(1, min(per_image, GAUSSIAN_ROWS // len(fit))) * len(d)
            pick = torch.randperm(len(flat), generator=g)[:keep].to(flat.device)
            rows[s].append(flat[pick].cpu())
            layouts[s].append(det.per_scale[s].layout(det.layout_input(r)).cpu())
        if progress:
            progress(Progress("stage2", 0.5 * min(1.0, (i + len(d)) * dist.world / len(fit)),
                              "fitting the distance detectors"))
    check_stop()
    for s in model.scales:
        sd = det.per_scale[s]
        fit_local = fit_positional_gaussians if sd.positional else fit_gaussian
        mean, prec = fit_local(dist.gather(torch.cat(rows[s])))
        sd.mean.copy_(mean)
        sd.precision.copy_(prec)
        lmean, basis, var, noise = fit_ppca(dist.gather(torch.cat(layouts[s])),
                                            sd.layout_basis.shape[1])
        sd.layout_mean.copy_(lmean)
        sd.layout_basis.copy_(basis)
        sd.layout_var.copy_(var)
        sd.layout_noise.copy_(noise)

    # Standardise on held-out normals: distances per position and the image-level scores.
    raw: dict[str, list] = {s: [] for s in model.scales}
    dist_stats: dict[str, list] = {s: [] for s in model.scales}
    for _, reads in _reads(model, calibration, device, dist=dist):
        for s, r in reads.items():
            sd = det.per_scale[s]
            dmap = sd.distance_map(r.deviation)
            raw[s].append(sd.raw_scores(det.layout_input(r), dmap).cpu())
            dist_stats[s].append(dmap.flatten().cpu())
    for s in model.scales:
        sd = det.per_scale[s]
        r = dist.gather(torch.cat(raw[s]))
        sd.score_loc.copy_(r.mean(0))
        sd.score_scale.copy_(r.std(0).clamp_min(1e-6))
        d = dist.gather(torch.cat(dist_stats[s]))
        sd.map_loc.copy_(d.mean())
        sd.map_scale.copy_(d.std().clamp_min(1e-6))

    check_stop()
    if tc.combine == "learned":
        _fit_combination(model, calibration, tc, device, g, dist)
    if len(anomalies):
        _fit_classifier(model, calibration, anomalies, device, dist)
    scores, maxima = [], []
    mine = dist.shard(calibration)
    for i in range(0, len(mine), 256):
        out = model.score(to_float(mine[i:i + 256].to(device)))
        scores.append(out.image.cpu())
        maxima.append(out.pixel_map.flatten(1).max(1).values.cpu())
    det.threshold.copy_(torch.quantile(dist.gather(torch.cat(scores)), tc.threshold_quantile))
    det.pixel_threshold.copy_(torch.quantile(dist.gather(torch.cat(maxima)),
                                             tc.threshold_quantile))
    det.fitted.fill_(True)
    if progress:
        progress(Progress("stage2", 1.0, "detector fitted"))


def _standardised_terms(model: AnoMem, images: torch.Tensor, device: torch.device,
                        dist: Dist) -> torch.Tensor:
    """(N, 2S) standardised term scores of uint8 images (every rank's shard, gathered)."""
    return dist.gather(torch.cat([model.detector.features(reads)[0].cpu()
                                  for _, reads in _reads(model, images, device, dist=dist)]))


def _fit_combination(model: AnoMem, calibration: torch.Tensor, tc: TrainConfig,
                     device: torch.device, g: torch.Generator, dist: Dist) -> None:
    """One-class: learn how much each scale and term counts, without real anomalies.

    Held-out normals are contrasted with distribution-shifted copies of themselves (the same
    pseudo-anomalies as stage 1) by a logistic model whose weights live on the simplex, so the
    image score stays a convex combination of standardised scores. A term that cannot tell a
    shifted image from a normal one ends up with little weight.
    """
    mine = dist.shard(calibration)
    normal = _standardised_terms(model, mine, device, Dist())
    shifted = _standardised_terms(model, shift(mine, tc.shift_negatives or ("jigsaw",), g),
                                  device, Dist())
    normal, shifted = dist.gather(normal), dist.gather(shifted)
    x = torch.cat([normal, shifted]).double()
    y = torch.cat([torch.zeros(len(normal)), torch.ones(len(shifted))]).double()
    logits_w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits_w, log_scale, bias], max_iter=200,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w = torch.softmax(logits_w, 0)
        out = log_scale.exp() * (x @ w) + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out, y)
        loss = loss + 1e-3 * logits_w.pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    model.detector.weights.copy_(torch.softmax(logits_w.detach(), 0).float())


def _fit_classifier(model: AnoMem, normals: torch.Tensor, anomalies: torch.Tensor,
                    device: torch.device, dist: Dist) -> None:
    """Unbalanced setting: a class-balanced logistic head on scale scores and pooled deviations.

    Trained on held-out normals against the labelled anomalies, with the one-class score as
    its offset: the image score is that score plus the head's logit, so the head is fitted to
    what the one-class score misses, and the labels sharpen the detector without replacing it.
    """
    det = model.detector
    feats, offsets = [], []
    for images in (normals, anomalies):
        parts, base = [], []
        for _, reads in _reads(model, images, device, dist=dist):
            z, _ = det.features(reads)
            parts.append(det.classifier_input(z, reads).cpu())
            base.append((z @ det.weights).cpu())
        feats.append(dist.gather(torch.cat(parts)))
        offsets.append(dist.gather(torch.cat(base)))
    y = torch.cat([torch.zeros(len(feats[0])), torch.ones(len(feats[1]))])
    weight, bias = fit_offset_logistic(torch.cat(feats), torch.cat(offsets), y)
    det.clf_weight.copy_(weight.float())
    det.clf_bias.copy_(torch.tensor(bias))


def fit_offset_logistic(x: torch.Tensor, offset: torch.Tensor, y: torch.Tensor, c: float = 0.5
                        ) -> tuple[torch.Tensor, float]:
    """Class-balanced, L2-regularised logistic regression of y on x, on top of a fixed offset.

    Minimises sum_i w_i * BCE(offset_i + x_i . coef + bias, y_i) + |coef|^2 / (2c), with
    w_i = n / (2 n_class(i)): scikit-learn's `LogisticRegression(C=c, class_weight="balanced")`
    objective when the offset is zero. Returns (coef, bias).
    """
    x, offset, y = x.double(), offset.double(), y.double()
    n1 = y.sum().clamp(1, len(y) - 1)
    balance = torch.where(y > 0.5, len(y) / (2 * n1), len(y) / (2 * (len(y) - n1)))
    coef = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([coef, bias], max_iter=1000, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logit = offset + x @ coef + bias
        loss = (F.binary_cross_entropy_with_logits(logit, y, reduction="none") * balance).sum()
        loss = loss + coef.pow(2).sum() / (2 * c)
        loss.backward()
        return loss

    opt.step(closure)
    return coef.detach(), float(bias.detach())


@dataclass
class ScoredSet:
    """Scores of every image of a set, in the order of the set."""

    image: np.ndarray  # (N,)
    per_scale: dict[str, np.ndarray]  # scale -> (N,)
    terms: dict[str, np.ndarray]  # "layer2/local", ... -> (N,) standardised term scores
    pixel_maps: np.ndarray | None  # (N, H, W) float16, or None when not asked for


@torch.no_grad()
def score_images(model: AnoMem, images: torch.Tensor, device: torch.device | str = "cpu",
                 batch_size: int = 256, with_maps: bool = True,
                 progress: ProgressFn | None = None) -> ScoredSet:
    """Score uint8 images (N, C, H, W) in batches."""
    device = torch.device(device)
    model.eval().to(device)
    image, maps = [], []
    per_scale: dict[str, list] = {s: [] for s in model.scales}
    terms: dict[str, list] = {}
    for i in range(0, len(images), batch_size):
        out = model.score(to_float(images[i:i + batch_size].to(device)))
        image.append(out.image.cpu())
        for s, v in out.per_scale.items():
            per_scale[s].append(v.cpu())
        for k, v in out.terms.items():
            terms.setdefault(k, []).append(v.cpu())
        if with_maps:
            maps.append(out.pixel_map.half().cpu())
        if progress:
            progress(Progress("evaluate", min(1.0, (i + batch_size) / len(images)),
                              "scoring"))
    return ScoredSet(
        image=torch.cat(image).numpy(),
        per_scale={s: torch.cat(v).numpy() for s, v in per_scale.items()},
        terms={k: torch.cat(v).numpy() for k, v in terms.items()},
        pixel_maps=torch.cat(maps).numpy() if with_maps else None,
    )
