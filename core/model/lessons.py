"""Lessons: what marked images teach a fitted detector, passed on to their look-alikes.

A user marks a false alarm "normal" or a missed image with its anomaly type (core/refit.py).
Fitting stage 2 again with ten more images among thousands barely moves its Gaussians, and
what moves is the marked image, not its kind. So a mark is kept instead as a few *keys* in the
space of look-alikes: the descriptor of the marked image and of mild augmentations of it.

The descriptor (`describe`) is a row of unit-norm blocks: at each scale the memory query
pooled over the map and the query at the position the detector finds most deviant, then the
encoder's deepest feature map pooled. Each key compares images on some of the blocks, its
*sight*: a missed defect is known by its strangest spot (the queries); a false alarm by what
the image shows, which the encoder's pooled features say best. Distances in the encoder block
are Mahalanobis distances under the held-out normal references' covariance (Ledoit-Wolf
shrinkage: no setting to tune): a sort of false alarm differs from ordinary normals along
directions in which normals seldom vary, and there a plain distance hears little. On the teach
protocol's runs (pretrained encoder), the other false alarms of a run are nearer the marked ones
than the caught anomalies are with an AUROC of 0.84 / 0.80 (CIFAR-10 airplane / cat), 0.84 /
0.96 (Fashion-MNIST ankle boot / shirt) and 0.99 / 0.97 (shapes circle / square) in the
whitened encoder block, against 0.71 / 0.63, 0.87 / 0.85 and 0.96 / 0.93 in the plain one and
less in the queries (benchmarks/README.md). A rehearsal on held-out normals chooses the sight
of marked normals per refit (`choose_lesson`).

A key speaks for what is nearer to it than the nearest normal reference image is: its
`radius`, measured when the key is made (a marked normal's may reach a little further, a marked
anomaly's stops short, so that it holds none of the normals the references missed, nor, taking
its distances to the references as Gaussian, more than a small tail of all normals). An image
at distance d of a key gets the weight max(0, 1 - (d / radius)^2), the largest over keys of a
kind. A look-alike of a marked normal has its score pulled down towards the typical normal
score by that weight; a look-alike of a marked anomaly has its score raised, by that weight, up
to the alarm score (above every reference normal's) or by the alarm's margin over the typical
normal score, whichever is more: raised to the alarm alone, a high-scoring look-alike gained
little, and a missed image stayed under the far tail of the normals, which a few hundred
references do not see (Fashion-MNIST ankle boot has 91). An image far from every key keeps
its score exactly: a lesson never reaches past its look-alikes, and marked anomalies can only
raise scores, as the labelled head. (Whitened distances concentrate: a ball 1.2 times as wide
as the nearest reference may hold most held-out normals, near its rim, where the weight is
small. Then what a lesson moves is bounded by the rehearsal's costs rather than by its radius;
the teach protocol compares such a lesson with raising the threshold.)

Marked anomalies of one named type (two or more) also teach a *kind*: the direction in which
they differ from the held-out normal references, under the references' Ledoit-Wolf shrunk
covariance (Fisher's discriminant, `fit_kind`). A ball about five marks holds only their near
copies; the direction finds the rest of their type, as far as it reaches. An image whose
projection on it passes the *cut* (beyond every reference the direction was not fitted on, and
beyond their mean + k std: a Gaussian tail of SHARE_EACH) is raised as a marked anomaly's
look-alike is, fully at the *top*: how far the marks project when each is left out of the
direction's fit. When the marks left out do not stand clearly past the cut (MIN_KIND_Z), the
kind does nothing: the marks do not show a direction that generalises. A marked type's balls
and its kind each raise at most half of the MAX_NORMALS_REACHED normals that keep the other
types' AUROC.
On the teach protocol's nine runs, five marks of a type lift its AUROC on its other images by at
least half its distance to 1 for 8 of the 40 types below 1 (mean share 0.27; 4 and 0.17 when
the raise went only to the alarm score), and the other types lose at most 0.0027 (each half
sized to the whole 0.005: 6 types, but four marked types cost the others up to 0.0098;
benchmarks/README.md).

Marked normals (two or more) may be of one *sort*: a darker batch, a turned part, a camera out
of focus. `fit_sort` draws the same direction from them; when the marks, each left out, stand
past the normals, an image past its cut scores up to the sort's *relief* lower: the least any
mark scored above a typical normal, what the sort added to a mark at the least, so that an
anomaly of the sort keeps what its anomaly adds (never under a typical normal's score). A sort
that would let more than MAX_DETECTION_LOSS of the held-out pseudo-anomalies caught through is
not taught: the marks look like an anomaly the run should catch. A run's own false alarms are
seldom of one sort; copies of its test images given one look are (the teach protocol's sorts).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.model.gaussians import ledoit_wolf, squared_distances
from core.model.memory import MemoryRead

ENCODER = "encoder"  # the block of the encoder's deepest features, last in a descriptor
# What a key may compare images on: the blocks of each sight
SIGHTS = ("encoder", "queries", "both")
ANOMALY_SIGHT = "queries"  # a missed defect is known by its strangest spot
SHRINKS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # a marked anomaly's reach, in radii
# The share of normals a marked type's lessons may raise: raising a normal's score moves each
# other type's AUROC down by up to that normal's share of the normals. Its marks' balls and its
# kind each get half: both raise, and what either reaches counts.
MAX_NORMALS_REACHED = 0.005
SHARE_EACH = MAX_NORMALS_REACHED / 2
CONFIDENCE = 0.9  # ... held to this surely, however few normal references there were
MIN_KIND_MARKS = 2  # marked images of a type that teach its kind: one cannot be left out
# ... and how far past the cut (in the references' spreads) each, left out of the direction,
# must still project: the cut is itself a guess from a hundred or so normals, and a kind just
# past it would raise every normal past it fully
MIN_KIND_Z = 1.0
# ... and for a sort of marked normals, twice as far: a sort lowers scores, which costs
# anomalies no one sees, and it keeps its marks' balls to their nearest normal (core/refit.py
# `marked_reach`). A run's own false alarms, not of one sort, stood up to 1.8 spreads past the
# cut by chance on the teach protocol's runs; copies of its test images given one look, 2.4 to
# 40 (benchmarks/README.md)
MIN_SORT_Z = 2.0


def descriptor_blocks(scales: tuple[str, ...], memory_dim: int, encoder_dim: int
                      ) -> dict[str, int]:
    """The blocks of a descriptor, in order, and their lengths."""
    return {**{f"{s}/{part}": memory_dim for s in scales for part in ("pooled", "peak")},
            ENCODER: encoder_dim}


def in_sight(names: tuple[str, ...], sight: str) -> torch.Tensor:
    """(len(names),) bool: the blocks a key of `sight` compares images on."""
    if sight not in SIGHTS:
        raise ValueError(f"sight {sight!r}: expected one of {', '.join(SIGHTS)}")
    return torch.tensor([sight == "both" or (name == ENCODER) == (sight == "encoder")
                         for name in names])


def key_sights(names: tuple[str, ...], anomalous: torch.Tensor, sight: str,
               anomaly_sight: str = ANOMALY_SIGHT) -> torch.Tensor:
    """(K, len(names)) bool: marked normals see `sight`, marked anomalies `anomaly_sight`."""
    return torch.where(anomalous[:, None], in_sight(names, anomaly_sight),
                       in_sight(names, sight))


def describe(reads: dict[str, MemoryRead], maps: dict[str, torch.Tensor],
             encoded: torch.Tensor) -> torch.Tensor:
    """(B, dim) descriptors, unit-norm blocks in the order of `descriptor_blocks`: per scale,
    the pooled query and the query at the position of the highest distance in `maps`
    ({scale: (B, h, w)}); then the encoder's deepest map `encoded` (B, C, h, w) pooled."""
    parts = []
    for s, read in reads.items():
        q = read.query.flatten(2)  # (B, D, h*w)
        peak = maps[s].flatten(1).argmax(1)  # (B,)
        at_peak = q.gather(2, peak[:, None, None].expand(-1, q.shape[1], 1))[:, :, 0]
        parts += [q.mean(2), at_peak]
    parts.append(encoded.flatten(2).mean(2))
    return torch.cat([F.normalize(p.float(), dim=1) for p in parts], dim=1)


