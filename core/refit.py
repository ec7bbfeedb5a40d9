"""Teach a detector: marked images become lessons for their look-alikes, in seconds.

A mark is an image and what it is: "normal" (a false alarm) or the name of an anomaly type.
`refit_run` keeps everything the parent run fitted (its encoder, memories, Gaussians, weights,
map scales and thresholds) and adds lessons (core/model/lessons.py): each marked image and
mild augmentations of it become keys whose look-alikes score like a normal (marked normals) or
at least like an alarm (marked anomalies), each key reaching about as far as the nearest normal
reference image (marked normals somewhat further where a rehearsal on held-out normals shows
that it pays). Marked anomalies of one type may teach their kind, marked normals of one sort
their sort (a direction each, core/model/lessons.py). Only look-alikes of the marks, and images
of their kind or sort, move: the refit changes no choice of stage 2. The result is saved as a
new run whose config records its parent and every mark; the parent is never written. The report
compares the parent and the new run on the test set with the marked test images left out of
both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from core import artefacts
from core.config import SHIFTS, AugmentConfig, LineageConfig, RunConfig
from core.data import NORMAL, DataError, Split, load_split
from core.data.imageio import MAX_UPLOAD_BYTES, read_image, validate_upload
from core.metrics import at_threshold, image_metrics
from core.model.anomem import AnoMem
from core.model.lessons import (
    ANOMALY_SIGHT,
    MAX_AUROC_LOSS,
    MAX_DETECTION_LOSS,
    MIN_KIND_MARKS,
    MIN_KIND_Z,
    MIN_SORT_Z,
    Kinds,
    choose_lesson,
    fit_kind,
    fit_sort,
    key_sights,
)
from core.pipeline import evaluate
from core.runs import (
    CONFIG,
    FINISHED,
    LOCK,
    METRICS,
    WEIGHTS,
    RunError,
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
from core.train.scoring import ScoredSet, score_images, taught
from core.train.shifts import shift
from core.train.stage2 import split_normals
from core.train.trainer import resolve_device

TEST_PREFIX = "test:"  # a mark's source naming an image of the run's own test set by index
VIEWS = 8  # keys per marked image: itself and mild augmentations of it
REFERENCES = 384  # held-out normal training images the keys' reach is measured against
PSEUDO_IMAGES = 128  # pseudo-anomalies made from them, to rehearse a lesson's cost
# Marked normals a refit needs before they reach as far as the rehearsal found (`marked_reach`)
MIN_REHEARSED_MARKS = 3
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


def test_index(source: str) -> int | None:
    """The test-set index a mark's source names ("test:12" -> 12), None for a file or upload."""
    return int(source[len(TEST_PREFIX):]) if source.startswith(TEST_PREFIX) else None


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
    seconds: float  # the teaching alone (keys and their reach)
    n_normal_marks: int
    n_anomaly_marks: int
    n_test: int  # test images compared (the marked ones left out)
    before: dict = field(default_factory=dict)  # auroc, auroc_by_type, fpr_at_threshold
    after: dict = field(default_factory=dict)
    changed: list[dict] = field(default_factory=list)  # unmarked test images whose verdict
    marked: list[dict] = field(default_factory=list)  # changed; the marked test images
    lessons: dict = field(default_factory=dict)  # what `teach` made: keys, reach, evidence

    def as_dict(self) -> dict:
        return asdict(self)


