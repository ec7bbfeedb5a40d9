"""`anomem export`: a run as one ONNX graph that is proved to give PyTorch's numbers.

The graph is `core.inference.ScoringGraph`: images (N, C, H, W) in [0, 1], any batch size, to
the score, the verdict at the run's threshold, the combined map and each scale's map. Everything
the detector reads is inside it (encoder, memories, Gaussians, pixel terms, standardisation,
weights); `ModelInfo` (threshold, input size and channels, normal class, anomaly types, SHA-256 of
the run's weights, anomem's version) is written into the model's metadata.

Before the file is given its name, onnxruntime scores the run's test images (a seeded sample by
default) and must match PyTorch: every score within TOLERANCE of the scores' standard deviation,
the same verdicts. Otherwise, or when torch cannot express the model in ONNX, nothing is left
on disk and the error says which.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.files import atomic_path
from core.inference import INPUT, OUTPUTS, Detector, ModelInfo, ScoringGraph, run_info

OPSET = 18
TOLERANCE = 1e-4  # largest score difference allowed, relative to the scores' spread (std)
CHECK_IMAGES = 256  # test images the check scores by default (None: all)


class ExportError(RuntimeError):
    """The run could not be exported, or the export does not agree with PyTorch."""


@dataclass
class ExportReport:
    path: Path
    info: ModelInfo
    checked: int  # images scored by both
    score_diff: float  # largest |onnx - torch| score
    spread: float  # std of the torch scores on those images
    map_diff: float  # largest |onnx - torch| map value
    verdicts_differ: int
    seconds: float

    @property
    def relative_diff(self) -> float:
        return self.score_diff / max(self.spread, 1e-12)

    def summary(self) -> str:
        return (f"{self.path}: checked on {self.checked} images, largest score difference "
                f"{self.score_diff:.2e} ({self.relative_diff:.1e} of the scores' spread "
                f"{self.spread:.3g}; tolerance {TOLERANCE:g}), largest map difference "
                f"{self.map_diff:.2e}, {self.verdicts_differ} verdict(s) differ; "
                f"{self.seconds:.0f} s")


Say = Callable[[str], None]


def export_run(run_dir: Path, out: Path, images: torch.Tensor | None = None,
               sample: int | None = CHECK_IMAGES, seed: int = 0,
               say: Say | None = None) -> ExportReport:
    """Export the run at `run_dir` to `out` (.onnx) and check it on `images` (uint8
    (N, C, H, W) at the run's size; default: the run's test images, `sample` of them, None:
    all)."""
    from core.runs import load_run

    say = say or (lambda message: None)
    start = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"{out}: expected a file name ending in .onnx")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: no such folder")
    run = load_run(Path(run_dir))
    info = run_info(run)
    graph = ScoringGraph(run.model).eval()
    if images is None:
        say("reading the run's test images for the check")
        images = _test_images(run, sample, seed)
    with atomic_path(out) as tmp:
        say(f"exporting to ONNX (opset {OPSET})")
        _export(graph, info, tmp)
        say(f"checking onnxruntime against PyTorch on {len(images)} images")
        onnx_out = Detector.from_onnx(tmp).score(images)
        with torch.inference_mode():
            torch_out = [graph(images[i:i + 32].float() / 255)
                         for i in range(0, len(images), 32)]
        scores, verdicts, maps = (torch.cat([o[OUTPUTS.index(name)] for o in torch_out]).numpy()
                                  for name in ("score", "anomalous", "map"))
        report = ExportReport(
            path=out, info=info, checked=len(images),
            score_diff=float(np.abs(onnx_out.scores - scores).max()),
            spread=float(scores.std()),
            map_diff=float(np.abs(onnx_out.maps - maps).max()),
            verdicts_differ=int((onnx_out.anomalous != verdicts).sum()),
            seconds=0.0)
        if report.relative_diff > TOLERANCE or report.verdicts_differ:
            raise ExportError(f"the exported model does not agree with PyTorch, nothing was "
                              f"written: {report.summary()}")
    report.seconds = time.perf_counter() - start
    return report


def _export(graph: ScoringGraph, info: ModelInfo, path: Path) -> None:
    """torch's ONNX exporter (the dynamo path), one file with the weights inside, metadata set.
    What it cannot express becomes an ExportError of one line."""
    import onnx

    example = torch.rand(2, info.channels, info.height, info.width)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.onnx.export(
            graph, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT],
            output_names=list(OUTPUTS), dynamic_shapes={"images": {0: batch}}, verbose=False)
    except Exception as err:  # the exporter's errors are pages long: keep their first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"torch cannot export this model to ONNX: {first}") from None
    model = program.model_proto
    for key, value in info.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save_model(model, str(path))


def _test_images(run, sample: int | None, seed: int) -> torch.Tensor:  # noqa: ANN001
    """The run's test images, uint8 (N, C, H, W), a seeded sample of them."""
    from core.data import load_split

    try:
        test = load_split(run.config.data).test
    except Exception as err:
        raise ExportError(f"cannot read the run's test images for the check ({err}); pass "
                          "images to check on (--images FOLDER)") from None
    index = np.arange(len(test))
    if sample is not None and sample < len(test):
        index = np.sort(np.random.default_rng(seed).choice(len(test), sample, replace=False))
    return test.images[torch.from_numpy(index)]
