"""core/bench/speed.py: the step-cost report on a tiny model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from core.bench.speed import measure
from core.config import DataConfig, ModelConfig, RunConfig, TrainConfig


def test_report_is_consistent(make_model_config: Callable[..., ModelConfig]) -> None:
    cfg = RunConfig(model=make_model_config(image_size=16),
                    train=TrainConfig(batch_size=8, device="cpu"), data=DataConfig())
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    r = measure(cfg, images, steps=2)
    assert r.batch == 8 and r.device == "cpu" and r.threads == torch.get_num_threads()
    for v in (r.backbone_images_per_s, r.anomem_images_per_s, r.anomem_no_shift_images_per_s,
              r.inference_images_per_s, r.peak_memory_mb):
        assert v > 0
    assert r.step_cost_ratio == pytest.approx(r.backbone_images_per_s / r.anomem_images_per_s)
    assert r.step_cost_ratio_no_shift == pytest.approx(
        r.backbone_images_per_s / r.anomem_no_shift_images_per_s)
    assert 0 < r.data_share < 1
    assert set(r.step_cost_ratio_by_shift_fraction) == {"0.25", "0.5", "1"}
    assert r.step_cost_ratio_by_shift_fraction["1"] == pytest.approx(r.step_cost_ratio)
    assert all(v > 0 for v in r.step_cost_ratio_by_shift_fraction.values())
    assert set(r.as_dict()) >= {"step_cost_ratio", "data_share", "peak_memory_mb"}
