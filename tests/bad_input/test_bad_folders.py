"""The class-folder loader and `anomem score` given bad images."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image

from core.config import DataConfig
from core.data import load_split
from core.data.base import DataError
from core.data.imageio import (
    MAX_PIXELS,
)
from tests.bad_input.cases import (
    ROOT,
    STEMS,
    SUFFIX_OF,
    SUFFIXES,
    bomb,
    cases,
    class_folders,
    encode,
    noise,
    pixel_data_end,
    run_cli,
    snapshot,
)


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
def test_anomem_score_skips_a_bad_image_names_it_and_exits_2(
        saved_run: Path, image_dir: Path, bad: tuple[str, bytes], stem: str) -> None:
    """The good image is still scored (a camera's one broken file must not stop a line), the
    bad one is named on stderr, and the exit status says something was skipped."""
    suffix, data = bad
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / (stem + suffix)
        path.write_bytes(data)
        overlays = Path(tmp) / "overlays"
        before = snapshot(saved_run)
        good = str(image_dir / "good.png")
        code, out, err = run_cli("score", str(saved_run), good, str(path),
                                 "--overlays", str(overlays))
        assert code == 2 and out.startswith(f"{good}\t") and out.count("\n") == 1
        assert err.startswith(f"anomem: error: cannot read image {str(path)!r}: "), err
        assert err.count("\n") == 1 and err.endswith("\n")
        assert snapshot(saved_run) == before
        assert os.listdir(overlays) == ["000_good_overlay.png"]
        assert sorted(os.listdir(tmp)) == sorted([path.name, "overlays"])
        assert path.read_bytes() == data


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
