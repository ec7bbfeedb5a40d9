"""core/train/scoring.py: scoring a whole set in batches."""

from __future__ import annotations

import numpy as np
import torch

from core.config import ModelConfig
from core.model.anomem import AnoMem
from core.train.scoring import score_images


def test_maps_beyond_the_float16_range_stay_finite(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = AnoMem(tiny_cfg).eval()
    with torch.no_grad():  # normal maps that barely varied: any deviation is enormous
        for sd in model.detector.per_scale.values():
            sd.map_scale.fill_(1e-9)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    scored = score_images(model, images)
    assert scored.pixel_maps is not None and scored.pixel_maps.dtype == np.float16
    assert np.isfinite(scored.pixel_maps).all()
    assert np.abs(scored.pixel_maps).max() == np.finfo(np.float16).max  # saturated, not inf
