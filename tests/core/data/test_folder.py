"""The class-folder layout ROOT/{train,test}/<class>/*."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import core.data
from core.data import folder
from core.data.base import DataError

REAL = Path(__file__).resolve().parents[3].parent / "shared" / "data"
COLOURS = {"apple": (200, 30, 30), "berry": (40, 40, 190), "cherry": (20, 160, 20)}


@pytest.fixture(autouse=True)
def private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANOMEM_CACHE", str(tmp_path_factory.mktemp("cache")))


def write(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """train: apple 3, berry 2 (+ a non-image class folder); test: apple 1, berry 1, cherry 2."""
    base = tmp_path / "fruit"
    for i in range(3):
        write(base / "train" / "apple" / f"{i}.png", COLOURS["apple"])
    write(base / "train" / "berry" / "b.JPG", COLOURS["berry"])
    write(base / "train" / "berry" / "a.bmp", COLOURS["berry"], (40, 40))
    (base / "train" / "berry" / "notes.txt").write_text("not an image")
    (base / "train" / "berry" / "._a.png").write_bytes(b"resource fork")
    (base / "train" / "docs").mkdir()
    (base / "train" / "docs" / "readme.md").write_text("no images here")
    write(base / "test" / "apple" / "0.png", COLOURS["apple"])
    write(base / "test" / "berry" / "0.png", COLOURS["berry"])
    write(base / "test" / "cherry" / "0.png", COLOURS["cherry"])
    write(base / "test" / "cherry" / "1.png", COLOURS["cherry"])
    return base


def test_classes_are_sorted_folders_with_images(root: Path) -> None:
    assert folder.classes(root) == ["apple", "berry"]
    assert core.data.list_classes("folder", root) == ["apple", "berry"]


@pytest.mark.parametrize("missing", ["train", "test"])
def test_missing_split_names_the_path(root: Path, missing: str) -> None:
    os.rename(root / missing, root / "elsewhere")
    with pytest.raises(DataError, match="expected ROOT/train/<class>") as info:
        folder.classes(root)
    assert str(root / missing) in str(info.value)
    with pytest.raises(DataError, match=str(root / missing)):
        folder.load_pools(root, 8, None)


def test_no_class_with_images(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.txt").write_text("text")
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no class folder with images") as info:
        folder.classes(tmp_path)
    assert str(tmp_path / "train") in str(info.value)
    with pytest.raises(DataError, match="needs a root"):
        folder.classes(None)


def test_load_pools(root: Path) -> None:
    train, test = folder.load_pools(root, 8, None)
    assert train.images.shape == (5, 3, 8, 8) and train.images.dtype == torch.uint8
    assert train.classes == ["apple"] * 3 + ["berry"] * 2
    assert train.names == [str(root / "train" / "apple" / f"{i}.png") for i in range(3)] + [
        str(root / "train" / "berry" / "a.bmp"), str(root / "train" / "berry" / "b.JPG")]
    assert test.classes == ["apple", "berry", "cherry", "cherry"]
    assert test.images.shape == (4, 3, 8, 8)
    for pool in (train, test):
        assert pool.masks is None
        for image, name in zip(pool.images, pool.classes, strict=True):
            expected = torch.tensor(COLOURS[name], dtype=torch.int16)[:, None, None]
            assert (image.to(torch.int16) - expected).abs().max() <= 8  # JPEG for one of them


def test_corrupt_image_is_skipped_with_a_warning(root: Path) -> None:
    bad = root / "test" / "cherry" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(UserWarning, match="skipped 1 unreadable") as caught:
        train, test = folder.load_pools(root, 8, None)
    assert str(bad) in str(caught[0].message)
    assert len(train) == 5 and len(test) == 4 and str(bad) not in test.names


def test_progress_reaches_one(root: Path) -> None:
    seen: list[float] = []
    folder.load_pools(root, 8, lambda message, fraction: seen.append(fraction))
    assert seen and seen[-1] == 1.0


def test_second_load_equals_first(root: Path) -> None:
    first = folder.load_pools(root, 8, None)
    second = folder.load_pools(root, 8, None)  # from the cache
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.images, b.images) and a.names == b.names and a.classes == b.classes


@pytest.mark.realdata
def test_real_cifar10_folders(tmp_path: Path) -> None:
    real = REAL / "cifar10"
    if not real.is_dir():
        pytest.skip(f"{real} is absent")
    classes = folder.classes(real)
    assert classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                       "ship", "truck"]
    subset = tmp_path / "cats"  # one class through symbolic links: 6,000 real JPEG files
    for split in ("train", "test"):
        (subset / split).mkdir(parents=True)
        (subset / split / "cat").symlink_to(real / split / "cat", target_is_directory=True)
    train, test = folder.load_pools(subset, 32, None)
    assert train.images.shape == (5000, 3, 32, 32) and test.images.shape == (1000, 3, 32, 32)
    assert set(train.classes) == {"cat"} and 40 < train.images.float().mean() < 215