def refit_run(parent: Path, marks: list[Marked], out: Path, device: str = "cpu"
              ) -> RefitReport:
    """Teach the finished run `parent` its `marks`; save the result as the new run `out`.

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
    device_ = resolve_device(cfg.train.device)
    start = time.perf_counter()
    context = known_context(parent, before_model, split, cfg, device_)  # scoring moves it
    model, lessons = teach(before_model, marks, split, cfg, device_, context)
    seconds = time.perf_counter() - start

    new_cfg = RunConfig.from_dict({
        **cfg.to_dict(),
        "model": {**cfg.to_dict()["model"], "lessons": model.cfg.lessons,
                  "lesson_kinds": model.cfg.lesson_kinds},
        "lineage": asdict(LineageConfig(parent=parent.name,
                                        marks=tuple(m.mark.recorded() for m in marks)))})
    parent_metrics = read_json(parent / METRICS) if (parent / METRICS).is_file() else {}
    with run_lock(out):
        if (out / CONFIG).exists():
            raise RunError(f"{out}: already holds a run (choose a new folder)")
        save_model(out, new_cfg, model)
        saved = artefacts.load(parent)
        if saved is not None and _reusable(saved.scored, parent_metrics, len(split.test),
                                          model.descriptor_dim):
            # Lessons change image scores alone, and only through what the parent's explorer
            # data holds: the test set is not scored again, the pages' data carried over
            assert model.lessons is not None
            scored = taught(saved.scored, model)
            metrics = _taught_metrics(parent_metrics, scored, split, model)
            artefacts.save(out, artefacts.Artefacts(scored, saved.umap, saved.patches))
            before_scores = saved.scored.image
        else:
            metrics, scored = evaluate(model, split, device)
            before_scores = None
        metrics.update({"dataset": cfg.data.dataset, "normal_class": split.normal_class,
                        "setting": cfg.data.setting, "n_train": len(split.train),
                        "stage2": parent_metrics.get("stage2", {}), "lessons": lessons,
                        "refit_seconds": seconds})
        write_json(out / METRICS, metrics)
        result = _compare(parent.name, before_model, model, scored.image, split, marks,
                          seconds, device, before_scores)
        result.lessons = lessons
        write_json(out / REFIT, result.as_dict())
    return result


def _reusable(scored: ScoredSet, metrics: dict, n_test: int, descriptor_dim: int) -> bool:
    """Whether a parent's saved test scores can stand in for scoring its test set again."""
    return (scored.untaught is not None and scored.descriptors is not None
            and len(scored.image) == n_test and scored.descriptors.shape[1] == descriptor_dim
            and "auroc_by_scale" in metrics)


def _taught_metrics(parent: dict, scored: ScoredSet, split: Split, model: AnoMem) -> dict:
    """metrics.json of a taught run from its parent's: the image-level metrics computed on the
    taught scores; the maps, the scales' and the terms' scores are the parent's own."""
    test = split.test
    labels = test.labels.numpy()
    return {**parent, **image_metrics(labels, scored.image, test.types),
            **at_threshold(labels, scored.image, float(model.detector.threshold))}


@dataclass
class Context:
    """What lessons are measured against: held-out normal training images (their descriptors
    and scores before any lesson) and the reach chosen on them (core/model/lessons.py)."""

    references: torch.Tensor  # (R, dim)
    scores: torch.Tensor  # (R,)
    sight: str  # what marked normals' keys compare images on
    reach: float
    evidence: dict
    anomaly_sight: str = ANOMALY_SIGHT  # what marked anomalies' keys compare images on
    # pseudo-anomalies made from the references (P, dim), their scores (P,), and the
    # threshold they are caught at: what a sort of marked normals may not cost
    pseudo: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    pseudo_scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    threshold: float = float("inf")


def lesson_context(parent: AnoMem, split: Split, cfg: RunConfig, device: torch.device
                   ) -> Context:
    """Up to REFERENCES held-out normals (those stage 2 standardised its terms on) and
    PSEUDO_IMAGES pseudo-anomalies made from them, read by `parent`; the sight and reach of
    marked normals are chosen by rehearsing a lesson on them (`choose_lesson`)."""
    tc = cfg.train
    _, cal_idx = split_normals(split.train, tc.holdout, tc.seed)
    if len(cal_idx) > REFERENCES:
        cal_idx = np.sort(np.random.default_rng(tc.seed).choice(cal_idx, REFERENCES,
                                                                replace=False))
    images = split.train.images[cal_idx]
    scores, references = describe_images(parent, images, device)
    g = torch.Generator().manual_seed(tc.seed)
    source = images[torch.randperm(len(images), generator=g)[:PSEUDO_IMAGES]]
    pseudo_scores, pseudo = describe_images(parent, shift(source, SHIFTS, g), device)
    sight, reach, evidence = choose_lesson(parent.descriptor_blocks, references, scores, pseudo,
                                           pseudo_scores, float(parent.detector.threshold),
                                           tc.seed)
    return Context(references, scores, sight, reach, evidence, pseudo=pseudo,
                   pseudo_scores=pseudo_scores, threshold=float(parent.detector.threshold))


CONTEXTS_KEPT = 4  # runs whose lesson context this process keeps (`known_context`)
_contexts: dict[tuple, Context] = {}


