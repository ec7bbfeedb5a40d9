"""Resumable stage-1 checkpoints: model, optimiser, schedule position and RNG state in one file.

`checkpoint.safetensors` sits in the run folder while the run trains. It is rewritten after
every epoch (so a SIGKILL loses at most one epoch) and when training is stopped mid-epoch
(SIGINT/SIGTERM, the app's Stop button). Writes are atomic, and the metadata carries a SHA-256
of every tensor, so a damaged or half-copied file is refused rather than resumed from. The
learning rate is a function of the step and elapsed time, so those two numbers are the whole
scheduler state. The file goes once the run's weights are saved.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from core.model.anomem import upgrade_state
from core.runs import CHECKPOINT, RunError, save_tensors

FORMAT = "anomem-checkpoint"
FORMAT_VERSION = "1"


@dataclass
class Stage1State:
    """Where stage 1 stands; the loop reads and advances it, the checkpoint stores it."""

    epoch: int = 0  # finished epochs
    step: int = 0  # optimiser steps taken
    index: int = 0  # next batch of the current epoch
    elapsed_s: float = 0.0  # stage-1 seconds so far, for the time budget and the schedule
    epoch_s: float = 0.0  # seconds spent in the current epoch
    finished: bool = False  # stage 1 is over (epochs or time budget spent)
    sums: dict[str, float] = field(default_factory=dict)  # loss sums of the current epoch
    history: list[dict] = field(default_factory=list)  # finished epochs' rows
    perm: torch.Tensor | None = None  # the current epoch's image order (mid-epoch only)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # prototype usage

    def scalars(self) -> dict[str, Any]:
        d = asdict(self)
        del d["perm"], d["counts"]
        return d


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    generator: torch.Generator, state: Stage1State) -> Path:
    """Write `run_dir/checkpoint.safetensors` atomically; returns its path."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    for i, entry in opt.state_dict()["state"].items():
        for name, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{i}/{name}"] = v.detach().cpu().contiguous()
    tensors["rng/generator"] = generator.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    if state.perm is not None:
        tensors["state/perm"] = state.perm.detach().cpu().contiguous()
    for s, c in state.counts.items():
        tensors[f"state/counts/{s}"] = c.detach().cpu().contiguous()
    metadata = {"format": FORMAT, "version": FORMAT_VERSION,
                "state": json.dumps(state.scalars()), "sha256": _digest(tensors)}
    path = Path(run_dir) / CHECKPOINT
    save_tensors(path, tensors, metadata)
    return path


def read_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], Stage1State]:
    """The checked tensors and state of `run_dir`'s checkpoint; RunError if it is unusable."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise RunError(f"{path}: missing (nothing to resume: the run has no checkpoint)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise RunError(f"{path}: not a readable checkpoint, damaged or incomplete ({err})"
                       ) from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise RunError(f"{path}: not an anomem checkpoint of version {FORMAT_VERSION}")
    if meta.get("sha256") != _digest(tensors):
        raise RunError(f"{path}: checksum mismatch, the file is damaged (cannot resume)")
    try:
        raw = json.loads(meta["state"])
        perm = tensors.get("state/perm")
        counts = {k.removeprefix("state/counts/"): v for k, v in tensors.items()
                  if k.startswith("state/counts/")}
        state = Stage1State(**raw, perm=perm, counts=counts)
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise RunError(f"{path}: malformed training state ({err})") from None
    return tensors, state


def restore(tensors: dict[str, torch.Tensor], path: Path, model: nn.Module,
            opt: torch.optim.Optimizer, generator: torch.Generator) -> None:
    """Load a checkpoint's tensors into a freshly built model, optimiser and generator."""
    weights = upgrade_state({k.removeprefix("model/"): v for k, v in tensors.items()
                             if k.startswith("model/")})
    expected = model.state_dict()
    if set(weights) != set(expected) or any(
            weights[k].shape != v.shape for k, v in expected.items()):
        raise RunError(f"{path}: the checkpoint's tensors do not match config.json")
    model.load_state_dict(weights)
    template = opt.state_dict()
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, i, name = k.split("/", 2)
            entries.setdefault(int(i), {})[name] = v
    device = next(model.parameters()).device
    template["state"] = {i: {n: (v if n == "step" else v.to(device)) for n, v in e.items()}
                         for i, e in entries.items()}
    try:
        opt.load_state_dict(template)
    except (ValueError, KeyError, RuntimeError) as err:
        raise RunError(f"{path}: optimiser state does not match the model ({err})") from None
    generator.set_state(tensors["rng/generator"])
    torch.set_rng_state(tensors["rng/torch"])
