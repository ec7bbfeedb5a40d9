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


def grey(path: Path, value: int, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)


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