class Lessons(nn.Module):
    """Keys of marked images and what they do to their look-alikes' scores; all buffers."""

    def __init__(self, n_keys: int, blocks: dict[str, int], n_kinds: int = 0) -> None:
        super().__init__()
        self.names, self.sizes = tuple(blocks), tuple(blocks.values())
        dim = sum(self.sizes)
        self.register_buffer("keys", torch.zeros(n_keys, dim))
        # the encoder block's metric: distances there are |(x - y) @ whiten|
        self.register_buffer("whiten", torch.eye(blocks.get(ENCODER, 0)))
        self.register_buffer("sight", torch.zeros(n_keys, len(self.sizes), dtype=torch.bool))
        self.register_buffer("radius", torch.zeros(n_keys))  # 0: the key reaches nothing
        self.register_buffer("anomalous", torch.zeros(n_keys, dtype=torch.bool))
        self.register_buffer("normal_score", torch.zeros(()))  # a typical normal's score
        self.register_buffer("alarm_score", torch.zeros(()))  # above every reference normal
        # kinds of marked anomalies (`fit_kind`): projections (x - centre) . direction, raised
        # from 0 at the cut to fully at the top
        self.register_buffer("kind_centre", torch.zeros(n_kinds, dim))
        self.register_buffer("kind_direction", torch.zeros(n_kinds, dim))
        self.register_buffer("kind_cut", torch.zeros(n_kinds))
        self.register_buffer("kind_top", torch.zeros(n_kinds))  # at the cut: the kind is inert
        # > 0: a sort of marked normals (`fit_sort`), which lowers scores by up to that much
        self.register_buffer("kind_relief", torch.zeros(n_kinds))
        # marked anomalies' radii, as a share of the distance to the nearest reference, when
        # taught (a record for the refit's summary: the radii hold it)
        self.register_buffer("shrink", torch.ones(()), persistent=False)

    def _shrink(self, sq: torch.Tensor, seed: int = 0) -> float:
        """How much of the distance to the nearest reference a marked anomaly may reach: the
        nearest of a few hundred references is further than the nearest of all normals (on
        Fashion-MNIST shirt 8 to 10 % of the test normals fell inside such balls). Sized on a
        random two thirds of the references, the largest of SHRINKS that reaches at most
        SHARE_EACH of the other third. `sq`: (R, K) squared distances of the references to
        the keys."""
        order = torch.randperm(len(sq), generator=torch.Generator().manual_seed(seed))
        cut = len(sq) * 2 // 3
        if cut == len(sq) or not bool(self.anomalous.any()):
            return 1.0
        sq = sq[:, self.anomalous]
        nearest = sq[order[:cut]].amin(0).sqrt()  # (A,)
        d = sq[order[cut:]].sqrt()  # (H, A)
        for shrink in SHRINKS:
            if float((d < nearest * shrink).any(1).float().mean()) <= SHARE_EACH:
                return shrink
        return SHRINKS[-1]

    def _cap(self, sq: torch.Tensor) -> torch.Tensor:
        """(K,) radii within which the marked anomalies' keys together hold at most SHARE_EACH
        of all normals, with CONFIDENCE: each key's distances to the references (`sq`, (R, K)
        squared) taken as Gaussian, mean - k std, k the `tolerance_factor` for the references'
        number and the key's share of SHARE_EACH. A few hundred references, let alone the few
        dozen of a small data set, cannot show that a ball holds back 99.75 % of normals by
        holding them all back: on Fashion-MNIST shirt, balls that held none of 91 references
        reached 2.5 to 3.3 % of the test normals. (A mark's views are near copies that could
        share one part; counting each apart helped as many types and is the safer.)"""
        if len(sq) < 2:
            return torch.full((sq.shape[1],), math.inf)
        d = sq.sqrt()
        k = tolerance_factor(len(d), 1 - SHARE_EACH / max(1, int(self.anomalous.sum())))
        return (d.mean(0) - k * d.std(0)).clamp_min(0)

    def reaches(self, references: torch.Tensor) -> torch.Tensor:
        """(K,) each key's radius in units of its distance to the nearest of `references`
        (R, dim): the reach a marked normal was taught with, when these are the references it
        was taught on."""
        nearest = self.distances(references).amin(0).sqrt()
        return self.radius / nearest.clamp_min(1e-12)

    def distances(self, descriptors: torch.Tensor) -> torch.Tensor:
        """(B, K) squared distances of descriptors (B, dim) to the keys, each the mean over
        the blocks in the key's sight (the encoder block's under its metric, `whiten`)."""
        parts = list(descriptors.float().split(self.sizes, dim=1))
        keys = list(self.keys.split(self.sizes, dim=1))
        if ENCODER in self.names:
            e = self.names.index(ENCODER)
            parts[e], keys[e] = parts[e] @ self.whiten, keys[e] @ self.whiten
        sq = torch.stack([squared_distances(p, k) for p, k in zip(parts, keys, strict=True)],
                         dim=2)  # (B, K, blocks)
        sight = self.sight.float()
        return (sq * sight).sum(2) / sight.sum(1).clamp_min(1)

    def reach(self, descriptors: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,) weights in [0, 1] of the nearest marked normal and of the nearest marked
        anomaly (1 - (d / radius)^2 at distance d of a key, 0 at its radius and beyond; or a
        kind's weight), and (B,) how much sorts of marked normals lower each score."""
        sq = self.distances(descriptors)
        live = (self.radius > 0) & self.sight.any(1)  # a key that sees nothing reaches nothing
        w = (1 - sq / self.radius.pow(2).clamp_min(1e-12)).clamp_min(0) * live
        zero = torch.zeros_like(w)
        normal = torch.where(self.anomalous, zero, w).amax(1)
        anomaly = torch.where(self.anomalous, w, zero).amax(1)
        if not len(self.kind_cut):
            return normal, anomaly, torch.zeros_like(normal)
        kinds = self.kinds.weights(descriptors)  # (B, T)
        raises = (kinds * (self.kind_relief <= 0)).amax(1)
        return normal, torch.maximum(anomaly, raises), (kinds * self.kind_relief).amax(1)

    @property
    def kinds(self) -> Kinds:
        """The kinds of marked anomalies these lessons hold (`fit_kind`)."""
        return Kinds(*(getattr(self, f"kind_{name}") for name in Kinds._fields))

    def kind_weight(self, descriptors: torch.Tensor) -> torch.Tensor:
        """(B,) weights in [0, 1] of the kinds of marked anomalies, the largest over kinds: 0
        up to a kind's cut, 1 from its top."""
        if not len(self.kind_cut):
            return torch.zeros_like(descriptors[:, 0])  # (an exported graph keeps B dynamic)
        return (self.kinds.weights(descriptors) * (self.kind_relief <= 0)).amax(1)

    def forward(self, score: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
        """Image scores (B,) after the lessons, given the images' descriptors (B, dim)."""
        return self.relieve(score, *self.reach(descriptors))

    def relieve(self, score: torch.Tensor, normal: torch.Tensor, anomaly: torch.Tensor,
                lowered: torch.Tensor | None = None) -> torch.Tensor:
        """Image scores (B,) moved by the weights (B,) of their nearest marked normal and
        marked anomaly, and lowered by a sort of marked normals (`reach`): lowered by the
        larger of the two reliefs, never under the typical normal score; raised, at full
        weight, to the alarm score or by its margin over the typical score, whichever is
        more."""
        score = relieved(score, self.normal_score, normal,
                         torch.zeros_like(score) if lowered is None else lowered)
        margin = self.alarm_score - self.normal_score
        return score + anomaly * torch.maximum(self.alarm_score - score, margin).clamp_min(0)

    @torch.no_grad()
    def teach(self, keys: torch.Tensor, anomalous: torch.Tensor, references: torch.Tensor,
              reference_scores: torch.Tensor, reach: float | torch.Tensor = 1.0, *,
              sights: torch.Tensor, whiten: torch.Tensor | None = None,
              kinds: Kinds | None = None) -> None:
        """Set the keys (K, dim) and their kinds (K,) bool, with the radii measured against the
        descriptors of normal reference images (R, dim) and the scores they get (R,). A marked
        normal reaches `reach` times its distance to the nearest reference (see
        `choose_lesson`; one for all keys or (K,), one each), a marked anomaly a share of
        that distance (`_shrink`), and no further than most normals are (`_cap`); each key
        compares images on the blocks of its row of `sights` (K, blocks), see `key_sights`;
        the encoder block's metric is `whiten`, by default the references'
        (`encoder_whitening`); `kinds`, those of marked anomaly types (`fit_kind`) and sorts
        of marked normals (`fit_sort`), as many as the lessons hold."""
        if len(keys) != len(self.keys):
            raise ValueError(f"expected {len(self.keys)} keys, got {len(keys)}")
        self.keys.copy_(keys)
        if whiten is None:
            whiten = encoder_whitening(dict(zip(self.names, self.sizes, strict=True)), references)
        self.whiten.copy_(whiten)
        self.anomalous.copy_(anomalous)
        self.sight.copy_(sights)
        sq = self.distances(references)  # (R, K), each key in its own sight
        nearest = sq.amin(0).sqrt()
        self.shrink.fill_(self._shrink(sq))
        self.radius.copy_(torch.where(
            anomalous, torch.minimum(nearest * self.shrink, self._cap(sq)),
            nearest * reach))
        s = reference_scores.float()
        self.normal_score.copy_(s.median())
        self.alarm_score.copy_(s.max() + s.std())
        kinds = Kinds.none(keys.shape[1]) if kinds is None else kinds
        if len(kinds.cut) != len(self.kind_cut):
            raise ValueError(f"expected {len(self.kind_cut)} kinds, got {len(kinds.cut)}")
        for held, value in zip(self.kinds, kinds, strict=True):
            held.copy_(value)


def relieved(score: torch.Tensor, typical: torch.Tensor | float, normal: torch.Tensor,
             lowered: torch.Tensor) -> torch.Tensor:
    """Scores (B,) lowered by the larger of two reliefs, never under the `typical` normal
    score: a marked normal's, its weight `normal` (B,) times the excess over `typical`, and a
    sort's, up to `lowered` (B,)."""
    excess = (score - typical).clamp_min(0)
    return score - torch.maximum(normal * excess, torch.minimum(lowered, excess))


@torch.no_grad()
def whitening(encoded: torch.Tensor) -> torch.Tensor:
    """(E, E) metric W of normal images' encoder blocks `encoded` (R, E): |(x - y) @ W| is the
    Mahalanobis distance under their Ledoit-Wolf shrunk covariance (the shrinkage is estimated
    from the data: nothing to tune), scaled so that the images spread about their mean as
    much as in the plain metric (blocks stay comparable when a key sees several). Images that
    do not vary give the plain metric."""
    x = encoded.detach().cpu().double()
    x = x - x.mean(0)
    spread = float(x.pow(2).sum(1).mean())
    if spread <= 1e-12:
        return torch.eye(x.shape[1])
    w = torch.linalg.cholesky(ledoit_wolf(x[None])[1][0])  # w @ w.T: the precision
    return (w * math.sqrt(spread / float((x @ w).pow(2).sum(1).mean()))).float()


def encoder_whitening(blocks: dict[str, int], references: torch.Tensor) -> torch.Tensor:
    """The encoder block's metric (a `Lessons`' `whiten`) for normal references' descriptors
    (R, dim) of `blocks`: see `whitening`; the plain metric when there is no encoder block or a
    single reference."""
    if ENCODER not in blocks or len(references) < 2:
        return torch.eye(blocks.get(ENCODER, 0))
    return whitening(references.split(list(blocks.values()), dim=1)[list(blocks).index(ENCODER)])


class Kinds(NamedTuple):
    """Kinds of marked anomalies (`fit_kind`) and sorts of marked normals (`fit_sort`), T
    rows: where each projects images from (T, dim), along what (T, dim), the projections (T,)
    where its weight starts and is full, and (T,) how much a sort lowers scores (0: a kind of
    anomalies, which raises them)."""

    centre: torch.Tensor
    direction: torch.Tensor
    cut: torch.Tensor
    top: torch.Tensor
    relief: torch.Tensor

    @staticmethod
    def none(dim: int) -> Kinds:
        return Kinds(torch.zeros(0, dim), torch.zeros(0, dim), torch.zeros(0), torch.zeros(0),
                     torch.zeros(0))

    def weights(self, descriptors: torch.Tensor) -> torch.Tensor:
        """(B, T) weights in [0, 1] of each row for descriptors (B, dim): 0 up to its cut, 1
        from its top; 0 everywhere for an inert row (top = cut)."""
        x = descriptors.float()
        # (x - centre) . direction, without a (B, T, dim) difference
        p = x @ self.direction.T - (self.centre * self.direction).sum(1)
        span = self.top - self.cut
        return ((p - self.cut) / span.clamp_min(1e-12)).clamp(0, 1) * (span > 0)

    @staticmethod
    def cat(parts: list[Kinds], dim: int) -> Kinds:
        if not parts:
            return Kinds.none(dim)
        return Kinds(*(torch.cat([getattr(k, f).float().cpu() for k in parts])
                       for f in Kinds._fields))


def tolerance_factor(n: int, share: float = 1 - SHARE_EACH, confidence: float = CONFIDENCE
                     ) -> float:
    """k such that the mean + k std of n normal samples is above `share` of the population
    with probability `confidence`: the one-sided normal tolerance factor (Natrella's
    approximation). Larger than the quantile for few samples (3.4 for 30, against 2.8)."""
    zp, zg = NormalDist().inv_cdf(share), NormalDist().inv_cdf(confidence)
    a = 1 - zg ** 2 / (2 * (n - 1))
    b = zp ** 2 - zg ** 2 / n
    return (zp + math.sqrt(max(zp ** 2 - a * b, 0.0))) / max(a, 1e-6)


@torch.no_grad()
def fit_kind(marks: torch.Tensor, references: torch.Tensor, seed: int = 0
             ) -> tuple[Kinds, dict]:
    """The kind of M marked anomalies of one type, given their descriptors (M, V, dim) (each
    mark and V - 1 views of it) and the held-out normal references' (R, dim): one row of
    `Kinds` and a summary of the evidence.

    Fisher's direction: the references' Ledoit-Wolf precision (fitted on a seeded two thirds
    of them) times the marks' mean less the references'. The cut is where the other third
    ends: beyond the largest of them and their mean + k std, k the `tolerance_factor` for
    their number (a Gaussian tail holding SHARE_EACH of the normals, surely enough for so
    few), so that the direction raises as few normals as the marks' balls may. The top is how
    far past the cut the marks project when each is left out of the direction (the median, in
    the other third's std): what an image of the type that was not marked may be expected to
    reach. When that is less than MIN_KIND_Z past the cut, or with fewer than MIN_KIND_MARKS
    marks, the kind is inert (top = cut)."""
    n, dim = marks.shape[0], marks.shape[-1]
    x = references.detach().cpu().double()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    fit, held = x[order[:len(x) * 2 // 3]], x[order[len(x) * 2 // 3:]]
    inert = Kinds(torch.zeros(1, dim), torch.zeros(1, dim), torch.zeros(1), torch.zeros(1),
                  torch.zeros(1))
    if n < MIN_KIND_MARKS or len(fit) < 2 or len(held) < 2:
        return inert, {"marks": n, "left_out_z": None, "generalises": False}
    means, precision = ledoit_wolf(fit[None])
    centre, precision = means[0], precision[0]
    marked = marks.detach().cpu().double().mean(1)  # (M, dim): each mark over its views

    def direction(rows: torch.Tensor) -> torch.Tensor:
        d = precision @ (rows.mean(0) - centre)
        return d / d.norm().clamp_min(1e-12)

    def cut_of(d: torch.Tensor) -> tuple[float, float]:
        h = (held - centre) @ d
        spread = float(h.std()) or 1e-12
        return max(float(h.max()), float(h.mean()) + tolerance_factor(len(h)) * spread), spread

    d = direction(marked)
    cut, spread = cut_of(d)
    left_out = []
    for i in range(n):
        di = direction(marked[torch.arange(n) != i])
        ci, si = cut_of(di)
        left_out.append((float((marked[i] - centre) @ di) - ci) / si)
    z = float(torch.tensor(left_out).quantile(0.5))
    top = cut + z * spread if z >= MIN_KIND_Z else cut
    kind = Kinds(centre[None].float(), d[None].float(), torch.tensor([cut]).float(),
                 torch.tensor([top]).float(), torch.zeros(1))
    return kind, {"marks": n, "left_out_z": z, "generalises": z >= MIN_KIND_Z}


@torch.no_grad()
def fit_sort(marks: torch.Tensor, mark_scores: torch.Tensor, references: torch.Tensor,
             reference_scores: torch.Tensor, pseudo: torch.Tensor, pseudo_scores: torch.Tensor,
             threshold: float, seed: int = 0) -> tuple[Kinds, dict]:
    """The sort of M marked normals (a darker batch, a turned part, a blurred camera), given
    their descriptors (M, V, dim) and scores (M,), and the held-out normal references'
    descriptors (R, dim) and scores (R,): one row of `Kinds` and a summary of the evidence.

    The direction, cut and top are `fit_kind`'s: marks that, left out one at a time, do not
    stand MIN_SORT_Z spreads past the normals in the direction the others draw are not of one
    sort (false alarms of a run's own test set seldom are: benchmarks/README.md) and teach
    nothing beyond their look-alikes. A sort lowers the score of an image past its cut by up
    to its *relief*: the least any mark scored above a typical normal (the references'
    median), which is what the sort added to a mark at the least, so an image of the sort that
    is also anomalous keeps what its anomaly adds; never under a typical normal's score. A
    sort that would cost the pseudo-anomalies made from the references (descriptors `pseudo`,
    scores `pseudo_scores`) more than MAX_AUROC_LOSS of their AUROC against the references,
    or MAX_DETECTION_LOSS of those above `threshold`, is not taught: the marks then look like
    an anomaly the run should catch."""
    from sklearn.metrics import roc_auc_score

    kind, evidence = fit_kind(marks, references, seed)
    z = evidence["left_out_z"]
    evidence["generalises"] = z is not None and z >= MIN_SORT_Z
    typical = reference_scores.float().median()
    relief = float((mark_scores.float() - typical).min().clamp_min(0))
    evidence = {**evidence, "relief": relief, "auroc_loss": None, "detection_loss": None,
                "taught": False}
    if not evidence["generalises"] or relief <= 0 or not len(pseudo):
        return kind._replace(top=kind.cut.clone()), evidence
    kind = kind._replace(relief=torch.tensor([relief]))

    def lowered(scores: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
        return relieved(scores.float(), typical, torch.zeros(len(scores)),
                        kind.weights(descriptors)[:, 0] * relief)

    y = torch.cat([torch.zeros(len(references)), torch.ones(len(pseudo))]).numpy()
    before = torch.cat([reference_scores, pseudo_scores]).float()
    after = torch.cat([lowered(reference_scores, references), lowered(pseudo_scores, pseudo)])
    auroc_loss = float(roc_auc_score(y, before.numpy()) - roc_auc_score(y, after.numpy()))
    caught = pseudo_scores > threshold
    lost = caught & (after[len(references):] <= threshold)
    detection_loss = float(lost.float().sum() / caught.float().sum().clamp_min(1))
    taught = auroc_loss <= MAX_AUROC_LOSS and detection_loss <= MAX_DETECTION_LOSS
    evidence.update(auroc_loss=auroc_loss, detection_loss=detection_loss, taught=taught)
    return (kind if taught else kind._replace(top=kind.cut.clone())), evidence


def upgrade_lessons(state: dict[str, torch.Tensor], prefix: str, names: tuple[str, ...],
                    sizes: tuple[int, ...]) -> None:
    """In place: lessons saved by earlier versions in today's layout. Keys of the first
    layout (query blocks only, the whole row of unit norm, no sight) get each block unit norm
    and the encoder block empty and out of sight; lessons saved before the encoder block was
    whitened get the plain metric they were taught with, and lessons saved before kinds none."""
    keys = state.get(prefix + "keys")
    if keys is None:
        return
    if prefix + "sight" not in state and keys.shape[1] == sum(sizes[:-1]):
        n = len(sizes) - 1
        state[prefix + "keys"] = torch.cat([keys * math.sqrt(n),
                                            keys.new_zeros(len(keys), sizes[-1])], 1)
        state[prefix + "sight"] = in_sight(names, "queries").expand(len(keys), -1).clone()
    if prefix + "whiten" not in state and ENCODER in names:
        state[prefix + "whiten"] = torch.eye(sizes[names.index(ENCODER)])
    if prefix + "kind_cut" not in state:  # saved before marked types taught kinds: none
        for name, value in Kinds.none(sum(sizes))._asdict().items():
            state[f"{prefix}kind_{name}"] = value
    if prefix + "kind_relief" not in state:  # saved before sorts: every kind raises
        state[prefix + "kind_relief"] = torch.zeros_like(state[prefix + "kind_cut"])


REACHES = (1.0, 1.1, 1.2, 1.3, 1.5, 2.0)  # how far a marked normal's lesson may reach, in radii
MAX_AUROC_LOSS = 0.005  # ... at the cost of at most this much pseudo-anomaly AUROC
# ... and of at most this share of the pseudo-anomalies above the threshold brought below it.
# AUROC alone missed what a wide reach does: it lowers every score a little, which keeps their
# order but lets anomalies slip under the threshold (benchmarks/README.md, teach protocol)
MAX_DETECTION_LOSS = 0.01
SIMULATED_MARKS = 10
DEFAULT_LESSON = ("encoder", 1.0)  # (sight, reach) when there is too little to rehearse on


@torch.no_grad()
def choose_lesson(blocks: dict[str, int], references: torch.Tensor, scores: torch.Tensor,
                  pseudo: torch.Tensor, pseudo_scores: torch.Tensor, threshold: float,
                  seed: int = 0) -> tuple[str, float, dict]:
    """What marked normals' lessons see and how far they reach, chosen by rehearsing a lesson
    on held-out data.

    The held-out normal references (descriptors (R, dim), scores (R,)) that score above the
    threshold are false alarms the user never saw. Half of them (ten at most) are marked, as a
    user would mark false alarms. A lesson should clear the other false alarms and touch
    little else: each sight of SIGHTS and reach of REACHES is scored by the share of the other
    held-out false alarms it brings under the threshold (ties: the share of them it reaches
    minus the share of the ordinary held-out normals it reaches), and may cost at most
    MAX_AUROC_LOSS of the AUROC of pseudo-anomalies made from the references (descriptors
    `pseudo`, scores `pseudo_scores`) against the unmarked references, and at most
    MAX_DETECTION_LOSS of the pseudo-anomalies above the threshold. The best is kept (the
    first of equals, in the order of SIGHTS and REACHES); with fewer than four held-out false
    alarms, or none within the costs, DEFAULT_LESSON. Returns the sight, the reach and the
    evidence, for metrics.json.
    """
    from sklearn.metrics import roc_auc_score

    alarms = torch.nonzero(scores > threshold).flatten()
    evidence: dict = {"held_out_alarms": len(alarms), "tried": {}}
    sight, reach = DEFAULT_LESSON
    if len(alarms) < 4:
        evidence["chosen"] = {"sight": sight, "reach": reach}
        return sight, reach, evidence
    g = torch.Generator().manual_seed(seed)
    picked = alarms[torch.randperm(len(alarms), generator=g)]
    k = min(SIMULATED_MARKS, len(alarms) // 2)
    marked, others = picked[:k], picked[k:]
    unmarked = torch.ones(len(references), dtype=torch.bool)
    unmarked[marked] = False
    ordinary = scores <= threshold
    y = torch.cat([torch.zeros(int(unmarked.sum())), torch.ones(len(pseudo))]).numpy()
    auroc_before = float(roc_auc_score(y, torch.cat([scores[unmarked], pseudo_scores]).numpy()))
    caught = pseudo_scores > threshold
    whiten = encoder_whitening(blocks, references)  # the refit's metric, fitted once
    best: tuple[float, float] | None = None
    for candidate in SIGHTS:
        for r in REACHES:
            lessons = Lessons(k, blocks)
            normal = torch.zeros(k, dtype=torch.bool)
            lessons.teach(references[marked], normal, references[unmarked], scores[unmarked], r,
                          sights=key_sights(lessons.names, normal, candidate), whiten=whiten)
            # each image's distances once: the references' and the pseudo-anomalies' weights
            on_references, on_pseudo = lessons.reach(references), lessons.reach(pseudo)
            taught = lessons.relieve(scores, *on_references)
            taught_pseudo = lessons.relieve(pseudo_scores, *on_pseudo)
            loss = auroc_before - float(roc_auc_score(
                y, torch.cat([taught[unmarked], taught_pseudo]).numpy()))
            still = taught_pseudo > threshold
            missed = float((caught & ~still).float().sum() / caught.float().sum().clamp_min(1))
            reached = on_references[0] > 0
            cleared = float((taught[others] <= threshold).float().mean())
            alarms_reached = float(reached[others].float().mean())
            ordinary_reached = float(reached[ordinary].float().mean())
            contrast = alarms_reached - ordinary_reached
            evidence["tried"][f"{candidate} x{r:g}"] = {
                "sight": candidate, "reach": r, "cleared": cleared,
                "alarms_reached": alarms_reached, "ordinary_reached": ordinary_reached,
                "auroc_loss": loss, "detection_loss": missed}
            if loss > MAX_AUROC_LOSS or missed > MAX_DETECTION_LOSS:
                continue
            if best is None or _better((cleared, contrast), best):
                best, sight, reach = (cleared, contrast), candidate, r
    evidence["chosen"] = {"sight": sight, "reach": reach}
    return sight, reach, evidence


def _better(a: tuple[float, float], b: tuple[float, float], tol: float = 1e-9) -> bool:
    """Whether (cleared, contrast) `a` beats `b`: more cleared, or as many and more contrast."""
    if abs(a[0] - b[0]) > tol:
        return a[0] > b[0]
    return a[1] > b[1] + tol
