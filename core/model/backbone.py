"""The encoders: a ResNet trained from scratch (the paper's), or the frozen ImageNet-pretrained
EfficientNet-Lite0 (core/model/efficientnet.py). Both return {stage name: feature map}.

The ResNet is

Built from torchvision's `BasicBlock`. Inputs up to 64 px get the small-image stem (3x3,
stride 1, no max-pool, as in CIFAR ResNets) so that 32 px images still have 4x4 maps at
layer4; larger inputs get the standard 7x7 / stride-2 stem with max-pool.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from core.config import BACKBONES, ModelConfig

BASE_WIDTHS = (64, 128, 256, 512)
SMALL_IMAGE_MAX = 64
# Fixed input normalisation: images arrive in [0, 1]; no data-set statistics are baked in.
INPUT_MEAN, INPUT_STD = 0.5, 0.25


class ResNetFeatures(nn.Module):
    """Stem and four residual stages; `forward` returns {"layer1": ..., "layer4": ...}."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = [max(8, int(round(w * cfg.width))) for w in BASE_WIDTHS]
        self.widths = dict(zip(("layer1", "layer2", "layer3", "layer4"), widths, strict=True))
        if cfg.image_size <= SMALL_IMAGE_MAX:
            self.stem = nn.Sequential(
                nn.Conv2d(cfg.in_channels, widths[0], 3, 1, 1, bias=False),
                nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
            )
            self.stride = {"layer1": 1, "layer2": 2, "layer3": 4, "layer4": 8}
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(cfg.in_channels, widths[0], 7, 2, 3, bias=False),
                nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
            self.stride = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
        in_ch = widths[0]
        stages = []
        for i, (width, n_blocks) in enumerate(zip(widths, cfg.blocks, strict=True)):
            stride = 1 if i == 0 else 2
            stages.append(_stage(in_ch, width, n_blocks, stride))
            in_ch = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.last = max(int(s[-1]) for s in cfg.scales)  # no need to run stages past it
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)  # each block starts as the identity

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (x - INPUT_MEAN) / INPUT_STD  # (B, C, H, W) in [0, 1]
        x = self.stem(x)
        out = {}
        for i in range(1, self.last + 1):
            x = getattr(self, f"layer{i}")(x)
            out[f"layer{i}"] = x
        return out


def _stage(in_ch: int, width: int, n_blocks: int, stride: int) -> nn.Sequential:
    down = None
    if stride != 1 or in_ch != width:
        down = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride, bias=False),
                             nn.BatchNorm2d(width))
    blocks = [BasicBlock(in_ch, width, stride, down)]
    blocks += [BasicBlock(width, width) for _ in range(n_blocks - 1)]
    return nn.Sequential(*blocks)


def build_backbone(cfg: ModelConfig, pretrained: bool = True) -> tuple[nn.Module, dict[str, int]]:
    """The encoder and the channel width of each stage, so per-scale heads size themselves.

    Either has `stride`: input pixels of the encoder per map position, by stage. `pretrained`:
    load the pretrained encoder's ImageNet weights (False when a run's own weights follow).
    """
    if cfg.backbone == "resnet":
        net = ResNetFeatures(cfg)
        return net, dict(net.widths)
    from core.model.efficientnet import EfficientNetLite0

    order = BACKBONES[cfg.backbone]
    last = max(cfg.scales, key=order.index)
    encoder = EfficientNetLite0(cfg.in_channels, cfg.encoder_size, last, pretrained)
    encoder.requires_grad_(False)  # frozen: stage 1 learns the memories on its features
    return encoder.eval(), dict(encoder.widths)
