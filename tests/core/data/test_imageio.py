"""Decoding of every image mode, refusal of broken files, and the image-set cache."""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from core.data import imageio
from core.data.base import DataError
from core.data.imageio import (
    IMAGE_SUFFIXES,
    decode_bytes,
    describe_skipped,
    list_images,
    load_images,
    read_image,
    read_mask,
    resize_batch,
)
from core.explore import hwc_to_chw


def save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header(width: int, height: int) -> bytes:
    """A well-formed PNG declaring width x height whose pixel data is a few bytes only."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


def gradient_rgb(size: int = 16) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // (size - 1), y * 255 // (size - 1), np.full_like(x, 90)], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------
# modes and formats


def test_rgb_keeps_values_at_native_size(tmp_path: Path) -> None:
    img = gradient_rgb()
    out = read_image(save(img, tmp_path / "g.png"), 16)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, np.asarray(img))


def test_grey_is_replicated_and_colour_becomes_luma(tmp_path: Path) -> None:
    grey = read_image(save(Image.new("L", (8, 8), 100), tmp_path / "l.png"), 8, channels=3)
    assert grey.shape == (8, 8, 3) and (grey == 100).all()
    red = read_image(save(Image.new("RGB", (8, 8), (255, 0, 0)), tmp_path / "r.png"), 8, 1)
    assert red.shape == (8, 8, 1)
    assert (red == 76).all()  # ITU-R 601-2 luma of pure red: 0.299 * 255


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100], [65535, 32896]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = read_image(save(img, tmp_path / "deep.png"), 2, channels=1)[..., 0]
    np.testing.assert_array_equal(out, [[0, 100], [255, 128]])
    tif = read_image(save(img, tmp_path / "deep.tif"), 2, channels=3)
    np.testing.assert_array_equal(tif[..., 1], [[0, 100], [255, 128]])


def test_thirty_two_bit_int_is_scaled_as_sixteen_bit_or_by_its_range(tmp_path: Path) -> None:
    sixteen = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert sixteen.mode == "I"
    out = read_image(save(sixteen, tmp_path / "i16.tif"), 2, 1)[..., 0]
    np.testing.assert_array_equal(out[0], [0, 255])
    wide = Image.fromarray(np.array([[-1000, 99000]], dtype=np.int32))
    out = read_image(save(wide, tmp_path / "i32.tif"), 2, 1)[..., 0]
    np.testing.assert_array_equal(out[0], [0, 255])


def test_float_images(tmp_path: Path) -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    out = read_image(save(unit, tmp_path / "unit.tif"), 3, 1)[..., 0]
    # resized 3x1 -> 3x3 only vertically: every row keeps the horizontal values
    np.testing.assert_array_equal(out[1], [0, 128, 255])
    wide = Image.fromarray(np.array([[-5.0, 5.0]], dtype=np.float32))
    out = read_image(save(wide, tmp_path / "wide.tif"), 2, 1)[..., 0]
    np.testing.assert_array_equal(out[0], [0, 255])


def test_one_bit(tmp_path: Path) -> None:
    img = Image.new("1", (8, 8), 0)
    img.paste(1, (0, 0, 4, 8))
    out = read_image(save(img, tmp_path / "bw.png"), 8)
    assert set(np.unique(out).tolist()) == {0, 255}
    assert (out[:, :4] == 255).all() and (out[:, 4:] == 0).all()


def test_palette_and_palette_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    out = read_image(save(img, tmp_path / "p.png"), 8)
    assert (out == [10, 20, 30]).all()
    img.info["transparency"] = 1  # index 1 fully transparent: composited on black
    out = read_image(save(img, tmp_path / "pt.png", transparency=1), 8)
    assert (out == 0).all()
    gif = read_image(save(Image.new("P", (8, 8), 1), tmp_path / "p.gif"), 4)
    assert gif.shape == (4, 4, 3)


def test_alpha_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = [[255, 0], [128, 255]]
    out = read_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"), 2)
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])
    np.testing.assert_array_equal(out[1, 0], [100, 50, 25])
    la = Image.fromarray(np.array([[[200, 255], [200, 0]]], dtype=np.uint8), "LA")
    out = read_image(save(la, tmp_path / "la.png"), 2, channels=1)[..., 0]
    np.testing.assert_array_equal(out[0], [200, 0])


def test_cmyk(tmp_path: Path) -> None:
    white = read_image(save(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), tmp_path / "c.tif"), 4)
    assert (white == 255).all()
    cyan = read_image(save(Image.new("CMYK", (4, 4), (255, 0, 0, 0)), tmp_path / "c.jpg"), 4)
    assert cyan[..., 0].max() < 30 and cyan[..., 1:].min() > 220


@pytest.mark.parametrize("suffix", [".bmp", ".webp", ".ppm", ".jpg", ".JPEG", ".tiff", ".gif"])
def test_formats(tmp_path: Path, suffix: str) -> None:
    img = Image.new("RGB", (10, 6), (0, 128, 255))
    kwargs = {"lossless": True} if suffix == ".webp" else {}
    out = read_image(save(img, tmp_path / f"x{suffix}", **kwargs), 5)
    assert out.shape == (5, 5, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - [0, 128, 255]).max() <= 12


def test_pgm_grey(tmp_path: Path) -> None:
    out = read_image(save(Image.new("L", (4, 4), 77), tmp_path / "x.pgm"), 4, channels=3)
    assert out.shape == (4, 4, 3) and (out == 77).all()


def test_resize_stretches_without_crop(tmp_path: Path) -> None:
    wide = np.zeros((16, 64, 3), dtype=np.uint8)
    wide[:, :32] = (255, 0, 0)
    wide[:, 32:] = (0, 0, 255)
    out = read_image(save(Image.fromarray(wide), tmp_path / "wide.png"), 16)
    assert out.shape == (16, 16, 3)
    assert (out[:, :4] == [255, 0, 0]).all() and (out[:, 12:] == [0, 0, 255]).all()


def test_enlarging_is_bilinear(tmp_path: Path) -> None:
    img = Image.fromarray(np.array([[0, 255]], dtype=np.uint8), "L")
    out = read_image(save(img, tmp_path / "two.png"), 4, channels=1)[0, :, 0]
    assert out[0] == 0 and out[-1] == 255
    assert 0 < out[1] < out[2] < 255  # interpolated, not repeated


def test_large_jpeg_is_shrunk(tmp_path: Path) -> None:
    big = gradient_rgb(256)
    out = read_image(save(big, tmp_path / "big.jpg", quality=95), 32)
    ref = np.asarray(big.resize((32, 32), Image.Resampling.LANCZOS)).astype(int)
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - ref).mean() < 4


def test_read_mask_thresholds_and_uses_nearest(tmp_path: Path) -> None:
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[0, 0] = 255
    mask[3, 3] = 200
    mask[1, 1] = 100  # below the threshold
    out = read_mask(save(Image.fromarray(mask), tmp_path / "m.png"), 8)
    assert out.shape == (8, 8) and out.dtype == np.uint8
    assert set(np.unique(out).tolist()) == {0, 1}
    assert out[:2, :2].all() and out[6:, 6:].all() and out.sum() == 8


# ---------------------------------------------------------------------------------------------
# refusing broken files


def assert_refused(path: Path, *needles: str) -> str:
    with pytest.raises(DataError) as info:
        read_image(path, 8)
    message = str(info.value)
    assert repr(str(path)) in message and "\n" not in message
    for needle in needles:
        assert needle in message
    return message


def test_random_bytes_named_png(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    assert_refused(path, "not in an image format")


def test_truncated_png(tmp_path: Path) -> None:
    data = png_bytes(gradient_rgb(64))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    assert_refused(path, "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert_refused(path, "empty file")


def test_missing_file_and_folder(tmp_path: Path) -> None:
    assert_refused(tmp_path / "absent.png", "cannot open")
    (tmp_path / "dir.png").mkdir()
    assert_refused(tmp_path / "dir.png")


def test_huge_declared_size_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(100_000, 100_000))
    assert_refused(path, "decompression bomb")
    path.write_bytes(png_header(9000, 9000))  # over MAX_PIXELS, under PIL's own limit
    assert_refused(path, "9000x9000", "over the limit")
    before = list(warnings.filters)
    path.write_bytes(png_header(10_000, 10_000))  # PIL warns about this one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_refused(path, "decompression bomb")
    assert not caught  # PIL's warning became the DataError, it did not escape
    assert warnings.filters == before


def test_max_pixels_is_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(gradient_rgb(16), tmp_path / "small.png")
    assert read_image(path, 4).shape == (4, 4, 3)
    monkeypatch.setattr(imageio, "MAX_PIXELS", 255)
    assert_refused(path, "16x16", "256 pixels")
    data = path.read_bytes()
    with pytest.raises(DataError, match="over the limit of 100"):
        decode_bytes(data, "upload.png", None, max_pixels=100)


def test_decode_bytes_native_size_and_errors() -> None:
    data = png_bytes(Image.new("RGB", (7, 3), (1, 2, 3)))
    out = decode_bytes(data, "up.png", None)
    assert out.shape == (3, 7, 3) and (out == [1, 2, 3]).all()
    assert decode_bytes(data, "up.png", 5, channels=1).shape == (5, 5, 1)
    with pytest.raises(DataError, match="'up.png': empty file"):
        decode_bytes(b"", "up.png", None)
    with pytest.raises(DataError, match="'up.png'"):
        decode_bytes(b"GIF89a" + b"\0" * 20, "up.png", None)


VALID = png_bytes(gradient_rgb(12))


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a valid PNG cut short and with some bytes overwritten."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(VALID[: draw(st.integers(0, len(VALID)))])
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=damaged_images(), size=st.sampled_from([None, 4]))
def test_decode_bytes_raises_only_data_error(data: bytes, size: int | None) -> None:
    try:
        out = decode_bytes(data, "fuzz.png", size)
    except DataError as err:
        assert "'fuzz.png'" in str(err)
    else:
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[-1] == 3


# ---------------------------------------------------------------------------------------------
# image sets and the cache


def make_set(folder: Path, n: int = 5) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:02d}.png"
        Image.new("RGB", (12, 12), (i * 40, 255 - i * 40, 7)).save(path)
        paths.append(path)
    return paths


def test_load_images_is_chw_and_skips_corrupt_files(tmp_path: Path) -> None:
    paths = make_set(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "bad.png"
    bad.write_bytes(b"not an image")
    order = paths[:2] + [bad] + paths[2:]
    array, kept, skipped = load_images(order, 6, cache_dir=tmp_path / "cache")
    assert array.shape == (5, 3, 6, 6) and array.dtype == np.uint8
    assert kept == paths
    assert len(skipped) == 1 and str(bad) in skipped[0]
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(array[i], read_image(path, 6).transpose(2, 0, 1))
    grey, _, _ = load_images(paths, 6, channels=1, cache_dir=tmp_path / "cache")
    assert grey.shape == (5, 1, 6, 6)


def test_second_load_hits_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_set(tmp_path / "imgs")
    cache = tmp_path / "cache"
    first = load_images(paths, 8, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 1 and len(list(cache.glob("*.json"))) == 1
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*"))

    def fail(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("decoded although the cache holds this set")

    monkeypatch.setattr(imageio, "read_image", fail)
    seen: list[tuple[str, float]] = []
    second = load_images(paths, 8, cache_dir=cache, progress=lambda m, f: seen.append((m, f)))
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1:] == second[1:]
    assert seen and seen[-1][1] == 1.0
    assert torch.from_numpy(second[0]).shape == (5, 3, 8, 8)  # writable, torch-ready


def test_changed_file_misses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_set(tmp_path / "imgs")
    cache = tmp_path / "cache"
    load_images(paths, 8, cache_dir=cache)
    Image.new("RGB", (12, 12), (1, 2, 3)).save(paths[0])
    stat = paths[0].stat()
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    calls: list[Path] = []
    real = imageio.read_image

    def counting(path: Path, size: int, channels: int = 3) -> np.ndarray:
        calls.append(path)
        return real(path, size, channels)

    monkeypatch.setattr(imageio, "read_image", counting)
    array, _, _ = load_images(paths, 8, cache_dir=cache)
    assert len(calls) == len(paths)
    assert (array[0, :, 0, 0] == [1, 2, 3]).all()
    calls.clear()
    load_images(paths, 16, cache_dir=cache)  # another size is another entry
    assert len(calls) == len(paths)
    assert len(list(cache.glob("*.npy"))) == 3  # first set, changed set, other size


@pytest.mark.parametrize("broken", ["npy", "json", "shape"])
def test_broken_cache_is_ignored_and_rewritten(tmp_path: Path, broken: str) -> None:
    paths = make_set(tmp_path / "imgs")
    cache = tmp_path / "cache"
    first, _, _ = load_images(paths, 8, cache_dir=cache)
    npy, meta = next(cache.glob("*.npy")), next(cache.glob("*.json"))
    if broken == "npy":
        npy.write_bytes(npy.read_bytes()[:100])
    elif broken == "json":
        meta.write_text("{not json")
    else:
        np.save(npy, np.zeros((2, 3, 8, 8), dtype=np.uint8))
    again, kept, _ = load_images(paths, 8, cache_dir=cache)
    np.testing.assert_array_equal(first, again)
    assert kept == paths
    np.testing.assert_array_equal(np.load(npy, allow_pickle=False), first)  # rewritten
    assert json.loads(meta.read_text())["left_out"] == []


def test_unwritable_cache_only_warns(tmp_path: Path) -> None:
    paths = make_set(tmp_path / "imgs", 2)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="image cache not written"):
        array, kept, _ = load_images(paths, 4, cache_dir=blocker / "cache")
    assert array.shape == (2, 3, 4, 4) and kept == paths


def test_default_cache_dir_and_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imageio, "CHUNK", 2)
    monkeypatch.setenv("ANOMEM_CACHE", str(tmp_path / "env-cache"))
    paths = make_set(tmp_path / "imgs", 5)
    seen: list[float] = []
    load_images(paths, 4, progress=lambda message, fraction: seen.append(fraction))
    assert len(list((tmp_path / "env-cache").glob("*.npy"))) == 1
    assert seen == sorted(seen) and len(seen) == 3 and seen[-1] == 1.0


def test_load_images_of_nothing(tmp_path: Path) -> None:
    array, kept, skipped = load_images([], 8, cache_dir=tmp_path)
    assert array.shape == (0, 3, 8, 8) and kept == [] and skipped == []


def test_describe_skipped_names_ten_then_counts() -> None:
    text = describe_skipped([f"cannot read image 'f{i}'" for i in range(13)])
    assert "'f9'" in text and "'f10'" not in text
    assert text.splitlines()[-1].strip() == "and 3 more"


def test_list_images_by_suffix_any_case(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "notes.txt", "._a.jpg", "c.TiFf"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.TiFf"]
    assert list_images(tmp_path / "absent") == []
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
            ".pgm"} <= IMAGE_SUFFIXES


def test_resize_batch() -> None:
    flat = torch.full((3, 3, 8, 8), 77, dtype=torch.uint8)
    assert resize_batch(flat, 8) is flat
    for size in (4, 20):
        out = resize_batch(flat, size)
        assert out.shape == (3, 3, size, size) and out.dtype == torch.uint8
        assert (out == 77).all()
    ramp = torch.arange(8, dtype=torch.uint8).mul(30).expand(1, 1, 8, 8)
    out = resize_batch(ramp, 16)[0, 0, 0]
    assert (out[1:] >= out[:-1]).all() and out[0] <= 15 and out[-1] >= 195


def _png(size: tuple[int, int] = (20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_validate_upload_accepts_an_image_at_the_run_size():
    out = imageio.validate_upload(_png(), "leaf.png", size=16, channels=3)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert tuple(out[8, 8]) == (10, 200, 30)
    grey = imageio.validate_upload(_png(), "leaf.PNG", size=8, channels=1)
    assert grey.shape == (8, 8, 1)
    assert hwc_to_chw(out).shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("data", "name", "kwargs", "match"),
    [
        (b"%PDF-1.4", "notes.pdf", {}, "file type"),
        (_png(), "big.png", {"max_bytes": 10}, "over the limit"),
        (b"\x89PNG\r\n\x1a\n garbage", "broken.png", {}, "broken.png"),
        (_png((300, 300)), "huge.png", {"max_pixels": 1000}, "pixels"),
        (b"", "empty.jpg", {}, "empty"),
    ],
)
def test_validate_upload_refuses_with_the_file_name(data, name, kwargs, match):
    with pytest.raises(DataError, match=match) as err:
        imageio.validate_upload(data, name, size=16, **kwargs)
    assert name in str(err.value)

