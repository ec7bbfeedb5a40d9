"""core/model/pixels.py: the pixel scale's memory is cosine kNN on thumbnails; its layout term
a Gaussian of the image on a coarse grid."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from core.model.gaussians import Gaussian
from core.model.pixels import PixelLayout, PixelMemory
from core.model.terms import ImageTerm


def test_distance_is_cosine_knn_on_the_stored_thumbnails() -> None:
    g = torch.Generator().manual_seed(0)
    normals = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8, generator=g)
    queries = torch.rand(5, 3, 16, 16, generator=g)
    memory = PixelMemory(channels=3, size=8, capacity=64, k=2)
    memory.store(normals)
    assert int(memory.count) == 30 and not memory.bank[30:].any()
    bank = torch.nn.functional.avg_pool2d(normals.float() / 255, 2).flatten(1).numpy()
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = torch.nn.functional.avg_pool2d(queries, 2).flatten(1).numpy()
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    reference = 1 - np.sort(q @ bank.T, axis=1)[:, -2:].mean(1)
    np.testing.assert_allclose(memory.distance(queries).numpy(), reference, atol=2e-3)  # fp16
    nearest = PixelMemory(channels=3, size=8, capacity=64, k=1)
    nearest.store(normals)
    assert nearest.distance(normals[:3].float() / 255).max() < 1e-3  # its own nearest


def test_a_full_memory_keeps_a_random_subset_and_an_empty_one_scores_zero() -> None:
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    memory = PixelMemory(channels=1, size=8, capacity=20)
    assert bool((memory.distance(images[:4].float() / 255) == 0).all())
    memory.store(images, torch.Generator().manual_seed(1))
    assert int(memory.count) == 20
    rows = memory.thumbnails(images.float() / 255).half()
    kept = [int(torch.nonzero((rows == r).all(1)).flatten()[0]) for r in memory.bank]
    assert len(set(kept)) == 20  # twenty different images, not the first twenty
    assert kept != list(range(20))


def test_small_images_are_upsampled_to_the_thumbnail_size() -> None:
    memory = PixelMemory(channels=3, size=16, capacity=4)
    assert memory.thumbnails(torch.rand(2, 3, 8, 8)).shape == (2, 3 * 16 * 16)


def test_layout_is_a_ledoit_wolf_gaussian_of_the_pooled_image() -> None:
    g = torch.Generator().manual_seed(0)
    normals = torch.randint(0, 256, (80, 3, 16, 16), dtype=torch.uint8, generator=g)
    queries = torch.rand(6, 3, 16, 16, generator=g)
    layout = PixelLayout(channels=3, grid=4)
    layout.fit(normals, batch=32)  # in batches: the same as in one
    pooled = torch.nn.functional.avg_pool2d(normals.float() / 255, 4).flatten(1).double()
    reference = LedoitWolf().fit(pooled.numpy()).mahalanobis(
        torch.nn.functional.avg_pool2d(queries, 4).flatten(1).double().numpy())
    np.testing.assert_allclose(layout.distance(queries).double().numpy() ** 2, reference,
                               rtol=1e-3)


def test_layout_finds_brightness_in_the_wrong_place() -> None:
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(120, 1, 16, 16, generator=g) * 0.2
    left = noise.clone()
    left[..., :8] += 0.6  # normal: bright on the left
    right = noise.clone()
    right[..., 8:] += 0.6  # the same brightness on the right: every pixel value seen before
    layout = PixelLayout(channels=1, grid=4)
    layout.fit(left[:100])
    assert layout.distance(right[100:]).min() > layout.distance(left[100:]).max()


def test_both_are_image_terms_fitted_on_normal_uint8_images() -> None:
    g = torch.Generator().manual_seed(2)
    normals = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    queries = torch.rand(4, 3, 16, 16, generator=g)
    memory = PixelMemory(channels=3, size=8, capacity=16)
    assert isinstance(memory, ImageTerm) and memory.name == "pixels/knn"
    memory.fit(normals, torch.Generator().manual_seed(5))
    stored = PixelMemory(channels=3, size=8, capacity=16)
    stored.store(normals, torch.Generator().manual_seed(5))  # fit is store, the same subset
    assert int(memory.count) == 16 and torch.equal(memory.bank, stored.bank)
    torch.testing.assert_close(memory.raw(queries, {}, lambda x: {}), memory.distance(queries))
    layout = PixelLayout(channels=3, grid=4)
    assert isinstance(layout, ImageTerm) and layout.name == "pixels/layout"
    assert isinstance(layout.gaussian, Gaussian)
    assert set(layout.state_dict()) == {"loc", "scale", "gaussian.mean", "gaussian.precision"}
    layout.fit(normals, torch.Generator().manual_seed(5))
    pooled = torch.nn.functional.avg_pool2d(normals.float() / 255, 4).flatten(1)
    reference = Gaussian(3 * 4 * 4)
    reference.fit(pooled)
    torch.testing.assert_close(layout.gaussian.mean, reference.mean)
    torch.testing.assert_close(layout.gaussian.precision, reference.precision)
    torch.testing.assert_close(layout.raw(queries, {}, lambda x: {}), layout.distance(queries))
    torch.testing.assert_close(layout.distance(queries),
                               reference.distance(torch.nn.functional.avg_pool2d(queries, 4)
                                                  .flatten(1)))
