"""Stage 1: memory-augmented contrastive learning of the encoder and the memories.

Two augmented views of each batch (normal images, sampled labelled anomalies, shifted copies
of the normals as pseudo-anomalies) go through `ContrastStep`; the loss is
core/train/losses.py's `MemoryContrastLoss`. The learning rate follows `StepPlan`, a checkpoint
is written after every epoch (core/train/checkpoint.py), and under torchrun the whole step is
wrapped in `DistributedDataParallel`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.config import TrainConfig
from core.model.anomem import AnoMem
from core.train.augment import augment
from core.train.checkpoint import (
    CHECKPOINT,
    Stage1State,
    read_checkpoint,
    restore,
    save_checkpoint,
)
from core.train.distributed import Dist
from core.train.features import STEP_POSITIONS, FeatureCache, init_memories, subset
from core.train.losses import LossTerms, MemoryContrastLoss
from core.train.progress import Progress, ProgressFn, StopFn, TrainingCancelled
from core.train.shifts import shift


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
    (encoder, memories, projection heads, rotation head) and average every gradient across
    ranks.
    """

    def __init__(self, model: AnoMem, loss_fn: MemoryContrastLoss, w_rotation: float = 1.0
                 ) -> None:
        super().__init__()
        self.model, self.loss_fn, self.w_rotation = model, loss_fn, w_rotation

    def forward(self, views: torch.Tensor | dict[str, torch.Tensor], is_anomaly: torch.Tensor,
                is_shifted: torch.Tensor, rotated: torch.Tensor | None = None,
                turns: torch.Tensor | None = None
                ) -> tuple[LossTerms, dict[str, torch.Tensor]]:
        """views (2B, C, H, W): view a of B images, then view b -> loss, view a's attention.
        A frozen encoder's cached features of the views, {scale: (2B, C, h, w)}, stand for them.

        `rotated` (R, C, H, W), images turned by `turns` (R,) quarter turns, teach the rotation
        head; they share the backbone pass (and its batch statistics) with the views.
        """
        model, b = self.model, len(is_anomaly)
        if isinstance(views, dict):
            features, n = views, 2 * b
        else:
            n = len(views)
            features = model.backbone(views if rotated is None else torch.cat([views, rotated]))
        reads = {s: model.memories[s](features[s][:n]) for s in model.scales}
        reads_a = {s: type(r)(*(t[:b] for t in r)) for s, r in reads.items()}
        reads_b = {s: type(r)(*(t[b:] for t in r)) for s, r in reads.items()}
        out = self.loss_fn(reads_a, reads_b, model.heads,
                           {s: model.memories[s].prototypes for s in model.scales}, is_anomaly,
                           is_shifted)
        if rotated is not None:
            logits = model.rotation.logits({model.deepest: features[model.deepest][n:]})
            term = self.w_rotation * F.cross_entropy(logits.float(), turns)
            out = LossTerms(out.total + term, {**out.terms, "rotation": term})
        return out, {s: r.attention for s, r in reads_a.items()}


