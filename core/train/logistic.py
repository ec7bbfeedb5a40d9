"""The two class-balanced logistic fits of stage 2, with L-BFGS in float64.

- `simplex_logistic`: weights on the simplex, so the image score stays a convex combination of
  standardised terms (the weighting, core/train/weighting.py);
- `offset_logistic`: a head on top of a fixed offset, which may be made to only add (the
  labelled-anomaly head of the unbalanced setting, core/train/stage2.py).

Written here because scikit-learn's `LogisticRegression` has neither a simplex constraint nor
an offset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def simplex_logistic(normal: torch.Tensor, anomalous: torch.Tensor) -> torch.Tensor:
    """Weights on the simplex of a logistic model telling anomalous rows from normal ones.

    The image score stays a convex combination of standardised terms; a term that cannot tell
    the two apart ends up with little weight. Fitted with L-BFGS on a softmax parametrisation
    (scikit-learn has no simplex-constrained logistic regression).
    """
    x = torch.cat([normal, anomalous]).double()
    y = torch.cat([torch.zeros(len(normal)), torch.ones(len(anomalous))]).double()
    balance = class_balance(y)
    logits_w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        out = log_scale.exp() * (x @ torch.softmax(logits_w, 0)) + bias
        bce = (F.binary_cross_entropy_with_logits(out, y, reduction="none") * balance).mean()
        return bce + 1e-3 * logits_w.pow(2).mean()

    minimise(loss, [logits_w, log_scale, bias], max_iter=200)
    return torch.softmax(logits_w.detach(), 0)


def class_balance(y: torch.Tensor) -> torch.Tensor:
    """Per-row weights n / (2 n_class) of 0/1 labels y: both classes weigh the same."""
    n1 = y.sum().clamp(1, len(y) - 1)
    return torch.where(y > 0.5, len(y) / (2 * n1), len(y) / (2 * (len(y) - n1)))


def minimise(loss: Callable[[], torch.Tensor], params: list[torch.Tensor],
             **options: Any) -> None:
    """Minimise `loss()` over `params` in place with L-BFGS (strong Wolfe line search)."""
    opt = torch.optim.LBFGS(params, line_search_fn="strong_wolfe", **options)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(closure)


def offset_logistic(x: torch.Tensor, offset: torch.Tensor, y: torch.Tensor, c: float = 0.5,
                    positive: bool = False) -> tuple[torch.Tensor, float]:
    """Class-balanced, L2-regularised logistic regression of y on x, on top of a fixed offset.

    Minimises sum_i w_i * BCE(offset_i + h(x_i . coef + bias), y_i) + |coef|^2 / (2c), with
    w_i = n / (2 n_class(i)) and h the identity, or softplus when `positive` (the head may only
    add). With h the identity and a zero offset this is scikit-learn's
    `LogisticRegression(C=c, class_weight="balanced")`, which has no offset. Returns (coef, bias).
    """
    x, offset, y = x.double(), offset.double(), y.double()
    balance = class_balance(y)
    coef = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    link = F.softplus if positive else (lambda v: v)

    def loss() -> torch.Tensor:
        logit = offset + link(x @ coef + bias)
        bce = (F.binary_cross_entropy_with_logits(logit, y, reduction="none") * balance).sum()
        return bce + coef.pow(2).sum() / (2 * c)

    minimise(loss, [coef, bias], max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12)
    return coef.detach(), float(bias.detach())
