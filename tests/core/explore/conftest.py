"""A tiny untrained model and random images: the explorer is checked against brute force."""

from __future__ import annotations

import pytest
import torch

from core.config import ModelConfig
from core.model.anomem import AnoMem


@pytest.fixture(scope="module")
def model() -> AnoMem:
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=16, width=0.125, memory_size=8, memory_dim=8, head_dim=8,
                      beta=4.0)
    return AnoMem(cfg).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (11, 3, 16, 16), generator=g, dtype=torch.uint8)
