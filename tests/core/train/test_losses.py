"""core/train/losses.py: each term against a plain reference and its invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.config import TrainConfig
from core.model.anomem import ProjectionHead
from core.model.memory import HopfieldMemory, MemoryRead
from core.train.losses import (
    LossTerms,
    MemoryContrastLoss,
    alignment,
    anomaly_repulsion,
    nt_xent,
    prototype_variance,
    two_view_exclusion,
    usage_entropy,
)

TERMS = {"memory_contrast", "view_contrast", "align", "variance", "usage", "anomaly"}


def value(t: torch.Tensor) -> float:
    return float(t.detach())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def reference_simclr(za: torch.Tensor, zb: torch.Tensor, t: float) -> list[float]:
    """SimCLR's NT-Xent per anchor: z = [za; zb], positive of i at i +- B, self excluded."""
    z = torch.cat([za, zb]).double()
    n, b = len(z), len(za)
    losses = []
    for i in range(n):
        pos = i + b if i < b else i - b
        denominator = sum(math.exp(cosine(z[i], z[k]) / t) for k in range(n) if k != i)
        losses.append(-math.log(math.exp(cosine(z[i], z[pos]) / t) / denominator))
    return losses


def reference_info_nce(anchors: torch.Tensor, candidates: torch.Tensor, t: float,
                       excluded: set[tuple[int, int]]) -> list[float]:
    """Per anchor i: candidate i is the positive, every other non-excluded one a negative."""
    a, c = anchors.double(), candidates.double()
    losses = []
    for i in range(len(a)):
        denominator = sum(math.exp(cosine(a[i], c[k]) / t) for k in range(len(c))
                          if (i, k) not in excluded)
        losses.append(-math.log(math.exp(cosine(a[i], c[i]) / t) / denominator))
    return losses


@pytest.mark.parametrize(("batch", "t"), [(2, 0.5), (5, 0.2), (8, 1.0)])
def test_nt_xent_matches_simclr(batch: int, t: float) -> None:
    g = torch.Generator().manual_seed(batch)
    za, zb = torch.randn(batch, 6, generator=g), torch.randn(batch, 6, generator=g)
    got = nt_xent(torch.cat([za, zb]), torch.cat([zb, za]), t, two_view_exclusion(batch))
    expected = sum(reference_simclr(za, zb, t)) / (2 * batch)
    assert math.isclose(float(got), expected, rel_tol=1e-5)


def test_two_view_exclusion_marks_each_anchors_own_copy() -> None:
    mask = two_view_exclusion(3)
    assert mask.shape == (6, 6) and mask.dtype == torch.bool
    assert {tuple(ix) for ix in mask.nonzero().tolist()} == {
        (0, 3), (1, 4), (2, 5), (3, 0), (4, 1), (5, 2)}


def test_nt_xent_without_exclusion_is_plain_info_nce() -> None:
    g = torch.Generator().manual_seed(0)
    anchors, candidates = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    got = nt_xent(anchors, candidates, 0.3)
    expected = sum(reference_info_nce(anchors, candidates, 0.3, set())) / 5
    assert math.isclose(float(got), expected, rel_tol=1e-5)


def test_nt_xent_is_lower_for_aligned_positives() -> None:
    g = torch.Generator().manual_seed(1)
    za = torch.randn(16, 8, generator=g)
    zb = za + 0.05 * torch.randn(16, 8, generator=g)
    shuffled = zb[torch.randperm(16, generator=g)]
    mask = two_view_exclusion(16)
    aligned = nt_xent(torch.cat([za, zb]), torch.cat([zb, za]), 0.2, mask)
    mixed = nt_xent(torch.cat([za, shuffled]), torch.cat([shuffled, za]), 0.2, mask)
    assert float(aligned) < 0.5 * float(mixed)


def test_valid_masks_anchors() -> None:
    g = torch.Generator().manual_seed(2)
    anchors, candidates = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    exclude = two_view_exclusion(3)
    valid = torch.tensor([True, False, True, False, False, True])
    excluded = {tuple(ix) for ix in exclude.nonzero().tolist()}
    per_anchor = reference_info_nce(anchors, candidates, 0.5, excluded)
    expected = (per_anchor[0] + per_anchor[2] + per_anchor[5]) / 3
    got = nt_xent(anchors, candidates, 0.5, exclude, valid)
    assert math.isclose(float(got), expected, rel_tol=1e-5)


