"""Lessons: what marked images teach a fitted detector, passed on to their look-alikes.

A user marks a false alarm "normal" or a missed image with its anomaly type (core/refit.py).
Fitting stage 2 again with ten more images among thousands barely moves its Gaussians, and
what moves is the marked image, not its kind. So a mark is kept instead as a few *keys* in the
space of look-alikes: the descriptor of the marked image and of mild augmentations of it.

The descriptor (`describe`) is what an image shows and what its strangest spot shows: at each
scale the memory query pooled over the map, and the query at the position the detector finds
most deviant, each of unit norm. Two photos of the same sort of false alarm (a reflection, a
darker batch) are near in the first; two scratches are near in the second.

A key speaks for what is nearer to it than the nearest normal reference image is: its `radius`,
measured when the key is made. An image at distance d of a key gets the weight
max(0, 1 - (d / radius)^2), the largest over keys of a kind. A look-alike of a marked normal has its
score pulled down towards the typical normal score by that weight; a look-alike of a marked
anomaly has its score raised towards the alarm score (above every reference normal's). An
image far from every key keeps its score exactly: a lesson never reaches past its look-alikes,
and marked anomalies can only raise scores, as the labelled head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.model.gaussians import squared_distances
from core.model.memory import MemoryRead


def describe(reads: dict[str, MemoryRead], maps: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 2 * S * D) unit descriptors: per scale, the pooled query and the query at the
    position of the highest distance in `maps` ({scale: (B, h, w)})."""
    parts = []
    for s, read in reads.items():
        q = read.query.flatten(2)  # (B, D, h*w)
        peak = maps[s].flatten(1).argmax(1)  # (B,)
        at_peak = q.gather(2, peak[:, None, None].expand(-1, q.shape[1], 1))[:, :, 0]
        parts += [F.normalize(q.mean(2), dim=1), F.normalize(at_peak, dim=1)]
    return torch.cat(parts, dim=1) / len(parts) ** 0.5


