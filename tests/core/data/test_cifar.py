"""CIFAR-10 / CIFAR-100 from binary records or restricted-unpickled python batches."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import core.data
from core.config import DataConfig
from core.data import cifar
from core.data.base import DataError
from core.data.cifar import CIFAR10_CLASSES, CIFAR100_SUPERCLASSES

PER_BATCH = 4
N_TEST = 3


def fake_images(n: int, seed: int) -> np.ndarray:
    """(n, 3072) uint8 with a recognisable plane order: red 10+i, green 100, blue random."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, 1024), dtype=np.uint8)
    images[:, 0] = (10 + np.arange(n))[:, None]
    images[:, 1] = 100
    images[:, 2] = rng.integers(0, 256, (n, 1024), dtype=np.uint8)
    return images.reshape(n, 3072)


def batches(coarse: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (images (n, 3072), labels (n,)) for CIFAR-10 (5 + 1 batches) or CIFAR-100."""
    n_classes = 20 if coarse else 10
    names = ["train", "test"] if coarse else [f"data_batch_{i}" for i in range(1, 6)] + [
        "test_batch"]
    out = {}
    for k, name in enumerate(names):
        n = N_TEST if "test" in name else PER_BATCH * (5 if coarse else 1)
        labels = (np.arange(n) * 3 + k) % n_classes
        out[name] = fake_images(n, k), labels
    return out


def write_binary(folder: Path, coarse: bool = False) -> Path:
    folder.mkdir(parents=True)
    for name, (images, labels) in batches(coarse).items():
        head = [labels, (labels * 7) % 100] if coarse else [labels]  # coarse label byte first
        records = np.concatenate([np.stack(head, 1).astype(np.uint8), images], axis=1)
        records.tofile(folder / f"{name}.bin")
    return folder


def write_python(folder: Path, coarse: bool = False, protocol: int = 4,
                 byte_keys: bool = False) -> Path:
    folder.mkdir(parents=True)
    label_key = "coarse_labels" if coarse else "labels"
    for name, (images, labels) in batches(coarse).items():
        batch = {"data": images, label_key: labels.tolist(), "batch_label": name}
        if coarse:
            batch["fine_labels"] = ((labels * 7) % 100).tolist()
        if byte_keys:
            batch = {k.encode(): v for k, v in batch.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return folder


def test_binary_cifar10(tmp_path: Path) -> None:
    write_binary(tmp_path / "cifar-10-batches-bin")
    assert cifar.classes10(tmp_path) == list(CIFAR10_CLASSES)
    train, test = cifar.load_pools10(tmp_path, 32, None)
    assert train.images.shape == (5 * PER_BATCH, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (N_TEST, 3, 32, 32)
    data = batches(False)
    images, labels = data["data_batch_2"]
    first = train.images[PER_BATCH]  # first image of the second batch
    assert (first[0] == 10).all() and (first[1] == 100).all()  # red plane, then green
    assert torch.equal(first[2].flatten(), torch.from_numpy(images[0, 2048:]))
    assert train.classes[PER_BATCH] == CIFAR10_CLASSES[labels[0]]
    assert test.classes == [CIFAR10_CLASSES[i] for i in data["test_batch"][1]]
    assert test.names[1].endswith("test_batch.bin#1")


def test_root_may_be_the_folder_itself_and_meta_names_classes(tmp_path: Path) -> None:
    folder = write_binary(tmp_path / "cifar-10-batches-bin")
    names = [f"c{i}" for i in range(10)]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    assert cifar.classes10(folder) == names
    train, _ = cifar.load_pools10(folder, 32, None)
    assert set(train.classes) <= set(names)
    (folder / "batches.meta.txt").write_text("only\nthree\nnames\n")
    with pytest.raises(DataError, match="batches.meta.txt"):
        cifar.classes10(folder)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python_version_matches_binary(tmp_path: Path, protocol: int) -> None:
    write_binary(tmp_path / "bin" / "cifar-10-batches-bin")
    folder = write_python(tmp_path / "py" / "cifar-10-batches-py", protocol=protocol)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES), "num_vis": 3072}, f)
    assert cifar.classes10(tmp_path / "py") == list(CIFAR10_CLASSES)
    from_bin = cifar.load_pools10(tmp_path / "bin", 32, None)
    from_py = cifar.load_pools10(tmp_path / "py", 32, None)
    for a, b in zip(from_bin, from_py, strict=True):
        assert torch.equal(a.images, b.images) and a.classes == b.classes


def test_python_batches_with_byte_keys(tmp_path: Path) -> None:
    write_python(tmp_path / "cifar-10-batches-py", byte_keys=True)
    train, _ = cifar.load_pools10(tmp_path, 32, None)
    assert len(train) == 5 * PER_BATCH


def test_binary_preferred_when_both_present(tmp_path: Path) -> None:
    write_binary(tmp_path / "cifar-10-batches-bin")
    (tmp_path / "cifar-10-batches-py").mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / "cifar-10-batches-py" / name).write_bytes(b"never read")
    train, _ = cifar.load_pools10(tmp_path, 32, None)
    assert train.names[0].endswith(".bin#0")


def test_resize(tmp_path: Path) -> None:
    write_binary(tmp_path / "cifar-10-batches-bin")
    train, test = cifar.load_pools10(tmp_path, 16, None)
    assert train.images.shape == (5 * PER_BATCH, 3, 16, 16) and test.images.shape[-1] == 16
    assert (train.images[:, 1] == 100).all()  # a flat plane stays flat


def test_nothing_found_says_what_to_put_where(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        cifar.classes10(tmp_path)
    message = str(info.value)
    for needle in (str(tmp_path), "cifar-10-batches-bin/", "cifar-10-batches-py/",
                   "nothing is downloaded"):
        assert needle in message
    with pytest.raises(DataError, match="cifar-100-binary/ or cifar-100-python/"):
        cifar.load_pools100(tmp_path, 32, None)


def test_missing_batch_is_listed(tmp_path: Path) -> None:
    folder = write_binary(tmp_path / "cifar-10-batches-bin")
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match="missing data_batch_3.bin"):
        cifar.classes10(tmp_path)


def test_wrong_sized_batch_is_named(tmp_path: Path) -> None:
    folder = write_binary(tmp_path / "cifar-10-batches-bin")
    with open(folder / "data_batch_4.bin", "ab") as f:
        f.write(b"\0" * 100)
    with pytest.raises(DataError, match="multiple of 3073") as info:
        cifar.load_pools10(tmp_path, 32, None)
    assert str(folder / "data_batch_4.bin") in str(info.value)
    (folder / "data_batch_4.bin").write_bytes(b"")
    with pytest.raises(DataError, match="has 0 bytes"):
        cifar.load_pools10(tmp_path, 32, None)


def test_label_out_of_range(tmp_path: Path) -> None:
    folder = write_binary(tmp_path / "cifar-10-batches-bin")
    data = bytearray((folder / "test_batch.bin").read_bytes())
    data[0] = 10
    (folder / "test_batch.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match="label 10: expected 0..9"):
        cifar.load_pools10(tmp_path, 32, None)


@pytest.mark.parametrize("binary", [True, False])
def test_cifar100_superclasses(tmp_path: Path, binary: bool) -> None:
    if binary:
        write_binary(tmp_path / "cifar-100-binary", coarse=True)
    else:
        write_python(tmp_path / "cifar-100-python", coarse=True)
    assert cifar.classes100(tmp_path) == list(CIFAR100_SUPERCLASSES)
    assert core.data.list_classes("cifar100", tmp_path) == list(CIFAR100_SUPERCLASSES)
    train, test = cifar.load_pools100(tmp_path, 32, None)
    labels = batches(True)["train"][1]
    assert len(train) == 5 * PER_BATCH and len(test) == N_TEST
    assert train.classes == [CIFAR100_SUPERCLASSES[i] for i in labels]
    assert (train.images[3, 0] == 13).all()


def test_cifar100_binary_meta(tmp_path: Path) -> None:
    folder = write_binary(tmp_path / "cifar-100-binary", coarse=True)
    (folder / "coarse_label_names.txt").write_text("\n".join(f"s{i}" for i in range(20)))
    assert cifar.classes100(tmp_path)[19] == "s19"


class Exploit:
    """Pickles to a call of os.system: loading it with pickle.load would run the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    folder = write_python(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    images, labels = batches(False)["data_batch_1"]
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": images, "labels": labels.tolist(), "x": Exploit(marker)}, f)
    with pytest.raises(DataError, match="refusing to load") as info:
        cifar.load_pools10(tmp_path, 32, None)
    assert "data_batch_1" in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


def test_other_globals_are_refused(tmp_path: Path) -> None:
    folder = write_python(tmp_path / "cifar-10-batches-py")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [print]}, f)  # a builtin function, by reference
    with pytest.raises(DataError, match="builtins.print"):
        cifar.classes10(tmp_path)
    evil = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    (folder / "batches.meta").write_bytes(evil)
    with pytest.raises(DataError, match="rot13"):
        cifar.classes10(tmp_path)


def test_broken_python_batches(tmp_path: Path) -> None:
    folder = write_python(tmp_path / "cifar-10-batches-py")
    whole = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="broken pickle") as info:
        cifar.load_pools10(tmp_path, 32, None)
    assert str(folder / "test_batch") in str(info.value)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(DataError, match="not the expected dict: found list"):
        cifar.load_pools10(tmp_path, 32, None)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(DataError, match="'data' must be a"):
        cifar.load_pools10(tmp_path, 32, None)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), dtype=np.uint8), "labels": [0]}, f)
    with pytest.raises(DataError, match="one integer per image"):
        cifar.load_pools10(tmp_path, 32, None)


def test_split_through_the_registry(tmp_path: Path) -> None:
    write_binary(tmp_path / "cifar-10-batches-bin")
    config = DataConfig(dataset="cifar10", root=str(tmp_path), normal_class="automobile")
    split = core.data.load_split(config)
    assert set(split.train.types) == {"normal"} and len(split.train) == 2
    assert split.test.types == ["dog", "ship", "normal"]
