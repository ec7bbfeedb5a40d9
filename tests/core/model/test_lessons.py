"""core/model/lessons.py: a lesson moves its look-alikes' scores and nothing beyond its reach."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.model.lessons import (
    ENCODER,
    MAX_AUROC_LOSS,
    MAX_DETECTION_LOSS,
    MIN_KIND_Z,
    MIN_SORT_Z,
    SHARE_EACH,
    Kinds,
    Lessons,
    choose_lesson,
    describe,
    descriptor_blocks,
    encoder_whitening,
    fit_kind,
    fit_sort,
    in_sight,
    tolerance_factor,
    upgrade_lessons,
    whitening,
)
from core.model.memory import MemoryRead

ONE = {"s/pooled": 3}  # descriptors of a single query block of three, plain distances


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def taught(keys: torch.Tensor, anomalous: list[bool], blocks: dict[str, int] = ONE,
           sights: torch.Tensor | None = None) -> Lessons:
    lessons = Lessons(len(keys), blocks)
    references = unit([1, 0, 0], [0.9, 0.1, 0], [0.8, 0, 0.2])  # normal reference images
    if len(blocks) == 2:
        references = torch.cat([references, references], 1)
    if sights is None:
        sights = torch.ones(len(keys), len(blocks), dtype=torch.bool)
    lessons.teach(keys, torch.tensor(anomalous), references, torch.tensor([0.0, 1.0, 2.0]),
                  sights=sights)
    return lessons


def test_a_marked_normal_relieves_its_look_alikes_only():
    lessons = taught(unit([0, 1, 0]), [False])  # a false alarm far from the references
    nearest = torch.dist(unit([0, 1, 0]), unit([0.9, 0.1, 0]))
    assert torch.allclose(lessons.radius, nearest[None])  # its reach: the nearest reference
    x = unit([0, 1, 0], [0.1, 1, 0], [0, 0, 1], [0.1, 1, 0])
    score = torch.tensor([5.0, 5.0, 5.0, 0.5])
    out = lessons(score, x)
    assert out[0] == lessons.normal_score == 1.0  # the mark itself: a typical normal's score
    assert 1.0 < out[1] < 5.0  # a near look-alike: most of the way down
    assert out[2] == 5.0  # beyond the reach: untouched
    assert out[3] == 0.5  # already below a typical normal: never raised by a normal mark


def test_a_marked_anomaly_only_raises_and_only_its_look_alikes():
    lessons = taught(unit([0, 0, 1]), [True])
    x = unit([0, 0.1, 1], [0, 0, 1], [1, 0, 0])
    score = torch.tensor([0.0, 9.0, 0.0])
    out = lessons(score, x)
    assert out[0] > 1.5  # a look-alike of the miss now scores above most normals
    # the mark's own image, already above the alarm score, moves by the alarm's margin over a
    # typical normal: a score past every normal's is raised further, never lowered
    margin = float(lessons.alarm_score - lessons.normal_score)
    assert margin > 0 and float(out[1]) == pytest.approx(9.0 + margin)
    assert out[2] == 0.0  # a normal reference is beyond the reach (radius = its distance)
    assert lessons.alarm_score > 2.0  # above every reference normal's score


def test_a_key_compares_images_on_the_blocks_in_its_sight_only():
    blocks = {"s/pooled": 3, ENCODER: 3}
    key = torch.cat([unit([0, 1, 0]), unit([0, 0, 1])], 1)  # a false alarm: far in both blocks
    encoder_only = taught(key, [False], blocks, in_sight(tuple(blocks), "encoder")[None])
    both = taught(key, [False], blocks, in_sight(tuple(blocks), "both")[None])
    # an image the key's twin in what the encoder sees, opposite to it in the query block
    x = torch.cat([unit([0, -1, 0]), unit([0, 0, 1])], 1)
    relieved = encoder_only(torch.tensor([5.0]), x)
    assert relieved == encoder_only.normal_score  # all the way: it sees the encoder only
    assert both(torch.tensor([5.0]), x) > relieved + 1  # the queries count too
    assert in_sight(tuple(blocks), "queries").tolist() == [True, False]


def test_describe_reads_the_queries_and_the_encoders_pooled_map_in_unit_blocks():
    q = torch.zeros(1, 2, 2, 2)
    q[0, 0] = 1.0  # every position points along the first axis ...
    q[0, :, 1, 1] = torch.tensor([0.0, 1.0])  # ... but one, the most deviant
    read = MemoryRead(q, torch.zeros_like(q), torch.zeros(1, 3, 2, 2))
    maps = torch.tensor([[[0.0, 0.1], [0.2, 3.0]]])
    encoded = torch.zeros(1, 3, 2, 2)
    encoded[0, 2] = 4.0
    d = describe({"s": read}, {"s": maps}, encoded)
    assert list(descriptor_blocks(("s",), 2, 3).values()) == [2, 2, 3] == [2, 2, d.shape[1] - 4]
    assert torch.allclose(d[0, 2:4], torch.tensor([0.0, 1.0]))  # the query at the peak
    assert torch.allclose(d[0, 4:], torch.tensor([0.0, 0.0, 1.0]))  # the encoder, pooled


def test_keys_saved_before_sights_keep_their_distances():
    g = torch.Generator().manual_seed(0)
    blocks = descriptor_blocks(("a", "b"), 4, 5)
    old_blocks = [F.normalize(torch.randn(3, 4, generator=g), dim=1) for _ in range(4)]
    old = torch.cat(old_blocks, 1) / 2  # the earlier layout: one unit row of 4 unit blocks
    images = torch.cat([F.normalize(torch.randn(6, 4, generator=g), dim=1) for _ in range(4)]
                       + [F.normalize(torch.randn(6, 5, generator=g), dim=1)], 1)
    state = {"lessons.keys": old, "lessons.radius": torch.ones(3)}
    upgrade_lessons(state, "lessons.", tuple(blocks), tuple(blocks.values()))
    lessons = Lessons(3, blocks)
    lessons.load_state_dict({**lessons.state_dict(), **{k.removeprefix("lessons."): v
                                                        for k, v in state.items()}})
    before = torch.cdist(images[:, :16] / 2, old) ** 2  # what the earlier layout measured
    assert torch.allclose(lessons.distances(images), before, atol=1e-5)
    assert lessons.sight.tolist() == [[True] * 4 + [False]] * 3
    assert math.isclose(float(lessons.keys[:, 16:].abs().sum()), 0.0)


def test_lessons_saved_before_the_whitening_keep_the_plain_metric():
    blocks = descriptor_blocks(("a",), 2, 3)
    state = {"lessons.keys": torch.ones(2, 7), "lessons.sight": torch.ones(2, 3, dtype=bool)}
    upgrade_lessons(state, "lessons.", tuple(blocks), tuple(blocks.values()))
    assert torch.equal(state["lessons.whiten"], torch.eye(3))
    assert torch.equal(state["lessons.keys"], torch.ones(2, 7))  # already today's layout


def test_the_encoder_block_is_measured_in_units_of_how_much_normals_vary():
    g = torch.Generator().manual_seed(3)
    # references spread widely along the first axis, hardly at all along the second
    references = torch.randn(300, 2, generator=g) * torch.tensor([1.0, 0.05])
    lessons = Lessons(1, {ENCODER: 2})
    lessons.sight.fill_(True)
    steps = torch.tensor([[1.0, 0.0], [0.0, 0.2]])
    plain = lessons.distances(steps)[:, 0]
    lessons.whiten.copy_(encoder_whitening({ENCODER: 2}, references))
    whitened = lessons.distances(steps)[:, 0]
    assert plain[0] > plain[1]  # plainly, the step along the wide axis is the longer ...
    assert whitened[1] > 3 * whitened[0]  # ... but a step where normals never go is further
    spread = lambda w: float((references - references.mean(0)).matmul(w).pow(2)  # noqa: E731
                             .sum(1).mean())
    assert math.isclose(spread(lessons.whiten), spread(torch.eye(2)), rel_tol=1e-4)
    assert torch.equal(whitening(torch.ones(5, 2)), torch.eye(2))  # no variation: plain


def test_the_whitening_is_ledoit_wolfs_shrunk_covariance():
    from sklearn.covariance import ledoit_wolf

    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(4)).double() \
        * torch.arange(1, 7)
    w = whitening(x).double()
    cov = torch.from_numpy(ledoit_wolf((x - x.mean(0)).numpy(), assume_centered=True)[0])
    metric = w @ w.T  # proportional to the inverse of the shrunk covariance
    ratio = metric @ cov
    assert torch.allclose(ratio, ratio[0, 0] * torch.eye(6, dtype=ratio.dtype), atol=1e-4)


def rehearsal_data(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Descriptors of one block (16): 200 ordinary normals, twenty held-out false alarms of
    one sort (drifting the same way, scoring above the threshold 1.5), and their scores."""
    normals = F.normalize(torch.randn(200, 16, generator=g) * 0.1 + torch.eye(16)[0], dim=1)
    alarms = F.normalize(torch.randn(20, 16, generator=g) * 0.1 + torch.eye(16)[0]
                         + 0.8 * torch.eye(16)[1], dim=1)
    scores = torch.cat([torch.rand(200, generator=g), 2 + torch.rand(20, generator=g)])
    return torch.cat([normals, alarms]), scores, alarms


