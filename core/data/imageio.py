"""Safe image decoding, and an on-disk cache of decoded image sets.

Every image the project reads from disk or from an upload goes through `read_image`,
`read_mask` or `decode_bytes`, so each file format, bit depth and broken file is handled in
one place and always ends as a `DataError` naming the file.

Decoding choices:

* The declared width x height is checked against `MAX_PIXELS` right after the header is
  parsed and before any pixel is decoded; PIL's own decompression-bomb limit
  (`Image.MAX_IMAGE_PIXELS`) is never changed and still applies on top.
* Every mode ends as 8-bit grey ("L") or 8-bit colour ("RGB"): 16-bit images ("I;16*", and
  "I" whose values fit 0..65535) are scaled by 255/65535 (never clipped); other "I" and "F"
  images are stretched from their min..max (float images already in 0..1 are scaled by 255);
  1-bit images become 0/255; palette images are expanded through their palette; CMYK, YCbCr,
  HSV and LAB go through PIL's conversion to RGB.
* Alpha ("LA", "RGBA", "PA", palette transparency) is composited on black: a colour is
  multiplied by its alpha, so a fully transparent pixel is black whatever colour it stores.
* Colour to grey (channels=1) uses PIL's ITU-R 601-2 luma; grey to colour replicates the
  channel.
* Images are resized straight to the target, `size` x `size` or (height, width) (no crop or
  padding; a data set read at its aspect asks for its (height, width): core/data/mvtec.py):
  LANCZOS when the image is larger than the target in either direction, BILINEAR when it is
  only enlarged.
  Large JPEGs are first decoded at a reduced DCT scale (`Image.draft`) that stays at least as
  large as the target. Masks use NEAREST.
* A multi-frame file (GIF, TIFF) contributes its first frame.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from core.data.base import DataError
from core.files import atomic_path, write_atomic

# Skipped files are also logged here, so the app can show them to whoever started the job.
LOG = logging.getLogger("core.data")
LOG.addHandler(logging.NullHandler())

MAX_PIXELS = 64 * 1024 * 1024  # declared width * height above which a file is refused
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)
CACHE_VERSION = 1  # bump when decoding changes, so older cache entries are never read
CHUNK = 256  # images per decoding task, and per progress report
WORKERS = max(2, min(4, os.cpu_count() or 1))

Progress = Callable[[str, float], None] | None
Size = int | tuple[int, int]  # a square side, or (height, width)
_OPEN_LOCK = threading.Lock()  # warnings filters are process-wide: one header parse at a time


def default_cache_dir() -> Path:
    """`$ANOMEM_CACHE`, or ~/.cache/anomem."""
    return Path(os.environ.get("ANOMEM_CACHE", "~/.cache/anomem")).expanduser()


def is_image_file(name: str | Path) -> bool:
    """An image by its suffix (any case); hidden files such as macOS '._x.png' are not."""
    name = os.path.basename(name)
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and not name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name; [] when it is not a folder."""
    try:
        with os.scandir(folder) as entries:
            files = [e.path for e in entries if is_image_file(e.name) and e.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [Path(path) for path in sorted(files)]


def hw(size: Size) -> tuple[int, int]:
    """(height, width) of a target size: a side gives a square."""
    if isinstance(size, tuple | list):
        return int(size[0]), int(size[1])
    return int(size), int(size)


# ---------------------------------------------------------------------------------------------
# decoding


def read_image(path: Path, size: Size, channels: int = 3) -> np.ndarray:
    """Decode one image file to uint8 (H, W, channels), HWC, at `size`."""
    return _decode(Path(path), str(path), size, channels, MAX_PIXELS, mask=False)


def read_mask(path: Path, size: Size) -> np.ndarray:
    """Decode a ground-truth mask to uint8 (H, W) at `size`: 1 where the mask is above 127."""
    grey = _decode(Path(path), str(path), size, 1, MAX_PIXELS, mask=True)
    return (grey[..., 0] > 127).astype(np.uint8)


def declared_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from an image file's header, without decoding it; None when the file
    cannot be read (its loader says why later)."""
    try:
        with _open(Path(path)) as img:
            return img.size
    except Exception:  # untrusted bytes: any parser failure means "unknown"
        return None


def decode_bytes(
    data: bytes,
    name: str,
    size: Size | None,
    channels: int = 3,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Decode an uploaded file to uint8 (H, W, channels); size None keeps the native size."""
    if not data:
        raise DataError(_message(name, "empty file"))
    return _decode(io.BytesIO(data), name, size, channels, max_pixels, mask=False)


def _message(name: str, reason: str) -> str:
    reason = " ".join(str(reason).split())  # one line, whatever the library said
    return f"cannot read image {name!r}: {reason} (expected an image PIL can decode)"


def _open(source: Path | BinaryIO) -> Image.Image:
    """Parse the header only, with PIL's decompression-bomb warning raised as an error."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(source)


def _decode(
    source: Path | BinaryIO,
    name: str,
    size: Size | None,
    channels: int,
    max_pixels: int,
    *,
    mask: bool,
) -> np.ndarray:
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: expected 1 or 3")
    target = None if size is None else hw(size)
    if target is not None and min(target) < 1:
        raise ValueError(f"size={size}: expected a positive number of pixels")
    try:
        with _open(source) as img:
            width, height = img.size
            if width < 1 or height < 1:
                raise DataError(_message(name, f"declared size {width}x{height} is empty"))
            if width * height > max_pixels:
                raise DataError(
                    f"cannot read image {name!r}: declared size {width}x{height} is "
                    f"{width * height} pixels, over the limit of {max_pixels} (refused before "
                    "decoding)"
                )
            if target is not None and not mask and (width > target[1] or height > target[0]):
                img.draft(img.mode, target[::-1])  # JPEG only: decode at a reduced DCT scale
            img.load()
            array = _to_array(img, target, channels, mask)
    except DataError:
        raise
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as err:
        raise DataError(_message(name, f"cannot open the file ({err.strerror})")) from None
    except UnidentifiedImageError:
        empty = isinstance(source, Path) and _is_empty(source)
        reason = "empty file" if empty else "not in an image format PIL recognises"
        raise DataError(_message(name, reason)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(_message(name, f"refused as a decompression bomb ({err})")) from None
    except OSError as err:
        truncated = "truncated" in str(err).lower()  # PIL says both "truncated" and "Truncated"
        reason = "truncated file" if truncated else f"broken image data ({err})"
        raise DataError(_message(name, reason)) from None
    except Exception as err:  # any decoder failure on untrusted bytes
        reason = f"broken image data ({type(err).__name__}: {err})"
        raise DataError(_message(name, reason)) from None
    return array


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def _to_array(img: Image.Image, target: tuple[int, int] | None, channels: int,
              mask: bool) -> np.ndarray:
    """A loaded image of any mode -> uint8 (H, W, channels), resized to (H, W) = `target`."""
    img = _to_8bit(img)
    if channels == 1 and img.mode == "RGB":
        img = img.convert("L")
    if target is not None and img.size != target[::-1]:
        if mask:
            resample = Image.Resampling.NEAREST
        elif img.width > target[1] or img.height > target[0]:
            resample = Image.Resampling.LANCZOS
        else:
            resample = Image.Resampling.BILINEAR
        img = img.resize(target[::-1], resample)
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if channels == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Any PIL mode -> "L" or "RGB" (see the module docstring for each mode)."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode))  # 2-D uint8: "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return _to_8bit(img)
    if mode == "PA":
        return _to_8bit(img.convert("RGBA"))
    if mode in ("LA", "RGBA"):
        array = np.asarray(img).astype(np.uint16)
        colour, alpha = array[..., :-1], array[..., -1:]
        blended = ((colour * alpha + 127) // 255).astype(np.uint8)  # on black
        return Image.fromarray(blended[..., 0] if mode == "LA" else blended)
    if mode in ("La", "RGBa"):  # premultiplied: already composited on black
        colour = np.ascontiguousarray(np.asarray(img)[..., :-1])
        return Image.fromarray(colour[..., 0] if mode == "La" else colour)
    return img.convert("RGB")


def _scale_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """16-bit -> 8-bit by 255/65535; other integer or float data by its own range."""
    if mode.startswith("I;16"):
        wide = array.astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if values.size == 0:
        return np.zeros(array.shape, dtype=np.uint8)
    low, high = float(values.min()), float(values.max())
    if mode == "I" and low >= 0 and high <= 65535:
        scaled = values * (255 / 65535)
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    elif high > low:
        scaled = (values - low) * (255 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def resize_batch(images: torch.Tensor, size: Size) -> torch.Tensor:
    """(N, C, H, W) uint8 -> uint8 at `size`: bilinear, antialiased when shrinking."""
    n, c, h, w = images.shape
    target = hw(size)
    if (h, w) == target:
        return images
    out = torch.empty((n, c, *target), dtype=torch.uint8)
    step = max(1, 2**24 // (c * max(h * w, target[0] * target[1])))  # ~64 MB of float32
    for start in range(0, n, step):
        x = images[start:start + step].float()
        y = F.interpolate(x, size=target, mode="bilinear", antialias=True,
                          align_corners=False)
        out[start:start + step] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# image sets and their cache


def load_images(
    paths: Sequence[Path],
    size: Size,
    channels: int = 3,
    cache_dir: Path | None = None,
    progress: Progress = None,
) -> tuple[np.ndarray, list[Path], list[str]]:
    """Decode many images into uint8 (N, C, H, W) at `size`, through the on-disk cache.

    Returns (array, kept paths, messages of skipped files): an unreadable file is left out
    and its message collected, so one bad file does not lose a whole data set.
    """
    paths = [p if isinstance(p, Path) else Path(p) for p in paths]
    if not paths:
        return np.empty((0, channels, *hw(size)), dtype=np.uint8), [], []
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    key = cache_key(paths, size, channels)
    cached = _read_cache(cache_dir, key, len(paths), size, channels)
    if cached is not None:
        array, kept, skipped = cached
        if progress is not None:
            progress(f"read {len(kept)} images from the cache", 1.0)
        return array, [paths[i] for i in kept], skipped

    out = np.empty((len(paths), channels, *hw(size)), dtype=np.uint8)
    errors: list[str | None] = []
    starts = range(0, len(paths), CHUNK)

    def decode_chunk(start: int) -> list[str | None]:
        found: list[str | None] = []
        for i, path in enumerate(paths[start:start + CHUNK], start):
            try:
                out[i] = read_image(path, size, channels).transpose(2, 0, 1)  # HWC -> CHW
                found.append(None)
            except DataError as err:
                found.append(str(err))
        return found

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        for found in pool.map(decode_chunk, starts):
            errors.extend(found)
            if progress is not None:
                progress(f"decoding images {len(errors)}/{len(paths)}", len(errors) / len(paths))

    kept = [i for i, err in enumerate(errors) if err is None]
    left_out = [i for i, err in enumerate(errors) if err is not None]
    skipped = [errors[i] or "" for i in left_out]
    array = out if not left_out else out[kept]
    _write_cache(cache_dir, key, array, left_out, skipped)
    return array, [paths[i] for i in kept], skipped


def cache_key(paths: Sequence[Path], size: Size, channels: int) -> str:
    """sha256 over every path with its byte size and mtime, the target size and channels.

    The cache format, the decoding limit and PIL's version are part of the key too, so an
    entry is only reused when decoding again would give the same result.
    """
    digest = hashlib.sha256()
    h, w = hw(size)
    target = str(h) if h == w else f"{h}x{w}"  # a square keeps the key it always had
    head = (f"anomem-images v{CACHE_VERSION} pil {PIL.__version__} max {MAX_PIXELS} "
            f"size {target} channels {channels} n {len(paths)}\n")
    digest.update(head.encode())
    for path in paths:
        try:
            stat = os.stat(path)
            nbytes, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            nbytes = mtime = -1
        line = f"{os.path.abspath(os.fspath(path))}\0{nbytes}\0{mtime}\n"
        digest.update(line.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _read_cache(
    cache_dir: Path, key: str, n_paths: int, size: Size, channels: int
) -> tuple[np.ndarray, list[int], list[str]] | None:
    """The cached entry for `key`, or None when it is missing or broken in any way."""
    meta_path, data_path = cache_dir / f"{key}.json", cache_dir / f"{key}.npy"
    if not meta_path.is_file() or not data_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        left_out, skipped = meta["left_out"], meta["skipped"]
        if meta["version"] != CACHE_VERSION or meta["key"] != key:
            return None
        if not all(isinstance(i, int) and 0 <= i < n_paths for i in left_out):
            return None
        if not all(isinstance(s, str) for s in skipped) or len(set(left_out)) != len(skipped):
            return None
        gone = set(left_out)
        kept = [i for i in range(n_paths) if i not in gone]
        array = np.load(data_path, allow_pickle=False)
        if not isinstance(array, np.ndarray):
            return None
        if array.dtype != np.uint8 or array.shape != (len(kept), channels, *hw(size)):
            return None
    except Exception:  # a broken cache entry is a miss, never an error
        return None
    return array, kept, skipped


def _write_cache(
    cache_dir: Path, key: str, array: np.ndarray, left_out: list[int], skipped: list[str]
) -> None:
    """Store an entry atomically; a cache that cannot be written only costs a warning."""
    meta = {"version": CACHE_VERSION, "key": key, "left_out": left_out, "skipped": skipped}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_dir / f"{key}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        write_atomic(cache_dir / f"{key}.json", json.dumps(meta))
    except OSError as err:
        warnings.warn(f"image cache not written to '{cache_dir}': {err}", stacklevel=3)


def describe_skipped(skipped: Sequence[str], limit: int = 10) -> str:
    """One line per skipped file, at most `limit` of them, then "and N more"."""
    lines = [f"  {message}" for message in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  and {len(skipped) - limit} more")
    return "\n".join(lines)


def warn_skipped(skipped: Sequence[str], where: str) -> None:
    """Warn once about every unreadable image left out of a data set."""
    if skipped:
        message = (f"skipped {len(skipped)} unreadable image(s) under {where}:\n"
                   f"{describe_skipped(skipped)}")
        LOG.warning(message)
        warnings.warn(message, stacklevel=3)


# Caps on what a user may upload to the app (its Score page)
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000


def validate_upload(data: bytes, name: str, max_bytes: int = MAX_UPLOAD_BYTES,
                    max_pixels: int = MAX_UPLOAD_PIXELS, size: Size | None = None,
                    channels: int = 3) -> np.ndarray:
    """Check an uploaded file (type, bytes, pixels) and decode it to uint8 (H, W, C) at `size`.

    Raises DataError with a message naming the file; `size` and `channels` should be the
    run's `config.model.shape` and `in_channels`.
    """
    suffix = Path(name).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise DataError(
            f"cannot read image {name!r}: file type {suffix or '(none)'!r} is not supported "
            f"(expected one of {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    if len(data) > max_bytes:
        raise DataError(
            f"cannot read image {name!r}: {len(data) / 1e6:.1f} MB is over the limit of "
            f"{max_bytes / 1e6:.1f} MB"
        )
    return decode_bytes(data, name, size, channels, max_pixels)
