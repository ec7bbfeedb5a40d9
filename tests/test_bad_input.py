"""Bad input through every entry point a user reaches, as generated cases.

Each class of case is drawn by hypothesis (derandomised: every run tries the same cases) and
its count is in CASES. A refusal must name the file, say what was expected, change no file and
write none; valid but unusual images (1x1, 16-bit, palette) must decode to the right values.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import warnings
import zlib
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from safetensors.torch import save_file

from core.cli import main
from core.config import DataConfig, ModelConfig, RunConfig
from core.data import load_split
from core.data.base import DataError
from core.data.cifar import RestrictedUnpickler, allowed_globals
from core.data.imageio import (
    MAX_PIXELS,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_PIXELS,
    decode_bytes,
    read_image,
    read_mask,
    validate_upload,
)
from core.model.anomem import AnoMem
from core.runs import CONFIG, WEIGHTS, RunError, list_runs, load_model, load_run, read_config
from core.runs import save_model as save_run_model

ROOT = Path(__file__).resolve().parents[1]

CASES = {  # generated cases per class: hypothesis' max_examples (~20 s in all on 2 cores)
    "random bytes named as an image": 100,
    "truncated PNG or JPEG": 100,
    "declared decompression bomb": 60,
    "1x1 image": 60,
    "16-bit image": 40,
    "palette image": 60,
    "broken file among good ones in a class folder": 8,
    "class folder of unreadable files": 6,
    "bad image given to anomem score": 20,
    "malformed config.json": 150,
    "absurd numbers in config.json": 40,
    "bad model.safetensors": 60,
    "pickle naming a global": 60,
}


def cases(kind: str) -> settings:
    return settings(max_examples=CASES[kind], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------------------------
# files and folders


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


GOOD_PNG = encode(Image.fromarray(noise(0, 20, 24)), "PNG")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, depth: int, colour: int, rows: bytes) -> bytes:
    """A PNG from its IHDR fields and raw scanlines (filter bytes included)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def pixel_data_end(data: bytes) -> int:
    """Offset just past the last IDAT chunk's data: a PNG cut before it lacks pixels."""
    offset, end = 8, 0
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"IDAT":
            end = offset + 8 + length
        offset += 12 + length
    return end


