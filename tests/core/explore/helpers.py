"""Reference computations shared by the explorer's tests."""

from __future__ import annotations

import numpy as np
import torch

from core.model.anomem import AnoMem
from core.train.augment import to_float


def attention(model: AnoMem, images: torch.Tensor, scale: str) -> np.ndarray:
    with torch.no_grad():
        return model(to_float(images))[scale].attention.numpy()  # (B, N, h, w)
