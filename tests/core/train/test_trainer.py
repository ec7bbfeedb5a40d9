"""core/train/trainer.py: device choice and the fit/calibration split.

Whole runs (both stages, metrics) are covered end to end in tests/core/test_pipeline.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ConfigError
from core.data.base import DataError, ImageSet
from core.train.stage2 import split_normals
from core.train.trainer import resolve_device


def image_set(labels: list[int]) -> ImageSet:
    n = len(labels)
    return ImageSet(images=torch.zeros(n, 3, 8, 8, dtype=torch.uint8),
                    labels=torch.tensor(labels), types=["normal" if y == 0 else "object"
                                                        for y in labels],
                    names=[str(i) for i in range(n)], edge=torch.zeros(n, dtype=torch.bool))


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'cuda'.*no CUDA GPU"):
        resolve_device("cuda")


def test_split_normals_holds_out_a_share_of_the_normals_only() -> None:
    labels = [0] * 30 + [1] * 5 + [0] * 10
    fit, cal = split_normals(image_set(labels), holdout=0.2, seed=3)
    normals = {i for i, y in enumerate(labels) if y == 0}
    assert len(cal) == 8 and len(fit) == 32
    assert set(fit) | set(cal) == normals and not set(fit) & set(cal)
    assert list(fit) == sorted(fit) and list(cal) == sorted(cal)
    again = split_normals(image_set(labels), holdout=0.2, seed=3)
    other = split_normals(image_set(labels), holdout=0.2, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip((fit, cal), again, strict=True))
    assert not np.array_equal(cal, other[1])


def test_split_normals_keeps_at_least_two_images_on_each_side() -> None:
    fit, cal = split_normals(image_set([0] * 4 + [1] * 9), holdout=0.01, seed=0)
    assert len(fit) == len(cal) == 2


@pytest.mark.parametrize("labels", [[0, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
def test_too_few_normal_images_is_a_data_error(labels: list[int]) -> None:
    with pytest.raises(DataError, match="need at least 4 normal training images, got 3"):
        split_normals(image_set(labels), holdout=0.15, seed=0)
