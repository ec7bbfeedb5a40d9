"""core/data/shapes.py: the generated data set and the test sets built from it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from core.data import NORMAL, Pool, Split, list_classes, make_split, shapes

SIZE = 32
FOREGROUND = 0.4  # background tops out near 0.28 + noise; the dimmest shape is above 0.42


@pytest.fixture(scope="module")
def pools() -> tuple[Pool, Pool]:
    return shapes.load_pools(None, SIZE)


@pytest.fixture(scope="module")
def splits(pools: tuple[Pool, Pool]) -> dict[str, Split]:
    out = {}
    for name in shapes.CLASSES:
        train, test = shapes.for_normal_class(*pools, name)
        out[name] = make_split(train, test, dataset="shapes", normal_class=name)
    return out


def foreground(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) uint8 -> (N, H, W) bool: pixels brighter than any background."""
    return images.numpy().max(axis=1) > FOREGROUND * 255


def test_classes() -> None:
    assert shapes.classes() == ["circle", "square", "triangle", "cross"]
    assert list_classes("shapes") == shapes.classes()


def assert_same_pools(first: tuple[Pool, Pool], second: tuple[Pool, Pool]) -> None:
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.masks, b.masks) and torch.equal(a.edge, b.edge)
        assert a.names == b.names and a.classes == b.classes and a.kinds == b.kinds


def test_generation_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMEM_CACHE", str(tmp_path / "one"))
    first = shapes.load_pools(None, 8)
    monkeypatch.setenv("ANOMEM_CACHE", str(tmp_path / "two"))  # drawn again, not read back
    assert_same_pools(first, shapes.load_pools(None, 8))


def test_drawn_shapes_are_read_back_from_the_cache_and_a_broken_entry_is_drawn_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMEM_CACHE", str(tmp_path))
    drawn = shapes.load_pools(None, 8)
    [entry] = tmp_path.glob("shapes-*.npz")

    def no_drawing(*args, **kwargs):
        raise AssertionError("drew the shapes again instead of reading the cache")

    with monkeypatch.context() as patch:
        patch.setattr(shapes, "_render_all", no_drawing)
        assert_same_pools(drawn, shapes.load_pools(None, 8))
    entry.write_bytes(b"not an npz file")
    assert shapes._read_cache(8) is None
    assert_same_pools(drawn, shapes.load_pools(None, 8))
    assert shapes._read_cache(8) is not None  # written again


