"""Typed configuration shared by the model, the trainer, the CLI and the app.

Every knob lives in one of four small dataclasses. A run folder stores them as JSON
(`RunConfig.to_dict`) and `RunConfig.from_dict` rebuilds them, so a checkpoint never needs a
guess about the architecture. The presets, and the one function that builds a run's config
from a preset, the data and the budget, are in core/presets.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = 12
# The fields each version added, and the values that reproduce a run stored before it.
ADDED_IN = {
    2: [("model", "local_map", "shared")],
    3: [("train", "shift_fraction", 1.0)],
    4: [("model", "pixel_memory", 0), ("model", "pixel_size", 32)],
    5: [("lineage", None, {"parent": None, "marks": []})],  # a section: name None
    6: [("model", "rotation", False), ("train", "w_rotation", 1.0)],
    7: [("model", "map_weights", False)],
    8: [("model", "pixel_layout", False)],
    9: [("model", "backbone", "resnet"), ("model", "input_size", 0), ("train", "views", 2),
        ("train", "cache_images", 2048)],
    10: [("model", "image_shape", []), ("data", "keep_aspect", False)],
    11: [("model", "lessons", 0)],
    12: [("model", "lesson_kinds", 0)],
}
# Distribution-shifted pseudo-anomalies (core/train/shifts.py), and how stage 2 weighs its terms
SHIFTS = ("jigsaw", "rotate", "cutpaste", "scar", "blend", "colour")
COMBINE = ("checked", "learned", "fixed")
SETTINGS = ("one-class", "unbalanced")
# The encoders and the stages each can put a memory on. "resnet" is trained from scratch (the
# paper's); "efficientnet-lite0" is frozen with its ImageNet weights (core/model/efficientnet.py),
# its stages named by index and stride.
BACKBONES = {
    "resnet": ("layer1", "layer2", "layer3", "layer4"),
    "efficientnet-lite0": ("stage1_s2", "stage2_s4", "stage3_s8", "stage4_s16", "stage5_s16",
                           "stage6_s32", "stage7_s32"),
}
MAX_SIDE = 1024  # pixels, either side of the images a model reads
MAX_LESSONS = 100_000  # keys of marked images (core/model/lessons.py)
MAX_BLOCKS = 64  # per ResNet stage (ResNet-152 has 36): a stored config cannot ask for more


class ConfigError(ValueError):
    """A configuration value is out of range or a stored config cannot be read."""


def scaled_shape(shape: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(height, width) `shape` scaled so that its shorter side is `short_side`: how the
    encoder resizes an image (core/model/efficientnet.py)."""
    h, w = shape
    factor = short_side / min(h, w)
    return max(1, round(h * factor)), max(1, round(w * factor))


