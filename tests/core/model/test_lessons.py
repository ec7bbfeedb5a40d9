"""core/model/lessons.py: a lesson moves its look-alikes' scores and nothing beyond its reach."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.model.lessons import (
    MAX_AUROC_LOSS,
    MAX_DETECTION_LOSS,
    Lessons,
    choose_reach,
    describe,
)
from core.model.memory import MemoryRead


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def taught(keys: torch.Tensor, anomalous: list[bool]) -> Lessons:
    lessons = Lessons(len(keys), keys.shape[1])
    references = unit([1, 0, 0], [0.9, 0.1, 0], [0.8, 0, 0.2])  # normal reference images
    lessons.teach(keys, torch.tensor(anomalous), references, torch.tensor([0.0, 1.0, 2.0]))
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
    assert out[1] == 9.0  # a higher score is never lowered
    assert out[2] == 0.0  # a normal reference is beyond the reach (radius = its distance)
    assert lessons.alarm_score > 2.0  # above every reference normal's score


def test_describe_reads_the_pooled_query_and_the_most_deviant_position():
    q = torch.zeros(1, 2, 2, 2)
    q[0, 0] = 1.0  # every position points along the first axis ...
    q[0, :, 1, 1] = torch.tensor([0.0, 1.0])  # ... but one, the most deviant
    read = MemoryRead(q, torch.zeros_like(q), torch.zeros(1, 3, 2, 2))
    maps = torch.tensor([[[0.0, 0.1], [0.2, 3.0]]])
    d = describe({"s": read}, {"s": maps})
    assert torch.allclose(d.norm(dim=1), torch.ones(1))
    assert torch.allclose(d[0, 2:] * 2 ** 0.5, torch.tensor([0.0, 1.0]))


def test_the_reach_is_rehearsed_on_held_out_false_alarms_and_pseudo_anomalies():
    g = torch.Generator().manual_seed(0)
    normals = F.normalize(torch.randn(200, 16, generator=g) * 0.1 + torch.eye(16)[0], dim=1)
    # a sort of false alarm: twenty normals that drift the same way, scoring above threshold
    alarms = F.normalize(torch.randn(20, 16, generator=g) * 0.1 + torch.eye(16)[0]
                         + 0.8 * torch.eye(16)[1], dim=1)
    references = torch.cat([normals, alarms])
    scores = torch.cat([torch.rand(200, generator=g), 2 + torch.rand(20, generator=g)])
    far = F.normalize(torch.randn(50, 16, generator=g) * 0.1 + torch.eye(16)[2], dim=1)
    reach, evidence = choose_reach(references, scores, far, 5 + torch.rand(50), 1.5)
    assert reach > 1 and evidence["held_out_alarms"] == 20
    assert evidence["reaches"][str(reach)]["cleared"] > evidence["reaches"]["1.0"]["cleared"]
    # pseudo-anomalies that look like the false alarms: reaching further would hide them
    near = F.normalize(alarms + 0.02 * torch.randn(20, 16, generator=g), dim=1)
    reach, evidence = choose_reach(references, scores, near, 2 + torch.rand(20), 1.5)
    assert reach == 1.0 and evidence["reaches"]["2.0"]["auroc_loss"] > 0.005
    assert choose_reach(references[:200], scores[:200], far, 5 + torch.rand(50), 1.5)[0] == 1.0
    # pseudo-anomalies among the normals, just above the threshold: a wide reach keeps their
    # AUROC but pulls them under the threshold, and only the detection cost says so
    mid = F.normalize(torch.randn(50, 16, generator=g) * 0.1 + torch.eye(16)[0]
                      + 0.4 * torch.eye(16)[1], dim=1)
    reach, evidence = choose_reach(references, scores, mid, 1.6 + 0.2 * torch.rand(50, generator=g),
                                   1.5)
    wide = evidence["reaches"]["1.5"]
    assert wide["auroc_loss"] <= MAX_AUROC_LOSS and wide["detection_loss"] > MAX_DETECTION_LOSS
    assert evidence["reaches"][str(reach)]["detection_loss"] <= MAX_DETECTION_LOSS
    assert reach < 1.5
