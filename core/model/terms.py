"""Image-level terms: scores of a whole image that the detector weighs beside its scales.

Each learnt scale gives the detector two terms (core/model/detector.py). An image-level term
gives one more: a single raw value per image, standardised on held-out normal images like the
scales' terms, and weighed like a scale. A term is one `ImageTerm` class (its value and, if
stage 2 fits it, its `fit`) and one line in `AnoMem`'s list of terms; the model computes the
terms in the order of that list, the detector names its columns after them and stage 2 fits
and calibrates them in turn.

The terms: the pixel scale's kNN and layout distances (core/model/pixels.py) and, here, the
rotation head's loss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Features = dict[str, torch.Tensor]  # the encoder's feature maps of a batch, by scale
Encoder = Callable[[torch.Tensor], Features]


class ImageTerm(nn.Module, ABC):
    """One raw value per image, and its normal location and spread (buffers, set by stage 2).

    Subclasses set `name` (the detector's column, e.g. "pixels/knn") and define `raw` (the
    class is abstract without it); those with state of their own to fit on normal images also
    define `fit`.
    """

    name = ""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    @abstractmethod
    def raw(self, images: torch.Tensor, features: Features, encoder: Encoder) -> torch.Tensor:
        """(B,) the term of images (B, C, H, W) in [0, 1]; `features` are the encoder's maps
        of these very images, `encoder` computes them for others (e.g. rotated copies)."""

    def fit(self, images: torch.Tensor, generator: torch.Generator) -> None:
        """Stage 2: fit what the term measures against, on normal uint8 images (N, C, H, W).
        A term with nothing to fit (its state is learnt in stage 1, or it has none) keeps this."""

    @torch.no_grad()
    def calibrate(self, values: torch.Tensor) -> None:
        """Stage 2: the raw values (N,) of held-out normal images set the location and spread."""
        self.loc.copy_(values.mean())
        self.scale.copy_(values.std().clamp_min(1e-6))

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.loc) / self.scale


class ImageTerms(nn.ModuleDict):
    """The model's image-level terms, in the order of the detector's columns."""

    @property
    def names(self) -> list[str]:
        return [term.name for term in self.values()]

    def raw(self, images: torch.Tensor, features: Features, encoder: Encoder
            ) -> torch.Tensor | None:
        """(B, E) raw values of every term, None when there is none."""
        if not len(self):
            return None
        return torch.stack([term.raw(images, features, encoder) for term in self.values()], 1)

    def standardise(self, raw: torch.Tensor | None) -> torch.Tensor | None:
        """(B, E) raw values -> standardised on held-out normals."""
        if raw is None:
            return None
        return torch.stack([term.standardise(raw[:, j]) for j, term in enumerate(self.values())],
                           1)

    def fit(self, images: torch.Tensor, generator: torch.Generator) -> None:
        for term in self.values():
            term.fit(images, generator)

    def calibrate(self, raw: torch.Tensor) -> None:
        """Each term's location and spread from the raw values (N, E) of held-out normals."""
        for j, term in enumerate(self.values()):
            term.calibrate(raw[:, j])


class RotationTerm(ImageTerm):
    """The rotation head (learnt in stage 1 beside the memories) and its loss as a term.

    The head tells which of four rotations an image shows, from its deepest stage's pooled
    features. Its cross-entropy over an image's four rotations, averaged, is low where the
    image looks like the normal data's upright content (GEOM's score, Golan & El-Yaniv 2018).
    """

    name = "rotation/loss"

    def __init__(self, channels: int, scale: str) -> None:
        super().__init__()
        self.scale_name = scale  # the deepest stage, which the head reads
        self.head = nn.Linear(channels, 4)

    def logits(self, features: Features) -> torch.Tensor:
        """(B, 4) logits on the deepest stage's pooled features."""
        return self.head(features[self.scale_name].mean(dim=(2, 3)))

    def raw(self, images: torch.Tensor, features: Features | None, encoder: Encoder
            ) -> torch.Tensor:
        total = torch.zeros(len(images), device=images.device)
        for k in range(4):
            rotated = features if k == 0 and features is not None else \
                encoder(torch.rot90(images, k, dims=(2, 3)))
            total = total - F.log_softmax(self.logits(rotated).float(), dim=1)[:, k]
        return total / 4
