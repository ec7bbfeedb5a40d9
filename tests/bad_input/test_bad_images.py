"""Image files: read_image and read_mask (files on disk), decode_bytes and validate_upload
(uploads)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from core.data.base import DataError
from core.data.imageio import (
    MAX_PIXELS,
    MAX_UPLOAD_PIXELS,
    decode_bytes,
    read_image,
    read_mask,
    validate_upload,
)
from tests.bad_input.cases import (
    STEMS,
    SUFFIX_OF,
    SUFFIXES,
    bomb,
    cases,
    encode,
    noise,
    pixel_data_end,
    png,
)

ALL_READERS = ("read_image", "read_mask", "decode_bytes", "validate_upload")


def refusals(data: bytes, name: str, readers: tuple[str, ...] = ALL_READERS) -> list[str]:
    """The message of each reader's DataError on one file; the file must be left as it was."""
    messages = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        calls: dict[str, tuple[Callable[[], object], str]] = {
            "read_image": (lambda: read_image(path, 16), str(path)),
            "read_mask": (lambda: read_mask(path, 16), str(path)),
            "decode_bytes": (lambda: decode_bytes(data, name, 16), name),
            "validate_upload": (lambda: validate_upload(data, name, size=16), name),
        }
        for reader in readers:
            call, shown = calls[reader]
            with pytest.raises(DataError) as info:
                call()
            message = str(info.value)
            assert message.startswith(f"cannot read image {shown!r}: "), (reader, message)
            assert "\n" not in message
            messages.append(message.removeprefix(f"cannot read image {shown!r}: "))
        assert os.listdir(tmp) == [name] and path.read_bytes() == data
    return messages


