"""How stage 2 weighs the detector's terms (step 4), and the check learnt weights must pass.

The image score is a convex combination of standardised terms (each scale's local and layout
distances, then the image-level terms). "fixed" weights share it equally between the scales
and image-level terms; "learned" weights are fitted against pseudo-anomalies of held-out
normals (core/train/shifts.py); "checked" keeps learnt weights only when they hold on the kinds
of pseudo-anomaly they were not fitted on (`TrainConfig.combine`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from core.train.logistic import simplex_logistic

# The check of learnt weights on the kinds of pseudo-anomaly they were not fitted on: they must
# gain at least CHECK_MARGIN AUROC over the fixed weights on average (they were fitted on these
# very normals, so the check flatters them), and lose at most CHECK_TOLERANCE on any one kind.
# A kind that both weightings separate perfectly is no evidence either way: it is left out of
# the average, where it would only dilute the gains of the others.
CHECK_MARGIN = 0.01
CHECK_TOLERANCE = 0.02


def auroc(normal: torch.Tensor, anomalous: torch.Tensor) -> float:
    y = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    return float(roc_auc_score(y, torch.cat([normal, anomalous]).double().numpy()))


def choose_weights(normal: torch.Tensor, pseudo: dict[str, torch.Tensor], fixed: torch.Tensor,
                   names: list[str], combine: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The terms' weights (n_terms,) and the evidence for them, for metrics.json.

    `normal`: standardised term scores (N, n_terms) of held-out normals; `pseudo`: those of
    pseudo-anomalies made from them, one set per kind. "learned" fits simplex weights against
    all kinds. "checked" also fits, for each kind, weights without that kind and scores them on
    it: the learnt weights are kept only if, on the kinds they never saw, they beat the fixed
    weights by CHECK_MARGIN on average and lose by no more than CHECK_TOLERANCE on any one;
    kinds both weightings separate perfectly do not count. Real anomalies are none of these
    kinds; a weighting that holds only on the kinds it was fitted to is not trusted.
    """
    report: dict[str, Any] = {"combine": combine,
                              "weights": {"fixed": dict(zip(names, fixed.tolist(), strict=True))}}
    if combine == "fixed":
        report["chosen"] = "fixed"
        return fixed, report
    learned = simplex_logistic(normal, torch.cat(list(pseudo.values())))
    report["weights"]["learned"] = dict(zip(names, learned.tolist(), strict=True))
    report["pseudo_auroc"] = {
        kind: {**{n: auroc(normal[:, j], x[:, j]) for j, n in enumerate(names)},
               "fixed": auroc(normal @ fixed.double(), x @ fixed.double()),
               "learned": auroc(normal @ learned, x @ learned)}
        for kind, x in pseudo.items()}
    chosen = "learned"
    if combine == "checked":
        check = {}
        for kind, x in pseudo.items():
            w = simplex_logistic(normal, torch.cat([v for k, v in pseudo.items() if k != kind]))
            check[kind] = {"learned": auroc(normal @ w, x @ w),
                           "fixed": report["pseudo_auroc"][kind]["fixed"]}
        report["check"] = check
        report["check_uninformative"] = [k for k, c in check.items() if uninformative(c)]
        chosen = "learned" if confirms(check) else "fixed"
    report["chosen"] = chosen
    return (learned if chosen == "learned" else fixed.double()).float(), report


def uninformative(aurocs: dict[str, float]) -> bool:
    """Both weightings separate this kind perfectly: it tells them apart in no way."""
    return min(aurocs["learned"], aurocs["fixed"]) >= 1.0


def confirms(check: dict[str, dict[str, float]]) -> bool:
    """Whether the check {kind: {"learned": AUROC, "fixed": AUROC}} confirms the learnt weights:
    on the kinds that are evidence (not `uninformative`), a mean gain of CHECK_MARGIN and no loss
    above CHECK_TOLERANCE."""
    gains = [c["learned"] - c["fixed"] for c in check.values() if not uninformative(c)]
    return bool(gains) and float(np.mean(gains)) >= CHECK_MARGIN \
        and min(gains) >= -CHECK_TOLERANCE
