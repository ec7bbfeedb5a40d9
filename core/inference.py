"""Score images with a trained detector: a run folder (PyTorch) or an exported ONNX model.

The few lines a notebook needs, and what `anomem score`, `anomem export` and `anomem serve`
are built on:

    from core.inference import Detector
    detector = Detector.load("runs/bottle")      # or Detector.load("bottle.onnx")
    result = detector.score_paths(["a.png", "b.png"])
    result.scores, result.anomalous, result.maps  # (N,), (N,) bool, (N, H, W)

Both back ends compute one graph, `ScoringGraph`: PyTorch runs it, the export writes it to ONNX
(core/export.py), so a run and its exported model give the same numbers. The threshold and what
the detector expects (channels, height, width) travel with it as `ModelInfo`: in the run folder,
and in the ONNX file's metadata.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.data.base import DataError
from core.data.imageio import read_image
from core.model.anomem import AnoMem
from core.train.augment import grayscale

# The graph's input and outputs, by name (the ONNX file uses these names)
INPUT = "images"
OUTPUTS = ("score", "anomalous", "scale_scores", "map", "scale_maps")
META_PREFIX = "anomem."
BATCH = 32


class ScoringGraph(nn.Module):
    """A fitted AnoMem as one function of a batch: images (N, C, H, W) in [0, 1] ->
    score (N,), anomalous (N,) bool at the run's threshold, each scale's score (N, S), the
    combined anomaly map (N, H, W) and each scale's standardised map upsampled to the image
    (N, S, H, W)."""

    def __init__(self, model: AnoMem) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores = self.model.score(images)
        detector = self.model.detector
        scale_scores = torch.stack([scores.per_scale[s] for s in self.model.scales], dim=1)
        scale_maps = detector.upsampled_maps(scores.maps, images.shape[-2:]).transpose(0, 1)
        return (scores.image, scores.image > detector.threshold, scale_scores,
                scores.pixel_map, scale_maps)


@dataclass(frozen=True)
class ModelInfo:
    """What a deployed detector is and expects; stored as ONNX metadata ("anomem.<field>")."""

    threshold: float  # an image scoring above it is anomalous
    pixel_threshold: float  # a map value above it marks an anomalous pixel
    channels: int  # images are read with this many channels (1 or 3)
    height: int  # ... and resized to height x width
    width: int
    scales: tuple[str, ...]  # the order of `scale_maps`
    backbone: str
    dataset: str
    normal_class: str
    anomaly_types: tuple[str, ...]  # the test set's anomaly types, when the run knows them
    weights_sha256: str  # of the run's model.safetensors
    version: str  # of anomem, that trained or exported it

    def to_metadata(self) -> dict[str, str]:
        return {META_PREFIX + k: json.dumps(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> ModelInfo:
        """Read back `to_metadata`'s entries; a file without them is not an anomem export."""
        values = {}
        for f in dataclasses.fields(cls):
            key = META_PREFIX + f.name
            if key not in meta:
                raise DataError(f"{source}: not an anomem export (its metadata has no {key!r})")
            value = json.loads(meta[key])
            values[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)


@dataclass
class Result:
    """Scores of a batch, in input order (numpy arrays)."""

    scores: np.ndarray  # (N,) float32
    anomalous: np.ndarray  # (N,) bool
    scale_scores: np.ndarray  # (N, S) float32: each scale's score, in `ModelInfo.scales` order
    maps: np.ndarray  # (N, H, W) float32: the combined anomaly map
    scale_maps: np.ndarray  # (N, S, H, W) float32: each scale's map, in `ModelInfo.scales` order
    paths: list[str] = dataclasses.field(default_factory=list)  # score_paths: the files read
    skipped: list[str] = dataclasses.field(default_factory=list)  # ... and why others were not

    def __len__(self) -> int:
        return len(self.scores)


Backend = Callable[[np.ndarray], tuple[np.ndarray, ...]]