def test_the_reach_is_rehearsed_on_held_out_false_alarms_and_pseudo_anomalies():
    g = torch.Generator().manual_seed(0)
    blocks = {ENCODER: 16}
    references, scores, alarms = rehearsal_data(g)
    far = F.normalize(torch.randn(50, 16, generator=g) * 0.1 + torch.eye(16)[2], dim=1)
    sight, reach, evidence = choose_lesson(blocks, references, scores, far,
                                           5 + torch.rand(50), 1.5)
    assert reach > 1 and evidence["held_out_alarms"] == 20
    tried = evidence["tried"]
    assert tried[f"{sight} x{reach:g}"]["cleared"] > tried["encoder x1"]["cleared"]
    # pseudo-anomalies that look like the false alarms: reaching further would hide them
    near = F.normalize(alarms + 0.02 * torch.randn(20, 16, generator=g), dim=1)
    sight, reach, evidence = choose_lesson(blocks, references, scores, near, 2 + torch.rand(20),
                                           1.5)
    assert reach == 1.0 and evidence["tried"]["encoder x2"]["auroc_loss"] > 0.005
    assert choose_lesson(blocks, references[:200], scores[:200], far, 5 + torch.rand(50),
                         1.5)[:2] == ("encoder", 1.0)  # nothing to rehearse on: the default
    # pseudo-anomalies among the normals, just above the threshold: a wide reach keeps their
    # AUROC but pulls them under the threshold, and only the detection cost says so
    mid = F.normalize(torch.randn(50, 16, generator=g) * 0.1 + torch.eye(16)[0]
                      + 0.4 * torch.eye(16)[1], dim=1)
    sight, reach, evidence = choose_lesson(blocks, references, scores, mid,
                                           1.6 + 0.2 * torch.rand(50, generator=g), 1.5)
    wide = evidence["tried"]["encoder x1.5"]
    assert wide["auroc_loss"] <= MAX_AUROC_LOSS and wide["detection_loss"] > MAX_DETECTION_LOSS
    assert evidence["tried"][f"{sight} x{reach:g}"]["detection_loss"] <= MAX_DETECTION_LOSS
    assert reach < 1.5