@dataclass
class ModelConfig:
    """Architecture of the encoder, the memories and the detector."""

    image_size: int = 32  # side of square images; the shorter side of others
    # (height, width) of non-square images (a data set read at its aspect: core/data/mvtec.py),
    # the shorter side being image_size; empty for square ones
    image_shape: tuple[int, ...] = ()
    in_channels: int = 3
    backbone: str = "resnet"  # one of BACKBONES
    # The size the encoder resizes images to (0: image_size), the shorter side for non-square
    # images. The pretrained encoder sees small images upsampled, as it saw ImageNet's photos.
    input_size: int = 0
    blocks: tuple[int, ...] = (1, 1, 1, 1)  # resnet: BasicBlocks per stage (ResNet-18: 2,2,2,2)
    width: float = 0.25  # resnet: channel multiplier on (64, 128, 256, 512)
    scales: tuple[str, ...] = ("layer2", "layer3", "layer4")  # stages that carry a memory
    memory_size: int = 64  # prototypes per scale
    memory_dim: int = 64  # prototype / query dimension
    beta: float = 16.0  # Hopfield inverse temperature on cosine similarities
    learn_beta: bool = False
    head_dim: int = 64  # output of the contrastive projection head
    topk_ratio: float = 0.05  # share of positions averaged for a scale's local score
    layout_grid: int = 8  # the detector's layout term sees each map pooled to g x g at most
    layout_rank: int = 256  # principal directions kept by the layout's PPCA Gaussian
    layout_source: str = "query"  # map the layout term reads: "query" or "deviation"
    local_weight: float = 0.0  # share of the local (top-k deviation) term in a scale's score
    # The local term's Gaussian: "shared" by all positions, or "positional" (one per position,
    # for aligned images; the presets choose it for MVTec AD)
    local_map: str = "shared"
    # The pixel scale: up to this many normal training images kept as pixel_size thumbnails, an
    # image's term being its cosine distance to the nearest of them (0: no pixel scale)
    pixel_memory: int = 4096
    pixel_size: int = 32
    # The pixel scale's layout term: the image pooled to the layout grid, under a Gaussian of
    # normal images (core/model/pixels.py)
    pixel_layout: bool = True
    # A 4-way rotation head on the deepest stage (RotNet / GEOM): trained in stage 1, and how
    # badly it recognises an image's rotations is one more term of the detector
    rotation: bool = False
    # Weigh the scales of the pixel map by how well each finds pasted defects on held-out
    # normals (core/train/stage2.py); false: every scale counts the same
    map_weights: bool = True
    # Keys of marked images a refit taught the detector (core/model/lessons.py); 0: none
    lessons: int = 0
    # Kinds of marked anomalies (a direction per marked type) and sorts of marked normals (a
    # direction per refit whose normal marks are of one sort) among those lessons
    lesson_kinds: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.blocks, list | tuple) or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in self.blocks):
            raise ConfigError(f"blocks={self.blocks!r}: expected four integers")
        self.blocks = tuple(self.blocks)
        self.scales = tuple(str(s) for s in self.scales)
        if not 8 <= self.image_size <= MAX_SIDE:
            raise ConfigError(f"image_size={self.image_size}: expected 8..{MAX_SIDE} pixels")
        self.image_shape = tuple(self.image_shape)
        if self.image_shape and (
                len(self.image_shape) != 2 or min(self.image_shape) != self.image_size
                or max(self.image_shape) > MAX_SIDE
                or not all(isinstance(v, int) for v in self.image_shape)):
            raise ConfigError(f"image_shape={list(self.image_shape)}: expected [] (square) or "
                              f"[height, width] whose shorter side is image_size="
                              f"{self.image_size} and longer at most {MAX_SIDE}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"in_channels={self.in_channels}: expected 1 or 3")
        if len(self.blocks) != 4 or min(self.blocks) < 1 or max(self.blocks) > MAX_BLOCKS:
            raise ConfigError(f"blocks={self.blocks}: expected four block counts in "
                              f"1..{MAX_BLOCKS}")
        if not 0.05 <= self.width <= 4:
            raise ConfigError(f"width={self.width}: expected a multiplier in 0.05..4")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone={self.backbone!r}: expected one of "
                              f"{', '.join(BACKBONES)}")
        valid = BACKBONES[self.backbone]
        if not self.scales or not set(self.scales) <= set(valid):
            raise ConfigError(f"scales={self.scales}: expected a non-empty subset of "
                              f"{', '.join(valid)} (the stages of {self.backbone})")
        if self.input_size != 0 and not 32 <= self.input_size <= 1024:
            raise ConfigError(f"input_size={self.input_size}: expected 0 (the image size) or "
                              "32..1024 pixels")
        if self.input_size != 0 and self.backbone == "resnet":
            raise ConfigError(f"input_size={self.input_size}: the resnet encoder reads images "
                              "at image_size (set input_size=0)")
        if self.rotation and self.pretrained:
            raise ConfigError("rotation=true: the rotation head trains the encoder, and the "
                              f"{self.backbone} encoder is frozen (use backbone=resnet)")
        for name in ("image_size", "in_channels", "input_size", "memory_size", "memory_dim",
                     "head_dim", "layout_grid", "layout_rank", "pixel_memory", "pixel_size",
                     "lessons", "lesson_kinds"):
            _require_int(self, name)
        if self.memory_size < 2 or self.memory_dim < 2:
            raise ConfigError("memory_size and memory_dim must be at least 2")
        if self.head_dim < 2:
            raise ConfigError(f"head_dim={self.head_dim}: expected at least 2")
        if self.beta <= 0:
            raise ConfigError(f"beta={self.beta}: expected a positive inverse temperature")
        if self.local_map not in ("shared", "positional"):
            raise ConfigError(f"local_map={self.local_map!r}: expected shared or positional")
        if not 1 <= self.layout_grid <= 16:
            raise ConfigError(f"layout_grid={self.layout_grid}: expected 1..16")
        if not 1 <= self.layout_rank <= 4096:
            raise ConfigError(f"layout_rank={self.layout_rank}: expected 1..4096")
        if self.layout_source not in ("query", "deviation"):
            raise ConfigError(f"layout_source={self.layout_source!r}: expected query or deviation")
        if not 0 <= self.local_weight <= 1:
            raise ConfigError(f"local_weight={self.local_weight}: expected 0..1")
        if not 0 < self.topk_ratio <= 1:
            raise ConfigError(f"topk_ratio={self.topk_ratio}: expected 0 < ratio <= 1")
        if self.pixel_memory != 0 and not 2 <= self.pixel_memory <= 100_000:
            raise ConfigError(f"pixel_memory={self.pixel_memory}: expected 0 (none) or "
                              "2..100000 stored images")
        if not 0 <= self.lessons <= MAX_LESSONS:
            raise ConfigError(f"lessons={self.lessons}: expected 0..{MAX_LESSONS} keys")
        if not 0 <= self.lesson_kinds <= (MAX_LESSONS if self.lessons else 0):
            raise ConfigError(f"lesson_kinds={self.lesson_kinds}: expected 0..{MAX_LESSONS}, "
                              "and 0 without lessons")
        if not 4 <= self.pixel_size <= 128:
            raise ConfigError(f"pixel_size={self.pixel_size}: expected 4..128 pixels")

    @property
    def pretrained(self) -> bool:
        """Whether the encoder is a frozen ImageNet-pretrained one (not trained by stage 1)."""
        return self.backbone != "resnet"

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the images the model reads."""
        h, w = self.image_shape or (self.image_size, self.image_size)
        return h, w

    @property
    def encoder_size(self) -> int:
        """The side (the shorter one) of the images the encoder sees."""
        return self.input_size or self.image_size

    @property
    def encoder_shape(self) -> tuple[int, int]:
        """(height, width) of the images the encoder sees: the image scaled to encoder_size."""
        return scaled_shape(self.shape, self.encoder_size)


@dataclass
class AugmentConfig:
    """Batched view augmentations for stage 1 (see core/train/augment.py).

    Colour jitter is kept mild by default: a memory that is invariant to colour cannot
    flag a style anomaly whose only difference is its palette.
    """

    crop_scale: tuple[float, float] = (0.6, 1.0)
    flip: bool = True
    jitter: float = 0.15  # brightness / contrast / saturation strength
    hue: float = 0.02  # hue shift, as a fraction of the colour circle
    grayscale_p: float = 0.0

    def __post_init__(self) -> None:
        try:
            lo, hi = (float(v) for v in self.crop_scale)
        except (TypeError, ValueError):
            raise ConfigError(f"crop_scale={self.crop_scale!r}: expected two numbers") from None
        self.crop_scale = (lo, hi)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop_scale={self.crop_scale}: expected 0 < min <= max <= 1")
        if not 0 <= self.jitter <= 1 or not 0 <= self.hue <= 0.5:
            raise ConfigError("jitter must be in 0..1 and hue in 0..0.5")
        if not 0 <= self.grayscale_p <= 1:
            raise ConfigError(f"grayscale_p={self.grayscale_p}: expected a probability")


@dataclass
class TrainConfig:
    """Optimisation of both stages; the loss weights name the terms of core/train/losses.py."""

    epochs: int = 20  # the scratch preset: about two minutes on a 2-core CPU
    # Frozen encoder: augmented views of each training image whose features are computed once
    # and cached; each step pairs two of them (more views, more variety, a longer start)
    views: int = 2
    cache_images: int = 2048  # ... of at most this many normal images (a random subset)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    w_memory_contrast: float = 1.0  # NT-Xent: view a's representation vs view b's read-out
    w_view_contrast: float = 0.5  # plain SimCLR term between the two views' representations
    w_align: float = 1.0  # per-position pull of queries towards their read-out (normal only)
    w_variance: float = 1.0  # keeps prototypes spread out
    w_usage: float = 0.1  # keeps every prototype read
    w_anomaly: float = 1.0  # pushes labelled anomalies away from their read-out
    w_rotation: float = 1.0  # cross-entropy of the rotation head (when ModelConfig.rotation)
    anomaly_margin: float = 0.0
    # Distribution-shifted copies of each batch (CSI) as extra contrastive negatives, any of
    # SHIFTS (core/train/shifts.py); empty to turn off. The presets add the local defects
    # (cutpaste, scar) on aligned data.
    shift_negatives: tuple[str, ...] = ("jigsaw",)
    # Share of a batch's normals that get a shifted copy: below 1 a step costs less, at the
    # price of fewer pseudo-anomalies per step (see `anomem bench --suites speed`).
    shift_fraction: float = 1.0
    # How stage 2 weighs scales and terms: "fixed" (ModelConfig.local_weight within a scale,
    # scales and the pixel term equal), "learned" (against pseudo-anomalies of held-out normals)
    # or "checked": learned only where weights fitted without a kind of pseudo-anomaly beat the
    # fixed ones on that kind (see core/train/stage2.py).
    combine: str = "checked"
    max_minutes: float | None = None  # wall-clock budget for both stages
    stage1_share: float = 0.85  # share of the budget given to stage 1
    holdout: float = 0.15  # share of normal training images kept for calibration
    threshold_quantile: float = 0.95
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**_checked_fields(AugmentConfig, self.augment,
                                                           "train.augment"))
        if not isinstance(self.augment, AugmentConfig):
            raise ConfigError(f"augment={self.augment!r}: expected an augmentation section")
        for name in ("epochs", "batch_size", "seed", "views", "cache_images"):
            _require_int(self, name)
        self.shift_negatives = tuple(self.shift_negatives)
        if not set(self.shift_negatives) <= set(SHIFTS):
            raise ConfigError(
                f"shift_negatives={self.shift_negatives}: expected some of {', '.join(SHIFTS)}"
            )
        if not 0 < self.shift_fraction <= 1:
            raise ConfigError(f"shift_fraction={self.shift_fraction}: expected 0 < share <= 1")
        if not 2 <= self.views <= 16:
            raise ConfigError(f"views={self.views}: expected 2..16 cached views per image")
        if self.cache_images < 2:
            raise ConfigError(f"cache_images={self.cache_images}: expected at least 2")
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError("epochs must be >= 1 and batch_size >= 2")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError("lr and temperature must be positive")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay}: expected >= 0")
        if self.w_rotation < 0:
            raise ConfigError(f"w_rotation={self.w_rotation}: expected >= 0")
        if self.combine not in COMBINE:
            raise ConfigError(f"combine={self.combine!r}: expected one of {', '.join(COMBINE)}")
        if not 0 < self.stage1_share <= 1:
            raise ConfigError(f"stage1_share={self.stage1_share}: expected 0 < share <= 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"max_minutes={self.max_minutes}: expected a positive number")
        if not 0 < self.holdout < 0.9:
            raise ConfigError(f"holdout={self.holdout}: expected a share in (0, 0.9)")
        if not 0.5 <= self.threshold_quantile < 1:
            raise ConfigError("threshold_quantile must be in [0.5, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: expected auto, cpu or cuda")


@dataclass
class DataConfig:
    """Which data set, which normal class, which protocol."""

    dataset: str = "shapes"
    root: str | None = None
    normal_class: str | None = None  # None: the data set's first class
    setting: str = "one-class"
    anomaly_ratio: float = 0.05  # unbalanced: labelled anomalies / normal training images
    anomaly_classes: tuple[str, ...] = ()  # unbalanced: where labelled anomalies come from
    image_size: int | None = None  # None: the data set's native working size
    # Read a data set whose images are not square at their aspect, image_size being the shorter
    # side (MVTec-layout categories: core/data/mvtec.py); False squashes them to a square
    keep_aspect: bool = True
    max_train: int | None = None  # cap on normal training images (None: all)
    seed: int = 0

    def __post_init__(self) -> None:
        self.anomaly_classes = tuple(self.anomaly_classes)
        if self.setting not in SETTINGS:
            raise ConfigError(f"setting={self.setting!r}: expected one of {', '.join(SETTINGS)}")
        if not 0 < self.anomaly_ratio <= 1:
            raise ConfigError(f"anomaly_ratio={self.anomaly_ratio}: expected 0 < ratio <= 1")
        if self.image_size is not None and (not isinstance(self.image_size, int)
                                            or not 8 <= self.image_size <= MAX_SIDE):
            raise ConfigError(f"image_size={self.image_size!r}: expected 8..{MAX_SIDE} pixels")
        if self.max_train is not None and (not isinstance(self.max_train, int)
                                           or self.max_train < 4):
            raise ConfigError(f"max_train={self.max_train!r}: expected at least 4 images")


MARK_FIELDS = ("source", "sha256", "label")


@dataclass
class LineageConfig:
    """Where a run comes from: trained from scratch (no parent), or its parent (all of it) with
    the lessons of marked images added (core/refit.py). Each mark is a dict of MARK_FIELDS:
    the image's path, upload name or test-set index, its SHA-256, and "normal" or a type."""

    parent: str | None = None
    marks: tuple[dict[str, str], ...] = ()

    def __post_init__(self) -> None:
        self.marks = tuple(self.marks)
        for mark in self.marks:
            if not isinstance(mark, dict) or sorted(mark) != sorted(MARK_FIELDS) or not all(
                    isinstance(v, str) for v in mark.values()):
                raise ConfigError(f"lineage.marks: {_short(mark)}: expected an object of "
                                  f"strings {', '.join(MARK_FIELDS)}")
        if self.marks and self.parent is None:
            raise ConfigError("lineage: marks without a parent run")


