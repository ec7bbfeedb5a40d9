"""core/train/augment.py: batched crops, flips and colour jitter."""

from __future__ import annotations

import pytest
import torch

from core.config import AugmentConfig
from core.train.augment import (
    augment,
    colour_jitter,
    grayscale,
    resized_crop_flip,
    to_float,
)

PLAIN = dict(flip=False, jitter=0.0, hue=0.0, grayscale_p=0.0)


def images(batch: int = 4, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=g)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_input_gives_float_in_unit_range(channels: int) -> None:
    x = (images(channels=channels) * 255).round().to(torch.uint8)
    out = augment(x, AugmentConfig(jitter=0.5, hue=0.1, grayscale_p=0.5), gen())
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert out.max() > 0.5  # scaled to [0, 1], not left at 0..255 nor divided twice


def test_float_input_keeps_shape_and_range() -> None:
    x = images(batch=3, size=12)
    out = augment(x, AugmentConfig(jitter=0.8, hue=0.3), gen())
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_to_float_scales_uint8_only() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    torch.testing.assert_close(to_float(x), torch.tensor([0.0, 0.2, 1.0]))
    y = torch.rand(3)
    assert to_float(y) is y


def test_full_area_crop_without_flip_or_jitter_is_the_identity() -> None:
    x = images(batch=8)
    out = augment(x, AugmentConfig(crop_scale=(1.0, 1.0), **PLAIN), gen())
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("area", [0.25, 0.6, 0.9])
def test_crop_covers_the_drawn_area_with_a_bounded_aspect(area: float) -> None:
    """On an image of its own pixel coordinates, a crop shows the span it was taken from."""
    size, batch = 64, 32
    coords = (torch.arange(size) + 0.5) / size
    x = torch.stack([coords.expand(size, size), coords[:, None].expand(size, size)])
    out = resized_crop_flip(x.expand(batch, -1, -1, -1), (area, area), False,
                           gen(int(area * 100)))
    # Sample centres lie (size - 1) / size of the crop's side apart at the two ends.
    w = (out[:, 0].amax(dim=(1, 2)) - out[:, 0].amin(dim=(1, 2))) * size / (size - 1)
    h = (out[:, 1].amax(dim=(1, 2)) - out[:, 1].amin(dim=(1, 2))) * size / (size - 1)
    torch.testing.assert_close(w * h, torch.full((batch,), area), atol=1e-3, rtol=0)
    aspect = w / h
    assert bool((aspect >= 3 / 4 - 1e-3).all() and (aspect <= 4 / 3 + 1e-3).all())
    assert float(aspect.max() - aspect.min()) > 0.1  # aspects are drawn, not fixed


def test_flip_mirrors_the_same_crop() -> None:
    """Same draws with and without flip: each view is either the unflipped one or its mirror."""
    x = images(batch=16)
    plain = resized_crop_flip(x, (0.5, 1.0), False, gen(3))
    flipped = resized_crop_flip(x, (0.5, 1.0), True, gen(3))
    mirrored = [torch.allclose(f, p.flip(-1), atol=1e-5) for f, p in zip(flipped, plain,
                                                                         strict=True)]
    same = [torch.allclose(f, p, atol=1e-5) for f, p in zip(flipped, plain, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert 3 <= sum(mirrored) <= 13  # about half the batch is flipped
    assert sum(same) < 16


def test_parameters_are_drawn_per_image() -> None:
    one = images(batch=1)
    x = one.expand(4, -1, -1, -1).contiguous()
    out = augment(x, AugmentConfig(crop_scale=(0.3, 1.0), jitter=0.5, hue=0.1), gen(1))
    for i in range(1, 4):
        assert not torch.allclose(out[0], out[i], atol=1e-3)


def test_grayscale_p_one_gives_equal_channels() -> None:
    out = augment(images(), AugmentConfig(grayscale_p=1.0), gen())
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 1], out[:, 2])


def test_grayscale_p_zero_keeps_colour() -> None:
    out = augment(images(), AugmentConfig(grayscale_p=0.0), gen())
    assert (out[:, 0] - out[:, 1]).abs().max() > 0.1


def test_a_seeded_generator_reproduces_the_views() -> None:
    x = images(batch=6)
    cfg = AugmentConfig(crop_scale=(0.4, 1.0), jitter=0.4, hue=0.05, grayscale_p=0.3)
    a = augment(x, cfg, gen(7))
    b = augment(x, cfg, gen(7))
    c = augment(x, cfg, gen(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c, atol=1e-3)


def test_colour_jitter_of_strength_zero_is_the_identity() -> None:
    x = images()
    torch.testing.assert_close(colour_jitter(x, 0.0, 0.0, gen()), x, rtol=0, atol=0)


def test_colour_jitter_leaves_single_channel_images_alone() -> None:
    x = images(channels=1)
    torch.testing.assert_close(colour_jitter(x, 0.5, 0.2, gen()), x, rtol=0, atol=0)


def test_hue_shift_keeps_luma() -> None:
    x = 0.4 + 0.2 * images(batch=6)  # mid-range, so the final clamp does not bite
    out = colour_jitter(x, 0.0, 0.5, gen(2))
    assert (out - x).abs().max() > 0.01  # the hue changed
    torch.testing.assert_close(grayscale(out), grayscale(x), atol=1e-5, rtol=0)


def test_colour_jitter_keeps_grey_images_grey_under_hue_and_saturation() -> None:
    grey = images(batch=4, channels=1).expand(-1, 3, -1, -1) * 0.5 + 0.25
    out = colour_jitter(grey, 0.0, 0.5, gen(4))
    torch.testing.assert_close(out, grey, atol=1e-5, rtol=0)


def test_colour_jitter_changes_brightness_per_image() -> None:
    x = torch.full((8, 3, 4, 4), 0.5)
    out = colour_jitter(x, 0.5, 0.0, gen(5))
    means = out.mean(dim=(1, 2, 3))
    assert means.min() >= 0.25 - 1e-6 and means.max() <= 0.75 + 1e-6  # 1 +- 0.5
    assert len(set(means.round(decimals=4).tolist())) > 4


# --- distribution shifts (pseudo-anomalies) ------------------------------------------------