def known_context(run_dir: Path, parent: AnoMem, split: Split, cfg: RunConfig,
                  device: torch.device) -> Context:
    """`lesson_context` of the run saved in `run_dir` (whose model is `parent`), kept in this
    process while the run's weights file is unchanged: it depends on the run alone, not on the
    marks, and its forward passes are most of a refit's time, so the Teach page's Foresee and
    the refit after it (or a second refit) make it once."""
    weights = (Path(run_dir) / WEIGHTS).resolve()
    stat = weights.stat()
    key = (str(weights), stat.st_mtime_ns, stat.st_size, str(device))
    if key not in _contexts:
        context = lesson_context(parent, split, cfg, device)
        while len(_contexts) >= CONTEXTS_KEPT:
            _contexts.pop(next(iter(_contexts)))
        _contexts[key] = context
    return _contexts[key]


def teach(parent: AnoMem, marks: list[Marked], split: Split, cfg: RunConfig,
          device: torch.device, context: Context | None = None) -> tuple[AnoMem, dict]:
    """A copy of the fitted `parent` with the marks (and the parent's own lessons) as lessons;
    returns it on the CPU and a summary for metrics.json. Each mark gives VIEWS keys; each
    anomaly type marked MIN_KIND_MARKS times or more may give a kind (`mark_kinds`).
    `context`: the parent's `lesson_context`, made here when not given."""
    parent = parent.to(device).eval()
    if context is None:
        context = lesson_context(parent, split, cfg, device)
    scores, keys = describe_images(parent, _views(marks, cfg.train.seed), device)
    parent.cpu()
    anomalous = torch.tensor([m.mark.label != NORMAL for m in marks]).repeat(VIEWS)
    kinds, summary = marked_kinds(marks, scores, keys, context, cfg.train.seed)
    normals = sum(m.mark.label == NORMAL for m in marks)
    model = with_lessons(parent, keys, anomalous, context, kinds, normals)
    lessons = model.lessons
    return model, {
        "keys": len(lessons.keys), "anomaly_keys": int(lessons.anomalous.sum()),
        "references": len(context.references), "sight": context.sight,
        "reach": marked_reach(context, kinds, normals), "rehearsed_reach": context.reach,
        "marked_normals": normals,
        "evidence": context.evidence,
        "normal_score": float(lessons.normal_score), "alarm_score": float(lessons.alarm_score),
        "anomaly_shrink": float(lessons.shrink),
        "median_radius": float(lessons.radius.median()), **summary}


def marked_kinds(marks: list[Marked], scores: torch.Tensor, keys: torch.Tensor,
                 context: Context, seed: int) -> tuple[Kinds, dict]:
    """The kinds of the marked anomaly types (`mark_kinds`) and the sort of the marked normals
    (`mark_sort`), given the marks' views' scores and keys (VIEWS * M, as `_views` orders
    them); a summary of each for metrics.json."""
    kinds, kind_summary = mark_kinds(marks, keys, context.references, seed)
    sort, sort_summary = mark_sort(marks, scores, keys, context, seed)
    return Kinds.cat([kinds, sort], keys.shape[1]), {"kinds": kind_summary,
                                                     "sort": sort_summary}


def mark_sort(marks: list[Marked], scores: torch.Tensor, keys: torch.Tensor, context: Context,
              seed: int) -> tuple[Kinds, dict | None]:
    """The sort of the marked normals (core/model/lessons.py `fit_sort`) when there are at
    least MIN_KIND_MARKS of them and it is taught (none otherwise), and a summary of the
    evidence (None with too few marked normals)."""
    normal = [i for i, m in enumerate(marks) if m.mark.label == NORMAL]
    dim = keys.shape[1]
    if len(normal) < MIN_KIND_MARKS:
        return Kinds.none(dim), None
    per_mark = keys.reshape(VIEWS, len(marks), -1).transpose(0, 1)  # (M, VIEWS, dim)
    own = scores[:len(marks)]  # each marked image's own score (its first view)
    sort, evidence = fit_sort(per_mark[normal], own[normal], context.references,
                              context.scores, context.pseudo, context.pseudo_scores,
                              context.threshold, seed)
    return (sort if evidence["taught"] else Kinds.none(dim)), {"marks": len(normal),
                                                                **evidence}


