"""core/model/backbone.py: stems, stage resolutions, widths and the stages that run."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from core.config import ModelConfig
from core.model.backbone import BASE_WIDTHS, build_backbone

LAYERS = ("layer1", "layer2", "layer3", "layer4")
ALL_SCALES = LAYERS


def spatial(features: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    return {k: tuple(v.shape[-2:]) for k, v in features.items()}


@pytest.mark.parametrize("size", [32, 64])
def test_small_image_stem_keeps_full_resolution_at_layer1(
        make_model_config: Callable[..., ModelConfig], size: int) -> None:
    net, _ = build_backbone(make_model_config(image_size=size, scales=ALL_SCALES))
    features = net(torch.rand(2, 3, size, size))
    assert spatial(features) == {
        "layer1": (size, size), "layer2": (size // 2, size // 2),
        "layer3": (size // 4, size // 4), "layer4": (size // 8, size // 8),
    }
    assert net.stride == {"layer1": 1, "layer2": 2, "layer3": 4, "layer4": 8}


def test_standard_stem_for_larger_images(make_model_config: Callable[..., ModelConfig]) -> None:
    net, _ = build_backbone(make_model_config(image_size=128, scales=ALL_SCALES))
    features = net(torch.rand(1, 3, 128, 128))
    assert spatial(features) == {
        "layer1": (32, 32), "layer2": (16, 16), "layer3": (8, 8), "layer4": (4, 4),
    }
    for layer, (h, _) in spatial(features).items():
        assert net.stride[layer] * h == 128


@pytest.mark.parametrize("width", [0.125, 0.25, 0.5, 1.0])
def test_widths_scale_with_the_multiplier_and_match_the_maps(
        make_model_config: Callable[..., ModelConfig], width: float) -> None:
    net, channels = build_backbone(make_model_config(width=width, scales=ALL_SCALES))
    expected = {k: max(8, round(w * width)) for k, w in zip(LAYERS, BASE_WIDTHS, strict=True)}
    assert channels == expected
    features = net(torch.rand(2, 3, 32, 32))
    assert {k: v.shape[1] for k, v in features.items()} == channels


def test_widths_have_a_floor_of_eight(make_model_config: Callable[..., ModelConfig]) -> None:
    _, channels = build_backbone(make_model_config(width=0.05))
    assert channels["layer1"] == 8 and channels["layer4"] == round(512 * 0.05)


def test_grayscale_input(make_model_config: Callable[..., ModelConfig]) -> None:
    net, channels = build_backbone(make_model_config(in_channels=1))
    features = net(torch.rand(2, 1, 32, 32))
    assert features["layer4"].shape == (2, channels["layer4"], 4, 4)


@pytest.mark.parametrize(("scales", "computed"), [
    (("layer2",), ("layer1", "layer2")),
    (("layer1", "layer3"), ("layer1", "layer2", "layer3")),
    (("layer4",), LAYERS),
])
def test_only_stages_up_to_the_last_scale_run(
        make_model_config: Callable[..., ModelConfig], scales: tuple[str, ...],
        computed: tuple[str, ...]) -> None:
    net, _ = build_backbone(make_model_config(scales=scales))
    called: list[str] = []
    for layer in LAYERS:
        getattr(net, layer).register_forward_hook(
            lambda _m, _i, _o, name=layer: called.append(name))
    features = net(torch.rand(1, 3, 32, 32))
    assert tuple(features) == computed
    assert tuple(called) == computed


def test_blocks_per_stage_follow_the_config(
        make_model_config: Callable[..., ModelConfig]) -> None:
    net, _ = build_backbone(make_model_config(blocks=(1, 2, 3, 1)))
    assert [len(getattr(net, layer)) for layer in LAYERS] == [1, 2, 3, 1]
