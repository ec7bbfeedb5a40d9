"""core/presets.py: the presets, and `run_config`'s one epoch rule for every caller."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from core.bench.runners import anomem_config
from core.bench.suites import BenchOptions, Cell
from core.cli import _config_from_args, _parser
from core.config import ConfigError, DataConfig, ModelConfig, RunConfig
from core.model.anomem import AnoMem
from core.presets import PRESETS, PRETRAINED_EPOCHS, UNBOUNDED_EPOCHS, preset, run_config


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_a_model(name: str) -> None:
    data = DataConfig(dataset="digits", normal_class="4")
    cfg = preset(name, data)
    assert isinstance(cfg, RunConfig) and cfg.preset == name
    assert cfg.data is data
    model = AnoMem(cfg.model)
    assert set(model.memories) == set(cfg.model.scales)
    assert model.memories[cfg.model.scales[0]].size == cfg.model.memory_size
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(("data", "size"), [
    (DataConfig(dataset="mvtec", root="/nowhere"), 128),  # the data set's working size
    (DataConfig(dataset="mvtec", root="/nowhere", image_size=64), 64),  # the asked size wins
    (DataConfig(dataset="digits", image_size=48), 48),
])
@pytest.mark.parametrize("name", ["scratch", "paper"])
def test_presets_size_the_model_from_the_data(name: str, data: DataConfig, size: int) -> None:
    assert preset(name, data).model.image_size == size


@pytest.mark.parametrize(("data", "size", "input_size"), [
    (DataConfig(dataset="mvtec", root="/nowhere"), 224, 224),  # aligned data: finer by default
    (DataConfig(dataset="mvtec", root="/nowhere", image_size=64), 64, 128),  # asked size wins
    (DataConfig(dataset="digits"), 32, 128),  # small images: upsampled for the encoder
    (DataConfig(dataset="folder", root="/nowhere", image_size=160), 160, 160),
])
def test_quick_preset_sizes_the_pretrained_encoder_from_the_data(
        data: DataConfig, size: int, input_size: int) -> None:
    before = data.image_size
    cfg = preset("quick", data)
    assert (cfg.model.image_size, cfg.model.input_size) == (size, input_size)
    assert cfg.data.image_size in (None, size) and data.image_size == before  # caller's intact
    assert cfg.model.backbone == "efficientnet-lite0" and cfg.model.pretrained


def test_scratch_preset_is_the_small_resnet_the_paper_path_trains() -> None:
    cfg = preset("scratch")
    assert (cfg.model.backbone, cfg.model.input_size, cfg.model.pretrained) == ("resnet", 0,
                                                                                 False)
    assert cfg.model.scales == ("layer2", "layer3", "layer4")


def test_paper_preset_is_a_resnet18() -> None:
    cfg = preset("paper")
    assert cfg.model.blocks == (2, 2, 2, 2) and cfg.model.width == 1.0
    model = AnoMem(cfg.model)
    assert model.backbone.widths == {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}


def test_quick_preset_scores_an_image() -> None:
    model = AnoMem(preset("quick").model).eval()
    with torch.no_grad():
        scores = model.score(torch.rand(1, 3, 32, 32))
    assert scores.pixel_map.shape == (1, 32, 32)


def test_unknown_preset_raises() -> None:
    with pytest.raises(ConfigError, match="preset 'huge'.*quick"):
        preset("huge")


def test_presets_do_not_share_state() -> None:
    a, b = preset("quick"), preset("quick")
    a.train.epochs = b.train.epochs + 1
    a.model.memory_size = b.model.memory_size + 1
    a.train.augment.jitter = 0.0 if b.train.augment.jitter else 0.5
    assert b == preset("quick")
    assert a != b


def test_presets_fit_one_gaussian_per_position_on_aligned_data_only() -> None:
    assert preset("quick", DataConfig(dataset="mvtec", root="x")).model.local_map == \
        "positional"
    assert preset("paper", DataConfig(dataset="mvtec", root="x")).model.local_map == \
        "positional"
    for dataset in ("shapes", "folder", "cifar10"):
        assert preset("quick", DataConfig(dataset=dataset)).model.local_map == "shared"
    with pytest.raises(ConfigError, match="local_map='pixel'"):
        ModelConfig(local_map="pixel")


def test_the_config_module_needs_no_data_module() -> None:
    """core.config sits below core.data (which reads DataConfig): no import circle."""
    code = "import sys, core.config; sys.exit('core.data' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize(("name", "epochs", "minutes", "expected"), [
    ("scratch", None, None, 20),  # no budget: the preset's epochs
    ("quick", None, None, PRETRAINED_EPOCHS),
    ("scratch", None, 2.0, UNBOUNDED_EPOCHS),  # from scratch: the budget ends it
    ("paper", None, 2.0, UNBOUNDED_EPOCHS),
    ("quick", None, 2.0, PRETRAINED_EPOCHS),  # frozen encoder: the preset's, or the budget
    ("quick", 5, 2.0, 5),  # explicit epochs always win
    ("scratch", 5, 2.0, 5),
    ("paper", 7, None, 7),
])
def test_run_config_has_one_epoch_rule(name: str, epochs: int | None, minutes: float | None,
                                       expected: int) -> None:
    cfg = run_config(name, DataConfig(), epochs=epochs, minutes=minutes)
    assert (cfg.preset, cfg.train.epochs, cfg.train.max_minutes) == (name, expected, minutes)


def test_run_config_sets_the_seed_and_device_and_applies_overrides_last() -> None:
    cfg = run_config("scratch", DataConfig(seed=3), minutes=1.0, seed=3, device="cpu",
                     overrides=["train.epochs=4", "model.rotation=true"])
    assert (cfg.train.seed, cfg.data.seed, cfg.train.device) == (3, 3, "cpu")
    assert (cfg.train.epochs, cfg.model.rotation) == (4, True)  # an override beats the rule
    assert run_config("quick").train.device == preset("quick").train.device == "auto"
    assert run_config("quick") == preset("quick")
    with pytest.raises(ConfigError, match="epochs"):
        run_config("quick", epochs=0)
    with pytest.raises(ConfigError, match="no field 'model.nope'"):
        run_config("quick", overrides=["model.nope=1"])


def test_the_cli_and_the_bench_build_the_same_run() -> None:
    """`anomem train` and `anomem bench` ask run_config alike: same choices, same config."""
    args = _parser().parse_args(["train", "--preset", "scratch", "--normal-class", "circle",
                                 "--max-minutes", "1.5", "--seed", "2", "--out", "x",
                                 "--set", "model.memory_size=16"])
    cli = _config_from_args(args)
    bench = anomem_config(Cell("shapes", "shapes", None, "circle"),
                          BenchOptions(minutes=1.5, seed=2, preset="scratch",
                                       overrides=("model.memory_size=16",)))
    assert json.dumps(cli.to_dict()) == json.dumps(bench.to_dict())
    assert cli.train.epochs == UNBOUNDED_EPOCHS and cli.model.memory_size == 16
