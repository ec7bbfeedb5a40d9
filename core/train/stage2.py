"""Stage 2: fit the anomaly distance detector on the trained encoder and memories.

In order:
1. the pixel scale stores normal thumbnails and fits its layout Gaussian (core/model/pixels.py);
2. each scale's Gaussians are fitted to the `fit` images' deviations and layouts;
3. every term is standardised on held-out `calibration` normals (images stage 1 never saw);
4. the terms are weighed (`TrainConfig.combine`): fixed weights, or weights learnt against
   pseudo-anomalies of the calibration normals (core/train/shifts.py), kept only when they
   survive a check on kinds of pseudo-anomaly they were not fitted on;
5. the scales of the pixel map are weighed (`ModelConfig.map_weights`): the set of scales
   whose averaged map best outlines defects pasted into the calibration normals;
6. with labelled anomalies, a head that may only raise scores (unbalanced setting);
7. the thresholds: a quantile of the calibration scores.

`fit_detector` returns a report of steps 4 and 5 for metrics.json.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from core.config import SHIFTS, TrainConfig
from core.model.anomem import AnoMem
from core.model.detector import fit_gaussian, fit_positional_gaussians, fit_ppca
from core.model.memory import MemoryRead
from core.train.augment import to_float
from core.train.distributed import Dist
from core.train.features import subset as cached_subset
from core.train.progress import Progress, ProgressFn, StopFn, TrainingCancelled
from core.train.shifts import shift

GAUSSIAN_ROWS = 60_000  # deviation vectors sampled per scale to fit a detector's Gaussian
MIN_PSEUDO = 256  # pseudo-anomalies per kind for the combination: small sets are repeated
MAX_REPEATS = 8  # ... but each held-out normal at most this many times per kind
# The check of learnt weights on the kinds of pseudo-anomaly they were not fitted on: they must
# gain at least CHECK_MARGIN AUROC over the fixed weights on average (they were fitted on these
# very normals, so the check flatters them), and lose at most CHECK_TOLERANCE on any one kind.
# A kind that both weightings separate perfectly is no evidence either way: it is left out of
# the average, where it would only dilute the gains of the others.
CHECK_MARGIN = 0.01
CHECK_TOLERANCE = 0.02
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


@torch.no_grad()
def reads_of(model: AnoMem, images: torch.Tensor, device: torch.device, bs: int | None = None,
             dist: Dist | None = None
             ) -> Iterator[tuple[int, dict[str, MemoryRead], torch.Tensor | None]]:
    """Yields (start index, {scale: MemoryRead}, raw image-level terms (B, E) or None) batch
    by batch (see `AnoMem.read`).

    Under torchrun each rank reads only its shard of `images`.
    """
    model.eval()
    if dist is not None:
        images = dist.shard(images)
    bs = bs or model.inference_batch()
    for i in range(0, len(images), bs):
        x = to_float(images[i:i + bs].to(device))
        yield i, *model.read(x)


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
    if model.pixels is not None:  # every rank stores the same images: one seed for all
        model.pixels.store(fit.to(device), torch.Generator().manual_seed(tc.seed))
    if model.pixel_layout is not None:  # all of `fit` on every rank: the same Gaussian
        model.pixel_layout.fit(fit.to(device))
    pseudo_from = calibration
    if model.frozen:  # an encoder pass costs ~10x the scratch one's: fewer images, same fits
        fit = cached_subset(fit, tc.cache_images, tc.seed)
        pseudo_from = cached_subset(calibration, FROZEN_PSEUDO_IMAGES, tc.seed)
    _fit_gaussians(model, fit, device, g, dist, progress)
    check_stop()
    _standardise(model, calibration, device, dist)
    check_stop()
    report = fit_combination(model, pseudo_from, tc, device, g, dist)
    if hasattr(det, "map_weights"):
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
            layouts[s].append(det.per_scale[s].layout(det.layout_input(r)).cpu())
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


def _standardise(model: AnoMem, calibration: torch.Tensor, device: torch.device,
                 dist: Dist) -> None:
    """Location and scale of every term and distance map on held-out normals."""
    det = model.detector
    raw: dict[str, list] = {s: [] for s in model.scales}
    dist_stats: dict[str, list] = {s: [] for s in model.scales}
    extras: list[torch.Tensor] = []
    for _, reads, extra in reads_of(model, calibration, device, dist=dist):
        for s, r in reads.items():
            sd = det.per_scale[s]
            dmap = sd.distance_map(r.deviation)
            raw[s].append(sd.raw_scores(det.layout_input(r), dmap).cpu())
            dist_stats[s].append(dmap.flatten().cpu())
        if extra is not None:
            extras.append(extra.cpu())
    for s in model.scales:
        sd = det.per_scale[s]
        r = dist.gather(torch.cat(raw[s]))
        sd.score_loc.copy_(r.mean(0))
        sd.score_scale.copy_(r.std(0).clamp_min(1e-6))
        d = dist.gather(torch.cat(dist_stats[s]))
        sd.map_loc.copy_(d.mean())
        sd.map_scale.copy_(d.std().clamp_min(1e-6))
    if det.extra_terms:
        e = dist.gather(torch.cat(extras))
        for j, (loc, scale) in enumerate(zip(det.extra_buffers("loc"),
                                             det.extra_buffers("scale"), strict=True)):
            loc.copy_(e[:, j].mean())
            scale.copy_(e[:, j].std().clamp_min(1e-6))


def standardised_terms(model: AnoMem, images: torch.Tensor, device: torch.device,
                       dist: Dist | None = None) -> torch.Tensor:
    """(N, n_terms) standardised term scores of uint8 images (every rank's shard, gathered)."""
    dist = dist or Dist()
    parts = [model.detector.features(reads, extra)[0].cpu()
             for _, reads, extra in reads_of(model, images, device, dist=dist)]
    return dist.gather(torch.cat(parts))


def _auroc(normal: torch.Tensor, anomalous: torch.Tensor) -> float:
    y = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    return float(roc_auc_score(y, torch.cat([normal, anomalous]).double().numpy()))


def fit_combination(model: AnoMem, calibration: torch.Tensor, tc: TrainConfig,
                    device: torch.device, g: torch.Generator, dist: Dist) -> dict[str, Any]:
    """Weigh the terms; returns the pseudo-anomaly evidence and the choice made.

    Held-out normals are contrasted with pseudo-anomalies made from them, one set per kind of
    SHIFTS. "learned" fits simplex weights against all kinds. "checked" also fits, for each
    kind, weights without that kind and scores them on it: the learnt weights are kept only
    if, on the kinds they never saw, they beat the fixed weights by CHECK_MARGIN on average and
    lose by no more than CHECK_TOLERANCE on any one; kinds both weightings separate perfectly
    do not count. Real anomalies are none of these kinds; a weighting that holds only on the
    kinds it was fitted to is not trusted.
    """
    det = model.detector
    fixed = det.fixed_weights()
    names = det.term_names
    report: dict[str, Any] = {"combine": tc.combine,
                              "weights": {"fixed": dict(zip(names, fixed.tolist(), strict=True))}}
    if tc.combine == "fixed":
        det.weights.copy_(fixed)
        report["chosen"] = "fixed"
        return report
    mine = dist.shard(calibration)
    repeats = max(1, min(MAX_REPEATS, -(-MIN_PSEUDO // max(1, len(calibration)))))
    normal = standardised_terms(model, mine, device).double()
    normal = dist.gather(normal)
    pseudo = {}
    for kind in SHIFTS:
        copies = torch.cat([shift(mine, (kind,), g) for _ in range(repeats)])
        pseudo[kind] = dist.gather(standardised_terms(model, copies, device).double())
    learned = _simplex_logistic(normal, torch.cat(list(pseudo.values())))
    report["weights"]["learned"] = dict(zip(names, learned.tolist(), strict=True))
    report["pseudo_auroc"] = {
        kind: {**{n: _auroc(normal[:, j], x[:, j]) for j, n in enumerate(names)},
               "fixed": _auroc(normal @ fixed.double(), x @ fixed.double()),
               "learned": _auroc(normal @ learned, x @ learned)}
        for kind, x in pseudo.items()}
    chosen = "learned"
    if tc.combine == "checked":
        check = {}
        for kind, x in pseudo.items():
            w = _simplex_logistic(normal, torch.cat([v for k, v in pseudo.items() if k != kind]))
            check[kind] = {"learned": _auroc(normal @ w, x @ w),
                           "fixed": report["pseudo_auroc"][kind]["fixed"]}
        report["check"] = check
        report["check_uninformative"] = [k for k, c in check.items() if uninformative(c)]
        chosen = "learned" if confirms(check) else "fixed"
    det.weights.copy_((learned if chosen == "learned" else fixed.double()).float())
    report["chosen"] = chosen
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
            _auroc(v[t == 0][:, list(subset)].mean(1), v[t == 1][:, list(subset)].mean(1))
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


def _simplex_logistic(normal: torch.Tensor, anomalous: torch.Tensor) -> torch.Tensor:
    """Weights on the simplex of a logistic model telling anomalous rows from normal ones.

    The image score stays a convex combination of standardised terms; a term that cannot tell
    the two apart ends up with little weight. Fitted with L-BFGS on a softmax parametrisation
    (scikit-learn has no simplex-constrained logistic regression).
    """
    x = torch.cat([normal, anomalous]).double()
    y = torch.cat([torch.zeros(len(normal)), torch.ones(len(anomalous))]).double()
    balance = torch.where(y > 0.5, len(y) / (2 * len(anomalous)), len(y) / (2 * len(normal)))
    logits_w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits_w, log_scale, bias], max_iter=200,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w = torch.softmax(logits_w, 0)
        out = log_scale.exp() * (x @ w) + bias
        loss = (F.binary_cross_entropy_with_logits(out, y, reduction="none") * balance).mean()
        loss = loss + 1e-3 * logits_w.pow(2).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return torch.softmax(logits_w.detach(), 0)


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
    weight, bias = fit_offset_logistic(torch.cat(feats), torch.cat(offsets), y, positive=True)
    det.clf_weight.copy_(weight.float())
    det.clf_bias.copy_(torch.tensor(bias))


def fit_offset_logistic(x: torch.Tensor, offset: torch.Tensor, y: torch.Tensor, c: float = 0.5,
                        positive: bool = False) -> tuple[torch.Tensor, float]:
    """Class-balanced, L2-regularised logistic regression of y on x, on top of a fixed offset.

    Minimises sum_i w_i * BCE(offset_i + h(x_i . coef + bias), y_i) + |coef|^2 / (2c), with
    w_i = n / (2 n_class(i)) and h the identity, or softplus when `positive` (the head may only
    add). With h the identity and a zero offset this is scikit-learn's
    `LogisticRegression(C=c, class_weight="balanced")`, which has no offset. Returns (coef, bias).
    """
    x, offset, y = x.double(), offset.double(), y.double()
    n1 = y.sum().clamp(1, len(y) - 1)
    balance = torch.where(y > 0.5, len(y) / (2 * n1), len(y) / (2 * (len(y) - n1)))
    coef = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([coef, bias], max_iter=1000, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")
    link = F.softplus if positive else (lambda v: v)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logit = offset + link(x @ coef + bias)
        loss = (F.binary_cross_entropy_with_logits(logit, y, reduction="none") * balance).sum()
        loss = loss + coef.pow(2).sum() / (2 * c)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return coef.detach(), float(bias.detach())


def uninformative(aurocs: dict[str, float]) -> bool:
    """Both weightings separate this kind perfectly: it tells them apart in no way."""
    return min(aurocs["learned"], aurocs["fixed"]) >= 1.0


def confirms(check: dict[str, dict[str, float]]) -> bool:
    """Whether the check {kind: {"learned": AUROC, "fixed": AUROC}} confirms the learnt weights:
    on the kinds that are evidence (not `uninformative`), a mean gain of CHECK_MARGIN and no loss
    above CHECK_TOLERANCE."""
    gains = [c["learned"] - c["fixed"] for c in check.values() if not uninformative(c)]
    return bool(gains) and float(np.mean(gains)) >= CHECK_MARGIN \
        and min(gains) >= -CHECK_TOLERANCE