def mark_kinds(marks: list[Marked], keys: torch.Tensor, references: torch.Tensor, seed: int
               ) -> tuple[Kinds, list[dict]]:
    """The kinds (core/model/lessons.py `fit_kind`) of the anomaly types marked at least
    MIN_KIND_MARKS times, given the marks' keys (VIEWS * M, dim, as `_views` orders them) and
    the held-out normal references (R, dim): those whose marks, each left out in turn, still
    stand past the normals (the others would do nothing), and a summary of every type's."""
    per_mark = keys.reshape(VIEWS, len(marks), -1).transpose(0, 1)  # (M, VIEWS, dim)
    kinds, summary = [], []
    for label in sorted({m.mark.label for m in marks} - {NORMAL}):
        of_type = [i for i, m in enumerate(marks) if m.mark.label == label]
        if len(of_type) < MIN_KIND_MARKS:
            continue
        kind, evidence = fit_kind(per_mark[of_type], references, seed)
        summary.append({"label": label, **evidence})
        if evidence["generalises"]:
            kinds.append(kind)
    return Kinds.cat(kinds, keys.shape[1]), summary


SIGHT_WORDS = {"encoder": "what the image shows (the encoder's deepest features, measured "
                          "against how much normal images vary)",
               "queries": "the memory queries of every scale, pooled and at the strangest spot",
               "both": "both what the image shows and the memory queries"}


def lesson_story(lessons: dict) -> str:
    """What a refit's marked images compare images on and how far they reach, and why."""
    sight, reach = lessons.get("sight", "queries"), lessons["reach"]
    rehearsed = lessons.get("rehearsed_reach", reach)
    tried = (lessons.get("evidence") or {}).get("tried")  # None: saved by an earlier version
    chosen = (tried or {}).get(f"{sight} x{rehearsed:g}", {})
    how_far = ("as far as its nearest held-out normal" if reach == 1 else
               f"{reach:g} times its distance to the nearest held-out normal")
    what = (f"A marked normal compares images on {SIGHT_WORDS.get(sight, sight)}, and reaches "
            f"{how_far}")
    within = bool(chosen) and chosen["auroc_loss"] <= MAX_AUROC_LOSS \
        and chosen.get("detection_loss", 0.0) <= MAX_DETECTION_LOSS
    if reach != rehearsed and (lessons.get("sort") or {}).get("taught"):
        why = (": the marks are of one sort, which carries the lesson to the rest of it (see "
               f"below); the reach rehearsed on held-out false alarms, {rehearsed:g} times, is "
               "for false alarms not of one sort, which it clears by lowering every image near "
               "the marks a little")
    elif reach != rehearsed:
        n = lessons.get("marked_normals", 0)
        told = "1 marked normal is" if n == 1 else f"{n} marked normals are"
        why = (f" (its look-alikes): {told} too few (fewer than {MIN_REHEARSED_MARKS}) to speak "
               "for other false alarms; the reach rehearsed on held-out false alarms, "
               f"{rehearsed:g} times, is for a batch of marks, and about one or two far marks "
               "it lowers many images a little, anomalies among them")
    elif within:
        why = (f": of the {len(tried)} lessons rehearsed on held-out normals (half of their false "
               "alarms marked), the one that cleared most of the other false alarms "
               f"({chosen['cleared']:.0%}; it reached {chosen['ordinary_reached']:.0%} of the "
               "ordinary normals) within the costs allowed: it moved the pseudo-anomaly AUROC by "
               f"{-chosen['auroc_loss']:+.4f} and cost {chosen['detection_loss']:.0%} of the "
               "pseudo-anomalies caught")
    elif chosen:
        why = (f": none of the {len(tried)} lessons rehearsed on held-out normals stayed within "
               f"the costs allowed ({MAX_AUROC_LOSS:g} pseudo-anomaly AUROC, "
               f"{MAX_DETECTION_LOSS:.0%} of the pseudo-anomalies caught), so the default")
    elif tried is not None:
        why = ": too few held-out false alarms to rehearse on, so the default"
    else:
        why = ""
    shrink = lessons.get("anomaly_shrink", 1.0)
    anomaly = ("A marked anomaly reaches at most as far as its nearest held-out normal"
               if shrink == 1 else f"A marked anomaly reaches at most {shrink:g} times its "
               "distance to the nearest held-out normal, so that it holds none of the held-out "
               "normals it was not sized on,")
    anomaly += (" and, judging by how far the held-out normals are, no more than a small tail "
                "of all normals.")
    normal = f"{what}{why}." if lessons.get("keys", 1) != lessons.get("anomaly_keys", 0) else ""
    told = [normal, anomaly if lessons.get("anomaly_keys", 1) else "",
            *(kind_story(k) for k in lessons.get("kinds", [])),
            sort_story(lessons.get("sort"))]
    return " ".join(t for t in told if t)