def test_no_valid_anchor_gives_zero_with_a_graph() -> None:
    anchors = torch.randn(4, 3, requires_grad=True)
    loss = nt_xent(anchors, torch.randn(4, 3), 0.5, valid=torch.zeros(4, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert anchors.grad is not None and float(anchors.grad.abs().sum()) == 0.0


@pytest.mark.parametrize(("anchors", "candidates"), [
    (torch.randn(4), torch.randn(4)),
    (torch.randn(4, 3), torch.randn(5, 3)),
    (torch.randn(4, 3), torch.randn(4, 2)),
    (torch.randn(2, 4, 3), torch.randn(2, 4, 3)),
])
def test_nt_xent_rejects_bad_shapes(anchors: torch.Tensor, candidates: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"must both be \(M, P\)"):
        nt_xent(anchors, candidates, 0.5)


@pytest.mark.parametrize("t", [0.0, -0.1])
def test_nt_xent_rejects_bad_temperature(t: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 3), torch.randn(4, 3), t)


def test_prototype_variance_is_zero_for_spread_prototypes() -> None:
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    assert float(prototype_variance(torch.eye(8))) == 0.0
    assert float(prototype_variance(torch.cat([q, -q]))) == 0.0


def test_prototype_variance_is_positive_for_collapsed_prototypes() -> None:
    collapsed = torch.randn(1, 8).expand(6, 8) * torch.arange(1, 7.0)[:, None]  # one direction
    value = float(prototype_variance(collapsed))
    # every std is sqrt(eps): relu(1/sqrt(D) - sqrt(eps)) * sqrt(D) = 1 - sqrt(eps * D)
    assert math.isclose(value, 1 - math.sqrt(1e-4 * 8), rel_tol=1e-4)
    nearly = F.normalize(torch.eye(8) + 3.0, dim=1)  # spread, but much less than orthonormal
    assert 0 < float(prototype_variance(nearly)) < value


def attention_map(per_image: torch.Tensor, h: int = 2, w: int = 3) -> torch.Tensor:
    """(B, N) usage per image -> (B, N, h, w), the same at every position."""
    return per_image[:, :, None, None].expand(*per_image.shape, h, w)


def test_usage_entropy_is_zero_for_uniform_usage() -> None:
    uniform = attention_map(torch.full((3, 5), 0.2))
    assert abs(float(usage_entropy(uniform, torch.ones(3)))) < 1e-6
    # one-hot per image, but every prototype used as often: usage is still even
    spread = attention_map(torch.eye(4))
    assert abs(float(usage_entropy(spread, torch.ones(4)))) < 1e-6


def test_usage_entropy_is_log_n_for_a_single_prototype() -> None:
    one_hot = torch.zeros(3, 5)
    one_hot[:, 2] = 1
    value = float(usage_entropy(attention_map(one_hot), torch.ones(3)))
    assert math.isclose(value, math.log(5), rel_tol=1e-5)


def test_usage_entropy_ignores_images_of_weight_zero() -> None:
    per_image = torch.full((3, 4), 0.25)
    per_image[2] = torch.tensor([1.0, 0, 0, 0])
    weight = torch.tensor([1.0, 1.0, 0.0])
    assert abs(float(usage_entropy(attention_map(per_image), weight))) < 1e-6
    assert float(usage_entropy(attention_map(per_image), torch.ones(3))) > 0.05


def make_read(query: torch.Tensor, readout: torch.Tensor, n: int = 3) -> MemoryRead:
    b, _, h, w = query.shape
    return MemoryRead(query=query, readout=readout, attention=torch.full((b, n, h, w), 1 / n))


def test_alignment_matches_reference() -> None:
    g = torch.Generator().manual_seed(3)
    q, r = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    weight = torch.tensor([1.0, 0.0, 1.0])
    per_image = [float(((q[i] - r[i]) ** 2).sum(0).mean()) for i in range(3)]
    got = float(alignment(make_read(q, r), weight))
    assert math.isclose(got, (per_image[0] + per_image[2]) / 2, rel_tol=1e-5)
    assert float(alignment(make_read(q, q.clone()), torch.ones(3))) == 0.0


def test_anomaly_repulsion_is_zero_without_anomalies() -> None:
    q = torch.randn(2, 4, 2, 2, requires_grad=True)
    loss = anomaly_repulsion(make_read(q, q), torch.zeros(2, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    loss.backward()  # still part of the graph
    assert q.grad is not None


def test_anomaly_repulsion_is_positive_when_anomalies_are_read_back() -> None:
    g = torch.Generator().manual_seed(4)
    q = F.normalize(torch.randn(3, 4, 2, 2, generator=g), dim=1)
    r = -q.clone()  # normals: read-out opposite their query
    r[1] = q[1]  # the anomaly: read-out equal to its query
    is_anomaly = torch.tensor([False, True, False])
    assert math.isclose(float(anomaly_repulsion(make_read(q, r), is_anomaly)), 1.0, rel_tol=1e-5)
    assert math.isclose(float(anomaly_repulsion(make_read(q, r), is_anomaly, margin=0.25)), 0.75,
                        rel_tol=1e-5)
    r[1] = -q[1]  # an anomaly far from its read-out costs nothing
    assert float(anomaly_repulsion(make_read(q, r), is_anomaly)) == 0.0


def two_views(batch: int = 4, scales: tuple[str, ...] = ("layer2", "layer3"), seed: int = 0):
    torch.manual_seed(seed)
    memories = {s: HopfieldMemory(in_channels=5, size=6, dim=8, beta=4.0) for s in scales}
    heads = nn.ModuleDict({s: ProjectionHead(8, 4) for s in scales})
    reads_a = {s: m(torch.randn(batch, 5, 3, 3)) for s, m in memories.items()}
    reads_b = {s: m(torch.randn(batch, 5, 3, 3)) for s, m in memories.items()}
    prototypes = {s: m.prototypes for s, m in memories.items()}
    return reads_a, reads_b, heads, prototypes


def weights_config(value: float, **overrides) -> TrainConfig:
    names = ("w_memory_contrast", "w_view_contrast", "w_align", "w_variance", "w_usage",
             "w_anomaly")
    return TrainConfig(**{**dict.fromkeys(names, value), "temperature": 0.2, **overrides})


def test_memory_contrast_loss_returns_every_term_and_their_sum() -> None:
    reads_a, reads_b, heads, prototypes = two_views()
    is_anomaly = torch.tensor([False, True, False, False])
    out = MemoryContrastLoss(weights_config(1.0))(reads_a, reads_b, heads, prototypes,
                                                  is_anomaly)
    assert isinstance(out, LossTerms)
    assert set(out.terms) == TERMS
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.terms.values())
    torch.testing.assert_close(out.total, sum(out.terms.values()))
    assert value(out.terms["memory_contrast"]) > 0 and value(out.terms["view_contrast"]) > 0
    out.total.backward()
    assert all(p.grad is not None for p in prototypes.values())


def test_memory_contrast_loss_weights_each_term() -> None:
    reads_a, reads_b, heads, prototypes = two_views()
    is_anomaly = torch.tensor([False, True, False, False])
    ones = MemoryContrastLoss(weights_config(1.0))(reads_a, reads_b, heads, prototypes,
                                                   is_anomaly)
    weights = {"w_memory_contrast": 2.0, "w_view_contrast": 0.5, "w_align": 3.0,
               "w_variance": 0.25, "w_usage": 4.0, "w_anomaly": 1.5}
    cfg = TrainConfig(temperature=0.2, **weights)
    out = MemoryContrastLoss(cfg)(reads_a, reads_b, heads, prototypes, is_anomaly)
    for name in TERMS:
        torch.testing.assert_close(out.terms[name], ones.terms[name] * weights[f"w_{name}"])
    torch.testing.assert_close(out.total, sum(out.terms.values()))
    off = MemoryContrastLoss(weights_config(1.0, w_view_contrast=0.0))(
        reads_a, reads_b, heads, prototypes, is_anomaly)
    assert value(off.terms["view_contrast"]) == 0.0
    torch.testing.assert_close(off.terms["memory_contrast"], ones.terms["memory_contrast"])


def test_memory_contrast_pairs_each_query_with_the_other_views_readout() -> None:
    reads_a, reads_b, heads, prototypes = two_views(batch=3, scales=("layer3",))
    is_anomaly = torch.tensor([False, False, True])
    out = MemoryContrastLoss(weights_config(1.0))(reads_a, reads_b, heads, prototypes,
                                                  is_anomaly)
    head = heads["layer3"]
    ra, rb = reads_a["layer3"], reads_b["layer3"]
    with torch.no_grad():
        qa, qb = head(ra.query.mean(dim=(2, 3))), head(rb.query.mean(dim=(2, 3)))
        oa, ob = head(ra.readout.mean(dim=(2, 3))), head(rb.readout.mean(dim=(2, 3)))
    excluded = {(i, (i + 3) % 6) for i in range(6)}  # an anchor's own view's read-out
    per_anchor = reference_info_nce(torch.cat([qa, qb]), torch.cat([ob, oa]), 0.2, excluded)
    normal_anchors = [0, 1, 3, 4]
    expected = sum(per_anchor[i] for i in normal_anchors) / len(normal_anchors)
    assert math.isclose(value(out.terms["memory_contrast"]), expected, rel_tol=1e-4)
    view = sum(reference_simclr(qa, qb, 0.2)) / 6
    assert math.isclose(value(out.terms["view_contrast"]), view, rel_tol=1e-4)


def test_anomaly_term_is_zero_without_labelled_anomalies() -> None:
    reads_a, reads_b, heads, prototypes = two_views()
    out = MemoryContrastLoss(weights_config(1.0))(reads_a, reads_b, heads, prototypes,
                                                  torch.zeros(4, dtype=torch.bool))
    assert value(out.terms["anomaly"]) == 0.0


@pytest.mark.parametrize("name", ["w_memory_contrast", "w_view_contrast", "w_align",
                                  "w_variance", "w_usage", "w_anomaly"])
def test_negative_loss_weight_raises(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MemoryContrastLoss(TrainConfig(**{name: -0.5}))


# --- shifted pseudo-anomalies: negatives only ----------------------------------------------

def subset(reads: dict[str, MemoryRead], keep: list[int]) -> dict[str, MemoryRead]:
    return {s: MemoryRead(*(t[keep] for t in r)) for s, r in reads.items()}


def memory_contrast_reference(reads_a, reads_b, heads, anchors: list[int]) -> float:
    """Sum over scales of the mean InfoNCE of the listed anchors of [view a; view b] against
    the other view's read-outs of *every* image, an anchor's own copy excluded."""
    total = 0.0
    for s, head in heads.items():
        ra, rb = reads_a[s], reads_b[s]
        b = len(ra.query)
        with torch.no_grad():
            qa, qb = head(ra.query.mean(dim=(2, 3))), head(rb.query.mean(dim=(2, 3)))
            oa, ob = head(ra.readout.mean(dim=(2, 3))), head(rb.readout.mean(dim=(2, 3)))
        excluded = {(i, (i + b) % (2 * b)) for i in range(2 * b)}
        per_anchor = reference_info_nce(torch.cat([qa, qb]), torch.cat([ob, oa]), 0.2, excluded)
        total += sum(per_anchor[i] for i in anchors) / len(anchors)
    return total


def align_and_usage_reference(reads_a, reads_b, keep: list[int]) -> tuple[float, float]:
    """Both terms over the kept images only, summed over scales and views."""
    align = usage = 0.0
    for reads in (reads_a, reads_b):
        for r in reads.values():
            dev = (r.query - r.readout)[keep].detach().double()
            align += float(dev.pow(2).sum(1).mean(dim=(1, 2)).mean())
            p = r.attention[keep].detach().double().mean(dim=(0, 2, 3))
            usage += math.log(len(p)) + float((p * p.log()).sum())
    return align, usage


def test_shifted_samples_are_neither_anchors_nor_aligned_nor_counted_in_usage() -> None:
    reads_a, reads_b, heads, prototypes = two_views(batch=5)
    is_anomaly = torch.tensor([False, False, False, True, False])
    is_shifted = torch.tensor([False, True, False, False, True])
    loss = MemoryContrastLoss(weights_config(1.0))
    out = loss(reads_a, reads_b, heads, prototypes, is_anomaly, is_shifted)
    normals = [0, 2]
    align, usage = align_and_usage_reference(reads_a, reads_b, normals)
    assert math.isclose(value(out.terms["align"]), align, rel_tol=1e-5)
    assert math.isclose(value(out.terms["usage"]), usage, rel_tol=1e-4, abs_tol=1e-6)
    anchors = normals + [i + 5 for i in normals]  # both views of the normal images
    expected = memory_contrast_reference(reads_a, reads_b, heads, anchors)
    assert math.isclose(value(out.terms["memory_contrast"]), expected, rel_tol=1e-4)
    # Not repelled like a labelled anomaly: the anomaly term sees image 3 only.
    only_anomaly = sum(anomaly_repulsion(r, is_anomaly) for reads in (reads_a, reads_b)
                       for r in reads.values())
    assert math.isclose(value(out.terms["anomaly"]), value(only_anomaly), rel_tol=1e-5)
    # The same alignment and usage as a batch without the shifted images at all.
    kept = [0, 2, 3]
    without = loss(subset(reads_a, kept), subset(reads_b, kept), heads, prototypes,
                   is_anomaly[kept])
    for name in ("align", "usage", "variance", "anomaly"):
        torch.testing.assert_close(out.terms[name], without.terms[name])


def test_shifted_samples_still_act_as_negatives() -> None:
    reads_a, reads_b, heads, prototypes = two_views(batch=4)
    is_anomaly = torch.zeros(4, dtype=torch.bool)
    is_shifted = torch.tensor([False, False, True, False])
    loss = MemoryContrastLoss(weights_config(1.0))
    out = loss(reads_a, reads_b, heads, prototypes, is_anomaly, is_shifted)
    # Removing the shifted image changes the other anchors' loss: it was in their denominator.
    kept = [0, 1, 3]
    without = loss(subset(reads_a, kept), subset(reads_b, kept), heads, prototypes,
                   is_anomaly[kept])
    assert abs(value(out.terms["memory_contrast"]) - value(without.terms["memory_contrast"])) > 1e-3

    def moved(reads: dict[str, MemoryRead]) -> dict[str, MemoryRead]:
        """Image 2 reads something else from memory (and attends elsewhere)."""
        out = {}
        for s, r in reads.items():
            readout, attention = r.readout.clone(), r.attention.clone()
            readout[2] = -readout[2].roll(1, dims=0)
            attention[2] = attention[2].flip(0)
            out[s] = MemoryRead(r.query, readout, attention)
        return out

    changed = loss(moved(reads_a), moved(reads_b), heads, prototypes, is_anomaly, is_shifted)
    assert abs(value(changed.terms["memory_contrast"]) - value(out.terms["memory_contrast"])) \
        > 1e-3
    for name in ("align", "usage"):  # its own read-out is never pulled nor counted
        torch.testing.assert_close(changed.terms[name], out.terms[name])
    # Flagged as normal instead, the same change moves the alignment term too.
    as_normal = [loss(r_a, r_b, heads, prototypes, is_anomaly)
                 for r_a, r_b in ((reads_a, reads_b), (moved(reads_a), moved(reads_b)))]
    assert not torch.allclose(as_normal[0].terms["align"], as_normal[1].terms["align"])


def test_no_shift_flags_is_the_same_as_all_false() -> None:
    reads_a, reads_b, heads, prototypes = two_views()
    is_anomaly = torch.tensor([False, True, False, False])
    loss = MemoryContrastLoss(weights_config(1.0))
    default = loss(reads_a, reads_b, heads, prototypes, is_anomaly)
    explicit = loss(reads_a, reads_b, heads, prototypes, is_anomaly, torch.zeros(4, dtype=bool))
    for name in TERMS:
        torch.testing.assert_close(default.terms[name], explicit.terms[name])