def test_the_rehearsal_chooses_the_sight_in_which_false_alarms_are_of_a_sort():
    g = torch.Generator().manual_seed(1)
    references, scores, _ = rehearsal_data(g)
    noise = F.normalize(torch.randn(len(references), 16, generator=g), dim=1)
    far = F.normalize(torch.randn(50, 16, generator=g) * 0.1 + torch.eye(16)[2], dim=1)
    blocks = {"s/pooled": 16, ENCODER: 16}
    # the false alarms are of a sort in the query block, scattered in the encoder block
    queried = torch.cat([references, noise], 1)
    pseudo = torch.cat([far, F.normalize(torch.randn(50, 16, generator=g), dim=1)], 1)
    sight, reach, evidence = choose_lesson(blocks, queried, scores, pseudo, 5 + torch.rand(50),
                                           1.5)
    cleared = {k: v["cleared"] for k, v in evidence["tried"].items()}
    assert sight == "queries"
    assert cleared[f"queries x{reach:g}"] > max(v for k, v in cleared.items() if "encoder" in k)
    # and the other way round
    encoded = torch.cat([noise, references], 1)
    pseudo = torch.cat([pseudo[:, 16:], pseudo[:, :16]], 1)
    assert choose_lesson(blocks, encoded, scores, pseudo, 5 + torch.rand(50), 1.5)[0] \
        == "encoder"