def sort_story(sort: dict | None) -> str:
    """Whether the images marked normal were of one sort, and what that taught (see
    core/model/lessons.py `fit_sort`); "" with too few of them."""
    if not sort:
        return ""
    told = f"The {sort['marks']} images marked normal"
    if not sort["generalises"]:
        z = sort["left_out_z"]
        stood = "" if z is None else (f" (the median stood {z:+.1f} spreads of the normals "
                                      f"from where they end; {MIN_SORT_Z:+g} needed)")
        return (f"{told} are not of one sort: left out one at a time, they did not stand "
                f"clearly past the held-out normals in the direction the others drew{stood}, so "
                "they clear their look-alikes alone.")
    if sort["relief"] <= 0:
        return (f"{told} are of one sort but score no higher than a typical normal: nothing "
                "to lower.")
    cost = (f"{sort['detection_loss']:.0%} of the pseudo-anomalies caught and "
            f"{sort['auroc_loss']:+.4f} of their AUROC")
    if not sort["taught"]:
        return (f"{told} are of one sort, but lowering it would have cost {cost} (at most "
                f"{MAX_DETECTION_LOSS:.0%} and {MAX_AUROC_LOSS:g}): they look like an anomaly "
                "the run should catch, so only their look-alikes are cleared.")
    return (f"{told} are of one sort (each, left out of its direction, still stood "
            f"{sort['left_out_z']:.1f} spreads of the normals past them, the median): images "
            f"that differ from the held-out normals as they do score up to {sort['relief']:.2f} "
            "lower, the least any mark scored above a typical normal, so that an image of the "
            f"sort keeps what an anomaly adds to it; on pseudo-anomalies this cost {cost}.")


def kind_story(kind: dict) -> str:
    """Whether the images marked with one anomaly type taught its kind, and why."""
    told = f"The {kind['marks']} images marked {kind['label']!r}"
    if kind["left_out_z"] is None:
        return f"{told} are too few to teach their kind beyond their look-alikes."
    if kind["generalises"]:
        return (f"{told} teach their kind: images that differ from the held-out normals in the "
                "way they do are raised to the alarm score or beyond (each mark, left out of that "
                f"direction, still stood {kind['left_out_z']:.1f} spreads of the normals past "
                "them, the median).")
    return (f"{told} teach nothing beyond their look-alikes: left out one at a time, they did "
            f"not stand clearly past the held-out normals in the direction the others drew "
            f"(the median stood {kind['left_out_z']:+.1f} spreads of the normals from where "
            f"they end; {MIN_KIND_Z:+g} needed).")


