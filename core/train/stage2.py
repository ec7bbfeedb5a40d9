"""Stage 2: fit the anomaly distance detector on the trained encoder and memories.

In order:
1. the image-level terms fit what they measure against (core/model/terms.py): the pixel scale
   stores normal thumbnails and fits its layout Gaussian (core/model/pixels.py);
2. each scale's Gaussians are fitted to the `fit` images' deviations and layouts
   (core/model/gaussians.py);
3. every term is standardised on held-out `calibration` normals (images stage 1 never saw);
4. the terms are weighed (`TrainConfig.combine`): fixed weights, or weights learnt against
   pseudo-anomalies of the calibration normals (core/train/shifts.py), kept only when they
   survive a check on kinds of pseudo-anomaly they were not fitted on (core/train/weighting.py);
5. the scales of the pixel map are weighed (`ModelConfig.map_weights`): the set of scales
   whose averaged map best outlines defects pasted into the calibration normals;
6. with labelled anomalies, a head that may only raise scores (unbalanced setting);
7. the thresholds: a quantile of the calibration scores.

`fit_stage2` splits a training set's normals into `fit` and `calibration` images
(`split_normals`, the split stage 1 trained on) and runs `fit_detector`, which returns a
report of steps 4 and 5 for metrics.json.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from core.config import SHIFTS, TrainConfig
from core.data.base import DataError, ImageSet
from core.model.anomem import AnoMem
from core.model.memory import MemoryRead
from core.train.augment import to_float
from core.train.distributed import Dist
from core.train.features import subset as cached_subset
from core.train.logistic import offset_logistic
from core.train.progress import Progress, ProgressFn, StopFn, TrainingCancelled
from core.train.shifts import shift
from core.train.weighting import auroc, choose_weights

GAUSSIAN_ROWS = 60_000  # deviation vectors sampled per scale to fit a detector's Gaussian
MIN_PSEUDO = 256  # pseudo-anomalies per kind for the weighting: small sets are repeated
MAX_REPEATS = 8  # ... but each held-out normal at most this many times per kind
# The pixel map's scales: pasted local defects outline the pixels that changed (by more than
# CHANGED grey levels); about MAP_PIXELS of each class of pixel per kind are compared, and a
# subset of scales replaces all of them only if it outlines every kind better, by MAP_MARGIN
# on average.
MAP_SHIFTS = ("cutpaste", "scar", "blend")
CHANGED = 8
MAP_PIXELS = 20_000
MAP_MARGIN = 0.005
# A frozen pretrained encoder: the Gaussians are fitted on the images stage 1 cached
# (TrainConfig.cache_images), and pseudo-anomalies are made from at most this many held-out
# normals per kind (the scores are still standardised on all of them)
FROZEN_PSEUDO_IMAGES = 256


def split_normals(train: ImageSet, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of normal training images for fitting (stage 1 and the Gaussians) and for
    calibration (held out: standardisation, weighting, thresholds)."""
    normal = np.flatnonzero(train.labels.numpy() == 0)
    rng = np.random.default_rng(seed)
    normal = rng.permutation(normal)
    n_cal = max(2, int(round(holdout * len(normal))))
    if len(normal) - n_cal < 2:
        raise DataError(
            f"need at least {n_cal + 2} normal training images, got {len(normal)}"
        )
    return np.sort(normal[n_cal:]), np.sort(normal[:n_cal])


def fit_stage2(model: AnoMem, train: ImageSet, tc: TrainConfig, device: torch.device,
               progress: ProgressFn | None = None, should_stop: StopFn | None = None,
               dist: Dist | None = None) -> dict[str, Any]:
    """Stage 2 on a training set: its normals split as stage 1's were (`split_normals`), its
    labelled anomalies (unbalanced setting) for the head; returns `fit_detector`'s report."""
    fit_idx, cal_idx = split_normals(train, tc.holdout, tc.seed)
    anomalies = train.images[np.flatnonzero(train.labels.numpy() == 1)]
    return fit_detector(model, train.images[fit_idx], train.images[cal_idx], anomalies, tc,
                        device, progress, should_stop, dist)


@torch.no_grad()
def reads_of(model: AnoMem, images: torch.Tensor, device: torch.device, bs: int | None = None,
             dist: Dist | None = None, standardised: bool = True
             ) -> Iterator[tuple[int, dict[str, MemoryRead], torch.Tensor | None]]:
    """Yields (start index, {scale: MemoryRead}, image-level terms (B, E) or None) batch by
    batch (see `AnoMem.read`).

    Under torchrun each rank reads only its shard of `images`.
    """
    model.eval()
    if dist is not None:
        images = dist.shard(images)
    bs = bs or model.inference_batch()
    for i in range(0, len(images), bs):
        x = to_float(images[i:i + bs].to(device))
        yield i, *model.read(x, standardised)