def test_a_marked_anomaly_is_sized_not_to_reach_normals_it_was_not_sized_on():
    g = torch.Generator().manual_seed(2)
    ring = lambda n, lift: F.normalize(torch.cat([  # noqa: E731
        (a := torch.rand(n, 1, generator=g) * 6.283).cos(), a.sin(), torch.full((n, 1), lift)],
        1), dim=1)
    normals = ring(600, 0.0)  # normals on a ring, anomalies just off it
    keys = ring(20, 0.15)
    # a ball as far as the nearest of 300 references holds, on average, one normal in 301
    # that the references missed, for each key: with 20 keys, a share of all normals
    lessons = Lessons(20, ONE)
    lessons.teach(keys, torch.ones(20, dtype=torch.bool), normals[:300], torch.rand(300),
                  sights=torch.ones(20, 1, dtype=torch.bool))
    assert float(lessons.shrink) < 1.0
    unseen = normals[300:]
    nearest = lessons.distances(normals[:300]).amin(0).sqrt()
    before = (lessons.distances(unseen).sqrt() < nearest).any(1).float().mean()
    reached = (lessons.reach(unseen)[1] > 0).float().mean()
    assert before > 0.03 and reached < before / 3


def test_a_marked_anomaly_reaches_few_normals_however_few_the_references():
    """Thirty references: a ball that holds none of them may still hold a tenth of all normals;
    taken as Gaussian, the references' distances to the keys bound it to a small tail."""
    before, after = [], []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        normals = torch.randn(20030, 8, generator=g)
        marks = torch.randn(5, 8, generator=g) * 0.3 + torch.tensor([2.5, 0, 0, 0, 0, 0, 0, 0])
        keys = (marks + 0.05 * torch.randn(4, 5, 8, generator=g)).reshape(20, 8)  # 4 views
        lessons = Lessons(20, {"s/pooled": 8})
        lessons.teach(keys, torch.ones(20, dtype=torch.bool), normals[:30], torch.rand(30),
                      sights=torch.ones(20, 1, dtype=torch.bool))
        unseen = normals[30:]
        nearest = lessons.distances(normals[:30]).amin(0).sqrt() * lessons.shrink
        before.append((lessons.distances(unseen).sqrt() < nearest).any(1).float().mean())
        after.append((lessons.reach(unseen)[1] > 0).float().mean())
    assert max(before) > 0.1 and float(torch.stack(after).mean()) <= SHARE_EACH


