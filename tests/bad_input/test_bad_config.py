"""config.json: read_config, load_run, list_runs and `anomem score`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.config import CONFIG_VERSION, RunConfig
from core.model.anomem import AnoMem
from core.runs import CONFIG, WEIGHTS, RunError, list_runs, load_run, read_config
from tests.bad_input.cases import (
    TINY,
    cases,
    run_cli,
    run_copy,
    snapshot,
)

VALID = json.loads(json.dumps(RunConfig(model=TINY).to_dict()))
OPTIONAL = {("data", "root"): "str", ("data", "normal_class"): "str",
            ("data", "image_size"): "int", ("data", "max_train"): "int",
            ("train", "max_minutes"): "number", ("lineage", "parent"): "str"}
LIST_OF = {("data", "anomaly_classes"): "str",  # element kinds of lists stored empty
           ("lineage", "marks"): "object", ("model", "image_shape"): "int"}


def field_paths(node: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in node.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += field_paths(value, (*prefix, key))
    return paths


FIELDS = field_paths(VALID)


def kind_of(path: tuple[str, ...]) -> tuple[str, str | None]:
    """The JSON kind a stored field takes, (kind, element kind of a list), from the defaults."""
    value = VALID
    for key in path:
        value = value[key]
    if value is None:
        return OPTIONAL[path], None
    if isinstance(value, list):
        return "list", LIST_OF.get(path) or kind_name(value[0])
    return kind_name(value), None


def kind_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    return {str: "str", dict: "object", list: "list"}[type(value)]


def fits(value: Any, kind: str) -> bool:
    if kind == "number":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and np.isfinite(value))
    return value is not None and kind_name(value) == kind


def wrong_for(path: tuple[str, ...], value: Any) -> bool:
    kind, element = kind_of(path)
    if path in OPTIONAL and value is None:
        return False
    if kind == "list" and isinstance(value, list):
        return not all(fits(v, element or "") for v in value)
    return not fits(value, kind)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)


def edited(path: tuple[str, ...], edit: Callable[[dict, str], None]) -> str:
    raw = json.loads(json.dumps(VALID))
    node = raw
    for key in path[:-1]:
        node = node[key]
    edit(node, path[-1])
    return json.dumps(raw)


def not_json(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return True
    return False


@st.composite
def malformed_configs(draw: st.DrawFn) -> tuple[bytes, tuple[str, ...]]:
    """(content of config.json, what its message must contain)."""
    kind = draw(st.sampled_from(["bytes", "cut", "deep", "long int", "value", "type", "missing",
                                 "extra"]))
    text = json.dumps(VALID, indent=2)
    if kind == "bytes":
        return draw(st.binary(max_size=300).filter(not_json)), ("not valid JSON",)
    if kind == "cut":  # a prefix of a JSON object is never a JSON document
        return text[:draw(st.integers(0, len(text) - 1))].encode(), ("not valid JSON",)
    if kind == "deep":
        return b"[" * draw(st.integers(10_000, 200_000)), ("not valid JSON",)
    if kind == "long int":  # more digits than Python turns into an int
        digits = "9" * draw(st.integers(4301, 10_000))
        return text.replace('"seed": 0', f'"seed": {digits}', 1).encode(), ("not valid JSON",)
    if kind == "value":  # any JSON document but a config
        return json.dumps(draw(JSON_VALUES)).encode(), ()
    if kind == "type":
        path = draw(st.sampled_from(FIELDS))
        value = draw(JSON_VALUES.filter(lambda v: wrong_for(path, v)))
        return edited(path, lambda node, key: node.update({key: value})).encode(), (path[-1],)
    if kind == "missing":  # "preset" alone may be left out: it then reads as "quick"
        path = draw(st.sampled_from([p for p in FIELDS if p != ("preset",)]))
        return edited(path, lambda node, key: node.pop(key)).encode(), (path[-1],)
    section = draw(st.sampled_from([(), ("model",), ("train",), ("data",), ("train", "augment")]))
    node = VALID
    for key in section:
        node = node[key]
    name = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in node))
    value = draw(JSON_VALUES)
    content = edited((*section, name), lambda node, key: node.update({key: value}))
    shown = name if name.isidentifier() else repr(name)
    return content.encode(), (f"unknown {shown}",)


@cases("malformed config.json")
@given(case=malformed_configs())
def test_malformed_config_json_is_a_run_error_naming_the_file(
        saved_run: Path, image_dir: Path, case: tuple[bytes, tuple[str, ...]]) -> None:
    content, needles = case
    with run_copy(saved_run) as run:
        file = run / CONFIG
        file.write_bytes(content)
        before = snapshot(run.parent)
        with pytest.raises(RunError) as info:
            read_config(run)
        message = str(info.value)
        assert message.startswith(f"{file}: ") and "\n" not in message, message
        for needle in needles:
            assert needle in message, (needle, message)
        with pytest.raises(RunError, match="^" + re.escape(message) + "$"):
            load_run(run)
        [summary] = list_runs(run.parent)  # the run is listed as broken, nothing raised
        assert summary.error == message and not summary.complete
        assert run_cli("score", str(run), str(image_dir / "good.png")) == (
            2, "", f"anomem: error: {message}\n")
        assert snapshot(run.parent) == before


INT_FIELDS = [p for p in FIELDS if kind_of(p)[0] == "int"]
NUMBER_FIELDS = [p for p in FIELDS if kind_of(p)[0] == "number"]


@st.composite
def absurd_numbers(draw: st.DrawFn) -> tuple[tuple[str, ...], int | float]:
    """A number field given a number of the right type but any size (finite floats only)."""
    big = st.integers(-10**400, 10**400)
    if draw(st.booleans()):
        return draw(st.sampled_from(INT_FIELDS)), draw(st.integers() | big)
    return draw(st.sampled_from(NUMBER_FIELDS)), draw(
        st.floats(allow_nan=False, allow_infinity=False) | st.integers() | big)


INF = float("inf")
# What each number field accepts, restated from the documented ranges (core/config.py), not
# read from the code under test: (low, high, low included, high included).
RANGES: dict[tuple[str, ...], tuple[float, float, bool, bool]] = {
    ("model", "image_size"): (8, 1024, True, True), ("model", "width"): (0.05, 4, True, True),
    ("model", "memory_size"): (2, INF, True, True), ("model", "memory_dim"): (2, INF, True, True),
    ("model", "beta"): (0, INF, False, True), ("model", "head_dim"): (2, INF, True, True),
    ("model", "topk_ratio"): (0, 1, False, True), ("model", "layout_grid"): (1, 16, True, True),
    ("model", "layout_rank"): (1, 4096, True, True),
    ("model", "local_weight"): (0, 1, True, True),
    ("model", "pixel_size"): (4, 128, True, True),
    ("model", "lessons"): (0, 100_000, True, True),
    ("train", "epochs"): (1, INF, True, True), ("train", "batch_size"): (2, INF, True, True),
    ("train", "views"): (2, 16, True, True), ("train", "cache_images"): (2, INF, True, True),
    ("train", "lr"): (0, INF, False, True), ("train", "weight_decay"): (0, INF, True, True),
    ("train", "w_rotation"): (0, INF, True, True),
    ("train", "temperature"): (0, INF, False, True),
    ("train", "shift_fraction"): (0, 1, False, True),
    ("train", "max_minutes"): (0, INF, False, True),
    ("train", "stage1_share"): (0, 1, False, True), ("train", "holdout"): (0, 0.9, False, False),
    ("train", "threshold_quantile"): (0.5, 1, True, False),
    ("train", "augment", "jitter"): (0, 1, True, True),
    ("train", "augment", "hue"): (0, 0.5, True, True),
    ("train", "augment", "grayscale_p"): (0, 1, True, True),
    ("data", "anomaly_ratio"): (0, 1, False, True), ("data", "image_size"): (8, 1024, True, True),
    ("data", "max_train"): (4, INF, True, True),
}
# Fields that size a tensor of the weights file: another value cannot match it
SHAPES = {("model", k) for k in ("image_size", "in_channels", "width", "memory_size",
                                 "memory_dim", "head_dim", "layout_grid", "layout_rank",
                                 "pixel_memory", "pixel_size", "lessons")}


def loads(path: tuple[str, ...], value: int | float) -> bool:
    """Whether a config with this one number changed must load (the oracle of the test)."""
    if isinstance(value, int) and abs(value) > 1.7e308 and kind_of(path)[0] == "number":
        return False  # no finite float holds it
    if path == ("version",):  # older versions are upgraded: every field is present here
        return 1 <= value <= CONFIG_VERSION
    if path == ("model", "in_channels") and value not in (1, 3):
        return False
    if path == ("model", "pixel_memory") and not (value == 0 or 2 <= value <= 100_000):
        return False
    if path == ("model", "lesson_kinds"):  # kinds need lessons, and the saved run has none
        return value == 0
    if path == ("model", "input_size"):  # the saved run's from-scratch encoder reads images
        return value == 0  # at image_size: any other input size is refused
    if path in RANGES:
        lo, hi, lo_in, hi_in = RANGES[path]
        if not ((lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)):
            return False
    saved = VALID
    for key in path:
        saved = saved[key]
    return path not in SHAPES or value == saved


@cases("absurd numbers in config.json")
@given(case=absurd_numbers())
def test_absurd_numbers_in_config_json_load_exactly_when_in_range(
        saved_run: Path, case: tuple[tuple[str, ...], int | float]) -> None:
    """In range, a value loads and reads back as written; out of range, or sizing a tensor
    other than the stored one, it is a one-line RunError naming the file."""
    path, value = case
    with run_copy(saved_run) as run:
        (run / CONFIG).write_text(edited(path, lambda node, key: node.update({key: value})))
        before = snapshot(run.parent)
        if loads(path, value):
            loaded = load_run(run)
            node = loaded.config.to_dict()
            for key in path:
                node = node[key]
            assert node == value and type(node) is type(value) or (
                isinstance(value, int) and kind_of(path)[0] == "number" and node == value)
            assert isinstance(loaded.model, AnoMem)
        else:
            with pytest.raises(RunError) as err:
                load_run(run)
            message = str(err.value)
            assert message.startswith((f"{run / CONFIG}: ", f"{run / WEIGHTS}: "))
            assert "\n" not in message
        assert [s.name for s in list_runs(run.parent)] == ["run"]
        assert snapshot(run.parent) == before
