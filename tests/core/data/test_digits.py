"""scikit-learn's bundled digits: scaling, upscaling and the fixed stratified split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

import core.data
from core.data import digits


def test_classes() -> None:
    assert digits.classes(None) == [str(d) for d in range(10)]
    assert core.data.list_classes("digits") == digits.classes(None)


def test_split_is_stratified_disjoint_and_complete() -> None:
    train, test = digits.load_pools(None, 16, None)
    target = load_digits().target
    assert len(train) + len(test) == len(target) == 1797
    assert abs(len(test) / len(target) - 0.4) < 0.01
    assert not set(train.names) & set(test.names)
    per_class = Counter(target.tolist())
    in_train = Counter(train.classes)
    for digit, total in per_class.items():
        assert abs(in_train[str(digit)] - 0.6 * total) <= 1
    index = [int(name.rsplit("/", 1)[1]) for name in train.names]
    assert [str(target[i]) for i in index] == train.classes  # names point at the source image
    assert train.names[0].startswith("digits/train/") and test.names[0].startswith("digits/test/")


def test_split_is_deterministic() -> None:
    first = digits.load_pools(None, 12, None)
    second = digits.load_pools(None, 12, None)
    for a, b in zip(first, second, strict=True):
        assert a.names == b.names and a.classes == b.classes
        assert torch.equal(a.images, b.images)
    target = load_digits().target
    np.testing.assert_array_equal(digits.split_indices(target)[1],
                                  digits.split_indices(target.copy())[1])


def test_values_and_upscaling() -> None:
    native, _ = digits.load_pools(None, 8, None)
    images = load_digits().images
    first = int(native.names[0].rsplit("/", 1)[1])
    expected = torch.from_numpy(np.rint(images[first] * 255 / 16).astype(np.uint8))
    assert torch.equal(native.images[0, 0], expected)
    assert torch.equal(native.images[:, 0], native.images[:, 2])  # grey in three channels
    assert native.images.max() == 255 and native.images.min() == 0
    big, _ = digits.load_pools(None, 32, None)
    assert big.images.shape == (len(native), 3, 32, 32) and big.images.dtype == torch.uint8
    # reference: PIL's bilinear enlargement of the native 8x8 image (same half-pixel grid)
    for image, small in zip(big.images[:20, 0], native.images[:20, 0], strict=True):
        ref = Image.fromarray(small.numpy()).resize((32, 32), Image.Resampling.BILINEAR)
        diff = image.to(torch.int16) - torch.from_numpy(np.array(ref)).to(torch.int16)
        assert diff.abs().max() <= 1
