"""The assembled AnoMem model: encoder, one memory per scale, contrastive heads, detector.

A plain `nn.Module`: images in, per-scale memory reads or anomaly scores out. It knows nothing
of optimisers or data sets, so a page of the app or a test can build and call it directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.config import BACKBONES, ModelConfig
from core.model.backbone import build_backbone
from core.model.detector import AnomalyDetector, Scores
from core.model.lessons import Lessons, describe, descriptor_blocks
from core.model.memory import HopfieldMemory, MemoryRead
from core.model.pixels import PixelLayout, PixelMemory
from core.model.terms import ImageTerm, ImageTerms, RotationTerm

INFERENCE_PIXELS = 256 * 128 * 128  # encoder input pixels per batch when scoring


# Tensors of weights saved before the Gaussians and the image-level terms were modules of their
# own: (old name, new name), the scale or term in between left as is (`upgrade_state`)
_RENAMED_SUFFIXES = (
    (".mean", ".local.mean"), (".precision", ".local.precision"),
    (".layout_mean", ".layout.mean"), (".layout_basis", ".layout.basis"),
    (".layout_var", ".layout.variances"), (".layout_noise", ".layout.noise"))
_RENAMED = {
    "pixels.bank": "terms.pixels.bank", "pixels.count": "terms.pixels.count",
    "pixel_layout.mean": "terms.pixel_layout.gaussian.mean",
    "pixel_layout.precision": "terms.pixel_layout.gaussian.precision",
    "rotation.weight": "terms.rotation.head.weight", "rotation.bias": "terms.rotation.head.bias",
    **{f"detector.{old}_{kind}": f"terms.{new}.{kind}"
       for old, new in (("pixel", "pixels"), ("pixel_layout", "pixel_layout"),
                        ("rotation", "rotation")) for kind in ("loc", "scale")}}


def upgrade_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict saved by an earlier version, with its tensors under today's names (the
    values are the same); a current one is returned as it is."""
    out = {}
    for key, value in state.items():
        new = _RENAMED.get(key, key)
        if key.startswith("detector.per_scale."):
            for old, suffix in _RENAMED_SUFFIXES:
                if key.endswith(old) and key.count(".") == 3:  # detector.per_scale.S.name
                    new = key[:-len(old)] + suffix
        out[new] = value
    return out


