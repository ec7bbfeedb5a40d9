"""Teach a detector: marked images refit stage 2 in seconds; stage 1 is left as it is.

A mark is an image and what it is: "normal" (a false alarm) or the name of an anomaly type.
`refit_run` fits stage 2 again (core/train/stage2.py) on the parent run's encoder and memories,
with the marked normals added to the normal fit set and the marked anomalies used as labelled
anomalies, and saves the result as a new run whose config records its parent and every mark.
The parent run is never written. The report compares the parent and the new run on the test
set with the marked test images left out of both.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.config import AugmentConfig, LineageConfig, RunConfig
from core.data import NORMAL, DataError, Split, load_split
from core.data.imageio import MAX_UPLOAD_BYTES, read_image, validate_upload
from core.metrics import image_metrics
from core.model.anomem import AnoMem
from core.pipeline import evaluate
from core.runs import (
    CONFIG,
    FINISHED,
    LOCK,
    METRICS,
    RunError,
    load_model,
    load_run,
    new_run_dir,
    read_config,
    read_json,
    run_lock,
    run_state,
    save_model,
    write_json,
)
from core.train.augment import augment
from core.train.stage2 import fit_detector
from core.train.trainer import resolve_device, split_normals

TEST_PREFIX = "test:"  # a mark's source naming an image of the run's own test set by index
REPEAT = 8  # a marked normal enters the fit set as this many augmented views of itself
REFIT = "refit.json"  # the new run's before-and-after report


@dataclass(frozen=True)
class Mark:
    """One marked image: where it came from, its SHA-256, what it is, and the identity of the
    data set of the run it was marked on (None for a file or an upload)."""

    source: str
    sha256: str
    label: str
    dataset: str | None = None

    def recorded(self) -> dict[str, str]:
        return {"source": self.source, "sha256": self.sha256, "label": self.label}


@dataclass
class Marked:
    mark: Mark
    image: np.ndarray  # uint8 (H, W, C) at the run's size


def data_identity(cfg: RunConfig) -> str:
    """What makes two runs' images comparable: the data set, its folder and the normal class."""
    d = cfg.data
    return f"{d.dataset}|{d.root or ''}|{d.normal_class or ''}|{cfg.model.shape}"


def _check_label(label: str) -> str:
    label = label.strip()
    if not label or "\t" in label or "\n" in label:
        raise DataError(f"mark label {label!r}: expected 'normal' or an anomaly type's name")
    return label


def mark_file(path: Path, label: str, cfg: RunConfig) -> Marked:
    """An image file marked `label`; DataError names the file if it is unreadable or too big."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    data = path.read_bytes()
    if len(data) > MAX_UPLOAD_BYTES:
        raise DataError(f"cannot read image {str(path)!r}: {len(data) / 1e6:.1f} MB is over "
                        f"the limit of {MAX_UPLOAD_BYTES / 1e6:.1f} MB")
    image = read_image(path, cfg.model.shape, cfg.model.in_channels)
    return Marked(Mark(str(path), hashlib.sha256(data).hexdigest(), _check_label(label)), image)


def mark_upload(name: str, data: bytes, label: str, cfg: RunConfig) -> Marked:
    """An uploaded file marked `label`, checked like any upload (type, bytes, pixels)."""
    image = validate_upload(data, name, size=cfg.model.shape,
                            channels=cfg.model.in_channels)
    return Marked(Mark(name, hashlib.sha256(data).hexdigest(), _check_label(label)), image)


def mark_test_image(cfg: RunConfig, split: Split, index: int, label: str) -> Marked:
    """Test image `index` of a run's own split, marked `label` on that run's data set."""
    if not 0 <= index < len(split.test):
        raise DataError(f"test image {index}: expected 0..{len(split.test) - 1}")
    image = split.test.images[index].permute(1, 2, 0).contiguous().numpy()
    return Marked(Mark(f"{TEST_PREFIX}{index}", hashlib.sha256(image.tobytes()).hexdigest(),
                       _check_label(label), data_identity(cfg)), image)


@dataclass
class RefitReport:
    """Before (the parent) and after (the refitted run), on the test set less the marks."""

    parent: str
    seconds: float  # stage 2 refit alone
    n_normal_marks: int
    n_anomaly_marks: int
    n_test: int  # test images compared (the marked ones left out)
    before: dict = field(default_factory=dict)  # auroc, auroc_by_type, fpr_at_threshold
    after: dict = field(default_factory=dict)
    changed: list[dict] = field(default_factory=list)  # test images whose verdict changed

    def as_dict(self) -> dict:
        return asdict(self)


def refit_run(parent: Path, marks: list[Marked], out: Path, device: str = "cpu"
              ) -> RefitReport:
    """Refit stage 2 of the finished run `parent` with `marks`; save it as the new run `out`.

    Refuses, writing nothing, when the parent is training or not finished, when a mark was made
    on another data set, or when there is no mark. The parent is never written.
    """
    parent, out = Path(parent), Path(out)
    if not marks:
        raise DataError("nothing to refit: mark at least one image")
    state = run_state(parent) if parent.is_dir() else "missing"
    if state != FINISHED:
        raise RunError(f"{parent.name}: is {state}; refit needs a finished run")
    cfg = read_config(parent)
    identity = data_identity(cfg)
    for m in marks:
        if m.mark.dataset is not None and m.mark.dataset != identity:
            raise DataError(f"mark {m.mark.source!r} was made on a run of another data set "
                            f"({m.mark.dataset.split('|')[0]}, not {cfg.data.dataset})")
    if out.exists() and any(p.name != LOCK for p in out.iterdir()):
        raise RunError(f"{out}: already exists (choose a new folder)")
    split = load_split(cfg.data)
    before_model = load_run(parent).model
    model = load_model(parent, cfg).to(resolve_device(cfg.train.device))

    tc = cfg.train
    train = split.train
    fit_idx, cal_idx = split_normals(train, tc.holdout, tc.seed)
    normals = [m for m in marks if m.mark.label == NORMAL]
    anomalies = [m for m in marks if m.mark.label != NORMAL]
    fit = torch.cat([train.images[fit_idx],
                     _views(normals, tc.seed, tuple(train.images.shape[1:]))])
    labelled = train.images[np.flatnonzero(train.labels.numpy() == 1)]
    if anomalies:
        labelled = torch.cat([labelled, _stack(anomalies)])
    start = time.perf_counter()
    report = fit_detector(model, fit, train.images[cal_idx], labelled, tc, model_device(model))
    seconds = time.perf_counter() - start
    model = model.cpu().eval()

    new_cfg = RunConfig.from_dict({
        **cfg.to_dict(),
        "lineage": asdict(LineageConfig(parent=parent.name,
                                        marks=tuple(m.mark.recorded() for m in marks)))})
    with run_lock(out):
        if (out / CONFIG).exists():
            raise RunError(f"{out}: already holds a run (choose a new folder)")
        save_model(out, new_cfg, model)
        metrics, scored = evaluate(model, split, device)
        metrics.update({"dataset": cfg.data.dataset, "normal_class": split.normal_class,
                        "setting": cfg.data.setting, "n_train": len(train), "stage2": report,
                        "refit_seconds": seconds})
        write_json(out / METRICS, metrics)
        result = _compare(parent.name, before_model, model, scored.image, split, marks,
                          seconds, device)
        write_json(out / REFIT, result.as_dict())
    return result


def refit_new_run(parent: Path, marks: list[Marked], root: Path, name: str,
                  device: str = "cpu") -> tuple[Path, RefitReport]:
    """`refit_run` into a fresh folder `root/name` (or `name-2`, ...), created and locked here;
    a refit that fails removes the folder it created. Returns the new run's folder and report."""
    out = new_run_dir(root, name)
    with run_lock(out):
        try:
            return out, refit_run(parent, marks, out, device)
        except BaseException:
            if not any(p.name != LOCK for p in out.iterdir()):  # nothing written: not a run
                shutil.rmtree(out, ignore_errors=True)
            raise


