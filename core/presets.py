"""The presets, and the one function that builds a run's config from a preset, the data and
the budget: the CLI (`anomem train`, `anomem bench`), the app's Train page and the benchmark
all call `run_config`, so the same choices give the same run wherever they are made.

core.data (which loads torch) is imported where a preset reads the data set's facts, not at
the top: the CLI reads PRESETS while it builds its parser, and `anomem --help` stays quick.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from core.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    with_overrides,
)

PRESETS = ("quick", "scratch", "paper")
PRETRAINED_SCALES = ("stage3_s8", "stage5_s16", "stage7_s32")
# The quick preset on the pretrained encoder (chosen on the general suite: benchmarks/README.md)
PRETRAINED_INPUT = 128  # smaller images are upsampled to this side
PRETRAINED_ALIGNED_SIZE = 224  # working size of aligned (MVTec-layout) data sets
PRETRAINED_MEMORY = 256  # prototypes per scale
PRETRAINED_EPOCHS = 20
# Epochs of a from-scratch encoder given a time budget and no epoch count: the budget ends it
UNBOUNDED_EPOCHS = 100_000


def preset(name: str, data: DataConfig | None = None) -> RunConfig:
    """The named preset. `quick`: memories on the frozen ImageNet-pretrained EfficientNet-Lite0,
    minutes on a 2-core CPU; `scratch`: the same memories on a small ResNet trained from scratch
    (the paper's path at CPU scale); `paper`: a ResNet-18 from scratch, GPU-scale epochs.

    The model's input size follows the data: `data.image_size`, else the data set's own; the
    pretrained encoder sees images of at least PRETRAINED_INPUT pixels a side.
    """
    from core.data import DATASETS  # here, not at the top: see the module's note

    data = data or DataConfig()
    info = DATASETS.get(data.dataset)
    if name == "quick":
        if data.image_size is None and info is not None and info.aligned:
            # fine defects need the resolution (a copy: the caller's config is left alone)
            data = dataclasses.replace(data, image_size=PRETRAINED_ALIGNED_SIZE)
        cfg = RunConfig(
            model=ModelConfig(backbone="efficientnet-lite0", scales=PRETRAINED_SCALES,
                              memory_size=PRETRAINED_MEMORY, memory_dim=128, head_dim=128),
            # stage 2 passes its images through the encoder too: it gets 40 % of a budget
            train=TrainConfig(epochs=PRETRAINED_EPOCHS, lr=1e-3, shift_fraction=0.5,
                              stage1_share=0.6),
            data=data, preset=name)
    elif name == "scratch":
        cfg = RunConfig(model=ModelConfig(), train=TrainConfig(), data=data, preset=name)
    elif name == "paper":
        cfg = RunConfig(
            model=ModelConfig(blocks=(2, 2, 2, 2), width=1.0, memory_size=256, memory_dim=128,
                              head_dim=128),
            train=TrainConfig(epochs=200, batch_size=256, lr=1e-3),
            data=data,
            preset=name,
        )
    else:
        raise ConfigError(f"preset {name!r}: expected one of {', '.join(PRESETS)}")
    cfg.model.image_size = data.image_size or (info.image_size if info else 32)
    cfg.model.pixel_size = min(32, cfg.model.image_size)
    if cfg.model.pretrained:
        cfg.model.input_size = max(PRETRAINED_INPUT, cfg.model.image_size)
    if info is not None and info.aligned:
        cfg.model.local_map = "positional"
        cfg.train.shift_negatives = ("jigsaw", "cutpaste", "scar")
    return cfg


def run_config(name: str, data: DataConfig | None = None, *, epochs: int | None = None,
               minutes: float | None = None, seed: int = 0, device: str | None = None,
               overrides: Sequence[str] = ()) -> RunConfig:
    """The config of a run: preset `name` on `data`, within `minutes` (None: no budget), with
    "section.field=value" `overrides` applied last (as `anomem train --set`); every check run.

    The epoch rule, the same everywhere: explicit `epochs` always win. Without them, a budget
    lets a from-scratch encoder train until it is spent (epochs unbounded): stage 1 is what it
    learns from, and the budget says how long it may. Memories on a frozen pretrained encoder
    stop at the preset's epochs, or earlier if the budget says so: their loss is flat by then,
    and more epochs would only spend the budget. Without a budget, the preset's epochs.
    """
    cfg = preset(name, data)
    if epochs is not None:
        cfg.train.epochs = epochs
    elif minutes is not None and not cfg.model.pretrained:
        cfg.train.epochs = UNBOUNDED_EPOCHS
    cfg.train.max_minutes = minutes
    cfg.train.seed = seed
    if device is not None:
        cfg.train.device = device
    return with_overrides(cfg, overrides)