class Detector:
    """A trained detector ready to score images, whichever back end runs it."""

    def __init__(self, info: ModelInfo, backend: Backend, source: str) -> None:
        self.info, self._backend, self.source = info, backend, source

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", threads: int | None = None
             ) -> Detector:
        """A run folder (scored with PyTorch, on CUDA when there is one and `device` is auto)
        or an exported .onnx file (scored with onnxruntime on `threads` CPU threads; None: its
        default, one per core)."""
        path = Path(path)
        if path.is_file() and path.suffix.lower() == ".onnx":
            return cls.from_onnx(path, threads)
        if path.is_dir():
            return cls.from_run(path, device)
        raise DataError(f"{path}: expected a run folder or an exported .onnx file")

    @classmethod
    def from_run(cls, path: Path, device: str = "auto") -> Detector:
        """A run folder, scored with PyTorch."""
        from core.runs import load_run
        from core.train.trainer import resolve_device

        run = load_run(path)
        dev = resolve_device(device)
        graph = ScoringGraph(run.model).to(dev)

        @torch.inference_mode()
        def backend(batch: np.ndarray) -> tuple[np.ndarray, ...]:
            out = graph(torch.from_numpy(batch).to(dev))
            return tuple(t.cpu().numpy() for t in out)

        return cls(run_info(run), backend, str(path))

    @classmethod
    def from_onnx(cls, path: Path, threads: int | None = None) -> Detector:
        """An exported model (any file name), scored with onnxruntime."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = onnxruntime.InferenceSession(str(path), options,
                                                   providers=["CPUExecutionProvider"])
        except Exception as err:  # a file that is not an ONNX model, or a broken one
            raise DataError(f"{path}: not a readable ONNX model ({' '.join(str(err).split())})"
                            ) from None
        info = ModelInfo.from_metadata(session.get_modelmeta().custom_metadata_map, str(path))

        def backend(batch: np.ndarray) -> tuple[np.ndarray, ...]:
            return tuple(session.run(list(OUTPUTS), {INPUT: batch}))

        return cls(info, backend, str(path))

    def score(self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray],
              batch_size: int = BATCH) -> Result:
        """Score images: a numpy batch (N, H, W, C) or one image (H, W, C), a list of such
        images of any sizes, or a torch batch (N, C, H, W); uint8, or float in [0, 1]. Each is
        resized to the detector's size and channels (`info`)."""
        batch = self.prepare(images)
        parts = [self._backend(batch[i:i + batch_size])
                 for i in range(0, len(batch), batch_size)]
        if not parts:
            h, w, s = self.info.height, self.info.width, len(self.info.scales)
            return Result(np.zeros(0, np.float32), np.zeros(0, bool), np.zeros((0, s), np.float32),
                          np.zeros((0, h, w), np.float32), np.zeros((0, s, h, w), np.float32))
        scores, anomalous, scale_scores, maps, scale_maps = (
            np.concatenate(x) for x in zip(*parts, strict=True))
        return Result(scores.astype(np.float32), anomalous.astype(bool),
                      scale_scores.astype(np.float32), maps.astype(np.float32),
                      scale_maps.astype(np.float32))

    def score_paths(self, paths: Sequence[str | Path], batch_size: int = BATCH) -> Result:
        """Score image files; an unreadable one is left out and its reason kept in
        `Result.skipped` (the others' paths in `Result.paths`)."""
        images, kept, skipped = self.read_all(paths)
        result = self.score(images, batch_size)
        result.paths, result.skipped = kept, skipped
        return result

    def read_all(self, paths: Sequence[str | Path]) -> tuple[np.ndarray, list[str], list[str]]:
        """(uint8 images (N, H, W, C) of the readable files, their paths, the reasons the
        others could not be read)."""
        images, kept, skipped = [], [], []
        for path in paths:
            try:
                images.append(self.read(path))
                kept.append(str(path))
            except DataError as err:
                skipped.append(str(err))
        shape = (0, self.info.height, self.info.width, self.info.channels)
        return (np.stack(images) if images else np.zeros(shape, np.uint8)), kept, skipped

    def read(self, path: str | Path) -> np.ndarray:
        """One image file as uint8 (H, W, C) at the detector's size and channels."""
        return read_image(Path(path), (self.info.height, self.info.width), self.info.channels)

    def prepare(self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> np.ndarray:
        """Any accepted input (see `score`) -> float32 (N, C, H, W) in [0, 1] at the size and
        channels the detector reads."""
        empty = np.zeros((0, self.info.channels, self.info.height, self.info.width), np.float32)
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"expected a torch batch (N, C, H, W), got {tuple(images.shape)}")
            return self._fit(_as_float(images.detach().cpu())).numpy()
        if isinstance(images, np.ndarray):
            array = images[None] if images.ndim == 3 else images
            if array.ndim != 4:
                raise ValueError(f"expected images (N, H, W, C) or (H, W, C), got an array of "
                                 f"shape {images.shape}")
            if len(array) == 0:
                return empty
            chw = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
            return self._fit(_as_float(chw)).numpy()
        # a list of (H, W, C) images, of any sizes
        arrays = [self.prepare(np.asarray(image)) for image in images]
        return np.concatenate(arrays) if arrays else empty

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        """float (N, C, H, W) -> the detector's channels and size."""
        c = self.info.channels
        if x.shape[1] not in (1, 3):
            raise ValueError(f"expected images with 1 or 3 channels, got {x.shape[1]}")
        if x.shape[1] != c:
            x = x.expand(-1, 3, -1, -1) if c == 3 else grayscale(x)
        size = (self.info.height, self.info.width)
        if tuple(x.shape[-2:]) != size:
            shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
            x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=shrink)
        return x.clamp(0, 1).float().contiguous()


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> [0, 1]; float input must already be in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float() / 255
    x = x.float()
    if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3 or not torch.isfinite(x).all()):
        raise ValueError("float images must hold values in [0, 1] (or pass uint8 images)")
    return x


def run_info(run) -> ModelInfo:  # noqa: ANN001 (core.runs.Run: imported lazily)
    """The `ModelInfo` of a saved run."""
    from importlib.metadata import PackageNotFoundError, version

    from core.artefacts import weights_digest

    cfg = run.config
    h, w = cfg.model.shape
    digest = weights_digest(run.path)
    try:
        anomem_version = version("anomem")
    except PackageNotFoundError:
        anomem_version = "unknown"
    types = sorted((run.metrics or {}).get("auroc_by_type") or {})
    return ModelInfo(
        threshold=float(run.model.detector.threshold),
        pixel_threshold=float(run.model.detector.pixel_threshold), channels=cfg.model.in_channels,
        height=h, width=w, scales=tuple(cfg.model.scales), backbone=cfg.model.backbone,
        dataset=cfg.data.dataset, normal_class=cfg.data.normal_class or "",
        anomaly_types=tuple(types), weights_sha256=digest, version=anomem_version)
