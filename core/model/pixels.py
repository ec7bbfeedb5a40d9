"""The pixel scale: two terms on the image itself, beside the learnt scales' terms.

`PixelMemory` (kNN): the learnt memories read feature maps; this one reads the image. Its
prototypes are not learnt:
they are up to `ModelConfig.pixel_memory` normal training images, area-resized to
`pixel_size` pixels a side and scaled to unit norm. Read like a Hopfield memory at infinite
inverse temperature (each query retrieves its nearest prototypes), it gives every image one
term: the mean cosine distance to its k nearest stored normals. That is cosine kNN on pixels,
the simplest detector there is, kept as one more scale so that the detector always has a term
at least as good as pixels, and stage 2 decides how much it counts.

`PixelLayout` (layout): like each learnt scale's layout term, the image average-pooled to the
layout grid and scored under a Gaussian fitted to normal images (Ledoit-Wolf shrinkage, as the
local terms). It sees an image's coarse arrangement of brightness and colour, where kNN
compares fine detail and ignores global brightness (cosine similarity).

Both are image-level terms (core/model/terms.py): stage 2 fits them on the normal images it
fits the scales' Gaussians on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.model.gaussians import Gaussian, squared_distances
from core.model.terms import Encoder, Features, ImageTerm


class PixelMemory(ImageTerm):
    """Normal thumbnails (a float16 buffer) and their nearest-neighbour distance."""

    name = "pixels/knn"

    def __init__(self, channels: int, size: int, capacity: int, k: int = 2) -> None:
        super().__init__()
        self.size, self.k = size, k
        self.register_buffer("bank", torch.zeros(capacity, channels * size * size,
                                                 dtype=torch.float16))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def thumbnails(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, C * size * size) unit rows."""
        x = images.float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.adaptive_avg_pool2d(x, self.size) if min(x.shape[-2:]) >= self.size else \
                F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False)
        return F.normalize(x.flatten(1), dim=1)

    @torch.no_grad()
    def store(self, images: torch.Tensor, generator: torch.Generator | None = None,
              batch: int = 512) -> None:
        """Keep normal images (N, C, H, W) in [0, 1] or uint8; a random subset if N > capacity."""
        capacity = len(self.bank)
        pick = torch.randperm(len(images), generator=generator)[:capacity].sort().values
        rows = []
        for i in range(0, len(pick), batch):
            x = images[pick[i:i + batch]].to(self.bank.device)
            rows.append(self.thumbnails(x.float() / 255 if x.dtype == torch.uint8 else x))
        self.bank.zero_()
        self.bank[:len(pick)] = torch.cat(rows).half()
        self.count.fill_(len(pick))

    def fit(self, images: torch.Tensor, generator: torch.Generator) -> None:
        self.store(images, generator)

    def raw(self, images: torch.Tensor, features: Features, encoder: Encoder) -> torch.Tensor:
        return self.distance(images)

    def distance(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B,) mean cosine distance to the k nearest stored normals
        (0 while none is stored).

        The cosine distance of unit rows is half their squared distance, computed here about
        the stored rows' mean: 1 - a.b in float32 keeps only the digits of a.b near 1, and
        photos of one object are all near each other (MVTec AD bottles: distances of 4e-4
        with a spread of 2e-4 among normals, so rounding alone moved the standardised term by
        0.006 between two runtimes). The stored rows are scaled back to unit norm: float16
        leaves them 2e-4 off, as much as the distances between bottles. Empty rows of the bank
        are masked rather than sliced off, so that the computation never depends on the stored
        count's value (an exported graph has none to read)."""
        stored = torch.arange(len(self.bank), device=images.device) < self.count
        bank = F.normalize(self.bank.float(), dim=1) * stored[:, None]  # unit again (float16)
        centre = bank.sum(0) / self.count.clamp_min(1)
        a = self.thumbnails(images) - centre
        b = (bank - centre) * stored[:, None]
        half_sq = squared_distances(a, b) / 2
        nearest = half_sq.masked_fill(~stored, 4.0).topk(min(self.k, len(self.bank)), dim=1,
                                                         largest=False).values
        valid = nearest < 3.0  # fewer than k stored: the mean of those there are
        mean = (nearest * valid).sum(1) / valid.sum(1).clamp_min(1)
        return torch.where(self.count > 0, mean, torch.zeros_like(mean))


class PixelLayout(ImageTerm):
    """The image on a coarse grid under a Gaussian of normal images: the pixel scale's layout."""

    name = "pixels/layout"

    def __init__(self, channels: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.gaussian = Gaussian(channels * grid * grid)

    def layout(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, C * grid * grid)."""
        return F.adaptive_avg_pool2d(images.float(), self.grid).flatten(1)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, generator: torch.Generator | None = None,
            batch: int = 512) -> None:
        """Fit the Gaussian to normal images (N, C, H, W), uint8 or in [0, 1] (all of them:
        `generator` is unused)."""
        rows = []
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(self.gaussian.mean.device)
            rows.append(self.layout(x.float() / 255 if x.dtype == torch.uint8 else x))
        self.gaussian.fit(torch.cat(rows))

    def distance(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B,) Mahalanobis distance of the image's layout."""
        return self.gaussian.distance(self.layout(images))

    def raw(self, images: torch.Tensor, features: Features, encoder: Encoder) -> torch.Tensor:
        return self.distance(images)