def read_refit_report(run_dir: Path) -> dict | None:
    """The before-and-after report of a refitted run (None for a run trained from scratch);
    RunError if the file is unreadable."""
    path = Path(run_dir) / REFIT
    if not path.is_file():
        return None
    report = read_json(path)
    if not isinstance(report, dict) or not {"before", "after", "changed"} <= set(report):
        raise RunError(f"{path}: not a refit report (expected before, after and changed)")
    return report


def model_device(model: AnoMem) -> torch.device:
    return next(model.parameters()).device


def _stack(marks: list[Marked]) -> torch.Tensor:
    return torch.from_numpy(np.stack([m.image for m in marks])).permute(0, 3, 1, 2).contiguous()


def _views(normals: list[Marked], seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Each marked normal and REPEAT - 1 mildly augmented views of it, as uint8: ten marks
    among thousands of normals would otherwise barely move a Gaussian fitted to all of them."""
    if not normals:
        return torch.zeros((0, *shape), dtype=torch.uint8)
    images = _stack(normals)
    g = torch.Generator().manual_seed(seed)
    mild = AugmentConfig(crop_scale=(0.85, 1.0))
    views = [images] + [(augment(images, mild, g) * 255).round().to(torch.uint8)
                        for _ in range(REPEAT - 1)]
    return torch.cat(views)


def _compare(parent: str, before: AnoMem, after: AnoMem, after_scores: np.ndarray, split: Split,
             marks: list[Marked], seconds: float, device: str) -> RefitReport:
    """Both models on the test set less the marked images; the new model's scores of the
    whole test set are given (its evaluation computed them already)."""
    from core.train.scoring import score_images

    test = split.test
    marked = {int(m.mark.source[len(TEST_PREFIX):]) for m in marks
              if m.mark.source.startswith(TEST_PREFIX)}
    keep = np.array([i for i in range(len(test)) if i not in marked], dtype=np.int64)
    images = test.images[torch.from_numpy(keep)]
    labels = test.labels.numpy()[keep]
    types = [test.types[i] for i in keep]
    rows = {}
    verdicts = {}
    for name, model in (("before", before), ("after", after)):
        s = after_scores[keep] if model is after else score_images(
            model, images, device, with_maps=False).image
        m = image_metrics(labels, s, types)
        flagged = s > float(model.detector.threshold)
        rows[name] = {"auroc": m["auroc"], "auroc_by_type": m["auroc_by_type"],
                      "threshold": float(model.detector.threshold),
                      "fpr_at_threshold": float(flagged[labels == 0].mean())
                      if (labels == 0).any() else None,
                      "tpr_at_threshold": float(flagged[labels == 1].mean())
                      if (labels == 1).any() else None}
        verdicts[name] = (flagged, s)
    changed = [{"index": int(keep[j]), "type": types[j], "name": test.names[keep[j]],
                "before": float(verdicts["before"][1][j]), "after": float(verdicts["after"][1][j]),
                "verdict": "anomalous" if verdicts["after"][0][j] else "normal"}
               for j in np.flatnonzero(verdicts["before"][0] != verdicts["after"][0])]
    n_normal = sum(m.mark.label == NORMAL for m in marks)
    return RefitReport(parent, seconds, n_normal, len(marks) - n_normal, len(keep),
                       rows["before"], rows["after"], changed)
