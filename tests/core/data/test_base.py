"""core/data/base.py: the one-class and unbalanced protocols of make_split."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from core.config import DataConfig
from core.data import load_split
from core.data.base import NORMAL, DataError, ImageSet, Pool, make_split, pool_to_set


def make_pool(counts: dict[str, int], split: str, kinds: dict[str, int] | None = None,
              size: int = 4) -> Pool:
    """Pool with `counts[c]` plain images of class c and `kinds[k]` variants of class "a"."""
    classes, names, kind_list = [], [], []
    for c, n in counts.items():
        classes += [c] * n
        names += [f"{split}/{c}/{i}" for i in range(n)]
        kind_list += [""] * n
    for k, n in (kinds or {}).items():
        classes += ["a"] * n
        names += [f"{split}/a-{k}/{i}" for i in range(n)]
        kind_list += [k] * n
    n = len(classes)
    images = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    edge = torch.tensor([i % 10 == 0 for i in range(n)])
    return Pool(images=images.view(n, 1, 1, 1).expand(n, 3, size, size).contiguous(),
                classes=classes, names=names, masks=masks, edge=edge,
                kinds=kind_list if kinds else None)


def test_one_class_trains_on_normal_images_only() -> None:
    train = make_pool({"a": 30, "b": 20, "c": 10}, "train")
    test = make_pool({"a": 8, "b": 5, "c": 4}, "test")
    split = make_split(train, test, dataset="toy", normal_class="a")
    assert len(split.train) == 30
    assert split.train.labels.tolist() == [0] * 30
    assert set(split.train.types) == {NORMAL}
    assert all(n.startswith("train/a/") for n in split.train.names)
    assert split.normal_class == "a" and split.dataset == "toy"
    assert split.classes == ["a", "b", "c"]
    # every test image kept, labelled by whether it is of the normal class
    assert len(split.test) == 17
    for name, label, kind in zip(split.test.names, split.test.labels.tolist(), split.test.types,
                                 strict=True):
        cls = name.split("/")[1]
        assert label == int(cls != "a")
        assert kind == (NORMAL if cls == "a" else cls)
    assert split.test.anomaly_types == ["b", "c"]


def test_max_train_caps_normal_images_reproducibly() -> None:
    train = make_pool({"a": 50, "b": 20}, "train")
    test = make_pool({"a": 5, "b": 5}, "test")
    first = make_split(train, test, dataset="toy", normal_class="a", max_train=12, seed=3)
    again = make_split(train, test, dataset="toy", normal_class="a", max_train=12, seed=3)
    other = make_split(train, test, dataset="toy", normal_class="a", max_train=12, seed=4)
    assert len(first.train) == 12 and len(set(first.train.names)) == 12
    assert all(n.startswith("train/a/") for n in first.train.names)
    assert first.train.names == again.train.names
    assert first.train.names != other.train.names
    assert len(make_split(train, test, dataset="toy", normal_class="a", max_train=500).train) \
        == 50


def test_edge_flag_is_kept_for_normal_images_only() -> None:
    pool = make_pool({"a": 10, "b": 10}, "x")
    labelled = pool_to_set(pool, [c == "a" for c in pool.classes])
    assert labelled.edge.tolist() == [i == 0 for i in range(10)] + [False] * 10
    assert pool.edge[10]  # image 10 was an edge case, but it is an anomaly here


@pytest.mark.parametrize(("ratio", "expected"), [(0.1, 10), (0.05, 5), (0.001, 1)])
def test_unbalanced_draws_the_ratio_of_labelled_anomalies(ratio: float, expected: int) -> None:
    train = make_pool({"a": 100, "b": 40, "c": 40}, "train")
    test = make_pool({"a": 5, "b": 5, "c": 5}, "test")
    split = make_split(train, test, dataset="toy", normal_class="a", setting="unbalanced",
                       anomaly_ratio=ratio)
    assert int((split.train.labels == 0).sum()) == 100
    assert int(split.train.labels.sum()) == expected
    anomalies = [t for t, y in zip(split.train.types, split.train.labels, strict=True) if y]
    assert set(anomalies) <= {"b", "c"}
    assert len(split.test) == 15  # drawn from the training pool: the test set is untouched


def test_unbalanced_honours_anomaly_classes() -> None:
    train = make_pool({"a": 100, "b": 40, "c": 40}, "train")
    test = make_pool({"a": 5, "b": 5, "c": 5}, "test")
    split = make_split(train, test, dataset="toy", normal_class="a", setting="unbalanced",
                       anomaly_ratio=0.2, anomaly_classes=("c",))
    labelled = [t for t, y in zip(split.train.types, split.train.labels, strict=True) if y]
    assert labelled == ["c"] * 20
    assert all(n.startswith("train/c/") for n, y in
               zip(split.train.names, split.train.labels, strict=True) if y)


def test_unbalanced_anomaly_classes_can_name_kinds() -> None:
    train = make_pool({"a": 50, "b": 20}, "train", kinds={"style": 10, "local": 10})
    test = make_pool({"a": 5, "b": 5}, "test", kinds={"style": 3, "local": 3})
    split = make_split(train, test, dataset="toy", normal_class="a", setting="unbalanced",
                       anomaly_ratio=0.1, anomaly_classes=("local",))
    labelled = Counter(t for t, y in zip(split.train.types, split.train.labels, strict=True)
                       if y)
    assert labelled == Counter({"local": 5})
    assert int((split.train.labels == 0).sum()) == 50  # variants of "a" are not normal


def test_unbalanced_draws_from_the_test_pool_and_removes_the_drawn_images() -> None:
    train = make_pool({"good": 40}, "train")  # MVTec-like: no anomaly to train on
    test = make_pool({"good": 10, "scratch": 12, "dent": 6}, "test")
    split = make_split(train, test, dataset="toy", normal_class="good", setting="unbalanced",
                       anomaly_ratio=0.25, seed=1)
    drawn = [n for n, y in zip(split.train.names, split.train.labels, strict=True) if y]
    assert len(drawn) == 9  # round(0.25 * 40) = 10, capped at half of the 18 candidates
    assert all(n.startswith("test/") and "/good/" not in n for n in drawn)
    assert not set(drawn) & set(split.test.names)
    assert set(drawn) | set(split.test.names) == set(test.names)
    assert len(split.test) == len(test) - 9
    assert int((split.test.labels == 0).sum()) == 10  # no normal image is drawn


def test_unbalanced_without_candidates_raises() -> None:
    train = make_pool({"a": 20, "b": 5}, "train")
    test = make_pool({"a": 5, "b": 5}, "test")
    with pytest.raises(DataError, match="no images of zebra"):
        make_split(train, test, dataset="toy", normal_class="a", setting="unbalanced",
                   anomaly_classes=("zebra",))


def test_unknown_normal_class_raises() -> None:
    train = make_pool({"a": 10, "b": 10}, "train")
    test = make_pool({"a": 5, "b": 5}, "test")
    with pytest.raises(DataError, match="'z'.*a, b"):
        make_split(train, test, dataset="toy", normal_class="z")


def test_test_split_needs_both_classes() -> None:
    train = make_pool({"a": 10, "b": 10}, "train")
    with pytest.raises(DataError, match="both normal"):
        make_split(train, make_pool({"a": 5}, "test"), dataset="toy", normal_class="a")
    with pytest.raises(DataError, match="both normal"):
        make_split(train, make_pool({"b": 5}, "test"), dataset="toy", normal_class="a")


@pytest.mark.parametrize(("cfg", "match"), [
    (DataConfig(dataset="shapes", normal_class="hexagon"), "'hexagon'.*circle"),
    (DataConfig(dataset="nope"), "unknown data set 'nope'"),
    (DataConfig(dataset="shapes", anomaly_classes=("zebra",), setting="unbalanced",
                image_size=8), "'zebra'"),
])
def test_load_split_rejects_unknown_names(cfg: DataConfig, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_split(cfg)


def test_pool_checks_its_fields() -> None:
    with pytest.raises(DataError, match="uint8"):
        Pool(images=torch.zeros(2, 3, 4, 4), classes=["a", "a"], names=["x", "y"])
    with pytest.raises(DataError, match="one entry per image"):
        Pool(images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8), classes=["a"], names=["x", "y"])


def test_concat_fills_missing_masks_with_zeros() -> None:
    pool = make_pool({"a": 3}, "x")
    with_masks = pool_to_set(pool, [True] * 3)
    with_masks.masks[0, 1, 1] = 1
    without = ImageSet(images=pool.images, labels=torch.zeros(3, dtype=torch.int64),
                       types=[NORMAL] * 3, names=["p", "q", "r"],
                       edge=torch.zeros(3, dtype=torch.bool))
    both = ImageSet.concat([with_masks, without])
    assert both.masks is not None and both.masks.shape == (6, 4, 4)
    assert int(both.masks.sum()) == 1 and int(both.masks[3:].sum()) == 0
    with pytest.raises(DataError, match="empty"):
        ImageSet.concat([with_masks.subset([])])


def test_anomaly_choices_offer_kinds_then_other_classes():
    from core.data import anomaly_choices

    choices = anomaly_choices("shapes", None, "square")
    assert choices[:3] == ["object", "style", "local"]
    assert "square" not in choices and {"circle", "triangle", "cross"} <= set(choices)
    assert anomaly_choices("digits", None, "3") == [str(d) for d in range(10) if d != 3]
