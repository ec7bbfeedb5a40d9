"""Shared pieces of the bad-input suite: case counts, file builders, the tiny run.

Bad input through every entry point a user reaches, as generated cases. Each class of case is
drawn by hypothesis (derandomised: every run tries the same cases) and its count is in CASES. A
refusal must name the file, say what was expected, change no file and write none; valid but
unusual images (1x1, 16-bit, palette) must decode to the right values.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

from core.cli import main
from core.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]  # the repository

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


@contextlib.contextmanager
def run_copy(saved_run: Path) -> Iterator[Path]:
    """A fresh copy of the saved run, alone under a runs folder of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(shutil.copytree(saved_run, Path(tmp) / "run"))


STEMS = st.text(alphabet="abxyz019-_ é", min_size=1, max_size=10).map(str.strip).filter(bool)
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".webp")
SUFFIX_OF = {"PNG": ".png", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp",
             "JPEG": ".jpg"}


def class_folders(root: Path, classes: dict[str, dict[str, int]]) -> None:
    """ROOT/split/class/<i>.png for the counts given, each image a different colour."""
    for split, counts in classes.items():
        for name, n in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                colour = (40 * i, 200 if name == "good" else 30, 90)
                Image.new("RGB", (12, 12), colour).save(root / split / name / f"{i}.png")
