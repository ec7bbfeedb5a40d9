"""Training, start to end: stage 1 (core/train/stage1.py), then stage 2 (core/train/stage2.py).

The model never sees this module; it only receives gradients (stage 1) and fitted buffers
(stage 2). Normal training images are split once: `fit` images train stage 1 and the detector's
Gaussians, the held-out `calibration` images standardise the scores and set the threshold, so
the threshold is not fitted on images the memory has already learnt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import ConfigError, RunConfig
from core.data.base import ImageSet
from core.model.anomem import AnoMem
from core.train.allocator import keep_freed_memory
from core.train.distributed import Dist
from core.train.progress import Progress, ProgressFn, StopFn, TrainingCancelled
from core.train.stage1 import train_stage1
from core.train.stage2 import fit_stage2, split_normals

# What callers of the trainer handle: its progress reports and its cancellation.
__all__ = ["Progress", "ProgressFn", "StopFn", "TrainingCancelled", "TrainOutput", "train",
           "resolve_device", "split_normals"]


@dataclass
class TrainOutput:
    model: AnoMem
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stage2: dict[str, Any] = field(default_factory=dict)  # how the detector was fitted


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


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
    fit_idx, _ = split_normals(train_set, tc.holdout, tc.seed)
    anomaly_idx = np.flatnonzero(train_set.labels.numpy() == 1)
    budget = None if tc.max_minutes is None else tc.max_minutes * 60
    history, stage1_s = train_stage1(
        model, train_set.images[fit_idx], train_set.images[anomaly_idx], tc, device,
        budget_s=None if budget is None else budget * tc.stage1_share,
        progress=progress, should_stop=should_stop, run_dir=run_dir, resume=resume, dist=dist,
    )
    stage2_start = time.perf_counter()
    try:
        report = fit_stage2(model, train_set, tc, device, progress, should_stop, dist)
    except TrainingCancelled:  # stage 1's last checkpoint is the resume point
        raise TrainingCancelled(history, run_dir if run_dir and dist.is_main else None
                                ) from None
    # contiguous like a model loaded from disk: its scores then match the reloaded run's
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    if dist.enabled and not dist.all_equal(_fingerprint(model)):
        raise RuntimeError("model replicas differ across ranks after training")
    # stage 1's seconds include those before an interruption
    return TrainOutput(model=model, history=history,
                       seconds=stage1_s + time.perf_counter() - stage2_start, stage2=report)


def _fingerprint(model: AnoMem) -> torch.Tensor:
    """Every parameter and buffer, flattened: equal on all ranks when replicas agree."""
    return torch.cat([v.detach().double().flatten() for v in model.state_dict().values()])