def read_file(data: bytes, name: str, size: int, channels: int = 3) -> np.ndarray:
    """read_image on `data` saved as `name` in a folder of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        return read_image(path, size, channels)


@cases("random bytes named as an image")
@given(data=st.binary(min_size=1, max_size=4096), stem=STEMS, suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_named_as_an_image_are_refused(data: bytes, stem: str, suffix: str
                                                    ) -> None:
    for reason in refusals(data, stem + suffix):
        assert reason == "not in an image format PIL recognises (expected an image PIL can decode)"


@st.composite
def truncated_images(draw: st.DrawFn) -> tuple[str, np.ndarray, bytes, int]:
    """(format, pixels, the whole file, cut point) of a valid PNG or JPEG of noise."""
    fmt = draw(st.sampled_from(["PNG", "JPEG", "progressive JPEG"]))
    pixels = noise(draw(st.integers(0, 2**32 - 1)), draw(st.integers(1, 40)),
                   draw(st.integers(1, 40)))
    image = Image.fromarray(pixels)
    if fmt == "PNG":
        data = encode(image, "PNG")
    else:
        data = encode(image, "JPEG", quality=90, progressive=fmt.startswith("progressive"))
    return fmt, pixels, data, draw(st.integers(1, len(data) - 1))


@cases("truncated PNG or JPEG")
@given(case=truncated_images(), stem=STEMS)
def test_truncated_images_are_refused(case: tuple[str, np.ndarray, bytes, int], stem: str
                                      ) -> None:
    fmt, pixels, data, cut = case
    name = stem + (".png" if fmt == "PNG" else ".jpg")
    if fmt == "PNG" and cut >= pixel_data_end(data) - 4:
        # Only the zlib checksum or the end chunk is cut off: every pixel is still there, and
        # what decodes must be the whole image, never a partly blank one.
        try:
            out = decode_bytes(data[:cut], name, None)
        except DataError as err:
            assert str(err).startswith(f"cannot read image {name!r}: ")
        else:
            np.testing.assert_array_equal(out, pixels)
        return
    for reason in refusals(data[:cut], name):
        assert reason.startswith(("truncated file", "not in an image format PIL recognises",
                                  "broken image data")), reason
        assert reason.endswith("(expected an image PIL can decode)")


@st.composite
def bomb_headers(draw: st.DrawFn) -> tuple[str, int, int]:
    """(format, width, height) with width * height above the upload limit."""
    fmt, side = draw(st.sampled_from([("PNG", 2**31 - 1), ("GIF", 2**16 - 1),
                                      ("BMP", 2**31 - 1)]))
    width = draw(st.integers(MAX_UPLOAD_PIXELS // side + 1, side))
    height = draw(st.integers(MAX_UPLOAD_PIXELS // width + 1, side))
    return fmt, width, height


@cases("declared decompression bomb")
@given(case=bomb_headers(), stem=STEMS)
def test_huge_declared_dimensions_are_refused_before_decoding(case: tuple[str, int, int],
                                                              stem: str) -> None:
    fmt, width, height = case
    pixels = width * height
    readers = ALL_READERS if pixels > MAX_PIXELS else ("validate_upload",)
    started = time.perf_counter()
    reasons = refusals(bomb(fmt, width, height), f"{stem}.{fmt.lower()}", readers)
    assert time.perf_counter() - started < 10  # refused from the header, nothing decoded
    for reason in reasons:
        ours = f"declared size {width}x{height} is {pixels} pixels, over the limit of "
        pils = f"refused as a decompression bomb (Image size ({pixels} pixels) exceeds limit of "
        assert reason.startswith((ours, pils)), reason


def composite(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Colour over black, as 8-bit integers: round(colour * alpha / 255)."""
    return ((colour.astype(np.int64) * alpha + 127) // 255).astype(np.uint8)


def sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    return ((values.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)


ONE_PIXEL_KINDS = [("L", "PNG"), ("1", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"),
                   ("P", "PNG"), ("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF"), ("F", "TIFF"),
                   ("CMYK", "TIFF"), ("RGB", "BMP"), ("P", "GIF"), ("RGBA", "WEBP"),
                   ("L", "JPEG"), ("RGB", "JPEG")]


def one_pixel_rgb(mode: str, value: Any, palette: np.ndarray) -> np.ndarray | None:
    """The RGB value a lossless file of one pixel must decode to (None: PIL converts CMYK)."""
    v = np.asarray(value)
    if mode in ("1", "L"):
        return np.full(3, 255 * value if mode == "1" else value)
    if mode == "RGB":
        return v
    if mode == "RGBA":
        return composite(v[:3], v[3])
    if mode == "LA":
        return np.full(3, composite(v[0], v[1]))
    if mode == "P":
        return palette[value]
    if mode in ("I;16", "I"):
        return np.full(3, sixteen_to_eight(v))
    if mode == "F":
        return np.full(3, np.rint(np.float32(value) * 255))
    return None


@st.composite
def one_pixel_images(draw: st.DrawFn) -> tuple[str, bytes, np.ndarray | None]:
    """(format, file, expected RGB value or None where the format is lossy)."""
    mode, fmt = draw(st.sampled_from(ONE_PIXEL_KINDS))
    byte = st.integers(0, 255)
    values = {"1": st.integers(0, 1), "L": byte, "P": byte, "LA": st.tuples(byte, byte),
              "RGB": st.tuples(byte, byte, byte), "RGBA": st.tuples(byte, byte, byte, byte),
              "CMYK": st.tuples(byte, byte, byte, byte), "I;16": st.integers(0, 65535),
              "I": st.integers(0, 65535), "F": st.floats(0, 1, width=32)}
    value = draw(values[mode])
    image = Image.new(mode, (1, 1), value)
    palette = np.frombuffer(draw(st.binary(min_size=768, max_size=768)), np.uint8).reshape(256, 3)
    if mode == "P":
        image.putpalette(palette.tobytes())
    expected = None if fmt == "JPEG" else one_pixel_rgb(mode, value, palette)
    data = encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return fmt, data, None if expected is None else expected.astype(np.uint8)


@cases("1x1 image")
@given(case=one_pixel_images(), size=st.integers(1, 40), stem=STEMS)
def test_one_pixel_images_decode(case: tuple[str, bytes, np.ndarray | None], size: int,
                                 stem: str) -> None:
    fmt, data, expected = case
    name = stem + SUFFIX_OF[fmt]
    native = decode_bytes(data, name, None)
    assert native.shape == (1, 1, 3) and native.dtype == np.uint8
    if expected is not None:
        np.testing.assert_array_equal(native[0, 0], expected)
    grown = read_file(data, name, size)
    assert grown.shape == (size, size, 3) and grown.dtype == np.uint8
    assert (grown == native[0, 0]).all()  # one pixel stretched stays one colour
    grey = validate_upload(data, name, size=size, channels=1)
    assert grey.shape == (size, size, 1) and grey.dtype == np.uint8 and (grey == grey[0, 0]).all()


SIXTEEN_BIT_KINDS = {"grey PNG": (0, 1), "grey TIFF": (None, 1), "grey+alpha PNG": (4, 2),
                     "RGB PNG": (2, 3), "RGBA PNG": (6, 4)}  # PNG colour type, channels


@st.composite
def sixteen_bit_images(draw: st.DrawFn) -> tuple[str, np.ndarray, bytes]:
    kind = draw(st.sampled_from(sorted(SIXTEEN_BIT_KINDS)))
    colour, channels = SIXTEEN_BIT_KINDS[kind]
    height, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    values = draw(arrays(np.uint16, (height, width, channels)))
    if channels == 1:
        image = Image.fromarray(values[..., 0])
        assert image.mode == "I;16"
        data = encode(image, "TIFF" if "TIFF" in kind else "PNG")
    else:
        rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
        data = png(width, height, 16, colour, rows)
    return kind, values, data


@cases("16-bit image")
@given(case=sixteen_bit_images(), size=st.integers(1, 24))
def test_sixteen_bit_images_decode_to_eight_bits(case: tuple[str, np.ndarray, bytes],
                                                 size: int) -> None:
    kind, values, data = case
    name = "deep.tif" if "TIFF" in kind else "deep.png"
    out = decode_bytes(data, name, None)
    assert out.shape == (*values.shape[:2], 3) and out.dtype == np.uint8
    if values.shape[-1] == 1:  # I;16: scaled by 255/65535 and rounded, never clipped
        np.testing.assert_array_equal(out, np.repeat(sixteen_to_eight(values), 3, axis=-1))
    else:  # PIL keeps the high byte of 16-bit colour: within one level (three with alpha)
        reference = values / 257
        if values.shape[-1] in (2, 4):
            reference = reference[..., :-1] * reference[..., -1:] / 255
        reference = np.broadcast_to(reference, out.shape)
        assert np.abs(out - reference).max() <= (1 if values.shape[-1] == 3 else 3)
    assert read_file(data, name, size, channels=1).shape == (size, size, 1)
    assert validate_upload(data, name, size=size).shape == (size, size, 3)


@st.composite
def palette_images(draw: st.DrawFn) -> tuple[str, bytes, np.ndarray]:
    """(format, file, expected RGB pixels) of a palette image, with or without transparency."""
    n = draw(st.integers(1, 256))
    palette = np.frombuffer(draw(st.binary(min_size=3 * n, max_size=3 * n)), np.uint8)
    palette = palette.reshape(n, 3)
    height, width = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    index = draw(arrays(np.uint8, (height, width), elements=st.integers(0, n - 1)))
    transparency = draw(st.one_of(st.none(), st.integers(0, n - 1),
                                  st.binary(min_size=1, max_size=n)))
    fmt = draw(st.sampled_from(["PNG", "BMP"])) if transparency is None else "PNG"
    image = Image.fromarray(index, "P")
    image.putpalette(palette.tobytes())
    alpha = np.full(n, 255, dtype=np.int64)
    if isinstance(transparency, int):
        alpha[transparency] = 0
    elif isinstance(transparency, bytes):
        alpha[:len(transparency)] = np.frombuffer(transparency, np.uint8)
    kwargs = {} if transparency is None else {"transparency": transparency}
    expected = composite(palette[index], alpha[index][..., None])
    return fmt, encode(image, fmt, **kwargs), expected


@cases("palette image")
@given(case=palette_images(), size=st.integers(1, 24))
def test_palette_images_decode_through_their_palette(case: tuple[str, bytes, np.ndarray],
                                                     size: int) -> None:
    fmt, data, expected = case
    name = "palette" + SUFFIX_OF[fmt]
    out = decode_bytes(data, name, None)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    assert read_file(data, name, size).shape == (size, size, 3)
    assert validate_upload(data, name, size=size, channels=1).shape == (size, size, 1)
