"""core/train/shifts.py: the pseudo-anomalies of both stages."""

from __future__ import annotations

import pytest
import torch

from core.train.shifts import (
    SHIFTS,
    blend,
    colour,
    cutpaste,
    jigsaw,
    rotate90,
    scar,
    shift,
)


def images(batch: int = 4, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=g)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quadrants(x: torch.Tensor) -> list[torch.Tensor]:
    """(C, H, W) -> [top-left, top-right, bottom-left, bottom-right]."""
    h, w = x.shape[1] // 2, x.shape[2] // 2
    return [x[:, :h, :w], x[:, :h, w:2 * w], x[:, h:2 * h, :w], x[:, h:2 * h, w:2 * w]]


def quadrant_permutation(before: torch.Tensor, after: torch.Tensor) -> tuple[int, ...]:
    """Which quadrant of `before` each quadrant of `after` shows; fails if any shows none."""
    src = quadrants(before)
    perm = []
    for q in quadrants(after):
        [match] = [i for i, s in enumerate(src) if torch.equal(q, s)]
        perm.append(match)
    return tuple(perm)


def test_jigsaw_permutes_the_quadrants_and_never_keeps_the_image() -> None:
    x = (images(batch=240, size=8) * 255).round().to(torch.uint8)  # all quadrants differ
    out = jigsaw(x, gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    perms = [quadrant_permutation(a, b) for a, b in zip(x, out, strict=True)]
    assert all(sorted(p) == [0, 1, 2, 3] for p in perms)  # a permutation, nothing lost
    assert (0, 1, 2, 3) not in perms
    assert len(set(perms)) == 23  # every other arrangement occurs
    for a, b in zip(x, out, strict=True):  # the same pixels, moved
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
    torch.testing.assert_close(jigsaw(x, gen(0)), out, rtol=0, atol=0)  # seeded


@pytest.mark.parametrize(("h", "w"), [(9, 8), (8, 11), (7, 7)])
def test_jigsaw_of_odd_sides_keeps_the_shape(h: int, w: int) -> None:
    x = torch.rand(6, 3, h, w, generator=gen(1))
    out = jigsaw(x, gen(2))
    assert out.shape == x.shape
    even = x[:, :, :h // 2 * 2, :w // 2 * 2]
    for a, b in zip(even, out[:, :, :h // 2 * 2, :w // 2 * 2], strict=True):
        assert quadrant_permutation(a, b) != (0, 1, 2, 3)


def test_rotate90_turns_each_image_by_a_quarter_half_or_three_quarters() -> None:
    x = images(batch=60, size=6)  # random images: no rotation maps one onto itself
    out = rotate90(x, gen(3))
    assert out.shape == x.shape
    turns = []
    for a, b in zip(x, out, strict=True):
        [k] = [k for k in range(4) if torch.equal(torch.rot90(a, k, dims=(1, 2)), b)]
        turns.append(k)
    assert 0 not in turns and set(turns) == {1, 2, 3}
    torch.testing.assert_close(rotate90(x, gen(3)), out, rtol=0, atol=0)


def test_rotate90_of_a_non_square_image_is_resized_back_to_its_shape() -> None:
    x = torch.zeros(30, 1, 8, 4)
    x[:, :, :2] = 1  # a bright band along the top
    out = rotate90(x, gen(6))
    assert out.shape == x.shape
    half = out[:, 0, 6:].flatten(1).mean(1) > 0.9  # a half turn: the band at the bottom
    quarter = (out[:, 0, :, 0].mean(1) > 0.75) | (out[:, 0, :, -1].mean(1) > 0.75)  # a side
    assert half.any() and quarter.any() and bool((half | quarter).all())


def test_rotate90_is_never_the_identity_on_an_asymmetric_image() -> None:
    x = torch.zeros(40, 1, 5, 5)
    x[:, :, 0, 1] = 1  # one pixel off every axis of symmetry
    out = rotate90(x, gen(4))
    assert all(not torch.equal(a, b) for a, b in zip(x, out, strict=True))


def test_shift_with_one_kind_is_that_transformation() -> None:
    x = images(batch=12)
    torch.testing.assert_close(shift(x, ("jigsaw",), gen(5)), jigsaw(x, gen(5)), rtol=0, atol=0)
    torch.testing.assert_close(shift(x, ("rotate",), gen(5)), rotate90(x, gen(5)), rtol=0, atol=0)


def test_shift_draws_a_kind_per_image() -> None:
    x = images(batch=40, size=8)
    out = shift(x, ("jigsaw", "rotate"), gen(6))
    kinds = []
    for a, b in zip(x, out, strict=True):
        if any(torch.equal(torch.rot90(a, k, dims=(1, 2)), b) for k in (1, 2, 3)):
            kinds.append("rotate")
        else:
            assert quadrant_permutation(a, b) != (0, 1, 2, 3)
            kinds.append("jigsaw")
    assert 8 <= kinds.count("rotate") <= 32


@pytest.mark.parametrize("kinds", [("blur",), ("jigsaw", "cutout"), ()])
def test_shift_rejects_unknown_kinds(kinds: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="shift kinds"):
        shift(images(), kinds, gen())


def smooth(batch: int, channels: int = 3, size: int = 32) -> torch.Tensor:
    """uint8 images with a gradient per image: every moved patch changes pixels."""
    ys = torch.linspace(0, 1, size).view(1, 1, size, 1)
    xs = torch.linspace(0, 1, size).view(1, 1, 1, size)
    phase = torch.arange(batch, dtype=torch.float32).view(-1, 1, 1, 1) / batch
    channel = torch.arange(channels).view(1, -1, 1, 1)
    img = 0.5 + 0.4 * torch.sin(6 * xs + 4 * ys + 6 * phase + channel)
    return (img * 255).round().to(torch.uint8)


@pytest.mark.parametrize("fn", [cutpaste, scar, blend])
def test_local_shifts_change_a_bounded_region_of_every_image(fn) -> None:
    x = smooth(32)
    out = fn(x, gen(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    changed = (out.int() - x.int()).abs().amax(1) > 2  # (B, H, W)
    share = changed.flatten(1).float().mean(1)
    assert (share > 0).all(), "every image gets a defect"
    assert share.max() < 0.5, "a local defect, not a new image"


def test_scar_is_thin_and_long() -> None:
    x = smooth(64, size=64)
    changed = ((scar(x, gen(2)).int() - x.int()).abs().amax(1) > 2).flatten(1).float()
    # a strip of at most 0.3 x 0.06 of the side covers under 2 % of the image
    assert changed.mean(1).max() < 0.02


def test_blend_takes_its_patch_from_another_image() -> None:
    x = torch.zeros(8, 1, 32, 32, dtype=torch.uint8)
    x[::2] = 255  # alternate black and white images: a patch from the other kind shows
    out = blend(x, gen(3))
    moved = (out.int() - x.int()).abs().flatten(1).amax(1)
    assert (moved > 100).sum() >= 4


def test_colour_changes_the_whole_image_but_not_its_layout() -> None:
    x = smooth(16)
    out = colour(x, gen(4))
    diff = (out.int() - x.int()).abs().amax(1).flatten(1)
    assert (diff.float().mean(1) > 3).all()
    # ordering of grey levels is kept: a monotone tone curve, on a grey image
    g = smooth(4, channels=1)
    og = colour(g, gen(5))
    for a, b in zip(g.flatten(1), og.flatten(1), strict=True):
        order = a.float().argsort()
        assert (b.float()[order].diff() >= -1).all()


@pytest.mark.parametrize("kind", SHIFTS)
def test_every_shift_keeps_float_input_float_and_in_range(kind: str) -> None:
    x = images(batch=6, size=16)
    out = shift(x, (kind,), gen(6))
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)


def test_shift_is_reproducible_with_a_seeded_generator() -> None:
    x = smooth(12)
    a = shift(x, SHIFTS, gen(7))
    b = shift(x, SHIFTS, gen(7))
    assert torch.equal(a, b)
