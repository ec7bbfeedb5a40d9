"""model.safetensors: load_model, load_run and `anomem score`."""

from __future__ import annotations

import struct
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from core.model.anomem import AnoMem
from core.runs import WEIGHTS, RunError, load_model
from tests.bad_input.cases import (
    TINY,
    cases,
    run_cli,
    run_copy,
    snapshot,
)


@cache
def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in AnoMem(TINY).state_dict().items()}


@cache
def weights_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors(), Path(tmp) / WEIGHTS)
        return (Path(tmp) / WEIGHTS).read_bytes()


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
          torch.int32, torch.int64, torch.bool]


def shown_key(name: str) -> str:
    return name if name.isprintable() else repr(name)


@st.composite
def broken_weights(draw: st.DrawFn) -> tuple[bytes, tuple[str, ...]]:
    """(content of model.safetensors, what the message must contain)."""
    kind = draw(st.sampled_from(["missing", "extra", "shape", "dtype", "bytes", "cut",
                                 "header"]))
    state = dict(tensors())
    names = sorted(state)
    if kind == "bytes":
        return draw(st.binary(max_size=2048)), ("not a readable safetensors file",)
    if kind == "cut":
        data = weights_bytes()
        return data[:draw(st.integers(0, len(data) - 1))], ("not a readable safetensors file",)
    if kind == "header":  # a length prefix, then anything
        body = draw(st.binary(max_size=300))
        length = draw(st.integers(0, 2**64 - 1) | st.just(len(body)))
        return struct.pack("<Q", length) + body, ("not a readable safetensors file",)
    if kind == "missing":
        gone = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names),
                             unique=True))
        for name in gone:
            del state[name]
        needles: tuple[str, ...] = ("tensors do not match config.json",
                                    f"missing {sorted(gone)[0]}")
    elif kind == "extra":
        added = draw(st.lists(st.text(min_size=1, max_size=20).filter(lambda k: k not in state),
                              min_size=1, max_size=3, unique=True))
        for name in added:
            state[name] = torch.zeros(draw(st.lists(st.integers(0, 3), max_size=3)))
        needles = ("tensors do not match config.json",
                   f"unexpected {shown_key(sorted(added)[0])}")
    elif kind == "shape":
        name = draw(st.sampled_from(names))
        shape = tuple(draw(st.lists(st.integers(0, 9), max_size=3).filter(
            lambda s: tuple(s) != tuple(state[name].shape))))
        state[name] = torch.zeros(shape, dtype=state[name].dtype)
        needles = (f"tensor {name} is {shape} ", "config.json expects")
    else:
        name = draw(st.sampled_from(names))
        dtype = draw(st.sampled_from([d for d in DTYPES if d != state[name].dtype]))
        state[name] = state[name].to(dtype)
        needles = (f"tensor {name} is ", str(dtype), "config.json expects")
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, Path(tmp) / WEIGHTS)
        return (Path(tmp) / WEIGHTS).read_bytes(), needles


@cases("bad model.safetensors")
@given(case=broken_weights())
def test_bad_weights_are_a_run_error_and_the_run_folder_is_left_as_it_was(
        saved_run: Path, image_dir: Path, case: tuple[bytes, tuple[str, ...]]) -> None:
    content, needles = case
    with run_copy(saved_run) as run:
        file = run / WEIGHTS
        file.write_bytes(content)
        before = snapshot(run.parent)
        with pytest.raises(RunError) as info:
            load_model(run)
        message = str(info.value)
        assert message.startswith(f"{file}: ") and "\n" not in message, message
        for needle in needles:
            assert needle in message, (needle, message)
        assert run_cli("score", str(run), str(image_dir / "good.png")) == (
            2, "", f"anomem: error: {message}\n")
        assert snapshot(run.parent) == before