def test_a_cache_that_cannot_be_written_only_warns(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("ANOMEM_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="shapes cache not written"):
        train, test = shapes.load_pools(None, 8)
    assert len(train) and len(test)


def test_pool_sizes_and_layout(pools: tuple[Pool, Pool]) -> None:
    for pool, split in zip(pools, ("train", "test"), strict=True):
        n = len(pool)
        assert pool.images.shape == (n, 3, SIZE, SIZE) and pool.images.dtype == torch.uint8
        assert pool.masks.shape == (n, SIZE, SIZE)
        assert len(set(pool.names)) == n
        counts = Counter(zip(pool.classes, pool.kinds, strict=True))
        normal, style, local = shapes.SIZES[split]
        for c in shapes.CLASSES:
            assert counts[(c, "")] == normal
            assert counts[(c, "style")] == style and counts[(c, "local")] == local


def test_every_class_renders_a_visible_distinct_shape(pools: tuple[Pool, Pool]) -> None:
    train, _ = pools
    classes, kinds = np.array(train.classes), np.array(train.kinds)
    fg = foreground(train.images).sum(axis=(1, 2))
    areas = {}
    for c in shapes.CLASSES:
        pick = (classes == c) & (kinds == "")
        assert fg[pick].min() >= 20, c  # even the tiny edge cases show a shape
        assert fg[pick].max() < 0.5 * SIZE * SIZE, c  # and none fills the image
        areas[c] = float(np.median(fg[pick]))
    values = sorted(areas.values())
    assert all(b > 1.1 * a for a, b in zip(values, values[1:], strict=False)), areas
    assert areas["circle"] > areas["square"] > areas["cross"] > areas["triangle"]


def test_style_anomalies_change_the_palette_or_texture(pools: tuple[Pool, Pool]) -> None:
    train, _ = pools
    kinds = np.array(train.kinds)
    images = train.images.numpy().astype(float)
    fg = foreground(train.images)

    def blue_share(pick: np.ndarray) -> float:
        blue = [(images[i, 2][fg[i]] > images[i, 0][fg[i]]).mean() for i in np.flatnonzero(pick)]
        return float(np.mean(blue))

    assert blue_share(kinds == "") < 0.02  # warm: red above blue
    assert blue_share(kinds == "style") > 0.3


@pytest.mark.parametrize("normal", shapes.CLASSES)
def test_each_test_set_has_every_anomaly_kind(splits: dict[str, Split], normal: str) -> None:
    split = splits[normal]
    assert set(split.train.types) == {NORMAL}
    assert len(split.train) == shapes.SIZES["train"][0]
    assert all(f"/{normal}/normal/" in n for n in split.train.names)
    counts = Counter(split.test.types)
    assert set(counts) == {NORMAL, "object", "style", "local"}
    assert counts[NORMAL] == shapes.SIZES["test"][0]
    assert counts["object"] == 3 * shapes.OBJECT_TEST_PER_CLASS
    assert counts["style"] == shapes.SIZES["test"][1]
    assert counts["local"] == shapes.SIZES["test"][2]
    for name, kind in zip(split.test.names, split.test.types, strict=True):
        cls = name.split("/")[2]
        assert (cls == normal) == (kind != "object"), name
    labels = split.test.labels.tolist()
    assert labels == [int(t != NORMAL) for t in split.test.types]


@pytest.mark.parametrize("normal", ["circle", "cross"])
def test_local_anomalies_have_small_masks_inside_the_image(splits: dict[str, Split],
                                                          normal: str) -> None:
    test = splits[normal].test
    types = np.array(test.types)
    masks = test.masks.numpy()
    assert masks.shape == (len(test), SIZE, SIZE)
    assert set(np.unique(masks)) <= {0, 1}
    local = masks[types == "local"]
    area = local.sum(axis=(1, 2))
    assert area.min() > 0  # every local anomaly has a mask
    assert area.max() < 0.06 * SIZE * SIZE  # a small defect, not the whole shape
    border = local[:, [0, -1], :].sum() + local[:, :, [0, -1]].sum()
    assert border == 0
    assert masks[types != "local"].sum() == 0  # no mask anywhere else
    # the defect sits on the shape: around it, the shape's colour is present
    fg = foreground(test.images[torch.from_numpy(types == "local")])
    for m, f in zip(local, fg, strict=True):
        ys, xs = np.nonzero(m)
        y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, SIZE)
        x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, SIZE)
        assert (f[y0:y1, x0:x1] & (m[y0:y1, x0:x1] == 0)).any()


def test_local_defects_change_the_masked_pixels(pools: tuple[Pool, Pool]) -> None:
    train, _ = pools
    kinds = np.array(train.kinds)
    images = train.images.numpy().astype(float) / 255
    masks = train.masks.numpy().astype(bool)
    for i in np.flatnonzero(kinds == "local")[:40]:
        inside = images[i][:, masks[i]].mean(axis=1)  # (3,)
        ring = foreground(train.images[i:i + 1])[0] & ~masks[i]
        shape_colour = images[i][:, ring].mean(axis=1)
        assert np.abs(inside - shape_colour).max() > 0.15, i


def test_about_five_percent_of_normals_are_edge_cases(pools: tuple[Pool, Pool],
                                                      splits: dict[str, Split]) -> None:
    train, _ = pools
    kinds = np.array(train.kinds)
    edge = train.edge.numpy()
    share = edge[kinds == ""].mean()
    assert 0.035 < share < 0.065
    assert not edge[kinds != ""].any()
    for split in splits.values():
        for s in (split.train, split.test):
            flagged = s.edge.numpy()
            assert flagged.any()
            assert all(t == NORMAL for t in np.array(s.types)[flagged])


def test_edge_cases_are_tiny_or_dim(pools: tuple[Pool, Pool]) -> None:
    train, _ = pools
    classes, kinds, edge = np.array(train.classes), np.array(train.kinds), train.edge.numpy()
    fg = foreground(train.images)
    area = fg.sum(axis=(1, 2))
    brightest = train.images.numpy().max(axis=(1, 2, 3)) / 255
    for c in shapes.CLASSES:
        normal = (classes == c) & (kinds == "")
        median = np.median(area[normal & ~edge])
        unusual = (area < 0.5 * median) | (brightest < 0.7)
        assert unusual[normal & edge].all(), c
        assert not unusual[normal & ~edge].any(), c
