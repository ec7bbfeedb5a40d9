"""core/train/logistic.py: the class-balanced logistic fits of stage 2 (simplex weights, a head
on top of an offset) and their helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.train.logistic import class_balance, minimise, offset_logistic, simplex_logistic


def test_positive_offset_logistic_learns_to_raise_the_labelled_class() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(600, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 1.0).double()
    coef, bias = offset_logistic(x, torch.zeros(600), y, positive=True)
    lift = torch.nn.functional.softplus(x @ coef + bias)
    assert float(lift[y > 0.5].mean()) > 5 * float(lift[y < 0.5].mean())
    assert bool((lift >= 0).all())


def test_offset_logistic_is_scikit_learns_balanced_logistic_without_an_offset() -> None:
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] - 0.5 * x[:, 3] + 0.8 * torch.randn(300, generator=g, dtype=torch.float64)
         > 1.2).double()  # unbalanced classes
    coef, bias = offset_logistic(x, torch.zeros(300), y, c=0.5)
    ref = LogisticRegression(C=0.5, class_weight="balanced", tol=1e-10, max_iter=10_000)
    ref.fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(coef.numpy(), ref.coef_[0], atol=1e-4)
    assert bias == pytest.approx(float(ref.intercept_[0]), abs=1e-4)


def test_offset_logistic_fits_only_what_the_offset_misses() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    y = (torch.rand(4000, generator=g, dtype=torch.float64)
         < torch.sigmoid(2 * x[:, 0] + x[:, 1])).double()
    alone, _ = offset_logistic(x, torch.zeros(4000), y, c=10.0)
    given, _ = offset_logistic(x, 2 * x[:, 0], y, c=10.0)
    assert alone[0] == pytest.approx(2.0, abs=0.25) and alone[1] == pytest.approx(1.0, abs=0.2)
    assert given[0] == pytest.approx(0.0, abs=0.2) and given[1] == pytest.approx(1.0, abs=0.2)


def test_class_balance_gives_both_classes_the_same_total_weight() -> None:
    y = torch.tensor([0.0] * 9 + [1.0] * 3)
    w = class_balance(y)
    assert float(w[y == 0].sum()) == pytest.approx(6.0) == float(w[y == 1].sum())
    torch.testing.assert_close(w[:9], torch.full((9,), 12 / 18))
    torch.testing.assert_close(w[9:], torch.full((3,), 12 / 6))
    assert bool(torch.isfinite(class_balance(torch.zeros(4))).all())  # one class: no inf


def test_minimise_finds_the_minimum_of_a_quadratic() -> None:
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    minimise(lambda: (x - target).pow(2).sum(), [x], max_iter=100)
    torch.testing.assert_close(x.detach(), target)
    with torch.no_grad():  # the fit runs with gradients even when the caller has none
        y = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        minimise(lambda: (y - 3).pow(2).sum(), [y], max_iter=100)
    assert float(y.detach()) == pytest.approx(3.0)


def test_simplex_logistic_weights_are_convex_and_favour_the_informative_term() -> None:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(300, 4, generator=g, dtype=torch.float64)
    anomalous = torch.randn(100, 4, generator=g, dtype=torch.float64) + torch.tensor(
        [0.0, 2.5, 0.0, 0.3], dtype=torch.float64)
    w = simplex_logistic(normal, anomalous)
    assert w.shape == (4,) and w.dtype == torch.float64
    assert bool((w >= 0).all()) and float(w.sum()) == pytest.approx(1.0)
    assert int(w.argmax()) == 1 and float(w[1]) > 0.6
    assert float(w[1]) > float(w[3]) > min(float(w[0]), float(w[2]))
    # with a term that tells nothing, the informative one takes nearly all the weight
    two = simplex_logistic(normal[:, :2], anomalous[:, :2])
    assert float(two[1]) > 0.8 and float(two.sum()) == pytest.approx(1.0)
