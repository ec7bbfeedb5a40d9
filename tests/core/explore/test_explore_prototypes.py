"""core/explore/prototypes.py: top patches, near-duplicates, receptive-field crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core import explore as ex
from tests.core.explore.helpers import attention


@pytest.mark.parametrize("one_per_image", [True, False])
def test_top_patches_are_the_highest_attention_positions(model, images, one_per_image):
    scale, k = "layer3", 4
    att = attention(model, images, scale)
    b, n, h, w = att.shape
    pp = ex.top_patches(model, images, scale, per_prototype=k, batch_size=3,
                        one_per_image=one_per_image)
    assert pp.size == n and pp.map_size == (h, w) and pp.stride == model.stride(scale)
    for p in range(n):
        per_pos = att[:, p].reshape(b, -1)
        reference = per_pos.max(1) if one_per_image else per_pos.reshape(-1)
        expected = np.sort(reference)[::-1][:k]
        got = np.array([hit.weight for hit in pp.hits[p]])
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        for hit in pp.hits[p]:
            assert att[hit.image, p, hit.row, hit.col] == pytest.approx(hit.weight, rel=1e-5)
        if one_per_image:
            assert len({hit.image for hit in pp.hits[p]}) == len(pp.hits[p])
    usage = np.bincount(att.argmax(1).reshape(-1), minlength=n)
    np.testing.assert_array_equal(pp.usage, usage)
    assert pp.dead == np.flatnonzero(usage == 0).tolist()
    assert pp.usage.sum() == b * h * w
    order = pp.by_usage()
    assert list(pp.usage[order]) == sorted(pp.usage, reverse=True)


def test_near_duplicate_prototypes_are_reported():
    protos = torch.eye(4)
    protos[3] = protos[1] + 0.01  # cosine ~0.99995 with prototype 1
    pairs = ex.near_duplicates(protos)
    assert [(i, j) for i, j, _ in pairs] == [(1, 3)]
    assert pairs[0][2] > 0.95
    pp = ex.PrototypePatches("s", 1, (1, 1), [[]] * 4, np.array([3, 0, 1, 0]), pairs)
    assert pp.dead == [1, 3]
    assert pp.duplicate_of(3) == [1] and pp.duplicate_of(0) == []


def test_crop_is_the_receptive_field_window_clipped_inside_the_image():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).reshape(2, 3, 32, 32) % 251
    images = images.to(torch.uint8)
    # stride 8: side 24, centred at (row + 0.5) * 8, shifted inside the 32 px image.
    assert ex.crop_window(0, 0, 8, 32, 32) == (0, 0, 24)
    assert ex.crop_window(3, 3, 8, 32, 32) == (8, 8, 24)
    assert ex.crop_window(2, 1, 4, 32, 32) == (4, 0, 12)
    assert ex.crop_window(5, 5, 1, 32, 32)[2] == ex.MIN_CROP
    hit = ex.PatchHit(image=1, row=2, col=1, weight=0.5)
    out = ex.crop(images, hit, stride=4)
    assert out.shape == (12, 12, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images[1, :, 4:16, 0:12].permute(1, 2, 0).numpy())
    strip = ex.patch_strip(images, [hit, hit], stride=4, tile=24, gap=2)
    assert strip.shape == (24, 50, 3)