def quarter_turns(images: torch.Tensor, g: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (square) image turned by a random number of quarter turns -> (images, turns)."""
    turns = torch.randint(4, (len(images),), generator=g).to(images.device)
    out = images.clone()
    for k in (1, 2, 3):
        pick = turns == k
        out[pick] = torch.rot90(images[pick], k, dims=(2, 3))
    return out, turns


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


def cached_batch(cache: FeatureCache, chosen: torch.Tensor, n_anom: int, g: torch.Generator,
                 shift_fraction: float = 1.0
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """`make_batch` on a frozen encoder's cache: the chosen normals, sampled labelled
    anomalies and the shifted copies of the first `shift_fraction` normals, two different
    cached views of each, at most STEP_POSITIONS positions of each map
    -> ({scale: (2B, C, h, w) or (2B, C, 1, STEP_POSITIONS)}, is_anomaly (B,), is_shifted (B,))."""
    device = chosen.device
    parts = [chosen]
    if n_anom:
        pick = torch.randint(cache.n_anomaly, (n_anom,), generator=g).to(device)
        parts.append(pick + cache.n_normal)
    if cache.n_shifted:
        parts.append(cache.shifted_index(chosen[:max(1, round(shift_fraction * len(chosen)))]))
    index = torch.cat(parts)
    kinds = torch.cat([torch.full((len(p),), k, device=device) for k, p in enumerate(parts)])
    is_anom = kinds == 1 if n_anom else torch.zeros_like(kinds, dtype=torch.bool)
    is_shift = kinds == len(parts) - 1 if cache.n_shifted else torch.zeros_like(is_anom)
    a, b = torch.randperm(cache.views, generator=g)[:2].tolist()
    view_a = cache.take(a, index, STEP_POSITIONS, g)
    view_b = cache.take(b, index, STEP_POSITIONS, g)
    return ({s: torch.cat([view_a[s], view_b[s]]) for s in view_a}, is_anom, is_shift)


class StepPlan:
    """Stage 1's learning rate: a linear warm-up, then a cosine over the steps that will fit.

    Without a time budget the run has `total_steps`. With one, the plan is redone at every step
    from the steady step time (the median of the last 25 steps, the first two left out), as
    `step + remaining seconds / step time`: a slow start (caches filling, a busy machine)
    cannot shrink the run, and the cosine still ends as the time does. The warm-up is 10 % of
    the planned steps, at most 50.
    """

    WINDOW, SKIP, WARMUP_SHARE, WARMUP_MAX = 25, 2, 0.1, 50

    def __init__(self, base_lr: float, total_steps: int, budget_s: float | None) -> None:
        self.base_lr, self.total, self.budget_s = base_lr, max(1, total_steps), budget_s
        self.planned = self.total
        self._times: list[float] = []
        self._last: tuple[int, float] | None = None

    def lr(self, step: int, elapsed_s: float) -> float:
        """The learning rate of `step` (0-based), `elapsed_s` seconds into the stage."""
        if self._last is not None and step == self._last[0] + 1 and step > self.SKIP:
            self._times = [*self._times[-(self.WINDOW - 1):], elapsed_s - self._last[1]]
        self._last = (step, elapsed_s)
        if self.budget_s and self._times:
            step_s = max(float(np.median(self._times)), 1e-6)
            remaining = max(0.0, self.budget_s - elapsed_s)
            self.planned = max(1, min(self.total, step + int(remaining / step_s)))
        warmup = min(self.WARMUP_MAX, max(1, int(self.WARMUP_SHARE * self.planned)))
        scale = min(1.0, (step + 1) / warmup)
        progress = min(1.0, step / self.planned)
        return self.base_lr * scale * 0.5 * (1 + math.cos(math.pi * progress))


def train_stage1(model: AnoMem, normals: torch.Tensor, anomalies: torch.Tensor,
                 tc: TrainConfig, device: torch.device, budget_s: float | None = None,
                 progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                 run_dir: Path | None = None, resume: bool = False, dist: Dist | None = None
                 ) -> tuple[list[dict], float]:
    """Memory-augmented contrastive learning on uint8 images -> (one row per epoch, seconds).

    The learning rate follows `StepPlan`, so a time budget ends on a low learning rate whatever
    the machine's speed. With `run_dir`, a
    checkpoint is written after every epoch and when `should_stop` fires (then
    TrainingCancelled is raised); `resume` starts from that checkpoint.
    """
    dist = dist or Dist()
    model.train()
    step_fn: nn.Module = ContrastStep(model, MemoryContrastLoss(tc), tc.w_rotation)
    if dist.enabled:
        step_fn = nn.parallel.DistributedDataParallel(
            step_fn, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr)
    normals = dist.shard(normals).to(device)
    anomalies = anomalies.to(device)
    if model.frozen:  # the images stage 1 caches and learns on
        normals = subset(normals, tc.cache_images, tc.seed)
    n = len(normals)
    bs = min(max(2, tc.batch_size // dist.world), n)  # the global batch stays batch_size
    n_anom = 0 if len(anomalies) == 0 else max(1, bs // 8)  # labelled anomalies per batch
    steps_per_epoch = max(1, n // bs)
    if dist.enabled:  # every rank must take the same number of steps
        steps_per_epoch = int(dist.gather(torch.tensor([steps_per_epoch])).min())
    plan = StepPlan(tc.lr, steps_per_epoch * tc.epochs, budget_s)
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
    cache = None
    if model.frozen:  # the encoder's features of every view, once; then only the memories learn
        g_cache = torch.Generator().manual_seed(tc.seed + 1000 * dist.rank + 1)
        cache = FeatureCache(model, normals, anomalies, tc, device, g_cache, progress)
        if not resume:
            init_memories(model, cache, g_cache)
            if dist.enabled:  # rank 0's initial memories for all
                dist.broadcast_parameters(model)
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
            rotated = turns = None
            if cache is not None:
                views, is_anom, is_shift = cached_batch(cache, perm[i * bs:(i + 1) * bs],
                                                        n_anom, g, tc.shift_fraction)
            else:
                chosen = normals[perm[i * bs:(i + 1) * bs]]
                batch, is_anom, is_shift = make_batch(chosen, anomalies, n_anom,
                                                      tc.shift_negatives, g, tc.shift_fraction)
                views = torch.cat([augment(batch, tc.augment, g),
                                   augment(batch, tc.augment, g)])
                if model.rotation is not None:  # view a of the batch's normals (its first rows)
                    rotated, turns = quarter_turns(views[:len(chosen)], g)
                    rotated = rotated.contiguous(memory_format=torch.channels_last)
                views = views.contiguous(memory_format=torch.channels_last)
            out, attention = step_fn(views, is_anom, is_shift, rotated, turns)

            state.elapsed_s = elapsed0 + time.perf_counter() - session
            lr = plan.lr(state.step, state.elapsed_s)
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
               "seconds": state.epoch_s, "planned_steps": plan.planned,
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
