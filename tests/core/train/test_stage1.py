"""core/train/stage1.py: the stage-1 batches and the learning-rate plan.

Stopping and resuming stage 1 is covered in tests/core/train/test_checkpoint.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from core.config import ModelConfig, TrainConfig
from core.model.anomem import AnoMem
from core.train import stage1


@pytest.mark.parametrize(("shifts", "n_anomalies", "fraction", "n_shift"), [
    (("jigsaw",), 0, 1.0, 8), (("jigsaw", "rotate"), 3, 1.0, 8), ((), 3, 1.0, 0),
    (("jigsaw",), 3, 0.25, 2), (("rotate",), 0, 0.01, 1)])
def test_stage1_adds_a_flagged_shifted_copy_of_a_share_of_the_normals(
        make_model_config: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch,
        shifts: tuple[str, ...], n_anomalies: int, fraction: float, n_shift: int) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    class Recording(stage1.MemoryContrastLoss):
        def __call__(self, reads_a, reads_b, heads, prototypes, is_anomaly, is_shifted=None):
            seen.append((is_anomaly.clone(), is_shifted.clone(), len(reads_a["layer3"].query)))
            return super().__call__(reads_a, reads_b, heads, prototypes, is_anomaly, is_shifted)

    monkeypatch.setattr(stage1, "MemoryContrastLoss", Recording)
    torch.manual_seed(0)
    model = AnoMem(make_model_config(image_size=16, scales=("layer3",)))
    g = torch.Generator().manual_seed(0)
    normals = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=g)
    anomalies = torch.randint(0, 256, (n_anomalies, 3, 16, 16), dtype=torch.uint8, generator=g)
    tc = TrainConfig(epochs=1, batch_size=8, shift_negatives=shifts, shift_fraction=fraction)
    history, _ = stage1.train_stage1(model, normals, anomalies, tc, torch.device("cpu"))
    assert len(seen) == 2 and len(history) == 1
    n_anom = 1 if n_anomalies else 0  # batch_size // 8 labelled anomalies per batch
    for is_anomaly, is_shifted, size in seen:
        assert size == len(is_anomaly) == len(is_shifted) == 8 + n_anom + n_shift
        assert int(is_anomaly.sum()) == n_anom and int(is_shifted.sum()) == n_shift
        assert not (is_anomaly & is_shifted).any()
        assert not is_shifted[:8 + n_anom].any()  # the copies come after the originals


def test_shifted_copies_are_of_the_first_normals_of_the_batch() -> None:
    g = torch.Generator().manual_seed(0)
    normals = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=g)
    batch, is_anom, is_shift = stage1.make_batch(normals, normals[:0], 0, ("rotate",), g, 0.5)
    assert len(batch) == 12 and int(is_shift.sum()) == 4 and not is_anom.any()
    for copy, original in zip(batch[8:], normals[:4], strict=True):
        assert any(torch.equal(copy, torch.rot90(original, k, dims=(1, 2))) for k in (1, 2, 3))


def test_step_plan_without_a_budget_is_warmup_then_cosine_over_the_epochs() -> None:
    plan = stage1.StepPlan(1.0, total_steps=200, budget_s=None)
    lrs = [plan.lr(step, elapsed_s=100.0 * step) for step in range(200)]  # time plays no part
    assert lrs[0] == pytest.approx(1 / 20 * 1.0)  # warm-up: 10 % of the steps
    assert lrs[19] == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 200)))
    assert lrs[100] == pytest.approx(0.5, abs=1e-6) and lrs[-1] < 1e-3
    assert plan.planned == 200


def test_a_slow_start_does_not_shrink_a_timed_run() -> None:
    """Three 10 s steps, then 1 s steps, 100 s budget: about 70 more steps fit after the slow
    start, and the cosine is planned over them, not over the 10 that the first steps suggest."""
    plan = stage1.StepPlan(1.0, total_steps=100_000, budget_s=100.0)
    elapsed, lrs = 0.0, []
    for step in range(200):
        if elapsed > 100:
            break
        lrs.append(plan.lr(step, elapsed))
        elapsed += 10.0 if step < 3 else 1.0
    assert len(lrs) == 74  # three slow steps, then one a second up to 100 s
    assert plan.planned == pytest.approx(73, abs=2)
    assert max(lrs) > 0.95  # the warm-up completes: the run reaches its peak learning rate
    assert lrs[-1] < 0.01  # and ends on a low one as the time runs out


def test_quarter_turns_turn_each_image_by_its_own_count() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=g)
    turned, turns = stage1.quarter_turns(images, g)
    assert set(turns.tolist()) == {0, 1, 2, 3}
    for out, original, k in zip(turned, images, turns.tolist(), strict=True):
        assert torch.equal(out, torch.rot90(original, k, dims=(1, 2)))


def test_stage1_teaches_the_rotation_head_on_turned_normals(
        make_model_config: Callable[..., ModelConfig]) -> None:
    torch.manual_seed(0)
    model = AnoMem(make_model_config(image_size=16, scales=("layer3",), rotation=True))
    before = model.rotation.head.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    normals = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=g)
    tc = TrainConfig(epochs=2, batch_size=8, w_rotation=0.5)
    history, _ = stage1.train_stage1(model, normals, normals[:0], tc, torch.device("cpu"))
    assert not torch.equal(model.rotation.head.weight, before)
    # the term is the weighted cross-entropy of four classes: near 0.5 * log 4 untrained
    assert all(0 < row["rotation"] < 0.5 * 2 * math.log(4) for row in history)
    total = sum(v for k, v in history[0].items() if k in (
        "memory_contrast", "view_contrast", "align", "variance", "usage", "anomaly", "rotation"))
    assert history[0]["loss"] == pytest.approx(total, rel=1e-5)
