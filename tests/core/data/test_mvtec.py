"""The MVTec AD category layout: train/good, test/<type>, ground_truth/<type>."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import core.data
from core.config import DataConfig
from core.data import mvtec
from core.data.base import DataError

REAL = Path(__file__).resolve().parents[3].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANOMEM_CACHE", str(tmp_path_factory.mktemp("cache")))


def grey(path: Path, value: int, size: int = 20, height: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, height or size), value).save(path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A grayscale category: 3 train, test good 2 + crack 2 (one mask missing) + hole 1."""
    base = tmp_path / "screw"
    for i in range(3):
        grey(base / "train" / "good" / f"{i:03d}.png", 100)
    for i in range(2):
        grey(base / "test" / "good" / f"{i:03d}.png", 100)
        grey(base / "test" / "crack" / f"{i:03d}.png", 30)
    grey(base / "test" / "hole" / "000.png", 60)
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[:10, :5] = 255  # the top-left quarter's left half
    (base / "ground_truth" / "crack").mkdir(parents=True)
    Image.fromarray(mask).save(base / "ground_truth" / "crack" / "000_mask.png")
    (base / "ground_truth" / "hole").mkdir(parents=True)
    Image.fromarray(255 - mask).save(base / "ground_truth" / "hole" / "000_mask.png")
    return base


def test_classes(root: Path) -> None:
    assert mvtec.classes(root) == ["good"]
    assert core.data.list_classes("mvtec", root) == ["good"]


def test_defect_types_are_the_labelled_anomaly_choices(root: Path) -> None:
    assert mvtec.anomaly_types(root) == ["crack", "hole"]
    assert core.data.anomaly_choices("mvtec", root, "good") == ["crack", "hole"]


@pytest.mark.parametrize("folder", ["train/good", "test"])
def test_missing_folder_is_named(root: Path, folder: str) -> None:
    shutil.rmtree(root / folder)
    with pytest.raises(DataError, match="expected an MVTec AD category") as info:
        mvtec.classes(root)
    assert f"missing folder '{root / folder}'" in str(info.value)


def test_empty_folders_are_refused(root: Path) -> None:
    for path in (root / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="no images in"):
        mvtec.classes(root)
    with pytest.raises(DataError, match="needs a root"):
        mvtec.classes(None)


def test_load_pools_with_masks(root: Path) -> None:
    with pytest.warns(UserWarning, match="1 defect image") as caught:
        train, test = mvtec.load_pools(root, 8, None)
    assert str(root / "test" / "crack" / "001.png") in str(caught[0].message)
    assert train.images.shape == (3, 3, 8, 8) and train.classes == ["good"] * 3
    assert test.classes == ["crack", "crack", "good", "good", "hole"]
    assert test.names[0] == str(root / "test" / "crack" / "000.png")
    assert (train.images == 100).all()  # grayscale replicated to three channels
    assert (test.images[0] == 30).all()
    assert test.masks is not None and test.masks.shape == (5, 8, 8)
    assert test.masks.dtype == torch.uint8
    expected = torch.zeros(8, 8, dtype=torch.uint8)
    expected[:4, :2] = 1
    assert torch.equal(test.masks[0], expected)
    assert torch.equal(test.masks[4], 1 - expected)
    assert test.masks[1:4].sum() == 0  # the missing mask and both good images


def test_unreadable_mask_counts_as_missing(root: Path) -> None:
    (root / "ground_truth" / "crack" / "001_mask.png").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="1 defect image") as caught:
        _, test = mvtec.load_pools(root, 8, None)
    assert "001_mask.png" in str(caught[0].message)
    assert test.masks is not None and test.masks[1].sum() == 0


def test_split_through_the_registry(root: Path) -> None:
    with pytest.warns(UserWarning, match="no readable mask"):
        split = core.data.load_split(DataConfig(dataset="mvtec", root=str(root), image_size=16))
    assert split.normal_class == "good" and len(split.train) == 3
    assert split.test.labels.tolist() == [1, 1, 0, 0, 1]
    assert split.test.masks is not None and split.test.masks.shape == (5, 16, 16)


@pytest.fixture
def tall(tmp_path: Path) -> Path:
    """A category of 20 x 50 images (width x height), like KolektorSDD's 205 x 512 photos; its
    defect's mask marks a thin horizontal band at 40 % of the height."""
    base = tmp_path / "commutator"
    for i in range(4):
        grey(base / "train" / "good" / f"{i:03d}.png", 100, 20, 50)
    grey(base / "test" / "good" / "000.png", 100, 20, 50)
    grey(base / "test" / "crack" / "000.png", 30, 20, 50)
    mask = np.zeros((50, 20), dtype=np.uint8)
    mask[19:22, :] = 255
    (base / "ground_truth" / "crack").mkdir(parents=True)
    Image.fromarray(mask).save(base / "ground_truth" / "crack" / "000_mask.png")
    return base


@pytest.mark.parametrize(("size", "expected"), [
    (16, (32, 16)),  # 16 x 2.5 = 40 -> the nearest multiple of 32
    (32, (96, 32)),  # 80 -> 96
    (512, (1024, 512)),  # 1280 -> capped at 1024
])
def test_a_tall_category_keeps_its_aspect(tall: Path, size: int, expected: tuple) -> None:
    assert mvtec.shape(tall, size) == expected
    split = core.data.load_split(DataConfig(dataset="mvtec", root=str(tall), image_size=size))
    assert split.train.images.shape[-2:] == split.test.images.shape[-2:] == expected
    assert split.test.masks is not None and split.test.masks.shape[-2:] == expected
    row = torch.nonzero(split.test.masks[split.test.labels == 1][0].amax(1)).flatten()
    assert row.float().mean() / expected[0] == pytest.approx(20.5 / 50, abs=0.04)
    squashed = core.data.load_split(DataConfig(dataset="mvtec", root=str(tall),
                                               image_size=size, keep_aspect=False))
    assert squashed.train.images.shape[-2:] == (size, size)


def test_wide_and_about_square_categories(root: Path, tmp_path: Path) -> None:
    assert mvtec.shape(root, 24) == (24, 24)  # square
    for i in range(3):  # 24 x 20: a ratio of 1.2 is read square
        grey(root / "train" / "good" / f"{i:03d}.png", 100, 24, 20)
    assert mvtec.shape(root, 24) == (24, 24)
    for i in range(3):  # 60 x 20: wide, the width is the long side
        grey(root / "train" / "good" / f"{i:03d}.png", 100, 60, 20)
    assert mvtec.shape(root, 16) == (16, 64)  # 48 -> 64


@pytest.mark.realdata
def test_real_bottle() -> None:
    real = REAL / "mvtec_ad" / "bottle"
    if not real.is_dir():
        pytest.skip(f"{real} is absent")
    train, test = mvtec.load_pools(real, 64, None)
    assert train.images.shape == (209, 3, 64, 64) and len(test) == 83
    assert sorted(set(test.classes)) == ["broken_large", "broken_small", "contamination", "good"]
    assert test.masks is not None
    has_defect = test.masks.flatten(1).amax(1) == 1
    is_defect = torch.tensor([c != "good" for c in test.classes])
    assert torch.equal(has_defect, is_defect)
