"""core/explore/embedding.py: nearest neighbours, UMAP, one space for samples and prototypes."""

from __future__ import annotations

import numpy as np

from core import explore as ex


def test_exact_knn_matches_brute_force():
    x = np.random.default_rng(0).normal(size=(50, 5)).astype(np.float32)
    idx, dist = ex.exact_knn(x, 6)
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
