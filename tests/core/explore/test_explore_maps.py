"""core/explore/maps.py: overlays on one colour scale, deviation maps, one image's report."""

from __future__ import annotations

import numpy as np
import plotly.colors
import pytest
import torch

from core import explore as ex
from core.train.augment import to_float
from tests.core.explore.helpers import attention


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
    # the expected colours come from plotly itself, not from the code under test
    quarter = plotly.colors.unlabel_rgb(plotly.colors.sample_colorscale(
        ex.DEFAULT_CMAP, [round(0.25 * 255) / 255])[0])
    np.testing.assert_array_equal(b[0, 0], np.rint(quarter))
    over = ex.overlay(img_a, np.full((8, 8), 9.0), 0, 2, alpha=1.0)
    top = plotly.colors.unlabel_rgb(plotly.colors.sample_colorscale(ex.DEFAULT_CMAP, [1.0])[0])
    np.testing.assert_array_equal(over[0, 0], np.rint(top))  # clipped at vmax
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
    att = attention(model, images[2:3], "layer2")[0]
    match = ex.match_position(model, images[2], "layer2", 3, 5)
    assert match.prototype == int(att[:, 3, 5].argmax())
    assert match.weight == pytest.approx(float(att[:, 3, 5].max()), rel=1e-5)
    with pytest.raises(ValueError, match="outside"):
        ex.match_position(model, images[2], "layer2", 99, 0)


def test_combined_scales_names_the_scales_the_pixel_map_weighs(model):
    weights = model.detector.map_weights
    saved = weights.clone()
    try:
        assert ex.combined_scales(model) == list(model.scales)  # equal weights
        weights.copy_(torch.tensor([1.0, 0.0, 0.0]))
        assert ex.combined_scales(model) == [model.scales[0]]
    finally:
        weights.copy_(saved)
