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
from typing import Any

import numpy as np
import torch

from core.config import ConfigError, RunConfig, TrainConfig
from core.data.base import DataError, ImageSet
from core.model.anomem import AnoMem
from core.model.detector import fit_gaussian, fit_ppca
from core.model.memory import MemoryRead
from core.train.augment import augment, shift, to_float
from core.train.losses import MemoryContrastLoss

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
    """`should_stop` asked the trainer to stop; the partial history is attached."""

    def __init__(self, history: list[dict]) -> None:
        super().__init__("training cancelled")
        self.history = history


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
          should_stop: StopFn | None = None) -> TrainOutput:
    """Both stages on `train_set` (normal images, plus labelled anomalies if unbalanced)."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    device = resolve_device(tc.device)
    model = AnoMem(cfg.model).to(device)
    fit_idx, cal_idx = split_normals(train_set, tc.holdout, tc.seed)
    anomaly_idx = np.flatnonzero(train_set.labels.numpy() == 1)
    budget = None if tc.max_minutes is None else tc.max_minutes * 60
    start = time.perf_counter()
    history = train_stage1(
        model, train_set.images[fit_idx], train_set.images[anomaly_idx], tc, device,
        budget_s=None if budget is None else budget * tc.stage1_share,
        progress=progress, should_stop=should_stop,
    )
    fit_detector(model, train_set.images[fit_idx], train_set.images[cal_idx],
                 train_set.images[anomaly_idx], tc, device, progress)
    return TrainOutput(model=model.cpu().eval(), history=history,
                       seconds=time.perf_counter() - start)


def _param_groups(model: AnoMem, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 and "prototypes" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def train_stage1(model: AnoMem, normals: torch.Tensor, anomalies: torch.Tensor,
                 tc: TrainConfig, device: torch.device, budget_s: float | None = None,
                 progress: ProgressFn | None = None, should_stop: StopFn | None = None
                 ) -> list[dict]:
    """Memory-augmented contrastive learning on uint8 images; returns one row per epoch.

    The learning rate follows a cosine over the larger of the step and the time fractions, so
    a time budget ends on a low learning rate whatever the machine's speed.
    """
    model.train()
    loss_fn = MemoryContrastLoss(tc)
    opt = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr)
    normals, anomalies = normals.to(device), anomalies.to(device)
    n = len(normals)
    bs = min(tc.batch_size, n)
    n_anom = 0 if len(anomalies) == 0 else max(1, bs // 8)  # labelled anomalies per batch
    steps_per_epoch = max(1, n // bs)
    total_steps = steps_per_epoch * tc.epochs
    warmup = min(50, total_steps // 10)
    g = torch.Generator().manual_seed(tc.seed)
    history: list[dict] = []
    start, step = time.perf_counter(), 0
    for epoch in range(tc.epochs):
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        counts = {s: torch.zeros(model.cfg.memory_size, device=device) for s in model.scales}
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(steps_per_epoch):
            batch = normals[perm[i * bs:(i + 1) * bs]]
            is_anom = torch.zeros(len(batch), dtype=torch.bool, device=device)
            if n_anom:
                pick = torch.randint(len(anomalies), (n_anom,), generator=g).to(device)
                batch = torch.cat([batch, anomalies[pick]])
                is_anom = torch.cat([is_anom, torch.ones(n_anom, dtype=torch.bool,
                                                         device=device)])
            is_shift = torch.zeros_like(is_anom)
            if tc.shift_negatives:
                batch = torch.cat([batch, shift(batch[~is_anom], tc.shift_negatives, g)])
                is_shift = torch.cat([is_shift, torch.ones(int((~is_anom).sum()),
                                                           dtype=torch.bool, device=device)])
                is_anom = torch.cat([is_anom, torch.zeros_like(is_shift[len(is_anom):])])
            views = torch.cat([augment(batch, tc.augment, g), augment(batch, tc.augment, g)])
            reads = model(views)
            b = len(batch)
            reads_a = {s: type(r)(*(t[:b] for t in r)) for s, r in reads.items()}
            reads_b = {s: type(r)(*(t[b:] for t in r)) for s, r in reads.items()}
            out = loss_fn(reads_a, reads_b, model.heads,
                          {s: model.memories[s].prototypes for s in model.scales}, is_anom,
                          is_shift)

            frac = step / total_steps
            if budget_s:
                frac = max(frac, (time.perf_counter() - start) / budget_s)
            lr = tc.lr * (min(1.0, (step + 1) / warmup) if warmup else 1.0)
            lr *= 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            out.total.backward()
            opt.step()
            step += 1

            with torch.no_grad():
                for s, r in reads_a.items():
                    top = r.attention[~is_anom & ~is_shift].argmax(1).flatten()
                    counts[s] += torch.bincount(top, minlength=len(counts[s]))
            for k, v in out.terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(out.total.detach())
            out_of_time = budget_s is not None and time.perf_counter() - start > budget_s
            if (should_stop and should_stop()) or out_of_time:
                break
        done_steps = max(1, i + 1)
        row = {"epoch": epoch + 1, "stage": 1, **{k: v / done_steps for k, v in sums.items()},
               "lr": lr, "seconds": time.perf_counter() - t0,
               # training images per second (each also costs its shifted copy and two views)
               "images_per_s": done_steps * (bs + n_anom) / (time.perf_counter() - t0)}
        for s, c in counts.items():
            row[f"usage_{s}"] = float((c > 0).float().mean())
        history.append(row)
        if progress:
            elapsed = time.perf_counter() - start
            done = max((epoch + 1) / tc.epochs, elapsed / budget_s if budget_s else 0)
            progress(Progress("stage1", min(done, 1.0),
                              f"epoch {epoch + 1}: loss {row['loss']:.3f}", row))
        if should_stop and should_stop():
            raise TrainingCancelled(history)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    model.eval()
    return history


@torch.no_grad()
def _reads(model: AnoMem, images: torch.Tensor, device: torch.device, bs: int = 256
           ) -> Iterator[tuple[int, dict[str, MemoryRead]]]:
    """Yields (start index, {scale: MemoryRead}) batch by batch, model in eval mode."""
    model.eval()
    for i in range(0, len(images), bs):
        yield i, model(to_float(images[i:i + bs].to(device)))


@torch.no_grad()
def fit_detector(model: AnoMem, fit: torch.Tensor, calibration: torch.Tensor,
                 anomalies: torch.Tensor, tc: TrainConfig, device: torch.device,
                 progress: ProgressFn | None = None) -> None:
    """Stage 2: fit each scale's Gaussians, standardise on held-out normals, set thresholds."""
    det = model.detector
    g = torch.Generator().manual_seed(tc.seed)
    rows: dict[str, list] = {s: [] for s in model.scales}
    layouts: dict[str, list] = {s: [] for s in model.scales}
    for i, reads in _reads(model, fit, device):
        for s, r in reads.items():
            d = r.deviation
            flat = d.permute(0, 2, 3, 1).reshape(-1, d.shape[1])  # (b*h*w, D)
            per_image = d.shape[2] * d.shape[3]
            keep = max(1, min(per_image, GAUSSIAN_ROWS // len(fit))) * len(d)
            pick = torch.randperm(len(flat), generator=g)[:keep].to(flat.device)
            rows[s].append(flat[pick].cpu())
            layouts[s].append(det.per_scale[s].layout(det.layout_input(r)).cpu())
        if progress:
            progress(Progress("stage2", 0.5 * min(1.0, (i + len(d)) / len(fit)),
                              "fitting the distance detectors"))
    for s in model.scales:
        sd = det.per_scale[s]
        mean, prec = fit_gaussian(torch.cat(rows[s]))
        sd.mean.copy_(mean)
        sd.precision.copy_(prec)
        lmean, basis, var, noise = fit_ppca(torch.cat(layouts[s]), sd.layout_basis.shape[1])
        sd.layout_mean.copy_(lmean)
        sd.layout_basis.copy_(basis)
        sd.layout_var.copy_(var)
        sd.layout_noise.copy_(noise)

    # Standardise on held-out normals: distances per position and the image-level scores.
    raw: dict[str, list] = {s: [] for s in model.scales}
    dist_stats: dict[str, list] = {s: [] for s in model.scales}
    for _, reads in _reads(model, calibration, device):
        for s, r in reads.items():
            sd = det.per_scale[s]
            dist = sd.distance_map(r.deviation)
            raw[s].append(sd.raw_scores(det.layout_input(r), dist).cpu())
            dist_stats[s].append(dist.flatten().cpu())
    for s in model.scales:
        sd = det.per_scale[s]
        r = torch.cat(raw[s])
        sd.score_loc.copy_(r.mean(0))
        sd.score_scale.copy_(r.std(0).clamp_min(1e-6))
        d = torch.cat(dist_stats[s])
        sd.map_loc.copy_(d.mean())
        sd.map_scale.copy_(d.std().clamp_min(1e-6))

    if tc.combine == "learned":
        _fit_combination(model, calibration, tc, device, g)
    if len(anomalies):
        _fit_classifier(model, calibration, anomalies, device)
    scores, maxima = [], []
    for i in range(0, len(calibration), 256):
        out = model.score(to_float(calibration[i:i + 256].to(device)))
        scores.append(out.image.cpu())
        maxima.append(out.pixel_map.flatten(1).max(1).values.cpu())
    det.threshold.copy_(torch.quantile(torch.cat(scores), tc.threshold_quantile))
    det.pixel_threshold.copy_(torch.quantile(torch.cat(maxima), tc.threshold_quantile))
    det.fitted.fill_(True)
    if progress:
        progress(Progress("stage2", 1.0, "detector fitted"))


def _standardised_terms(model: AnoMem, images: torch.Tensor, device: torch.device
                        ) -> torch.Tensor:
    """(N, 2S) standardised term scores of uint8 images."""
    return torch.cat([model.detector.features(reads)[0].cpu()
                      for _, reads in _reads(model, images, device)])


def _fit_combination(model: AnoMem, calibration: torch.Tensor, tc: TrainConfig,
                     device: torch.device, g: torch.Generator) -> None:
    """One-class: learn how much each scale and term counts, without real anomalies.

    Held-out normals are contrasted with distribution-shifted copies of themselves (the same
    pseudo-anomalies as stage 1) by a logistic model whose weights live on the simplex, so the
    image score stays a convex combination of standardised scores. A term that cannot tell a
    shifted image from a normal one ends up with little weight.
    """
    normal = _standardised_terms(model, calibration, device)
    shifted = _standardised_terms(
        model, shift(calibration, tc.shift_negatives or ("jigsaw",), g), device)
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
                    device: torch.device) -> None:
    """Unbalanced setting: a class-balanced logistic head on scale scores and pooled deviations.

    Trained on held-out normals against the labelled anomalies; its logit is added to the
    one-class score, so the labels sharpen the detector without replacing it.
    """
    from sklearn.linear_model import LogisticRegression

    det = model.detector
    feats = []
    for images in (normals, anomalies):
        parts = []
        for _, reads in _reads(model, images, device):
            z, _ = det.features(reads)
            parts.append(det.classifier_input(z, reads).cpu())
        feats.append(torch.cat(parts))
    x = torch.cat(feats).double().numpy()
    y = np.r_[np.zeros(len(feats[0])), np.ones(len(feats[1]))]
    clf = LogisticRegression(C=0.5, class_weight="balanced", max_iter=2000)
    clf.fit(x, y)
    det.clf_weight.copy_(torch.from_numpy(clf.coef_[0]).float())
    det.clf_bias.copy_(torch.tensor(float(clf.intercept_[0])))


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