def with_lessons(parent: AnoMem, keys: torch.Tensor, anomalous: torch.Tensor,
                 context: Context, kinds: Kinds, marked_normals: int) -> AnoMem:
    """A copy of `parent` (on the CPU) taught the keys (K, dim) of marked images, `anomalous`
    (K,) saying which are anomalies, and the `kinds` of marked anomaly types, besides the
    lessons the parent already had; `marked_normals`: how many images the keys of marked
    normals come from (`marked_reach`)."""
    sights = key_sights(tuple(parent.descriptor_blocks), anomalous, context.sight,
                        context.anomaly_sight)
    reach = torch.full((len(keys),), marked_reach(context, kinds, marked_normals))
    if parent.lessons is not None:  # a refit of a refit keeps what its parent was taught
        taught = parent.lessons.cpu()
        keys = torch.cat([taught.keys, keys])
        anomalous = torch.cat([taught.anomalous, anomalous])
        sights = torch.cat([taught.sight, sights])
        kinds = Kinds.cat([taught.kinds, kinds], keys.shape[1])
        reach = torch.cat([taught.reaches(context.references), reach])
    model = AnoMem(dataclasses.replace(parent.cfg, lessons=len(keys), lesson_kinds=len(kinds.cut)),
                   pretrained=False)
    state = {k: v for k, v in parent.state_dict().items() if not k.startswith("lessons.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not all(k.startswith("lessons.") for k in missing):
        raise RuntimeError(f"lessons: the parent's weights do not fit ({missing}, {unexpected})")
    assert model.lessons is not None
    model.lessons.teach(keys, anomalous, context.references, context.scores, reach,
                        sights=sights, kinds=kinds)
    return model.eval()


def marked_reach(context: Context, kinds: Kinds, marked_normals: int) -> float:
    """How far a refit's `marked_normals` marked normals reach, given the kinds it teaches:
    the reach rehearsed on held-out false alarms (`choose_lesson`), or only as far as their
    nearest held-out normal (their look-alikes: images nearer a mark than it is to any
    held-out normal) in two cases. Held-out false alarms are not of one sort: a reach past
    the nearest normal clears them by lowering every image near the marks a little.
    - Marks of one sort (a row of `kinds` that lowers scores) have their sort to carry the
      lesson; their balls, which far from the normals would hold them all, hold look-alikes
      alone (on the teach protocol's sorts, Fashion-MNIST kept every anomaly caught, 95.2 and
      46.9 %, where the rehearsed reach lost 3.1 and 0.6 points; benchmarks/README.md).
    - Fewer than MIN_REHEARSED_MARKS marks: the rehearsal marks a batch of held-out false
      alarms, and its pull is a batch's; one or two far marks, each a ball of 1.3 times its
      distance to the nearest normal, passed up to 130 of Fashion-MNIST ankle boot's test
      anomalies for 10 normals cleared; at their nearest normal, one or two marks changed at
      most 2 verdicts beyond themselves on the protocol's nine runs, each a look-alike's.
      Rehearsing one or two marks instead was tried and is no guide: with pseudo-anomalies
      at the cost's edge it picked the queries x1.1 on CIFAR-10 and passed 240 to 305."""
    if bool((kinds.relief > 0).any()) or marked_normals < MIN_REHEARSED_MARKS:
        return 1.0
    return context.reach


def describe_images(model: AnoMem, images: torch.Tensor, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores before any lesson (N,) and look-alike descriptors (N, dim) of uint8 images."""
    scored = score_images(model, images, device, with_maps=False)
    assert scored.untaught is not None and scored.descriptors is not None
    return torch.from_numpy(scored.untaught), torch.from_numpy(scored.descriptors)


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


def _stack(marks: list[Marked]) -> torch.Tensor:
    return torch.from_numpy(np.stack([m.image for m in marks])).permute(0, 3, 1, 2).contiguous()


def _views(marks: list[Marked], seed: int) -> torch.Tensor:
    """Each marked image, then VIEWS - 1 rounds of mildly augmented views of them all, as
    uint8: a lesson should reach the same thing slightly moved, cropped or lit."""
    images = _stack(marks)
    g = torch.Generator().manual_seed(seed)
    mild = AugmentConfig(crop_scale=(0.85, 1.0))
    views = [images] + [(augment(images, mild, g) * 255).round().to(torch.uint8)
                        for _ in range(VIEWS - 1)]
    return torch.cat(views)


def _compare(parent: str, before: AnoMem, after: AnoMem, after_scores: np.ndarray, split: Split,
             marks: list[Marked], seconds: float, device: str,
             before_scores: np.ndarray | None = None) -> RefitReport:
    """Both models on the test set less the marked images; the new model's scores of the
    whole test set are given (its evaluation computed them already), the parent's when
    known. The marked test images are reported apart, with their scores before and after."""
    test = split.test
    marked = sorted({i for m in marks if (i := test_index(m.mark.source)) is not None})
    keep = np.setdiff1d(np.arange(len(test)), marked)
    labels = test.labels.numpy()
    if before_scores is None:
        before_scores = score_images(before, test.images, device, with_maps=False).image
    scores = {"before": before_scores, "after": after_scores}
    thresholds = {"before": float(before.detector.threshold),
                  "after": float(after.detector.threshold)}
    flagged = {k: scores[k] > thresholds[k] for k in scores}
    rows = {}
    for name in ("before", "after"):
        m = image_metrics(labels[keep], scores[name][keep], [test.types[i] for i in keep])
        rows[name] = {"auroc": m["auroc"], "auroc_by_type": m["auroc_by_type"],
                      "threshold": thresholds[name],
                      **at_threshold(labels[keep], scores[name][keep], thresholds[name])}

    def entry(i: int) -> dict:
        return {"index": int(i), "type": test.types[i], "name": test.names[i],
                "before": float(scores["before"][i]), "after": float(scores["after"][i]),
                "verdict": "anomalous" if flagged["after"][i] else "normal"}

    changed = [entry(i) for i in keep if flagged["before"][i] != flagged["after"][i]]
    n_normal = sum(m.mark.label == NORMAL for m in marks)
    return RefitReport(parent, seconds, n_normal, len(marks) - n_normal, len(keep),
                       rows["before"], rows["after"], changed, [entry(i) for i in marked])
