"""core/config.py: range checks, the JSON round trip, older versions and overrides."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from core.config import (
    CONFIG_VERSION,
    AugmentConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    with_overrides,
)
from core.presets import preset

OUT_OF_RANGE = [
    (ModelConfig, {"image_size": 4}, "image_size"),
    (ModelConfig, {"image_size": 2048}, "image_size"),
    (ModelConfig, {"in_channels": 2}, "in_channels"),
    (ModelConfig, {"blocks": (1, 1, 1)}, "blocks"),
    (ModelConfig, {"blocks": (1, 0, 1, 1)}, "blocks"),
    (ModelConfig, {"width": 0.01}, "width"),
    (ModelConfig, {"width": 8.0}, "width"),
    (ModelConfig, {"scales": ()}, "scales"),
    (ModelConfig, {"scales": ("layer2", "layer5")}, "scales"),
    (ModelConfig, {"memory_size": 1}, "memory_size"),
    (ModelConfig, {"memory_dim": 1}, "memory_dim"),
    (ModelConfig, {"beta": 0.0}, "beta"),
    (ModelConfig, {"topk_ratio": 0.0}, "topk_ratio"),
    (ModelConfig, {"topk_ratio": 1.5}, "topk_ratio"),
    (ModelConfig, {"head_dim": -1}, "head_dim"),
    (ModelConfig, {"head_dim": 1}, "head_dim"),
    (ModelConfig, {"layout_grid": 0}, "layout_grid"),
    (ModelConfig, {"layout_grid": 17}, "layout_grid"),
    (ModelConfig, {"layout_grid": 4.0}, "layout_grid"),
    (ModelConfig, {"layout_rank": 0}, "layout_rank"),
    (ModelConfig, {"layout_rank": 5000}, "layout_rank"),
    (ModelConfig, {"layout_source": "readout"}, "layout_source"),
    (ModelConfig, {"local_weight": -0.1}, "local_weight"),
    (ModelConfig, {"local_weight": 1.5}, "local_weight"),
    (AugmentConfig, {"crop_scale": (0.0, 1.0)}, "crop_scale"),
    (AugmentConfig, {"crop_scale": (0.8, 0.5)}, "crop_scale"),
    (AugmentConfig, {"crop_scale": (0.5, 1.5)}, "crop_scale"),
    (AugmentConfig, {"jitter": 1.5}, "jitter"),
    (AugmentConfig, {"hue": 0.6}, "hue"),
    (AugmentConfig, {"grayscale_p": -0.1}, "grayscale_p"),
    (TrainConfig, {"epochs": 0}, "epochs"),
    (TrainConfig, {"batch_size": 1}, "batch_size"),
    (TrainConfig, {"lr": 0.0}, "lr"),
    (TrainConfig, {"temperature": -1.0}, "temperature"),
    (TrainConfig, {"max_minutes": 0.0}, "max_minutes"),
    (TrainConfig, {"holdout": 0.0}, "holdout"),
    (TrainConfig, {"holdout": 0.95}, "holdout"),
    (TrainConfig, {"threshold_quantile": 0.4}, "threshold_quantile"),
    (TrainConfig, {"threshold_quantile": 1.0}, "threshold_quantile"),
    (TrainConfig, {"device": "tpu"}, "device"),
    (TrainConfig, {"augment": {**dataclasses.asdict(AugmentConfig()), "jitter": 2.0}}, "jitter"),
    (TrainConfig, {"augment": {"jitter": 0.5}}, "'train.augment': missing crop_scale"),
    (TrainConfig, {"augment": 3}, "augment"),
    (TrainConfig, {"stage1_share": 0.0}, "stage1_share"),
    (TrainConfig, {"stage1_share": 1.5}, "stage1_share"),
    (TrainConfig, {"weight_decay": -0.1}, "weight_decay"),
    (TrainConfig, {"shift_negatives": ("jigsaw", "blur")}, "shift_negatives"),
    (TrainConfig, {"shift_fraction": 0.0}, "shift_fraction"),
    (TrainConfig, {"shift_fraction": 1.5}, "shift_fraction"),
    (TrainConfig, {"combine": "mean"}, "combine"),
    (DataConfig, {"setting": "semi-supervised"}, "setting"),
    (DataConfig, {"anomaly_ratio": 0.0}, "anomaly_ratio"),
    (DataConfig, {"anomaly_ratio": 1.5}, "anomaly_ratio"),
    (DataConfig, {"max_train": -1}, "max_train"),
    (DataConfig, {"max_train": 3}, "max_train"),
    (DataConfig, {"max_train": 8.0}, "max_train"),
    (DataConfig, {"image_size": 0}, "image_size"),
    (DataConfig, {"image_size": 2048}, "image_size"),
    (DataConfig, {"image_size": 32.0}, "image_size"),
]


@pytest.mark.parametrize(("cls", "kwargs", "field"), OUT_OF_RANGE,
                         ids=[f"{c.__name__}-{f}-{v}" for c, kw, f in OUT_OF_RANGE
                              for v in kw.values()])
def test_out_of_range_value_raises_config_error_naming_the_field(
        cls: type, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        cls(**kwargs)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(("cls", "kwargs"), [
    (ModelConfig, {"head_dim": 2, "layout_grid": 1, "layout_rank": 1, "local_weight": 0.0}),
    (ModelConfig, {"layout_grid": 16, "layout_rank": 4096, "local_weight": 1.0,
                   "layout_source": "deviation"}),
    (TrainConfig, {"stage1_share": 1.0, "weight_decay": 0.0, "shift_negatives": ()}),
    (TrainConfig, {"shift_negatives": ["rotate", "jigsaw"], "combine": "fixed"}),
    (DataConfig, {"max_train": 4, "image_size": 8}),
    (DataConfig, {"image_size": 1024}),
])
def test_boundary_values_are_accepted(cls: type, kwargs: dict[str, Any]) -> None:
    cfg = cls(**kwargs)
    for name, value in kwargs.items():
        assert getattr(cfg, name) == (tuple(value) if isinstance(value, list) else value)


def custom_config() -> RunConfig:
    return RunConfig(
        model=ModelConfig(image_size=48, in_channels=1, blocks=(2, 1, 1, 2), width=0.5,
                          scales=("layer1", "layer3"), memory_size=12, memory_dim=6,
                          beta=3.5, learn_beta=True, head_dim=10, topk_ratio=0.2),
        train=TrainConfig(epochs=3, batch_size=16, lr=0.01, temperature=0.3, w_align=0.0,
                          max_minutes=2.5, holdout=0.2, device="cpu", seed=7,
                          augment=AugmentConfig(crop_scale=(0.3, 0.9), flip=False, jitter=0.4,
                                                hue=0.1, grayscale_p=0.2)),
        data=DataConfig(dataset="digits", normal_class="3", setting="unbalanced",
                        anomaly_ratio=0.1, anomaly_classes=("1", "7"), image_size=24,
                        max_train=100, seed=5),
        preset="paper",
    )


def test_to_dict_from_dict_round_trip_through_json() -> None:
    cfg = custom_config()
    raw = json.loads(json.dumps(cfg.to_dict()))
    back = RunConfig.from_dict(raw)
    assert back == cfg
    assert isinstance(back.model.blocks, tuple) and isinstance(back.model.scales, tuple)
    assert isinstance(back.train.augment, AugmentConfig)
    assert back.train.augment.crop_scale == (0.3, 0.9)
    assert back.data.anomaly_classes == ("1", "7")
    assert back.version == CONFIG_VERSION


def test_default_config_round_trips() -> None:
    assert RunConfig.from_dict(json.loads(json.dumps(RunConfig().to_dict()))) == RunConfig()


def edited(path: tuple[str, ...], value: Any) -> dict:
    raw = json.loads(json.dumps(RunConfig().to_dict()))
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return raw


@pytest.mark.parametrize(("raw", "match"), [
    ("not a dict", "JSON object"),
    ({**RunConfig().to_dict(), "version": CONFIG_VERSION + 1}, "version"),
    ({k: v for k, v in RunConfig().to_dict().items() if k != "version"}, "version"),
    ({k: v for k, v in RunConfig().to_dict().items() if k != "train"},
     "missing or malformed section 'train'"),
    (edited(("model", "unknown_knob"), 1), "section 'model': unknown unknown_knob"),
    (edited(("model", "memory_size"), "8"), "config"),
    (edited(("model",), [1, 2]), "config"),
    (edited(("train", "augment", "bogus"), 1), "section 'train.augment': unknown bogus"),
    (edited(("model", "width"), 100), "width"),
])
def test_from_dict_rejects_bad_input_with_config_error(raw: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(raw)


def without(section: str, name: str) -> dict:
    raw = json.loads(json.dumps(RunConfig().to_dict()))
    del raw[section][name]
    return raw


@pytest.mark.parametrize(("raw", "match"), [
    pytest.param(edited(("model", "blocks"), ["x", 1, 1, 1]), "blocks", id="blocks-not-int"),
    pytest.param(edited(("train", "augment", "crop_scale"), ["x", 1]), "crop_scale",
                 id="crop-not-float"),
    pytest.param(edited(("train", "augment"), 3), "augment", id="augment-not-object"),
    pytest.param(edited(("model", "memory_size"), 8.5), "memory_size", id="memory_size-float"),
    pytest.param(edited(("data", "max_train"), 2), "max_train", id="max_train-too-small"),
    pytest.param(without("model", "topk_ratio"), "section 'model': missing topk_ratio",
                 id="model-field-missing"),
    pytest.param(without("train", "augment"), "section 'train': missing augment",
                 id="train-field-missing"),
    pytest.param(without("data", "seed"), "section 'data': missing seed",
                 id="data-field-missing"),
    pytest.param(edited(("data", "extra"), 1), "section 'data': unknown extra",
                 id="data-field-unknown"),
    pytest.param(without("train", "augment") | {"train": {**without("train", "augment")["train"],
                                                           "augments": {}}},
                 "section 'train': missing augment; unknown augments", id="train-field-renamed"),
    # A TypeError of a range check on a mistyped value is wrapped too:
    pytest.param(edited(("model", "width"), "wide"), "^config: ", id="width-not-a-number"),
    pytest.param(edited(("train", "lr"), None), "^config: ", id="lr-null"),
])
def test_from_dict_rejects_mistyped_or_missing_fields(raw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(raw)


@pytest.mark.parametrize(("fields", "match"), [
    ({"backbone": "vgg"}, "backbone='vgg'"),
    ({"backbone": "efficientnet-lite0"}, "scales=.*stage3_s8"),  # resnet scale names
    ({"input_size": 64}, "input_size=64: the resnet encoder"),
    ({"backbone": "efficientnet-lite0", "scales": ("stage3_s8",), "input_size": 16},
     "input_size=16"),
    ({"backbone": "efficientnet-lite0", "scales": ("stage3_s8",), "rotation": True},
     "rotation=true"),
])
def test_model_config_checks_the_encoder(fields: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**fields)


@pytest.mark.parametrize(("shape", "match"), [
    ((96, 40), r"image_shape=\[96, 40\]: expected .* shorter side is image_size=32"),
    ((2048, 32), "longer at most 1024"),
    ((96,), r"image_shape=\[96\]"),
])
def test_model_config_checks_the_image_shape(shape: tuple, match: str) -> None:
    assert ModelConfig(image_size=32, image_shape=(96, 32)).shape == (96, 32)
    assert ModelConfig(image_size=32, image_shape=(32, 80), input_size=0).encoder_shape == (32, 80)
    assert ModelConfig(image_size=32).shape == (32, 32)
    with pytest.raises(ConfigError, match=match):
        ModelConfig(image_size=32, image_shape=shape)


def test_a_version_9_config_reads_square_images() -> None:
    raw = preset("quick", DataConfig(dataset="mvtec", root="x")).to_dict()
    raw["version"] = 9
    del raw["model"]["image_shape"], raw["data"]["keep_aspect"]
    cfg = RunConfig.from_dict(raw)
    assert cfg.model.shape == (224, 224) and cfg.data.keep_aspect is False


def test_a_version_8_config_reads_as_the_from_scratch_resnet() -> None:
    raw = preset("scratch").to_dict()
    raw["version"] = 8
    del raw["model"]["backbone"], raw["model"]["input_size"]
    del raw["train"]["views"], raw["train"]["cache_images"]
    del raw["model"]["image_shape"], raw["data"]["keep_aspect"]
    cfg = RunConfig.from_dict(raw)
    assert (cfg.model.backbone, cfg.model.input_size) == ("resnet", 0)
    assert cfg.model == preset("scratch").model


def test_a_version_1_config_reads_as_a_shared_local_map() -> None:
    old = RunConfig().to_dict()
    del old["model"]["local_map"]
    old["version"] = 1
    cfg = RunConfig.from_dict(old)
    assert cfg.model.local_map == "shared" and cfg.version == CONFIG_VERSION
    old["model"]["local_map"] = "positional"  # a field version 1 never had
    assert RunConfig.from_dict(old).model.local_map == "positional"


def test_a_version_2_config_gives_every_normal_a_shifted_copy() -> None:
    old = RunConfig().to_dict()
    del old["train"]["shift_fraction"]
    old["version"] = 2
    cfg = RunConfig.from_dict(old)
    assert cfg.train.shift_fraction == 1.0 and cfg.version == CONFIG_VERSION
    del old["model"]["local_map"]
    old["version"] = 1  # both fields added since version 1
    cfg = RunConfig.from_dict(old)
    assert (cfg.model.local_map, cfg.train.shift_fraction) == ("shared", 1.0)


def test_a_version_5_config_has_no_rotation_head() -> None:
    old = RunConfig().to_dict()
    del old["model"]["rotation"], old["train"]["w_rotation"]
    old["version"] = 5
    cfg = RunConfig.from_dict(old)
    assert (cfg.model.rotation, cfg.train.w_rotation, cfg.version) == (False, 1.0, CONFIG_VERSION)


def test_a_version_7_config_has_no_pixel_layout_term() -> None:
    old = RunConfig().to_dict()
    del old["model"]["pixel_layout"]
    old["version"] = 7
    assert RunConfig.from_dict(old).model.pixel_layout is False
    assert RunConfig().model.pixel_layout is True


def test_overrides_set_any_field_and_run_the_checks_again() -> None:
    cfg = with_overrides(RunConfig(), ["model.rotation=true", "train.lr=0.01",
                                       "data.normal_class=cat", "train.augment.flip=false"])
    assert (cfg.model.rotation, cfg.train.lr, cfg.data.normal_class) == (True, 0.01, "cat")
    assert cfg.train.augment.flip is False
    assert RunConfig().model.rotation is False  # the input is left as it was


@pytest.mark.parametrize(("setting", "match"), [
    ("model.rotation", "SECTION.FIELD=VALUE"),
    ("rotation=true", "SECTION.FIELD=VALUE"),
    ("model.rotaton=true", "no field 'model.rotaton'.*model.rotation"),
    ("train.augment=1", "no field.*train.augment.flip"),  # a section, not a field
    ("version=3", "SECTION.FIELD=VALUE"),
    ("train.lr=-1", "lr"),
    ("model.rotation=yes", "model.rotation='yes': expected true or false"),
])
def test_bad_overrides_name_the_setting(setting: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        with_overrides(RunConfig(), [setting])