class ProjectionHead(nn.Module):
    """SimCLR's MLP head; it sees pooled queries and read-outs, never the detector."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True),
                                 nn.Linear(dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AnoMem(nn.Module):
    def __init__(self, cfg: ModelConfig, pretrained: bool = True) -> None:
        """`pretrained`: load a pretrained encoder's ImageNet weights; False when a saved run's
        own weights are loaded over them."""
        super().__init__()
        self.cfg = cfg
        self.backbone, channels = build_backbone(cfg, pretrained)
        self.memories = nn.ModuleDict({
            s: HopfieldMemory(channels[s], cfg.memory_size, cfg.memory_dim, cfg.beta,
                              cfg.learn_beta)
            for s in cfg.scales
        })
        self.heads = nn.ModuleDict({s: ProjectionHead(cfg.memory_dim, cfg.head_dim)
                                    for s in cfg.scales})
        grids = {s: min(cfg.layout_grid, *self.map_size(s)) for s in cfg.scales}
        positions = {s: math.prod(self.map_size(s)) if cfg.local_map == "positional" else 0
                     for s in cfg.scales}
        # The image-level terms, in the order of the detector's last columns: the pixel
        # scale (fitted by stage 2, not learnt) and the rotation head (learnt in stage 1)
        self.deepest = max(cfg.scales, key=BACKBONES[cfg.backbone].index)
        terms: dict[str, ImageTerm] = {}
        if cfg.pixel_memory:
            terms["pixels"] = PixelMemory(cfg.in_channels, cfg.pixel_size, cfg.pixel_memory)
        if cfg.pixel_layout:
            terms["pixel_layout"] = PixelLayout(cfg.in_channels,
                                                min(cfg.layout_grid, cfg.image_size))
        if cfg.rotation:
            terms["rotation"] = RotationTerm(channels[self.deepest], self.deepest)
        self.terms = ImageTerms(terms)
        self.detector = AnomalyDetector(cfg.memory_dim, cfg.topk_ratio, grids, cfg.layout_rank,
                                        cfg.local_weight, cfg.layout_source, positions,
                                        image_terms=self.terms.names,
                                        map_weights=cfg.map_weights)
        # What marked images taught a refit (core/refit.py), keyed by look-alike descriptors
        self.descriptor_blocks = descriptor_blocks(cfg.scales, cfg.memory_dim,
                                                   channels[self.deepest])
        self.lessons = (Lessons(cfg.lessons, self.descriptor_blocks, cfg.lesson_kinds)
                        if cfg.lessons else None)

    @property
    def scales(self) -> tuple[str, ...]:
        return self.cfg.scales

    @property
    def frozen(self) -> bool:
        """Whether the encoder is frozen (pretrained): stage 1 then learns on cached features."""
        return self.cfg.pretrained

    def train(self, mode: bool = True) -> AnoMem:
        """As nn.Module's, but a frozen encoder stays in eval mode (its batch statistics are
        ImageNet's)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def stride(self, scale: str) -> float:
        """Image pixels per position of `scale`'s maps (the encoder may see the image resized)."""
        return self.backbone.stride[scale] * self.cfg.image_size / self.cfg.encoder_size

    def inference_batch(self, pixels: int = INFERENCE_PIXELS) -> int:
        """Images per forward pass without gradients: 256 at 128 x 128 px, fewer for larger
        inputs, so that the encoder's activations stay within a few GB (a batch of 256
        KolektorSDD photos at 576 x 224 px took 20 GB)."""
        h, w = self.cfg.encoder_shape
        return max(1, min(256, pixels // (h * w)))

    def map_size(self, scale: str) -> tuple[int, int]:
        """(height, width) of `scale`'s maps for an input of the configured shape."""
        stride = self.backbone.stride[scale]
        return tuple(max(1, -(-side // stride)) for side in self.cfg.encoder_shape)

    def forward(self, images: torch.Tensor) -> dict[str, MemoryRead]:
        """images (B, C, H, W) in [0, 1] -> {scale: MemoryRead} of queries and read-outs."""
        features = self.backbone(images)
        return {s: self.memories[s](features[s]) for s in self.scales}

    def read(self, images: torch.Tensor, standardised: bool = True
             ) -> tuple[dict[str, MemoryRead], torch.Tensor | None]:
        """The memory reads of every scale and the image-level terms (B, E) the detector adds
        to them, in the order of `terms` (None when it has none); standardised on held-out
        normals unless stage 2 asks for the raw values to calibrate them.
        The backbone runs once for the reads and the upright rotation."""
        reads, extra, _ = self._read(images, standardised)
        return reads, extra

    def _read(self, images: torch.Tensor, standardised: bool = True
              ) -> tuple[dict[str, MemoryRead], torch.Tensor | None, torch.Tensor]:
        """`read`, and the encoder's map at the deepest scale (what a descriptor pools)."""
        features = self.backbone(images)
        reads = {s: self.memories[s](features[s]) for s in self.scales}
        raw = self.terms.raw(images, features, self.backbone)
        extra = self.terms.standardise(raw) if standardised else raw
        return reads, extra, features[self.deepest]

    @property
    def rotation(self) -> RotationTerm | None:
        """The rotation head, when the model has one (stage 1 teaches it)."""
        return self.terms["rotation"] if "rotation" in self.terms else None  # noqa: SIM401

    def stage1_state(self) -> dict[str, torch.Tensor]:
        """The tensors stage 1 learns (encoder, memories, heads, rotation head): all but what
        stage 2 fits (the detector, the image-level terms' buffers) and the lessons."""
        fitted = {f"terms.{name}" for name, _ in self.terms.named_buffers()}
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(("detector.", "lessons.")) and k not in fitted}

    @property
    def descriptor_dim(self) -> int:
        """Length of an image's look-alike descriptor (core/model/lessons.py)."""
        return sum(self.descriptor_blocks.values())

    def score(self, images: torch.Tensor) -> Scores:
        """Anomaly scores and maps of a batch; needs a fitted detector (stage 2)."""
        if self.lessons is None:
            reads, extra = self.read(images)
            return self.detector(reads, images.shape[-2:], extra)
        scores, descriptors = self.score_and_describe(images)
        return scores._replace(image=self.lessons(scores.image, descriptors))

    def score_and_describe(self, images: torch.Tensor) -> tuple[Scores, torch.Tensor]:
        """The detector's scores before any lesson, and the images' look-alike descriptors
        (B, descriptor_dim)."""
        reads, extra, encoded = self._read(images)
        scores = self.detector(reads, images.shape[-2:], extra)
        return scores, describe(reads, scores.maps, encoded)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{scale: (B, D)} spatially pooled, unit-norm queries: one point per image (UMAP)."""
        return {s: F.normalize(r.query.mean(dim=(2, 3)), dim=1)
                for s, r in self.forward(images).items()}
