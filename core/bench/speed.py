"""What a stage-1 step costs, against the bare backbone on the same batches; what scoring
costs on each encoder; and what a saved detector scores per second with PyTorch and with its
ONNX export, one image at a time and in batches.

All timings run in one process, one after another, on the same images, so their ratios hold
even on a busy machine where the absolute numbers do not.
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.config import RunConfig
from core.export import export_run
from core.inference import Detector
from core.model.anomem import AnoMem
from core.runs import save_model
from core.train.allocator import keep_freed_memory
from core.train.augment import augment, to_float
from core.train.losses import MemoryContrastLoss
from core.train.stage1 import ContrastStep, make_batch
from core.train.trainer import resolve_device

FRACTIONS = (0.25, 0.5, 1.0)  # shares of shifted copies timed besides the config's own
BATCHES = (1, 32)  # batch sizes a saved detector is timed at: one image per call, and batches
CHECK_IMAGES = 16  # images the export is checked on against PyTorch


@dataclass
class SpeedReport:
    device: str
    threads: int
    batch: int  # training images per step
    backbone_images_per_s: float  # bare backbone, forward + backward of two views
    anomem_images_per_s: float  # the config's stage-1 step, shifted negatives included
    anomem_no_shift_images_per_s: float  # the same step without shifted negatives
    step_cost_ratio: float  # backbone / anomem images per s: cost per training image
    step_cost_ratio_no_shift: float
    # cost ratio when only this share of a batch's normals gets a shifted copy
    step_cost_ratio_by_shift_fraction: dict[str, float]
    inference_images_per_s: float  # scoring (stage 2's detector included)
    data_share: float  # share of a training step spent making the batch and its views
    peak_memory_mb: float  # process peak RSS on CPU, peak allocated on CUDA

    def as_dict(self) -> dict:
        return asdict(self)


def _timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per call of `fn`, after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def measure(cfg: RunConfig, images: torch.Tensor, steps: int = 10) -> SpeedReport:
    """Time `steps` stage-1 steps of `cfg` on uint8 `images` against the bare backbone."""
    tc = cfg.train
    keep_freed_memory()
    device = resolve_device(tc.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bs = min(tc.batch_size, len(images))
    g = torch.Generator().manual_seed(tc.seed)
    batch = images[:bs].to(device)
    empty = images[:0].to(device)

    model = AnoMem(cfg.model).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = ContrastStep(model, MemoryContrastLoss(tc))

    shifts = tc.shift_negatives or ("jigsaw",)

    def prepare(fraction: float) -> tuple[torch.Tensor, ...]:
        """A batch whose normals get shifted copies at this share (0: none)."""
        b, is_anom, is_shift = make_batch(batch, empty, 0, shifts if fraction else (), g,
                                          fraction or 1.0)
        views = torch.cat([augment(b, tc.augment, g), augment(b, tc.augment, g)])
        return views.contiguous(memory_format=torch.channels_last), is_anom, is_shift

    own = tc.shift_fraction if tc.shift_negatives else 0.0
    prepared = {f: prepare(f) for f in sorted({own, 0.0, *FRACTIONS})}

    def anomem_step(fraction: float) -> Callable[[], None]:
        def run() -> None:
            out, _ = step(*prepared[fraction])
            opt.zero_grad(set_to_none=True)
            out.total.backward()
            opt.step()
        return run

    views = prepared[0.0][0]

    def backbone_step() -> None:
        maps = model.backbone(views)
        loss = sum(m.float().mean() for m in maps.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    backbone_s = _timed(backbone_step, steps, device)
    step_s = {f: _timed(anomem_step(f), steps, device) for f in prepared}
    anomem_s, plain_s = step_s[own], step_s[0.0]
    prep_s = _timed(lambda: prepare(own), steps, device)

    model.eval()
    test = to_float(images[:256].to(device))
    with torch.no_grad():
        infer_s = _timed(lambda: model.score(test), max(1, steps // 2), device)

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return SpeedReport(
        device=str(device), threads=torch.get_num_threads(), batch=bs,
        backbone_images_per_s=bs / backbone_s, anomem_images_per_s=bs / anomem_s,
        anomem_no_shift_images_per_s=bs / plain_s,
        step_cost_ratio=anomem_s / backbone_s, step_cost_ratio_no_shift=plain_s / backbone_s,
        step_cost_ratio_by_shift_fraction={f"{f:g}": step_s[f] / backbone_s
                                           for f in FRACTIONS},
        inference_images_per_s=len(test) / infer_s,
        data_share=prep_s / (prep_s + anomem_s), peak_memory_mb=peak,
    )


def inference_rate(cfg: RunConfig, images: torch.Tensor, repeats: int = 3) -> float:
    """Images per second scored (image scores and maps) by a model of `cfg`, on up to 256
    uint8 `images`: what a user waits for at inference, encoder included."""
    device = resolve_device(cfg.train.device)
    model = AnoMem(cfg.model).to(device, memory_format=torch.channels_last).eval()
    test = to_float(images[:256].to(device))
    with torch.no_grad():
        return len(test) / _timed(lambda: model.score(test), repeats, device)


@dataclass
class DeployedRate:
    """Images per second that a saved detector scores through `Detector.score` (images resized
    to its size, scores and maps out), from its run folder (PyTorch) and from its ONNX export
    (onnxruntime, CPU), at each of `BATCHES`."""

    backbone: str
    shape: tuple[int, int]  # (height, width) the detector reads
    pytorch_device: str
    threads: int  # torch's intra-op threads; onnxruntime keeps its default pool
    images: dict[str, int]  # batch size -> images timed (after one warm-up batch)
    images_per_s: dict[str, dict[str, float]]  # backend -> batch size -> images/s
    export_s: float  # exporting and checking the ONNX model
    export_relative_diff: float  # largest score difference in the check, relative to spread

    def as_dict(self) -> dict:
        return asdict(self)


def scoring_rate(detector: Detector, images: torch.Tensor, batch: int) -> float:
    """Images per second `detector` scores `images` at, `batch` per call, after one warm-up
    call (onnxruntime and PyTorch both spend their first call settling)."""
    detector.score(images[:batch], batch_size=batch)
    start = time.perf_counter()
    detector.score(images, batch_size=batch)
    return len(images) / (time.perf_counter() - start)


def deployed_rate(cfg: RunConfig, images: torch.Tensor,
                  batches: tuple[int, ...] = BATCHES) -> DeployedRate:
    """Save a model of `cfg` as a run, export it to ONNX (checked on the first uint8 `images`),
    and time both back ends on the same images at each batch size: `max(64, 8 * batch)`
    images, `images` repeated if there are fewer.

    The model is built, not trained, as for `inference_rate`: what scoring costs does not
    depend on the weights or on stage 2's statistics (every buffer has a fixed shape and no
    branch reads a value). Fitting stage 2 would not help either: Gaussians fitted to a random
    encoder's features magnify float rounding past the export check's tolerance."""
    device = resolve_device(cfg.train.device)
    counts = {b: max(64, 8 * b) for b in batches}
    with tempfile.TemporaryDirectory(prefix="anomem-speed-") as tmp:
        run, onnx = Path(tmp) / "run", Path(tmp) / "model.onnx"
        save_model(run, cfg, AnoMem(cfg.model))
        report = export_run(run, onnx, images=images[:CHECK_IMAGES])
        detectors = {"pytorch": Detector.load(run, cfg.train.device),
                     "onnxruntime": Detector.load(onnx, threads=torch.get_num_threads())}
        timed = {b: images.repeat(-(-n // len(images)), 1, 1, 1)[:n] for b, n in counts.items()}
        rates = {name: {str(b): scoring_rate(d, timed[b], b) for b in batches}
                 for name, d in detectors.items()}
    return DeployedRate(
        backbone=cfg.model.backbone, shape=cfg.model.shape, pytorch_device=str(device),
        threads=torch.get_num_threads(), images={str(b): n for b, n in counts.items()},
        images_per_s=rates, export_s=report.seconds,
        export_relative_diff=report.relative_diff)