@torch.no_grad()
def fit_detector(model: AnoMem, fit: torch.Tensor, calibration: torch.Tensor,
                 anomalies: torch.Tensor, tc: TrainConfig, device: torch.device,
                 progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                 dist: Dist | None = None) -> dict[str, Any]:
    """Stage 2 on uint8 images; returns how the terms were weighed (for metrics.json).

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
    # the image-level terms: all of `fit` on every rank, one seed for all (the same fit)
    model.terms.fit(fit.to(device), torch.Generator().manual_seed(tc.seed))
    pseudo_from = calibration
    if model.frozen:  # an encoder pass costs ~10x the scratch one's: fewer images, same fits
        fit = cached_subset(fit, tc.cache_images, tc.seed)
        pseudo_from = cached_subset(calibration, FROZEN_PSEUDO_IMAGES, tc.seed)
    _fit_gaussians(model, fit, device, g, dist, progress)
    check_stop()
    _standardise(model, calibration, device, dist)
    check_stop()
    report = fit_combination(model, pseudo_from, tc, device, g, dist)
    if det.map_weights is not None:
        report["maps"] = fit_map_weights(model, pseudo_from, device, g, dist)
    if len(anomalies):
        _fit_classifier(model, calibration, anomalies, device, dist)
    scores, maxima = [], []
    mine = dist.shard(calibration)
    bs = model.inference_batch()
    for i in range(0, len(mine), bs):
        out = model.score(to_float(mine[i:i + bs].to(device)))
        scores.append(out.image.cpu())
        maxima.append(out.pixel_map.flatten(1).max(1).values.cpu())
    det.threshold.copy_(torch.quantile(dist.gather(torch.cat(scores)), tc.threshold_quantile))
    det.pixel_threshold.copy_(torch.quantile(dist.gather(torch.cat(maxima)),
                                             tc.threshold_quantile))
    det.fitted.fill_(True)
    if progress:
        progress(Progress("stage2", 1.0, "detector fitted"))
    return report


def _fit_gaussians(model: AnoMem, fit: torch.Tensor, device: torch.device, g: torch.Generator,
                   dist: Dist, progress: ProgressFn | None) -> None:
    """Each scale's local Gaussian (shared or per position) and its layout PPCA."""
    det = model.detector
    rows: dict[str, list] = {s: [] for s in model.scales}
    layouts: dict[str, list] = {s: [] for s in model.scales}
    for i, reads, _ in reads_of(model, fit, device, dist=dist):
        for s, r in reads.items():
            d = r.deviation
            layouts[s].append(det.per_scale[s].pooled(det.layout_input(r)).cpu())
            if det.per_scale[s].positional:  # every position of every map
                rows[s].append(d.cpu())
                continue
            flat = d.permute(0, 2, 3, 1).reshape(-1, d.shape[1])  # (b*h*w, D)
            per_image = d.shape[2] * d.shape[3]
            keep = max(1, min(per_image, GAUSSIAN_ROWS // len(fit))) * len(d)
            pick = torch.randperm(len(flat), generator=g)[:keep].to(flat.device)
            rows[s].append(flat[pick].cpu())
        if progress:
            progress(Progress("stage2", 0.5 * min(1.0, (i + len(d)) * dist.world / len(fit)),
                              "fitting the distance detectors"))
    for s in model.scales:
        det.per_scale[s].fit(dist.gather(torch.cat(rows[s])), dist.gather(torch.cat(layouts[s])))


def _standardise(model: AnoMem, calibration: torch.Tensor, device: torch.device,
                 dist: Dist) -> None:
    """Location and scale of every term and distance map on held-out normals."""
    det = model.detector
    raw: dict[str, list] = {s: [] for s in model.scales}
    distances: dict[str, list] = {s: [] for s in model.scales}
    terms: list[torch.Tensor] = []
    for _, reads, extra in reads_of(model, calibration, device, dist=dist, standardised=False):
        for s, r in reads.items():
            sd = det.per_scale[s]
            dmap = sd.distance_map(r.deviation)
            raw[s].append(sd.raw_scores(det.layout_input(r), dmap).cpu())
            distances[s].append(dmap.flatten().cpu())
        if extra is not None:
            terms.append(extra.cpu())
    for s in model.scales:
        det.per_scale[s].calibrate(dist.gather(torch.cat(raw[s])),
                                   dist.gather(torch.cat(distances[s])))
    if terms:
        model.terms.calibrate(dist.gather(torch.cat(terms)))


def standardised_terms(model: AnoMem, images: torch.Tensor, device: torch.device,
                       dist: Dist | None = None) -> torch.Tensor:
    """(N, n_terms) standardised term scores of uint8 images (every rank's shard, gathered)."""
    dist = dist or Dist()
    parts = [model.detector.features(reads, extra)[0].cpu()
             for _, reads, extra in reads_of(model, images, device, dist=dist)]
    return dist.gather(torch.cat(parts))


def fit_combination(model: AnoMem, calibration: torch.Tensor, tc: TrainConfig,
                    device: torch.device, g: torch.Generator, dist: Dist) -> dict[str, Any]:
    """Weigh the terms (core/train/weighting.py) on the held-out normals and pseudo-anomalies
    made from them, one set per kind of SHIFTS; returns the evidence and the choice made."""
    det = model.detector
    normal, pseudo = torch.zeros(0), {}
    if tc.combine != "fixed":
        mine = dist.shard(calibration)
        repeats = max(1, min(MAX_REPEATS, -(-MIN_PSEUDO // max(1, len(calibration)))))
        normal = dist.gather(standardised_terms(model, mine, device).double())
        for kind in SHIFTS:
            copies = torch.cat([shift(mine, (kind,), g) for _ in range(repeats)])
            pseudo[kind] = dist.gather(standardised_terms(model, copies, device).double())
    weights, report = choose_weights(normal, pseudo, det.fixed_weights(), det.term_names,
                                     tc.combine)
    det.weights.copy_(weights)
    return report


def fit_map_weights(model: AnoMem, calibration: torch.Tensor, device: torch.device,
                    g: torch.Generator, dist: Dist) -> dict[str, Any]:
    """Choose the scales whose averaged map best outlines pasted defects; returns the evidence.

    The pixel map shows *where* an image is anomalous; by default every scale counts the same.
    Coarse scales blur a small defect over their large cells, so on some data a finer scale
    alone draws a sharper outline. Local pseudo-defects (MAP_SHIFTS) are pasted into the
    held-out normals, the pixels they changed are the truth, and every non-empty set of scales
    is scored by the pixel AUROC of its averaged map on each kind. All scales stay unless the
    best subset beats them on every kind, and by MAP_MARGIN on average: no test label is
    involved.
    """
    det = model.detector
    scales = list(det.scales)
    mine = dist.shard(calibration)
    values, truth = [], []
    for kind in MAP_SHIFTS:
        shifted = shift(mine, (kind,), g)
        changed = (shifted.int() - mine.int()).abs().amax(1) > CHANGED  # (N, H, W)
        share = -(-MAP_PIXELS // max(1, len(mine)))  # pixels of each class kept per image
        kept, labels = [], []
        for i, reads, _ in reads_of(model, shifted, device):
            standardised = {s: det.standardised_map(s, det.per_scale[s].distance_map(
                reads[s].deviation)) for s in scales}
            up = det.upsampled_maps(standardised, tuple(changed.shape[-2:]))  # (S, b, H, W)
            per_pixel = up.flatten(1).T.cpu()  # (b*H*W, S)
            flat = changed[i:i + up.shape[1]].flatten().cpu()
            pick = torch.cat([_sample(idx, share * up.shape[1], g) for idx in
                              (flat.nonzero()[:, 0], (~flat).nonzero()[:, 0])])
            kept.append(per_pixel[pick])
            labels.append(flat[pick].long())
        values.append(dist.gather(torch.cat(kept).float()))
        truth.append(dist.gather(torch.cat(labels)))
    candidates = [c for n in range(len(scales), 0, -1)
                  for c in itertools.combinations(range(len(scales)), n)]
    evidence = {}  # {"layer2+layer3": [pixel AUROC per kind]}
    for subset in candidates:
        evidence["+".join(scales[j] for j in subset)] = [
            auroc(v[t == 0][:, list(subset)].mean(1), v[t == 1][:, list(subset)].mean(1))
            if 0 < int(t.sum()) < len(t) else 0.5 for v, t in zip(values, truth, strict=True)]
    every = "+".join(scales)
    best = max(evidence, key=lambda c: np.mean(evidence[c]))
    gains = np.subtract(evidence[best], evidence[every])
    chosen = best if gains.mean() >= MAP_MARGIN and gains.min() > 0 else every
    weights = torch.tensor([float(s in chosen.split("+")) for s in scales])
    det.map_weights.copy_(weights / weights.sum())
    return {"kinds": list(MAP_SHIFTS), "pseudo_pixel_auroc": evidence, "chosen": chosen}


def _sample(index: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """At most n of `index`, drawn without replacement."""
    return index if len(index) <= n else index[torch.randperm(len(index), generator=g)[:n]]


def _fit_classifier(model: AnoMem, normals: torch.Tensor, anomalies: torch.Tensor,
                    device: torch.device, dist: Dist) -> None:
    """Unbalanced setting: a class-balanced logistic head on term scores and pooled deviations.

    The image score is the one-class score plus softplus of the head's logit: the head can
    raise what resembles a labelled anomaly but never lower an image the one-class detector
    finds strange, so anomaly classes the labels never showed keep their one-class evidence.
    Fitted on held-out normals against the labelled anomalies with the one-class score as its
    offset, so it learns what that score misses.
    """
    det = model.detector
    feats, offsets = [], []
    for images in (normals, anomalies):
        parts, base = [], []
        for _, reads, extra in reads_of(model, images, device, dist=dist):
            z, _ = det.features(reads, extra)
            parts.append(det.classifier_input(z, reads).cpu())
            base.append((z @ det.weights).cpu())
        feats.append(dist.gather(torch.cat(parts)))
        offsets.append(dist.gather(torch.cat(base)))
    y = torch.cat([torch.zeros(len(feats[0])), torch.ones(len(feats[1]))])
    weight, bias = offset_logistic(torch.cat(feats), torch.cat(offsets), y, positive=True)
    det.clf_weight.copy_(weight.float())
    det.clf_bias.copy_(torch.tensor(bias))