def kind_world(seed: int = 0) -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    """Normal descriptors (a Gaussian in eight dimensions, one axis barely varying) and a
    type that differs from them along that quiet axis, a little along a loud one."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.tensor([3.0, 1, 1, 1, 1, 1, 1, 0.2])
    normals = torch.randn(600, 8, generator=g) * spread
    shift = torch.tensor([1.5, 0, 0, 0, 0, 0, 0, 1.5])
    anomalies = torch.randn(200, 8, generator=g) * spread + shift
    return g, normals, anomalies


def test_five_marks_of_a_type_teach_its_kind_to_its_unmarked_images():
    g, normals, anomalies = kind_world()
    references, unseen = normals[:300], normals[300:]
    marks = anomalies[:5, None] + 0.01 * torch.randn(5, 4, 8, generator=g)  # 4 views each
    kind, evidence = fit_kind(marks, references)
    assert evidence == {"marks": 5, "left_out_z": evidence["left_out_z"], "generalises": True}
    lessons = Lessons(1, {"s/pooled": 8}, n_kinds=1)
    lessons.teach(torch.full((1, 8), 50.0), torch.tensor([True]), references,
                  torch.zeros(300), sights=torch.ones(1, 1, dtype=torch.bool), kinds=kind)
    assert float(lessons.alarm_score) == 0.0  # every reference scored 0: raised to 0
    score = torch.full((300,), -1.0)
    raised = lessons(score[:195], anomalies[5:]) > -1
    untouched = lessons(score, unseen) == -1
    assert raised.float().mean() > 0.5  # most of the type, none of them marked
    assert untouched.float().mean() >= 0.98  # normals the kind was not sized on: alone
    # Fisher's direction, not the mean difference: it weighs the quiet axis most
    assert abs(float(kind.direction[0, 7])) > abs(float(kind.direction[0, 0]))


def test_marks_that_do_not_stand_apart_from_normals_teach_no_kind():
    g, normals, _ = kind_world(1)
    marks = torch.randn(5, 2, 8, generator=g) * torch.tensor([3.0, 1, 1, 1, 1, 1, 1, 0.2])
    kind, evidence = fit_kind(marks, normals[:300])  # five normals called anomalies
    assert not evidence["generalises"] and torch.equal(kind.top, kind.cut)
    one, evidence = fit_kind(normals[:1, None] + 10, normals[:300])  # one cannot be left out
    assert not evidence["generalises"] and evidence["left_out_z"] is None
    lessons = Lessons(1, {"s/pooled": 8}, n_kinds=1)
    lessons.teach(torch.full((1, 8), 50.0), torch.tensor([True]), normals[:300],
                  torch.zeros(300), sights=torch.ones(1, 1, dtype=torch.bool), kinds=kind)
    assert torch.equal(lessons.kind_weight(normals), torch.zeros(600))  # an inert kind


def test_marks_only_just_past_the_cut_teach_no_kind():
    """The cut is a guess from a few hundred normals: a kind whose marks, left out, stand less
    than MIN_KIND_Z spreads past it would raise every normal past the cut fully."""
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([3.0, 1, 1, 1, 1, 1, 1, 0.2])
    normals = torch.randn(300, 8, generator=g) * spread
    shift = torch.tensor([1.1, 0, 0, 0, 0, 0, 0, 0.9])  # closer to the normals than kind_world's
    anomalies = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)) * spread + shift
    marks = anomalies[:, None] + 0.01 * torch.randn(5, 4, 8, generator=g)
    kind, evidence = fit_kind(marks, normals)
    assert 0 < evidence["left_out_z"] < MIN_KIND_Z  # past the cut, not clearly
    assert not evidence["generalises"] and torch.equal(kind.top, kind.cut)


QUIET = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1.0])  # kind_world's axis normals barely vary on


def sort_taught(kind: Kinds, references: torch.Tensor) -> Lessons:
    """Lessons holding `kind` alone (their one key, a marked anomaly far away, reaches none of
    the images these tests score), with references that all scored 0."""
    lessons = Lessons(1, {"s/pooled": 8}, n_kinds=1)
    lessons.teach(torch.full((1, 8), 50.0), torch.tensor([True]), references,
                  torch.zeros(len(references)), sights=torch.ones(1, 1, dtype=torch.bool),
                  kinds=kind)
    return lessons


def test_marked_normals_of_one_sort_lower_the_rest_of_it_by_what_the_sort_added():
    """A darker batch: normal images moved along an axis in which normals barely vary, which
    the run flags. Six of them marked normal lower the others, by the least a mark scored
    above a typical normal, so that an anomaly of the same batch keeps what it adds."""
    g, normals, _ = kind_world()
    references, unseen = normals[:300], normals[300:500]
    batch = normals[500:] + 1.5 * QUIET  # 100 images of the sort
    marks = batch[:6, None] + 0.01 * torch.randn(6, 4, 8, generator=g)  # 4 views each
    mark_scores = torch.tensor([2.0, 2.5, 3.0, 2.2, 2.8, 2.1])
    pseudo = references[:100] + torch.tensor([4.0, 4, 0, 0, 0, 0, 0, 0])  # loud axes
    sort, evidence = fit_sort(marks, mark_scores, references, torch.zeros(300), pseudo,
                              torch.full((100,), 2.0), threshold=1.0)
    assert evidence["generalises"] and evidence["taught"]
    assert evidence["relief"] == 2.0 and evidence["detection_loss"] == 0.0
    lessons = sort_taught(sort, references)
    others = batch[6:]
    lowered = lessons(torch.full((94,), 2.5), others)
    assert (lowered < 1.0).float().mean() > 0.5  # most of the sort cleared, none marked
    assert bool((lowered >= 0.5).all())  # by the relief at most
    anomalous = lessons(torch.full((94,), 6.0), others)
    assert bool((anomalous >= 4.0).all())  # an anomaly of the sort keeps what it adds
    assert bool((lessons(torch.full((94,), 1.0), others) >= 0).all())  # never under typical
    untouched = lessons(torch.full((200,), 0.5), unseen) == 0.5
    assert untouched.float().mean() >= 0.98  # ordinary normals keep their scores
    assert bool((lessons(torch.full((100,), 2.0), pseudo) == 2.0).all())


def test_false_alarms_that_are_not_of_one_sort_teach_no_sort():
    g, normals, _ = kind_world(1)
    references = normals[:300]
    tail = normals[300:][normals[300:].norm(dim=1).argsort(descending=True)[:6]]  # far, apart
    sort, evidence = fit_sort(tail[:, None] + 0.01 * torch.randn(6, 2, 8, generator=g),
                              torch.full((6,), 2.0), references, torch.zeros(300),
                              references[:50] + 4, torch.full((50,), 2.0), threshold=1.0)
    assert not evidence["generalises"] and not evidence["taught"]
    assert torch.equal(sort.top, sort.cut)  # inert
    lessons = sort_taught(sort, references)
    assert torch.equal(lessons(torch.full((600,), 2.0), normals), torch.full((600,), 2.0))


def test_marked_normals_must_stand_further_past_the_normals_to_teach_a_sort_than_a_kind():
    """Seven false alarms drawn at random stand a spread past the normals by chance often
    enough; a sort, which lowers scores, needs MIN_SORT_Z."""
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([3.0, 1, 1, 1, 1, 1, 1, 0.2])
    normals = torch.randn(300, 8, generator=g) * spread
    shift = torch.tensor([1.1, 0, 0, 0, 0, 0, 0, 1.0])
    batch = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)) * spread + shift
    marks = batch[:, None] + 0.01 * torch.randn(5, 4, 8, generator=g)
    _, as_kind = fit_kind(marks, normals)
    sort, as_sort = fit_sort(marks, torch.full((5,), 3.0), normals, torch.zeros(300),
                             normals[:50] + 4, torch.full((50,), 2.0), threshold=1.0)
    assert MIN_KIND_Z <= as_kind["left_out_z"] < MIN_SORT_Z and as_kind["generalises"]
    assert not as_sort["generalises"] and not as_sort["taught"]
    assert torch.equal(sort.top, sort.cut)


def test_a_sort_that_pseudo_anomalies_look_like_is_not_taught():
    """Pseudo-anomalies made along the marks' own direction are anomalies the run catches: the
    marks are of one sort, but lowering it would let them through."""
    g, normals, _ = kind_world(2)
    references = normals[:300]
    batch = normals[300:] + 1.5 * QUIET
    marks = batch[:6, None] + 0.01 * torch.randn(6, 4, 8, generator=g)
    pseudo = references[:100] + 1.5 * QUIET  # the same shift, scored as anomalies
    sort, evidence = fit_sort(marks, torch.full((6,), 3.0), references, torch.zeros(300),
                              pseudo, torch.full((100,), 2.0), threshold=1.0)
    assert evidence["generalises"] and not evidence["taught"]
    assert evidence["detection_loss"] > MAX_DETECTION_LOSS
    assert torch.equal(sort.top, sort.cut)


def test_lessons_saved_before_sorts_keep_their_kinds_raising():
    g, normals, anomalies = kind_world()
    marks = anomalies[:5, None] + 0.01 * torch.randn(5, 4, 8, generator=g)
    kind, _ = fit_kind(marks, normals[:300])
    lessons = sort_taught(kind, normals[:300])
    state = {f"lessons.{k}": v for k, v in lessons.state_dict().items() if k != "kind_relief"}
    upgrade_lessons(state, "lessons.", ("s/pooled",), (8,))
    earlier = Lessons(1, {"s/pooled": 8}, n_kinds=1)
    earlier.load_state_dict({k.removeprefix("lessons."): v for k, v in state.items()})
    score = torch.full((200,), -1.0)
    assert torch.equal(earlier(score, anomalies), lessons(score, anomalies))
    assert bool((earlier(score, anomalies) > -1).any())


def test_lessons_saved_before_kinds_load_with_none():
    blocks = descriptor_blocks(("a",), 2, 3)
    state = {"lessons.keys": torch.ones(2, 7), "lessons.sight": torch.ones(2, 3, dtype=bool)}
    upgrade_lessons(state, "lessons.", tuple(blocks), tuple(blocks.values()))
    lessons = Lessons(2, blocks)
    lessons.load_state_dict({k.removeprefix("lessons."): v for k, v in state.items()}
                            | {"radius": torch.ones(2), "anomalous": torch.zeros(2, dtype=bool),
                               "normal_score": torch.zeros(()), "alarm_score": torch.zeros(())})
    assert lessons.kind_direction.shape == (0, 7) and lessons.kind_relief.shape == (0,)
    assert torch.equal(lessons.kind_weight(torch.ones(4, 7)), torch.zeros(4))
    assert Kinds.cat([], 7).cut.shape == (0,)


def test_a_kinds_cut_holds_back_the_normals_it_promises_however_few_they_were():
    """mean + k std of n normal samples is above 99.75 % of the population 90 % of the time."""
    g = torch.Generator().manual_seed(0)
    q = 2.8070337683438  # the 99.75 % quantile of a standard normal
    for n in (30, 128):
        x = torch.randn(4000, n, generator=g, dtype=torch.float64)
        held = (x.mean(1) + tolerance_factor(n) * x.std(1) > q).double().mean()
        assert 0.87 < float(held) < 0.93, n
    assert tolerance_factor(30) > tolerance_factor(128) > q
    assert math.isclose(tolerance_factor(30, 0.95, 0.95), 2.220, abs_tol=0.02)  # tables: 2.220
