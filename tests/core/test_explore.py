"""core/explore.py against brute-force references on a tiny untrained model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from core import explore as ex
from core.config import ModelConfig
from core.data.base import DataError
from core.model.anomem import AnoMem
from core.train.augment import to_float


@pytest.fixture(scope="module")
def model() -> AnoMem:
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=16, width=0.125, memory_size=8, memory_dim=8, head_dim=8,
                      beta=4.0)
    return AnoMem(cfg).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (11, 3, 16, 16), generator=g, dtype=torch.uint8)


def _attention(model: AnoMem, images: torch.Tensor, scale: str) -> np.ndarray:
    with torch.no_grad():
        return model(to_float(images))[scale].attention.numpy()  # (B, N, h, w)


@pytest.mark.parametrize("one_per_image", [True, False])
def test_top_patches_are_the_highest_attention_positions(model, images, one_per_image):
    scale, k = "layer3", 4
    att = _attention(model, images, scale)
    b, n, h, w = att.shape
    pp = ex.top_patches(model, images, scale, per_prototype=k, batch_size=3,
                        one_per_image=one_per_image)
    assert pp.size == n and pp.map_size == (h, w) and pp.stride == model.stride(scale)
    for p in range(n):
        per_pos = att[:, p].reshape(b, -1)
        reference = per_pos.max(1) if one_per_image else per_pos.reshape(-1)
        expected = np.sort(reference)[::-1][:k]
        got = np.array([hit.weight for hit in pp.hits[p]])
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        for hit in pp.hits[p]:
            assert att[hit.image, p, hit.row, hit.col] == pytest.approx(hit.weight, rel=1e-5)
        if one_per_image:
            assert len({hit.image for hit in pp.hits[p]}) == len(pp.hits[p])
    usage = np.bincount(att.argmax(1).reshape(-1), minlength=n)
    np.testing.assert_array_equal(pp.usage, usage)
    assert pp.dead == np.flatnonzero(usage == 0).tolist()
    assert pp.usage.sum() == b * h * w
    order = pp.by_usage()
    assert list(pp.usage[order]) == sorted(pp.usage, reverse=True)


def test_near_duplicate_prototypes_are_reported():
    protos = torch.eye(4)
    protos[3] = protos[1] + 0.01  # cosine ~0.99995 with prototype 1
    pairs = ex.near_duplicates(protos)
    assert [(i, j) for i, j, _ in pairs] == [(1, 3)]
    assert pairs[0][2] > 0.95
    pp = ex.PrototypePatches("s", 1, (1, 1), [[]] * 4, np.array([3, 0, 1, 0]), pairs)
    assert pp.dead == [1, 3]
    assert pp.duplicate_of(3) == [1] and pp.duplicate_of(0) == []


def test_crop_is_the_receptive_field_window_clipped_inside_the_image():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).reshape(2, 3, 32, 32) % 251
    images = images.to(torch.uint8)
    # stride 8: side 24, centred at (row + 0.5) * 8, shifted inside the 32 px image.
    assert ex.crop_window(0, 0, 8, 32, 32) == (0, 0, 24)
    assert ex.crop_window(3, 3, 8, 32, 32) == (8, 8, 24)
    assert ex.crop_window(2, 1, 4, 32, 32) == (4, 0, 12)
    assert ex.crop_window(5, 5, 1, 32, 32)[2] == ex.MIN_CROP
    hit = ex.PatchHit(image=1, row=2, col=1, weight=0.5)
    out = ex.crop(images, hit, stride=4)
    assert out.shape == (12, 12, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images[1, :, 4:16, 0:12].permute(1, 2, 0).numpy())
    strip = ex.patch_strip(images, [hit, hit], stride=4, tile=24, gap=2)
    assert strip.shape == (24, 50, 3)


def test_exact_knn_matches_brute_force():
    x = np.random.default_rng(0).normal(size=(50, 5)).astype(np.float32)
    idx, dist = ex.exact_knn(x, 6, chunk=16)
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    assert (idx[:, 0] == np.arange(50)).all()
    np.testing.assert_allclose(dist, np.sort(d, axis=1)[:, :6], atol=1e-4)


def test_umap_embedding_is_deterministic_and_keeps_clusters_apart():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.05, size=(30, 8)) + 1
    b = rng.normal(0, 0.05, size=(30, 8)) - 1
    x = np.concatenate([a, b]).astype(np.float32)
    y1 = ex.umap_embedding(x, seed=3, n_neighbors=10)
    y2 = ex.umap_embedding(x, seed=3, n_neighbors=10)
    assert y1.shape == (60, 2) and np.isfinite(y1).all()
    np.testing.assert_allclose(y1, y2)
    centre_a, centre_b = y1[:30].mean(0), y1[30:].mean(0)
    nearer_a = np.linalg.norm(y1 - centre_a, axis=1) < np.linalg.norm(y1 - centre_b, axis=1)
    assert nearer_a[:30].all() and not nearer_a[30:].any()


def test_umap_embedding_falls_back_to_pca_for_few_points():
    x = np.random.default_rng(0).normal(size=(5, 4))
    y = ex.umap_embedding(x)
    centred = x - x.mean(0)
    assert y.shape == (5, 2)
    # PCA keeps the variance of the two leading directions.
    s = np.linalg.svd(centred, compute_uv=False)
    np.testing.assert_allclose((y ** 2).sum(0), s[:2] ** 2, rtol=1e-4)
    assert ex.umap_embedding(x[:1]).shape == (1, 2)


def test_umap_points_puts_samples_and_prototypes_in_one_space(model, images):
    out = ex.umap_points(model, images, "layer4", max_points=9)
    assert out.samples.shape == (9, 2) and out.prototypes.shape == (8, 2)
    np.testing.assert_array_equal(out.index, ex.subsample(11, 9, 0))


def test_overlay_colour_is_anchored_to_the_scale_not_the_image():
    img_a = np.zeros((8, 8, 3), np.uint8)
    img_b = np.full((8, 8, 3), 200, np.uint8)
    heat_a = np.linspace(0, 1, 64).reshape(8, 8)
    heat_b = np.full((8, 8), 0.5)
    heat_a[3, 4] = 0.5
    a = ex.overlay(img_a, heat_a, vmin=0, vmax=2, alpha=1.0)
    b = ex.overlay(img_b, heat_b, vmin=0, vmax=2, alpha=1.0)
    assert a.shape == (8, 8, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a[3, 4], b[0, 0])  # same value, same colour
    table = ex.colour_table()
    np.testing.assert_array_equal(b[0, 0], table[round(0.25 * 255)])
    over = ex.overlay(img_a, np.full((8, 8), 9.0), 0, 2, alpha=1.0)
    np.testing.assert_array_equal(over[0, 0], table[-1])  # clipped at vmax
    np.testing.assert_array_equal(ex.overlay(img_b, heat_a, 0, 2, alpha=0.0), img_b)
    small = ex.overlay(img_b, np.ones((2, 2)), 0, 2, alpha=0.5)  # resized to the image
    assert small.shape == (8, 8, 3)
    with pytest.raises(ValueError):
        ex.overlay(img_a, heat_a, 0, 2, alpha=1.5)


def test_heat_range_is_anchored_to_the_pixel_threshold(model):
    model.detector.pixel_threshold.fill_(1.5)
    assert ex.heat_range(model) == (0.0, 3.0)
    model.detector.pixel_threshold.fill_(0.0)
    assert ex.heat_range(model)[1] > 0


def test_deviation_maps_and_inspect_image(model, images):
    maps = ex.deviation_maps(model, images[0])
    for s in model.scales:
        stride = model.stride(s)
        assert maps[s].shape == (16 // stride, 16 // stride)
    assert maps["combined"].shape == (16, 16)
    with torch.no_grad():
        ref = model.score(to_float(images[:1]))
    report = ex.inspect_image(model, images[0], k=3)
    assert report.score == pytest.approx(float(ref.image[0]), rel=1e-5)
    np.testing.assert_allclose(report.maps["combined"], maps["combined"], rtol=1e-5)
    for s, near in report.nearest.items():
        assert maps[s][near.row, near.col] == pytest.approx(maps[s].max())
        assert len(near.prototypes) == 3 and near.cosine == sorted(near.cosine, reverse=True)
    assert report.anomalous == (report.score > report.threshold)


def test_match_position_is_the_argmax_prototype(model, images):
    att = _attention(model, images[2:3], "layer2")[0]
    match = ex.match_position(model, images[2], "layer2", 3, 5)
    assert match.prototype == int(att[:, 3, 5].argmax())
    assert match.weight == pytest.approx(float(att[:, 3, 5].max()), rel=1e-5)
    with pytest.raises(ValueError, match="outside"):
        ex.match_position(model, images[2], "layer2", 99, 0)


def test_edge_cases_ordering():
    scores = np.array([0.1, 2.0, 0.5, 3.0, -1.0, 1.05, 0.8])
    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    out = ex.edge_cases(scores, labels, threshold=1.0, k=2)
    assert out["normal_highest"] == [1, 6]
    assert out["anomaly_lowest"] == [4, 5]
    assert out["near_threshold"] == [5, 6]


def test_type_stats_against_sklearn():
    rng = np.random.default_rng(0)
    types = ["normal"] * 40 + ["style"] * 20 + ["local"] * 15
    labels = np.array([0 if t == "normal" else 1 for t in types])
    scores = rng.normal(size=75) + labels * np.where(np.array(types) == "style", 2.0, 0.5)
    stats = ex.type_stats(scores, labels, types, threshold=0.8)
    assert list(stats.table["type"]) == ["local", "style"]
    normal = np.array(types) == "normal"
    for _, row in stats.table.iterrows():
        keep = normal | (np.array(types) == row["type"])
        assert row["auroc"] == pytest.approx(roc_auc_score(labels[keep], scores[keep]))
        of_type = np.array(types) == row["type"]
        assert row["n"] == of_type.sum()
        assert row["detection_rate"] == pytest.approx((scores[of_type] > 0.8).mean())
    assert stats.false_positive_rate == pytest.approx((scores[normal] > 0.8).mean())
    assert stats.n_normal == 40


def test_mean_scale_profile_puts_normal_first():
    types = ["style", "normal", "local", "normal"]
    per_scale = {"layer2": np.array([1.0, 0.0, 3.0, 2.0]), "layer3": np.array([5, 1, 1, 1.0])}
    df = ex.mean_scale_profile(per_scale, types)
    assert list(df.index) == ["normal", "local", "style"]
    assert df.loc["normal", "layer2"] == pytest.approx(1.0)
    assert df.loc["style", "layer3"] == pytest.approx(5.0)


def test_spread_examples_and_sample_groups():
    scores = np.arange(10.0)[::-1]
    assert ex.spread_examples(scores, np.arange(10), 3) == [9, 5, 0]
    assert ex.spread_examples(scores, np.array([2, 5]), 3) == [5, 2]
    groups = ex.sample_groups(["normal", "normal", "style"], torch.tensor([False, True, False]))
    assert groups == ["normal", ex.EDGE_CASE, "style"]


def _png(size: tuple[int, int] = (20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_validate_upload_accepts_an_image_at_the_run_size():
    out = ex.validate_upload(_png(), "leaf.png", size=16, channels=3)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert tuple(out[8, 8]) == (10, 200, 30)
    grey = ex.validate_upload(_png(), "leaf.PNG", size=8, channels=1)
    assert grey.shape == (8, 8, 1)
    assert ex.hwc_to_chw(out).shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("data", "name", "kwargs", "match"),
    [
        (b"%PDF-1.4", "notes.pdf", {}, "file type"),
        (_png(), "big.png", {"max_bytes": 10}, "over the limit"),
        (b"\x89PNG\r\n\x1a\n garbage", "broken.png", {}, "broken.png"),
        (_png((300, 300)), "huge.png", {"max_pixels": 1000}, "pixels"),
        (b"", "empty.jpg", {}, "empty"),
    ],
)
def test_validate_upload_refuses_with_the_file_name(data, name, kwargs, match):
    with pytest.raises(DataError, match=match) as err:
        ex.validate_upload(data, name, size=16, **kwargs)
    assert name in str(err.value)
