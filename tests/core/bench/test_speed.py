"""core/bench/speed.py: the step-cost report on a tiny model, a saved detector timed with
PyTorch and onnxruntime, the speed suite's runner and its table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.bench import runners
from core.bench.results import Results
from core.bench.speed import measure, scoring_rate
from core.bench.suites import BenchOptions
from core.bench.tables import render_markdown
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


def test_a_saved_detector_is_timed_with_both_back_ends_at_each_batch(
        make_model_config: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    """A real export of a tiny run; the timed calls are recorded: every back end scores the
    same images at each batch size, one warm-up batch first."""
    from core.bench import speed

    calls: list[tuple[str, int, int]] = []
    real = speed.scoring_rate

    def recorded(detector, images, batch):
        kind = "onnxruntime" if detector.source.endswith(".onnx") else "pytorch"
        calls.append((kind, batch, len(images)))
        return real(detector, images[:batch], batch)  # one call's worth: the test stays quick

    monkeypatch.setattr(speed, "scoring_rate", recorded)
    cfg = RunConfig(model=make_model_config(image_size=16), train=TrainConfig(device="cpu"),
                    data=DataConfig())
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    r = speed.deployed_rate(cfg, images)
    assert set(r.images_per_s) == {"pytorch", "onnxruntime"}
    assert all(set(rates) == {"1", "32"} and min(rates.values()) > 0
               for rates in r.images_per_s.values())
    assert r.images == {"1": 64, "32": 256} and r.shape == (16, 16) and r.pytorch_device == "cpu"
    assert r.export_relative_diff <= 1e-4 and r.export_s > 0
    assert calls == [(kind, b, n) for kind in ("pytorch", "onnxruntime")
                     for b, n in ((1, 64), (32, 256))]  # 40 images, repeated to the count


def test_scoring_rate_warms_up_then_times_every_image() -> None:
    batches: list[int] = []
    detector = SimpleNamespace(score=lambda images, batch_size: batches.append(len(images)))
    assert scoring_rate(detector, torch.zeros(64, 3, 8, 8), 32) > 0
    assert batches == [32, 64]  # one batch to warm up, then all 64 images at batch 32


DEPLOYED = {name: {"backbone": backbone, "shape": [32, 32], "pytorch_device": "cpu",
                   "threads": 2, "images": {"1": 64, "32": 256},
                   "images_per_s": {"pytorch": {"1": torch_1, "32": torch_32},
                                    "onnxruntime": {"1": onnx_1, "32": onnx_32}},
                   "export_s": 8.0, "export_relative_diff": 1e-5}
            for name, backbone, torch_1, torch_32, onnx_1, onnx_32 in (
                ("scratch", "resnet", 30.0, 400.0, 120.0, 600.0),
                ("pretrained", "efficientnet-lite0", 20.0, 70.0, 60.0, 140.0))}
SPEED = {"device": "cpu", "threads": 2, "batch": 128, "dataset": "folder", "image_size": 32,
         "backbone_images_per_s": 700.0, "anomem_images_per_s": 200.0,
         "anomem_no_shift_images_per_s": 400.0, "step_cost_ratio": 3.5,
         "step_cost_ratio_no_shift": 1.75, "step_cost_ratio_by_shift_fraction": {"1": 3.5},
         "inference_images_per_s": 3000.0, "data_share": 0.02, "peak_memory_mb": 2000.0,
         "pretrained": {"inference_images_per_s": 150.0, "input_size": 128}}


def test_the_speed_table_shows_both_back_ends_side_by_side(tmp_path: Path) -> None:
    (tmp_path / "speed.json").write_text(json.dumps({**SPEED, "deployed": DEPLOYED}))
    md = render_markdown(Results(tmp_path / "r.csv"), BenchOptions(out=tmp_path))
    assert ("| saved detector, from-scratch encoder (resnet), batch 1 | PyTorch 30 images/s, "
            "onnxruntime 120 images/s (4.00x) |") in md
    assert ("| saved detector, pretrained encoder (efficientnet-lite0), batch 32 | PyTorch 70 "
            "images/s, onnxruntime 140 images/s (2.00x) |") in md
    assert md.count("| saved detector,") == 4
    assert "PyTorch on cpu, 2 threads" in md
    assert "64 images at batch 1 and 256 images at batch 32" in md
    assert "| inference (scores and maps), from-scratch encoder | 3000 images/s |" in md
    (tmp_path / "speed.json").write_text(json.dumps(SPEED))  # a file from before: no rows
    md = render_markdown(Results(tmp_path / "r.csv"), BenchOptions(out=tmp_path))
    assert "saved detector" not in md.lower() and "| peak memory | 2000 MB |" in md


def test_the_speed_suite_adds_only_what_its_file_lacks(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A speed.json from before keeps its step timings and gains what it lacks (the
    pretrained encoder's rate, the saved detectors); a complete one is left alone; a missing
    one is timed in full."""
    from core.bench import speed

    timed: list[str] = []

    def record(name: str, value: object) -> Callable[..., object]:
        return lambda cfg, *args, **kwargs: (timed.append(f"{name} {cfg.model.backbone}"),
                                             value)[1]

    monkeypatch.setattr(runners, "load_split", lambda data: SimpleNamespace(
        train=SimpleNamespace(images=torch.zeros(4, 3, 32, 32, dtype=torch.uint8))))
    monkeypatch.setattr(speed, "measure", record("measure", SimpleNamespace(
        as_dict=lambda: {"steps": 1})))
    monkeypatch.setattr(speed, "inference_rate", record("rate", 150.0))
    monkeypatch.setattr(speed, "deployed_rate", record("deployed", SimpleNamespace(
        as_dict=lambda: {"b": 1})))
    old = {k: v for k, v in SPEED.items() if k != "pretrained"}
    (tmp_path / "speed.json").write_text(json.dumps(old))
    opts = BenchOptions(out=tmp_path, device="cpu")
    runners.run_speed(opts, lambda message: None)
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert timed == ["rate efficientnet-lite0", "deployed resnet", "deployed efficientnet-lite0"]
    assert saved == {**old, "pretrained": {"inference_images_per_s": 150.0, "input_size": 128},
                     "deployed": {"scratch": {"b": 1}, "pretrained": {"b": 1}}}
    runners.run_speed(opts, lambda message: None)
    assert len(timed) == 3  # nothing timed again
    (tmp_path / "speed.json").unlink()
    runners.run_speed(opts, lambda message: None)
    assert timed[3:] == ["measure resnet", "rate efficientnet-lite0", "deployed resnet",
                         "deployed efficientnet-lite0"]
    assert {"steps", "dataset", "pretrained", "deployed"} <= json.loads(
        (tmp_path / "speed.json").read_text()).keys()