def bomb(fmt: str, width: int, height: int) -> bytes:
    """A well-formed header declaring width x height, followed by a few bytes of pixels."""
    if fmt == "PNG":
        return png(width, height, 8, 2, b"\0" * 64)
    if fmt == "GIF":
        screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
        frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
        return b"GIF89a" + screen + frame + b"\x08\x02\x4c\x01\x00;"
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + info + b"\0" * 16


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` (hidden ones too), with a hash of each file."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "folder" for p in sorted(folder.rglob("*"))}


def run_cli(*args: str) -> tuple[int, str, str]:
    """`anomem ARGS` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


TINY = ModelConfig(image_size=32, width=0.125, memory_size=8, memory_dim=8, head_dim=8)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `anomem train` leaves it (config.json and model.safetensors)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("runs") / "tiny"
    save_run_model(path, RunConfig(model=TINY), AnoMem(TINY))
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    (folder / "good.png").write_bytes(GOOD_PNG)
    return folder


@contextlib.contextmanager
def run_copy(saved_run: Path) -> Iterator[Path]:
    """A fresh copy of the saved run, alone under a runs folder of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(shutil.copytree(saved_run, Path(tmp) / "run"))


# ---------------------------------------------------------------------------------------------
# image files: read_image, read_mask (files on disk), decode_bytes and validate_upload (uploads)

STEMS = st.text(alphabet="abxyz019-_ é", min_size=1, max_size=10).map(str.strip).filter(bool)
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".webp")
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
SUFFIX_OF = {"PNG": ".png", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp",
             "JPEG": ".jpg"}


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


# ---------------------------------------------------------------------------------------------
# the class-folder loader and `anomem score`


@st.composite
def bad_image_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(suffix, content) of a file no reader accepts: noise, a cut image, a bomb, nothing."""
    kind = draw(st.sampled_from(["noise", "truncated PNG", "truncated JPEG", "bomb", "empty",
                                 "text", "executable"]))
    if kind == "noise":
        return draw(st.sampled_from(SUFFIXES)), draw(st.binary(min_size=1, max_size=2048))
    if kind.startswith("truncated"):
        image = Image.fromarray(noise(draw(st.integers(0, 2**32 - 1)), 12, 12))
        fmt = kind.split()[1]
        data = encode(image, fmt)
        end = pixel_data_end(data) - 4 if fmt == "PNG" else len(data)
        return SUFFIX_OF[fmt], data[:draw(st.integers(1, end - 1))]
    if kind == "bomb":
        side = draw(st.integers(MAX_PIXELS // 50_000 + 1, 50_000))
        return ".png", bomb("PNG", 50_000, side)
    if kind == "empty":
        return draw(st.sampled_from(SUFFIXES)), b""
    if kind == "text":
        return ".txt", draw(st.text(min_size=1, max_size=200)).encode()
    return ".exe", b"MZ\x90\x00" + draw(st.binary(max_size=512))


def class_folders(root: Path, classes: dict[str, dict[str, int]]) -> None:
    """ROOT/split/class/<i>.png for the counts given, each image a different colour."""
    for split, counts in classes.items():
        for name, n in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                colour = (40 * i, 200 if name == "good" else 30, 90)
                Image.new("RGB", (12, 12), colour).save(root / split / name / f"{i}.png")


@contextlib.contextmanager
def folder_data(classes: dict[str, dict[str, int]]) -> Iterator[Path]:
    """A class-folder data set in a temporary folder, with the image cache kept beside it."""
    with tempfile.TemporaryDirectory() as tmp, \
            mock.patch.dict(os.environ, {"ANOMEM_CACHE": str(Path(tmp) / "cache")}):
        class_folders(Path(tmp) / "data", classes)
        yield Path(tmp) / "data"


@cases("broken file among good ones in a class folder")
@given(bad=bad_image_files(), stem=STEMS)
def test_folder_loader_skips_a_broken_file_with_a_warning_naming_it(bad: tuple[str, bytes],
                                                                    stem: str) -> None:
    suffix, data = bad
    assume(suffix != ".txt" and suffix != ".exe")  # not image suffixes: never listed
    layout = {"train": {"good": 3, "other": 2}, "test": {"good": 2, "other": 2}}
    with folder_data(layout) as root:
        broken = root / "train" / "good" / f"bad-{stem}{suffix}"
        broken.write_bytes(data)
        before = snapshot(root)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            split = load_split(DataConfig(dataset="folder", root=str(root)))
        assert snapshot(root) == before
    skipped = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(skipped) == 1
    assert skipped[0].startswith(f"skipped 1 unreadable image(s) under '{root}':\n")
    assert f"cannot read image {str(broken)!r}: " in skipped[0]
    assert len(split.train) == 3 and str(broken) not in split.train.names + split.test.names


@cases("class folder of unreadable files")
@given(bad=st.lists(bad_image_files().filter(lambda b: b[0] not in (".txt", ".exe")),
                    min_size=1, max_size=3))
def test_folder_loader_refuses_a_class_folder_without_a_readable_image(
        bad: list[tuple[str, bytes]]) -> None:
    with folder_data({"train": {"other": 2}, "test": {"good": 1, "other": 1}}) as root:
        folder = root / "train" / "good"
        folder.mkdir()
        files = [folder / f"{i}{suffix}" for i, (suffix, _) in enumerate(bad)]
        for file, (_, data) in zip(files, bad, strict=True):
            file.write_bytes(data)
        before = snapshot(root)
        with pytest.raises(DataError) as info:
            load_split(DataConfig(dataset="folder", root=str(root), normal_class="good"))
        assert snapshot(root) == before
    message = str(info.value)
    assert message.startswith(f"class folder '{folder}': none of its {len(files)} image file(s) "
                              "can be read (expected at least one readable image):\n")
    for file in files:
        assert f"cannot read image {str(file)!r}: " in message


@cases("bad image given to anomem score")
@given(bad=bad_image_files(), stem=STEMS)
def test_anomem_score_refuses_a_bad_image_and_writes_nothing(
        saved_run: Path, image_dir: Path, bad: tuple[str, bytes], stem: str) -> None:
    suffix, data = bad
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / (stem + suffix)
        path.write_bytes(data)
        overlays = Path(tmp) / "overlays"
        before = snapshot(saved_run)
        code, out, err = run_cli("score", str(saved_run), str(image_dir / "good.png"), str(path),
                                 "--overlays", str(overlays))
        assert code == 2 and out == ""
        assert err.startswith(f"anomem: error: cannot read image {str(path)!r}: "), err
        assert err.count("\n") == 1 and err.endswith("\n")
        assert snapshot(saved_run) == before and not overlays.exists()
        assert os.listdir(tmp) == [path.name] and path.read_bytes() == data


def test_anomem_score_as_a_process_exits_2_with_one_line_and_no_traceback(
        saved_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "noise.png"
    bad.write_bytes(np.random.default_rng(1).bytes(1000))
    proc = subprocess.run([sys.executable, "-m", "core.cli", "score", str(saved_run), str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"anomem: error: cannot read image {str(bad)!r}: not in an image format PIL "
        "recognises (expected an image PIL can decode)"
    ]


# ---------------------------------------------------------------------------------------------
# config.json: read_config, load_run, list_runs and `anomem score`

VALID = json.loads(json.dumps(RunConfig(model=TINY).to_dict()))
OPTIONAL = {("data", "root"): "str", ("data", "normal_class"): "str",
            ("data", "image_size"): "int", ("data", "max_train"): "int",
            ("train", "max_minutes"): "number"}
LIST_OF = {("data", "anomaly_classes"): "str"}  # element kind of a list stored empty


def field_paths(node: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in node.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += field_paths(value, (*prefix, key))
    return paths


FIELDS = field_paths(VALID)


def kind_of(path: tuple[str, ...]) -> tuple[str, str | None]:
    """The JSON kind a stored field takes, (kind, element kind of a list), from the defaults."""
    value = VALID
    for key in path:
        value = value[key]
    if value is None:
        return OPTIONAL[path], None
    if isinstance(value, list):
        return "list", LIST_OF.get(path) or kind_name(value[0])
    return kind_name(value), None


def kind_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    return {str: "str", dict: "object", list: "list"}[type(value)]


def fits(value: Any, kind: str) -> bool:
    if kind == "number":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and np.isfinite(value))
    return value is not None and kind_name(value) == kind


def wrong_for(path: tuple[str, ...], value: Any) -> bool:
    kind, element = kind_of(path)
    if path in OPTIONAL and value is None:
        return False
    if kind == "list" and isinstance(value, list):
        return not all(fits(v, element or "") for v in value)
    return not fits(value, kind)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)


def edited(path: tuple[str, ...], edit: Callable[[dict, str], None]) -> str:
    raw = json.loads(json.dumps(VALID))
    node = raw
    for key in path[:-1]:
        node = node[key]
    edit(node, path[-1])
    return json.dumps(raw)


def not_json(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return True
    return False


@st.composite
def malformed_configs(draw: st.DrawFn) -> tuple[bytes, tuple[str, ...]]:
    """(content of config.json, what its message must contain)."""
    kind = draw(st.sampled_from(["bytes", "cut", "deep", "long int", "value", "type", "missing",
                                 "extra"]))
    text = json.dumps(VALID, indent=2)
    if kind == "bytes":
        return draw(st.binary(max_size=300).filter(not_json)), ("not valid JSON",)
    if kind == "cut":  # a prefix of a JSON object is never a JSON document
        return text[:draw(st.integers(0, len(text) - 1))].encode(), ("not valid JSON",)
    if kind == "deep":
        return b"[" * draw(st.integers(10_000, 200_000)), ("not valid JSON",)
    if kind == "long int":  # more digits than Python turns into an int
        digits = "9" * draw(st.integers(4301, 10_000))
        return text.replace('"seed": 0', f'"seed": {digits}', 1).encode(), ("not valid JSON",)
    if kind == "value":  # any JSON document but a config
        return json.dumps(draw(JSON_VALUES)).encode(), ()
    if kind == "type":
        path = draw(st.sampled_from(FIELDS))
        value = draw(JSON_VALUES.filter(lambda v: wrong_for(path, v)))
        return edited(path, lambda node, key: node.update({key: value})).encode(), (path[-1],)
    if kind == "missing":  # "preset" alone may be left out: it then reads as "quick"
        path = draw(st.sampled_from([p for p in FIELDS if p != ("preset",)]))
        return edited(path, lambda node, key: node.pop(key)).encode(), (path[-1],)
    section = draw(st.sampled_from([(), ("model",), ("train",), ("data",), ("train", "augment")]))
    node = VALID
    for key in section:
        node = node[key]
    name = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in node))
    value = draw(JSON_VALUES)
    content = edited((*section, name), lambda node, key: node.update({key: value}))
    shown = name if name.isidentifier() else repr(name)
    return content.encode(), (f"unknown {shown}",)


@cases("malformed config.json")
@given(case=malformed_configs())
def test_malformed_config_json_is_a_run_error_naming_the_file(
        saved_run: Path, image_dir: Path, case: tuple[bytes, tuple[str, ...]]) -> None:
    content, needles = case
    with run_copy(saved_run) as run:
        file = run / CONFIG
        file.write_bytes(content)
        before = snapshot(run.parent)
        with pytest.raises(RunError) as info:
            read_config(run)
        message = str(info.value)
        assert message.startswith(f"{file}: ") and "\n" not in message, message
        for needle in needles:
            assert needle in message, (needle, message)
        with pytest.raises(RunError, match="^" + re.escape(message) + "$"):
            load_run(run)
        [summary] = list_runs(run.parent)  # the run is listed as broken, nothing raised
        assert summary.error == message and not summary.complete
        assert run_cli("score", str(run), str(image_dir / "good.png")) == (
            2, "", f"anomem: error: {message}\n")
        assert snapshot(run.parent) == before


INT_FIELDS = [p for p in FIELDS if kind_of(p)[0] == "int"]
NUMBER_FIELDS = [p for p in FIELDS if kind_of(p)[0] == "number"]


@st.composite
def absurd_numbers(draw: st.DrawFn) -> tuple[tuple[str, ...], int | float]:
    """A number field given a number of the right type but any size (finite floats only)."""
    big = st.integers(-10**400, 10**400)
    if draw(st.booleans()):
        return draw(st.sampled_from(INT_FIELDS)), draw(st.integers() | big)
    return draw(st.sampled_from(NUMBER_FIELDS)), draw(
        st.floats(allow_nan=False, allow_infinity=False) | st.integers() | big)


@cases("absurd numbers in config.json")
@given(case=absurd_numbers())
def test_absurd_numbers_in_config_json_load_or_raise_a_run_error(
        saved_run: Path, case: tuple[tuple[str, ...], int | float]) -> None:
    path, value = case
    with run_copy(saved_run) as run:
        (run / CONFIG).write_text(edited(path, lambda node, key: node.update({key: value})))
        before = snapshot(run.parent)
        try:
            loaded = load_run(run)
        except RunError as err:
            message = str(err)
            assert message.startswith((f"{run / CONFIG}: ", f"{run / WEIGHTS}: "))
            assert "\n" not in message
        else:  # a value that does not change the architecture (a training knob, a seed)
            assert isinstance(loaded.model, AnoMem)
        assert [s.name for s in list_runs(run.parent)] == ["run"]
        assert snapshot(run.parent) == before


# ---------------------------------------------------------------------------------------------
# model.safetensors: load_model, load_run and `anomem score`


@cache
def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in AnoMem(TINY).state_dict().items()}


@cache
def weights_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors(), Path(tmp) / WEIGHTS)
        return (Path(tmp) / WEIGHTS).read_bytes()


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
          torch.int32, torch.int64, torch.bool]


def shown_key(name: str) -> str:
    return name if name.isprintable() else repr(name)


@st.composite
def broken_weights(draw: st.DrawFn) -> tuple[bytes, tuple[str, ...]]:
    """(content of model.safetensors, what the message must contain)."""
    kind = draw(st.sampled_from(["missing", "extra", "shape", "dtype", "bytes", "cut",
                                 "header"]))
    state = dict(tensors())
    names = sorted(state)
    if kind == "bytes":
        return draw(st.binary(max_size=2048)), ("not a readable safetensors file",)
    if kind == "cut":
        data = weights_bytes()
        return data[:draw(st.integers(0, len(data) - 1))], ("not a readable safetensors file",)
    if kind == "header":  # a length prefix, then anything
        body = draw(st.binary(max_size=300))
        length = draw(st.integers(0, 2**64 - 1) | st.just(len(body)))
        return struct.pack("<Q", length) + body, ("not a readable safetensors file",)
    if kind == "missing":
        gone = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names),
                             unique=True))
        for name in gone:
            del state[name]
        needles: tuple[str, ...] = ("tensors do not match config.json",
                                    f"missing {sorted(gone)[0]}")
    elif kind == "extra":
        added = draw(st.lists(st.text(min_size=1, max_size=20).filter(lambda k: k not in state),
                              min_size=1, max_size=3, unique=True))
        for name in added:
            state[name] = torch.zeros(draw(st.lists(st.integers(0, 3), max_size=3)))
        needles = ("tensors do not match config.json",
                   f"unexpected {shown_key(sorted(added)[0])}")
    elif kind == "shape":
        name = draw(st.sampled_from(names))
        shape = tuple(draw(st.lists(st.integers(0, 9), max_size=3).filter(
            lambda s: tuple(s) != tuple(state[name].shape))))
        state[name] = torch.zeros(shape, dtype=state[name].dtype)
        needles = (f"tensor {name} is {shape} ", "config.json expects")
    else:
        name = draw(st.sampled_from(names))
        dtype = draw(st.sampled_from([d for d in DTYPES if d != state[name].dtype]))
        state[name] = state[name].to(dtype)
        needles = (f"tensor {name} is ", str(dtype), "config.json expects")
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, Path(tmp) / WEIGHTS)
        return (Path(tmp) / WEIGHTS).read_bytes(), needles


@cases("bad model.safetensors")
@given(case=broken_weights())
def test_bad_weights_are_a_run_error_and_the_run_folder_is_left_as_it_was(
        saved_run: Path, image_dir: Path, case: tuple[bytes, tuple[str, ...]]) -> None:
    content, needles = case
    with run_copy(saved_run) as run:
        file = run / WEIGHTS
        file.write_bytes(content)
        before = snapshot(run.parent)
        with pytest.raises(RunError) as info:
            load_model(run)
        message = str(info.value)
        assert message.startswith(f"{file}: ") and "\n" not in message, message
        for needle in needles:
            assert needle in message, (needle, message)
        assert run_cli("score", str(run), str(image_dir / "good.png")) == (
            2, "", f"anomem: error: {message}\n")
        assert snapshot(run.parent) == before


# ---------------------------------------------------------------------------------------------
# security: no unpickling, localhost, upload caps

GLOBALS = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
           ("builtins", "open"), ("builtins", "getattr"), ("builtins", "__import__"),
           ("subprocess", "Popen"), ("shutil", "rmtree"), ("torch", "load"), ("numpy", "load"),
           ("pickle", "loads"), ("copyreg", "_reconstructor"), ("functools", "partial"),
           ("operator", "attrgetter"), ("numpy", "frombuffer"), ("numpy.lib.npyio", "load"),
           ("collections", "OrderedDict"), ("builtins", "object"), ("torch", "Tensor")]
IDENTIFIERS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)


def global_pickle(module: str, name: str, protocol: int, args: list[str]) -> bytes:
    """A pickle that calls module.name(*args), named by GLOBAL or (protocol 4+) STACK_GLOBAL."""
    head = b"\x80" + bytes([protocol]) if protocol >= 2 else b""
    if protocol >= 4:
        found = b"".join(b"\x8c" + bytes([len(s.encode())]) + s.encode() for s in (module, name))
        found += b"\x93"
    else:
        found = b"c" + f"{module}\n{name}\n".encode()
    text = [arg.encode() for arg in args]
    packed = b"(" + b"".join(b"X" + struct.pack("<I", len(t)) + t for t in text) + b"t"
    return head + found + packed + b"R."


@cases("pickle naming a global")
@given(target=st.sampled_from(GLOBALS) | st.tuples(
    st.lists(IDENTIFIERS, min_size=1, max_size=3).map(".".join), IDENTIFIERS),
    protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_restricted_unpickler_refuses_every_other_global(target: tuple[str, str], protocol: int
                                                         ) -> None:
    assume(target not in allowed_globals())
    module, name = target
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "marker"  # what open(marker, "w") and the like would create
        path = Path(tmp) / "data_batch_1"
        path.write_bytes(global_pickle(module, name, protocol, [str(marker), "w"]))
        with open(path, "rb") as f, pytest.raises(DataError) as info:
            RestrictedUnpickler(f, str(path)).load()
        assert sorted(os.listdir(tmp)) == ["data_batch_1"]
    assert str(info.value) == (f"refusing to load '{path}': it references {module}.{name}, "
                               "which is not a numpy array (expected a CIFAR python batch)")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_unpickler_still_reads_arrays_lists_and_dicts(protocol: int) -> None:
    batch = {"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "labels": [1, 2],
             b"name": "x", "scale": np.float64(0.5)}
    back = RestrictedUnpickler(io.BytesIO(pickle.dumps(batch, protocol)), "batch").load()
    assert back.keys() == batch.keys() and back["labels"] == [1, 2]
    np.testing.assert_array_equal(back["data"], batch["data"])
    assert back["scale"] == 0.5
    objects = np.array([print], dtype=object)  # an object array names what it holds
    with pytest.raises(DataError, match=r"(__builtin__|builtins)\.print"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(objects, protocol)), "batch").load()


UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
              "marshal"}


def unsafe_loads(source: str, path: str = "<source>") -> list[str]:
    """Every place in `source` that can unpickle: a module of UNPICKLERS, torch.load without
    weights_only=True, allow_pickle=True, read_pickle, an Unpickler other than cifar's."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNPICKLERS - {"pickle"}:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            found.append(f"{where}: from {node.module} import ...")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "pickle" and node.attr in ("load", "loads", "Unpickler")):
            found.append(f"{where}: pickle.{node.attr}")
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            keywords = {k.arg: k.value for k in node.keywords}
            flag = keywords.get("weights_only")
            is_torch = isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch"
            if is_torch and name == "load" and not (
                    isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
            pickles = keywords.get("allow_pickle")
            if isinstance(pickles, ast.Constant) and pickles.value is True:
                found.append(f"{where}: allow_pickle=True")
            if name == "read_pickle":
                found.append(f"{where}: read_pickle")
    return found


def test_the_unpickling_check_finds_what_it_looks_for() -> None:
    assert unsafe_loads("import torch\ntorch.load('m.pt')\n")
    assert unsafe_loads("import torch\ntorch.load('m.pt', weights_only=False)\n")
    assert not unsafe_loads("import torch\ntorch.load('m.pt', weights_only=True)\n")
    assert unsafe_loads("import pickle\npickle.loads(b'')\n")
    assert unsafe_loads("from pickle import load\n")
    assert unsafe_loads("import numpy as np\nnp.load('a.npy', allow_pickle=True)\n")
    assert unsafe_loads("import joblib\n") and unsafe_loads("pd.read_pickle('x')\n")
    assert unsafe_loads("class U(pickle.Unpickler):\n    pass\n")


def test_no_source_can_unpickle_a_user_file() -> None:
    """core/ and app/ never unpickle: the one Unpickler is cifar's, which allows numpy only."""
    found = []
    for path in sorted([*(ROOT / "core").rglob("*.py"), *(ROOT / "app").rglob("*.py")]):
        found += unsafe_loads(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    cifar = "core/data/cifar.py"
    allowed = [f for f in found if f.startswith(cifar) and f.endswith(": pickle.Unpickler")]
    assert len(allowed) == 1  # `class RestrictedUnpickler(pickle.Unpickler)`, with find_class
    assert [f for f in found if f not in allowed] == []
    source = (ROOT / cifar).read_text(encoding="utf-8")
    assert "def find_class(self, module: str, name: str)" in source


def test_streamlit_config_listens_on_localhost_and_caps_uploads() -> None:
    server = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())["server"]
    assert server["address"] in ("localhost", "127.0.0.1")
    assert 0 < server["maxUploadSize"] * 2**20 <= MAX_UPLOAD_BYTES  # Streamlit's MB: 2**20 bytes
    assert server.get("enableXsrfProtection", True) and server.get("enableCORS", True)


# ---------------------------------------------------------------------------------------------
# the app: Score page uploads, Train page data


def bad_uploads() -> list[tuple[str, bytes, str]]:
    """(name, content, part of the expected message) of each kind the Score page refuses."""
    rng = np.random.default_rng(7)
    cut = GOOD_PNG[:len(GOOD_PNG) // 2]
    return [
        ("noise.png", rng.bytes(3000), "not in an image format PIL recognises"),
        ("notes.txt", b"just some text\n", "file type '.txt' is not supported (expected one of"),
        ("setup.exe", b"MZ\x90\x00" + rng.bytes(500), "file type '.exe' is not supported"),
        ("cut.png", cut, "truncated file"),
        ("bomb.png", bomb("PNG", 8000, 6000), f"over the limit of {MAX_UPLOAD_PIXELS}"),
        ("huge.png", GOOD_PNG + bytes(MAX_UPLOAD_BYTES), "MB is over the limit of"),
        ("empty.jpg", b"", "empty file"),
    ]


@pytest.fixture
def app_runs(saved_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(saved_run, root / "tiny")
    monkeypatch.setenv("ANOMEM_RUNS", str(root))
    return root


def test_score_page_names_each_refused_upload_then_scores_a_good_one(app_runs: Path) -> None:
    from tests.app.helpers import open_page

    at = open_page("views/score.py")
    before = snapshot(app_runs)
    uploads = bad_uploads()
    at.file_uploader(key="score_files").set_value(
        [(name, data, "application/octet-stream") for name, data, _ in uploads]).run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert len(errors) == len(uploads)
    for (name, _, needle), error in zip(uploads, errors, strict=True):
        assert error.startswith(f"cannot read image {name!r}: ") and needle in error, error
    assert not at.subheader and not at.metric
    at.file_uploader(key="score_files").set_value([("good.png", GOOD_PNG, "image/png")]).run()
    assert not at.exception and not at.error
    assert [s.value for s in at.subheader] == ["good.png"]
    assert np.isfinite(float({m.label: m.value for m in at.metric}["Anomaly score"]))
    assert snapshot(app_runs) == before


def test_train_page_shows_a_class_folder_of_unreadable_images(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_job_board: None) -> None:
    from tests.app.helpers import open_page

    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("ANOMEM_RUNS", str(runs))
    monkeypatch.setenv("ANOMEM_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    class_folders(data, {"train": {"other": 2}, "test": {"good": 1, "other": 1}})
    (data / "train" / "good").mkdir()
    (data / "train" / "good" / "noise.png").write_bytes(np.random.default_rng(3).bytes(800))
    (data / "train" / "good" / "cut.png").write_bytes(GOOD_PNG[:300])
    at = open_page()
    at.selectbox(key="train_dataset").set_value("folder").run()
    at.text_input(key="train_root_folder").input(str(data)).run()
    at.selectbox(key="train_normal_folder").set_value("good").run()
    at.button(key="train_start").click().run()
    deadline = time.monotonic() + 60
    while not at.error and time.monotonic() < deadline:  # as the page's polling would
        time.sleep(0.2)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "failed" in errors[0], errors
    assert f"class folder '{data / 'train' / 'good'}': none of its 2 image file(s)" in errors[0]
    for name in ("noise.png", "cut.png"):
        assert repr(str(data / "train" / "good" / name)) in errors[0]
    assert list_runs(runs) == [] and not any(runs.iterdir())