@dataclass
class RunConfig:
    """Everything a run folder needs to rebuild and re-evaluate its model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preset: str = "quick"
    version: int = CONFIG_VERSION
    lineage: LineageConfig = field(default_factory=LineageConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checked(self) -> RunConfig:
        """A copy with every check run again: for configs edited field by field."""
        return RunConfig.from_dict(self.to_dict())

    @classmethod
    def from_dict(cls, raw: Any) -> RunConfig:
        """Rebuild from JSON; any missing, unknown or mistyped field raises ConfigError."""
        if not isinstance(raw, dict):
            raise ConfigError("config: expected a JSON object")
        raw = _upgraded(raw)
        version = raw.get("version")
        if not _fits(version, int) or version != CONFIG_VERSION:
            raise ConfigError(
                f"config version {version!r}: this anomem reads version {CONFIG_VERSION} "
                "(retrain the run with this version)"
            )
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"config: unknown {', '.join(map(_key, unknown))}")
        if not isinstance(raw.get("preset", "quick"), str):
            raise ConfigError(f"config: preset={_short(raw['preset'])}: expected a string")
        sections = {}
        for name, kind in (("model", ModelConfig), ("train", TrainConfig), ("data", DataConfig),
                           ("lineage", LineageConfig)):
            if not isinstance(raw.get(name), dict):
                raise ConfigError(f"config: missing or malformed section {name!r}")
            sections[name] = _checked_fields(kind, raw[name], name)
        try:
            return cls(
                model=ModelConfig(**sections["model"]),
                train=TrainConfig(**sections["train"]),
                data=DataConfig(**sections["data"]),
                preset=raw.get("preset", "quick"),
                version=version,
                lineage=LineageConfig(**sections["lineage"]),
            )
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config: {err}") from None


def with_overrides(cfg: RunConfig, settings: list[str] | tuple[str, ...]) -> RunConfig:
    """`cfg` with "section.field=value" settings applied (the value read as JSON, else as a
    string: "model.rotation=true", "train.lr=1e-3", "train.augment.flip=false"), every check
    run again."""
    raw = cfg.to_dict()
    for setting in settings:
        key, sep, text = setting.partition("=")
        *path, name = key.strip().split(".")
        if not sep or not path:
            raise ConfigError(f"setting {setting!r}: expected SECTION.FIELD=VALUE, "
                              "e.g. model.rotation=true")
        section: Any = raw
        for part in path:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or name not in section or isinstance(section[name],
                                                                              dict):
            raise ConfigError(f"setting {setting!r}: no field {key.strip()!r}; expected one "
                              f"of {', '.join(_field_paths(raw))}")
        try:
            section[name] = json.loads(text)
        except json.JSONDecodeError:
            section[name] = text
    return RunConfig.from_dict(raw)


def _field_paths(raw: dict, prefix: str = "") -> list[str]:
    """ "model.image_size", ..., "train.augment.flip", ...: every settable field of a config."""
    paths = []
    for name, value in raw.items():
        if isinstance(value, dict):
            paths += _field_paths(value, f"{prefix}{name}.")
        elif prefix:
            paths.append(f"{prefix}{name}")
    return paths


def _upgraded(raw: dict) -> dict:
    """An older config with each field added since given the value its run was trained with."""
    version = raw.get("version")
    if type(version) is not int or not 1 <= version < CONFIG_VERSION:
        return raw
    for added in range(version + 1, CONFIG_VERSION + 1):
        for section, name, value in ADDED_IN[added]:
            if name is None:  # a whole section
                raw = {section: value, **raw}
            elif isinstance(raw.get(section), dict):
                raw = {**raw, section: {name: value, **raw[section]}}
    return {**raw, "version": CONFIG_VERSION}


def _checked_fields(kind: type, raw: dict, section: str) -> dict:
    """`raw` must name exactly the fields of dataclass `kind`: a stored run never silently
    takes today's default for a field it did not record."""
    names = {f.name for f in dataclasses.fields(kind)}
    missing, unknown = sorted(names - set(raw)), sorted(set(raw) - names)
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
            ([f"unknown {', '.join(map(_key, unknown))}"] if unknown else [])
        raise ConfigError(f"config section {section!r}: {'; '.join(parts)}")
    for name, hint in typing.get_type_hints(kind).items():
        if not _fits(raw[name], hint):
            raise ConfigError(f"config: {section}.{name}={_short(raw[name])}: expected "
                              f"{_describe(hint)}")
    return raw


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has a field's annotated type (a list stands for a tuple, an int
    for a float; numbers must be finite). Nested sections are checked on their own."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool or hint is str:
        return isinstance(value, hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        try:
            return math.isfinite(value)
        except OverflowError:  # an integer beyond the range of a float
            return False
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(
            _fits(v, a) for v, a in zip(value, args, strict=True))
    return True


def _describe(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}items, each {_describe(args[0])}"
    names = {bool: "true or false", int: "an integer", float: "a finite number",
             str: "a string", type(None): "null"}
    return names.get(hint, str(hint))


def _key(name: str) -> str:
    """A stored key as a message shows it: quoted unless it is a plain identifier."""
    return name if name.isidentifier() else repr(name)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _require_int(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected an integer")
