"""core/bench/speed.py: the step-cost report on a tiny model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from core.bench.speed import measure
from core.config import DataConfig, ModelConfig, RunConfig, TrainConfig


def test_a_real_measurement_reports_every_figure(
        make_model_config: Callable[..., ModelConfig]) -> None:
    cfg = RunConfig(model=make_model_config(image_size=16),
                    train=TrainConfig(batch_size=8, device="cpu"), data=DataConfig())
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    r = measure(cfg, images, steps=2)
    assert r.batch == 8 and r.device == "cpu" and r.threads == torch.get_num_threads()
    for v in (r.backbone_images_per_s, r.anomem_images_per_s, r.anomem_no_shift_images_per_s,
              r.inference_images_per_s, r.peak_memory_mb):
        assert v > 0
    assert 0 < r.data_share < 1
    assert set(r.step_cost_ratio_by_shift_fraction) == {"0.25", "0.5", "1"}
    assert set(r.as_dict()) >= {"step_cost_ratio", "data_share", "peak_memory_mb"}


def test_ratios_follow_the_timed_seconds_exactly(
        make_model_config: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    """A scripted clock: each timed call reports known seconds, in the order `measure` times
    them (the backbone, the step at each share of shifted copies, making a batch, scoring)."""
    from core.bench import speed

    seconds = iter([1.0,  # bare backbone
                    1.5, 2.0, 2.5, 3.0,  # steps with 0, 25, 50 and 100 % shifted copies
                    0.5,  # making a batch and its views
                    0.25])  # scoring the test images
    monkeypatch.setattr(speed, "_timed", lambda fn, steps, device: next(seconds))
    cfg = RunConfig(model=make_model_config(image_size=16),
                    train=TrainConfig(batch_size=8, device="cpu"), data=DataConfig())
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    r = measure(cfg, images, steps=2)
    assert r.backbone_images_per_s == 8 / 1.0 and r.anomem_images_per_s == 8 / 3.0
    assert r.anomem_no_shift_images_per_s == 8 / 1.5
    assert r.step_cost_ratio == 3.0 and r.step_cost_ratio_no_shift == 1.5
    assert r.step_cost_ratio_by_shift_fraction == {"0.25": 2.0, "0.5": 2.5, "1": 3.0}
    assert r.data_share == pytest.approx(0.5 / 3.5) and r.inference_images_per_s == 16 / 0.25
    assert next(seconds, None) is None  # every scripted time was used, none more


def test_inference_rate_times_scoring_on_either_encoder(
        make_model_config: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    from core.bench import speed

    timed: list[int] = []

    def one_second(fn, steps, device):
        fn()
        timed.append(steps)
        return 2.0

    monkeypatch.setattr(speed, "_timed", one_second)
    images = torch.randint(0, 256, (300, 3, 16, 16), dtype=torch.uint8)
    for model in (make_model_config(image_size=16),
                  make_model_config(image_size=16, backbone="efficientnet-lite0", input_size=32,
                                    scales=("stage3_s8",))):
        cfg = RunConfig(model=model, train=TrainConfig(device="cpu"), data=DataConfig())
        assert speed.inference_rate(cfg, images) == 128.0  # 256 images scored in 2 s
    assert timed == [3, 3]
