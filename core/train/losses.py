"""Stage-1 objective: memory-augmented contrastive learning, one named function per term.

- `nt_xent`: NT-Xent (SimCLR, Chen et al. 2020). In AnoMem the positive of a view's pooled
  query is the memory read-out of the *other* view (Jezequel et al., arXiv 2211.09041), so the
  memory must hold what makes each normal image itself, rare ones included.
- `alignment`: per-position squared distance between a normal query and its read-out, so the
  memory answers every position of a normal image and the deviation map is small there.
- `prototype_variance`: VICReg-style hinge on the spread of the prototypes (Bardes et al. 2022),
  so they cannot collapse onto each other.
- `usage_entropy`: log N minus the entropy of the mean attention, so no prototype is left unread.
- `anomaly_repulsion`: labelled anomalies (unbalanced setting) are pushed away from their
  read-out, so they never become normal prototypes.

Labelled anomalies and distribution-shifted pseudo-anomalies (CSI, Tack et al. 2020) take part
as instances of their own: they are negatives for every normal anchor, but never anchors of the
memory term, never pulled towards the memory and never counted in its usage.

`MemoryContrastLoss` combines them with the weights of `TrainConfig` and returns every term.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from core.config import TrainConfig
from core.model.memory import MemoryRead


def nt_xent(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float,
            exclude: torch.Tensor | None = None, valid: torch.Tensor | None = None
            ) -> torch.Tensor:
    """InfoNCE over cosine similarities; the positive of anchor i is candidate i.

    anchors, candidates: (M, P). exclude: (M, M) bool, pairs that are neither positive nor
    negative (an anchor's own copy among the candidates). valid: (M,) bool, anchors that count.
    """
    if anchors.ndim != 2 or anchors.shape != candidates.shape:
        raise ValueError(
            f"anchors {tuple(anchors.shape)} and candidates {tuple(candidates.shape)} must both "
            "be (M, P)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: expected > 0")
    logits = F.normalize(anchors, dim=1) @ F.normalize(candidates, dim=1).T / temperature
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    target = torch.arange(len(anchors), device=anchors.device)
    loss = F.cross_entropy(logits, target, reduction="none")
    if valid is None:
        return loss.mean()
    return loss[valid].mean() if valid.any() else loss.sum() * 0


def two_view_exclusion(batch: int, device: torch.device | None = None) -> torch.Tensor:
    """(2B, 2B) mask of anchor i's own copy at (i + B) mod 2B, for [view a; view b] stacks."""
    idx = torch.arange(2 * batch, device=device)
    mask = torch.zeros(2 * batch, 2 * batch, dtype=torch.bool, device=device)
    mask[idx, (idx + batch) % (2 * batch)] = True
    return mask


def alignment(read: MemoryRead, weight: torch.Tensor) -> torch.Tensor:
    """Mean over positions of |q - r|^2, averaged over the images with weight 1 (normal)."""
    per_image = read.deviation.pow(2).sum(1).mean(dim=(1, 2))  # (B,)
    return (per_image * weight).sum() / weight.sum().clamp_min(1)


def prototype_variance(prototypes: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Hinge on the std of each dimension across unit prototypes, target 1/sqrt(D)."""
    p = F.normalize(prototypes, dim=1)
    std = torch.sqrt(p.var(dim=0) + eps)
    return F.relu(1.0 / math.sqrt(p.shape[1]) - std).mean() * math.sqrt(p.shape[1])


def usage_entropy(attention: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """log N - H(mean attention over the positions of weighted images); 0 when usage is even."""
    n = attention.shape[1]
    per_image = attention.mean(dim=(2, 3))  # (B, N)
    usage = (per_image * weight[:, None]).sum(0) / weight.sum().clamp_min(1e-8)
    entropy = -(usage * usage.clamp_min(1e-12).log()).sum()
    return math.log(n) - entropy


def anomaly_repulsion(read: MemoryRead, is_anomaly: torch.Tensor, margin: float = 0.0
                      ) -> torch.Tensor:
    """Hinge on the cosine between an anomaly's queries and their read-outs, above `margin`."""
    if not is_anomaly.any():
        return read.query.sum() * 0
    cos = F.cosine_similarity(read.query[is_anomaly], read.readout[is_anomaly], dim=1)
    return F.relu(cos - margin).mean()


class LossTerms(NamedTuple):
    total: torch.Tensor
    terms: dict[str, torch.Tensor]  # each weighted term, summed over scales


class MemoryContrastLoss:
    """The stage-1 loss for two views of a batch, summed over scales."""

    def __init__(self, cfg: TrainConfig) -> None:
        if cfg.temperature <= 0:
            raise ValueError(f"temperature={cfg.temperature}: expected > 0")
        for name in ("w_memory_contrast", "w_view_contrast", "w_align", "w_variance", "w_usage",
                     "w_anomaly"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"{name}={getattr(cfg, name)}: loss weights must be >= 0")
        self.cfg = cfg

    def __call__(self, reads_a: dict[str, MemoryRead], reads_b: dict[str, MemoryRead],
                 heads: torch.nn.ModuleDict, prototypes: dict[str, torch.Tensor],
                 is_anomaly: torch.Tensor, is_shifted: torch.Tensor | None = None
                 ) -> LossTerms:
        """reads_*: {scale: MemoryRead} of views a and b of the same B images; is_anomaly and
        is_shifted: (B,) bool flags of labelled anomalies and shifted pseudo-anomalies."""
        cfg = self.cfg
        b = len(is_anomaly)
        if is_shifted is None:
            is_shifted = torch.zeros_like(is_anomaly)
        exclude = two_view_exclusion(b, is_anomaly.device)
        normal = ~is_anomaly & ~is_shifted
        normal2 = torch.cat([normal, normal])
        weight = normal.float()
        names = ("memory_contrast", "view_contrast", "align", "variance", "usage", "anomaly")
        terms = {k: torch.zeros((), device=is_anomaly.device) for k in names}
        for s, head in heads.items():
            ra, rb = reads_a[s], reads_b[s]
            qa, qb = head(ra.query.mean(dim=(2, 3))), head(rb.query.mean(dim=(2, 3)))
            oa, ob = head(ra.readout.mean(dim=(2, 3))), head(rb.readout.mean(dim=(2, 3)))
            anchors = torch.cat([qa, qb])
            # View a's query against view b's read-out, and b's against a's (normals only):
            terms["memory_contrast"] += nt_xent(anchors, torch.cat([ob, oa]), cfg.temperature,
                                                exclude, normal2)
            if cfg.w_view_contrast:
                terms["view_contrast"] += nt_xent(anchors, torch.cat([qb, qa]),
                                                  cfg.temperature, exclude)
            terms["align"] += alignment(ra, weight) + alignment(rb, weight)
            terms["variance"] += prototype_variance(prototypes[s])
            terms["usage"] += usage_entropy(ra.attention, weight) + usage_entropy(
                rb.attention, weight)
            terms["anomaly"] += anomaly_repulsion(ra, is_anomaly, cfg.anomaly_margin) + \
                anomaly_repulsion(rb, is_anomaly, cfg.anomaly_margin)
        weights = {"memory_contrast": cfg.w_memory_contrast, "view_contrast": cfg.w_view_contrast,
                   "align": cfg.w_align, "variance": cfg.w_variance, "usage": cfg.w_usage,
                   "anomaly": cfg.w_anomaly}
        weighted = {k: v * weights[k] for k, v in terms.items()}
        return LossTerms(total=sum(weighted.values()), terms=weighted)