class Lessons(nn.Module):
    """Keys of marked images and what they do to their look-alikes' scores; all buffers."""

    def __init__(self, n_keys: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", torch.zeros(n_keys, dim))
        self.register_buffer("radius", torch.zeros(n_keys))  # 0: the key reaches nothing
        self.register_buffer("anomalous", torch.zeros(n_keys, dtype=torch.bool))
        self.register_buffer("normal_score", torch.zeros(()))  # a typical normal's score
        self.register_buffer("alarm_score", torch.zeros(()))  # above every reference normal

    def reach(self, descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) weights in [0, 1] of the nearest marked normal and of the nearest marked
        anomaly: 1 - (d / radius)^2 at distance d of a key, 0 at its radius and beyond."""
        sq = squared_distances(descriptors.float(), self.keys)  # (B, K)
        w = (1 - sq / self.radius.pow(2).clamp_min(1e-12)).clamp_min(0) * (self.radius > 0)
        zero = torch.zeros_like(w)
        normal = torch.where(self.anomalous, zero, w).amax(1)
        anomaly = torch.where(self.anomalous, w, zero).amax(1)
        return normal, anomaly

    def forward(self, score: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
        """Image scores (B,) after the lessons, given the images' descriptors (B, dim)."""
        normal, anomaly = self.reach(descriptors)
        score = score - normal * (score - self.normal_score).clamp_min(0)
        return score + anomaly * (self.alarm_score - score).clamp_min(0)

    @torch.no_grad()
    def teach(self, keys: torch.Tensor, anomalous: torch.Tensor, references: torch.Tensor,
              reference_scores: torch.Tensor, reach: float = 1.0) -> None:
        """Set the keys (K, dim) and their kinds (K,) bool, with the radii measured against the
        descriptors of normal reference images (R, dim) and the scores they get (R,). A marked
        normal's radius is `reach` times its distance to the nearest reference (see
        `choose_reach`); a marked anomaly's never reaches past that nearest normal."""
        if len(keys) != len(self.keys):
            raise ValueError(f"expected {len(self.keys)} keys, got {len(keys)}")
        self.keys.copy_(keys)
        self.anomalous.copy_(anomalous)
        nearest = squared_distances(keys.float(), references.float()).amin(1).sqrt()
        self.radius.copy_(torch.where(anomalous, nearest, nearest * reach))
        s = reference_scores.float()
        self.normal_score.copy_(s.median())
        self.alarm_score.copy_(s.max() + s.std())


REACHES = (1.0, 1.1, 1.2, 1.3, 1.5, 2.0)  # how far a marked normal's lesson may reach, in radii
MAX_AUROC_LOSS = 0.005  # ... at the cost of at most this much pseudo-anomaly AUROC
# ... and of at most this share of the pseudo-anomalies above the threshold brought below it.
# AUROC alone missed what a wide reach does: it lowers every score a little, which keeps their
# order but lets anomalies slip under the threshold (benchmarks/README.md, teach protocol)
MAX_DETECTION_LOSS = 0.01
SIMULATED_MARKS = 10


@torch.no_grad()
def choose_reach(references: torch.Tensor, scores: torch.Tensor, pseudo: torch.Tensor,
                 pseudo_scores: torch.Tensor, threshold: float, seed: int = 0
                 ) -> tuple[float, dict]:
    """How far marked normals' lessons reach, chosen by rehearsing a lesson on held-out data.

    The held-out normal references (descriptors (R, dim), scores (R,)) that score above the
    threshold are false alarms the user never saw. Half of them (ten at most) are marked, as a
    user would mark false alarms. A lesson should reach the false alarms of the same sort and
    little else: each reach of REACHES is scored by the share of the other held-out false
    alarms it reaches minus the share of the ordinary held-out normals (those below the
    threshold) it reaches, and may cost at most MAX_AUROC_LOSS of the AUROC of pseudo-anomalies
    made from the references (descriptors `pseudo`, scores `pseudo_scores`) against the unmarked
    references, and at most MAX_DETECTION_LOSS of the pseudo-anomalies above the threshold. The
    best reach is kept (the shortest of equals); with fewer than four held-out false alarms, or
    none within the costs, 1. Returns the reach and the evidence, for metrics.json.
    """
    from sklearn.metrics import roc_auc_score

    alarms = torch.nonzero(scores > threshold).flatten()
    evidence: dict = {"held_out_alarms": len(alarms), "reaches": {}}
    if len(alarms) < 4:
        evidence["chosen"] = 1.0
        return 1.0, evidence
    g = torch.Generator().manual_seed(seed)
    picked = alarms[torch.randperm(len(alarms), generator=g)]
    k = min(SIMULATED_MARKS, len(alarms) // 2)
    marked, others = picked[:k], picked[k:]
    unmarked = torch.ones(len(references), dtype=torch.bool)
    unmarked[marked] = False
    ordinary = scores <= threshold
    y = torch.cat([torch.zeros(int(unmarked.sum())), torch.ones(len(pseudo))]).numpy()
    x = torch.cat([references[unmarked], pseudo])
    before = torch.cat([scores[unmarked], pseudo_scores])
    auroc_before = float(roc_auc_score(y, before.numpy()))
    caught = pseudo_scores > threshold
    best, best_gain = 1.0, -2.0
    for reach in REACHES:
        lessons = Lessons(k, references.shape[1])
        lessons.teach(references[marked], torch.zeros(k, dtype=torch.bool),
                      references[unmarked], scores[unmarked], reach)
        loss = auroc_before - float(roc_auc_score(y, lessons(before, x).numpy()))
        still = lessons(pseudo_scores, pseudo) > threshold
        missed = float((caught & ~still).float().sum() / caught.float().sum().clamp_min(1))
        reached = lessons.reach(references)[0] > 0
        gain = float(reached[others].float().mean() - reached[ordinary].float().mean())
        evidence["reaches"][str(reach)] = {
            "alarms_reached": float(reached[others].float().mean()),
            "ordinary_reached": float(reached[ordinary].float().mean()),
            "cleared": float((lessons(scores[others], references[others]) <= threshold)
                             .float().mean()),
            "auroc_loss": loss, "detection_loss": missed}
        if loss <= MAX_AUROC_LOSS and missed <= MAX_DETECTION_LOSS and gain > best_gain + 1e-9:
            best, best_gain = reach, gain
    evidence["chosen"] = best
    return best, evidence
