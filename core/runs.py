"""Run folders on disk: save, load, list, lock and delete trained runs.

A run folder holds `model.safetensors`, `config.json` (a `RunConfig` that rebuilds the model),
`history.jsonl` (one row per epoch) and `metrics.json`. Every write goes to a temporary file in
the same folder and is renamed into place, so a crash never leaves a half-written file behind.
Nothing here unpickles anything. Comparing two runs, for the Compare runs page, is
core/explore/runs.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.config import ConfigError, RunConfig
from core.files import atomic_path, write_atomic
from core.model.anomem import AnoMem, upgrade_state
from core.model.lessons import upgrade_lessons

WEIGHTS, CONFIG, METRICS, HISTORY = "model.safetensors", "config.json", "metrics.json", \
    "history.jsonl"
DEFAULT_RUNS_DIR = Path(os.environ.get("ANOMEM_RUNS", "runs"))
_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# What json.loads raises on a malformed file: a syntax error, bytes that are not UTF-8, an
# integer of more digits than Python converts (ValueError), nesting deeper than the stack.
_BAD_JSON = (ValueError, RecursionError)


class RunError(ValueError):
    """A run folder or one of its files is missing, malformed or from another version."""


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def safe_name(name: str) -> str:
    """A run name reduced to letters, digits, '.', '_' and '-' (no path traversal)."""
    cleaned = _NAME.sub("-", name).strip(".-_")
    return cleaned[:80] or "run"


def new_run_dir(root: Path, name: str) -> Path:
    """Create a fresh folder `root/name` (or `name-2`, `name-3`, ...): never an existing one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = safe_name(name)
    for i in range(1, 10_000):
        path = root / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()  # atomic: two processes cannot both create the same folder
            return path
        except FileExistsError:
            continue
    raise RunError(f"no free run folder name for {base!r} under {root}")


LOCK = ".lock"
CHECKPOINT = "checkpoint.safetensors"  # stage 1's resume point (core/train/checkpoint.py)
# A run folder's state: its lock is held (by any process), it can be resumed, it is complete,
# or none of these (a folder that died before its first checkpoint, or a damaged one).
TRAINING, STOPPED, FINISHED, BROKEN = "training", "stopped", "finished", "broken"

# Locks this process holds: resolved path -> [open lock file, depth]. A holder may take the
# same lock again (the app holds a new run's lock from its creation, then `train_run` takes it),
# and `lock_depth` tells a second holder in this process apart from the first.
_HELD: dict[Path, list] = {}
_HELD_GUARD = threading.Lock()


@contextmanager
def run_lock(path: Path, create: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on a run folder while writing into it or deleting it.

    Another process (a CLI, another app, the benchmark) gets a RunError instead of interleaving
    its files; this process may take the lock again (see `lock_depth`). The operating system
    drops the lock when the process dies, so a killed training never leaves a stale one
    behind. With `create=False` a missing folder is a RunError rather than created.
    """
    path = Path(path)
    if not create and not path.is_dir():
        raise RunError(f"{path}: no longer exists")
    path.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    with _HELD_GUARD:
        entry = _HELD.get(key)
        if entry is None:
            f = open(path / LOCK, "a+b")  # noqa: SIM115  (held past this block)
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise RunError(f"{path}: another process is training this run") from None
            entry = _HELD[key] = [f, 0]
        entry[1] += 1
    try:
        yield
    finally:
        with _HELD_GUARD:
            entry[1] -= 1
            if entry[1] == 0:
                fcntl.flock(entry[0].fileno(), fcntl.LOCK_UN)
                entry[0].close()
                del _HELD[key]


def lock_depth(path: Path) -> int:
    """How many holders in this process have the run's lock (0: none here)."""
    with _HELD_GUARD:
        entry = _HELD.get(Path(path).resolve())
        return entry[1] if entry else 0


def is_locked(path: Path) -> bool:
    """Whether a process, this one included, holds the run's lock: it is being written."""
    path = Path(path)
    if lock_depth(path):
        return True
    try:
        f = open(path / LOCK, "rb")  # noqa: SIM115
    except (FileNotFoundError, NotADirectoryError):
        return False
    with f:
        try:  # a shared probe: it cannot take the lock from anyone, only see it is held
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


def files_state(path: Path) -> str:
    """FINISHED, STOPPED or BROKEN from the files alone (whether the run is locked aside)."""
    path = Path(path)
    if (path / WEIGHTS).is_file() and (path / METRICS).is_file():
        return FINISHED
    if (path / CHECKPOINT).is_file() and (path / CONFIG).is_file() and not (
            path / WEIGHTS).is_file():
        return STOPPED
    return BROKEN


def run_state(path: Path) -> str:
    """TRAINING while any process holds the run's lock, else what its files say."""
    return TRAINING if is_locked(path) else files_state(path)


def delete_run(path: Path, allowed: tuple[str, ...] = (STOPPED, BROKEN)) -> None:
    """Delete a run folder, holding its lock, if its state is one of `allowed`.

    Raises RunError, touching nothing, when another process (or another holder in this one)
    is writing the run, when it has vanished, or when its state is not allowed.
    """
    path = Path(path)
    with run_lock(path, create=False):
        if lock_depth(path) > 1:
            raise RunError(f"{path.name}: is training in this app; stop it first")
        state = files_state(path)
        if state not in allowed:
            raise RunError(f"{path.name}: is {state}; only {' or '.join(allowed)} runs are "
                           "deleted here")
        shutil.rmtree(path)


def save_model(path: Path, cfg: RunConfig, model: AnoMem) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_tensors(path / WEIGHTS, state, {"format": "anomem", "version": str(cfg.version)})
    write_json(path / CONFIG, cfg.to_dict())


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (core/files.py)."""
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def append_history(path: Path, row: dict) -> None:
    """Rewrite history.jsonl with one more row (atomic, so a crash keeps the old file)."""
    file = Path(path) / HISTORY
    old = file.read_text() if file.exists() else ""
    write_atomic(file, old + json.dumps(row) + "\n")


def write_history(path: Path, rows: list[dict]) -> None:
    """Replace history.jsonl with `rows` (a resumed run drops rows its checkpoint lacks)."""
    write_atomic(Path(path) / HISTORY, "".join(json.dumps(r) + "\n" for r in rows))


def read_config(path: Path) -> RunConfig:
    file = Path(path) / CONFIG
    if not file.is_file():
        raise RunError(f"{file}: missing (expected the config.json of an anomem run)")
    try:
        raw = json.loads(file.read_text())
    except _BAD_JSON as err:
        raise RunError(f"{file}: not valid JSON ({err})") from None
    try:
        return RunConfig.from_dict(raw)
    except ConfigError as err:
        raise RunError(f"{file}: {err}") from None


def load_model(path: Path, cfg: RunConfig | None = None, device: str = "cpu") -> AnoMem:
    """Rebuild the model from config.json and load its weights, checking every tensor."""
    path = Path(path)
    cfg = cfg or read_config(path)
    file = path / WEIGHTS
    if not file.is_file():
        raise RunError(f"{file}: missing (expected the weights of an anomem run)")
    try:
        state = upgrade_state(load_file(file, device="cpu"))
    except (SafetensorError, OSError, ValueError) as err:
        raise RunError(f"{file}: not a readable safetensors file ({err})") from None
    try:
        with torch.device("meta"):  # shapes only: a config.json naming a huge model is free
            shaped = AnoMem(cfg.model, pretrained=False)
        expected = shaped.state_dict()
    except (RuntimeError, ValueError, TypeError, OverflowError) as err:
        reason = " ".join(str(err).split())
        raise RunError(f"{path / CONFIG}: describes a model that cannot be built ({reason})"
                       ) from None
    if shaped.lessons is not None:
        upgrade_lessons(state, "lessons.", shaped.lessons.names, shaped.lessons.sizes)
    missing = sorted(set(expected) - set(state))
    extra = [k if k.isprintable() else repr(k) for k in sorted(set(state) - set(expected))]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3
                                                               else ""))
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3
                                                                else ""))
        raise RunError(f"{file}: tensors do not match config.json ({'; '.join(parts)})")
    for k, v in expected.items():
        if state[k].shape != v.shape or state[k].dtype != v.dtype:
            raise RunError(
                f"{file}: tensor {k} is {tuple(state[k].shape)} {state[k].dtype}, config.json "
                f"expects {tuple(v.shape)} {v.dtype}"
            )
    model = AnoMem(cfg.model, pretrained=False)  # as large as the checked weights file
    model.load_state_dict(state)
    return model.to(device).eval()


def read_json(file: Path) -> Any:
    try:
        return json.loads(Path(file).read_text())
    except _BAD_JSON as err:
        raise RunError(f"{file}: not valid JSON ({err})") from None


def read_history(path: Path) -> list[dict]:
    file = Path(path) / HISTORY
    if not file.is_file():
        return []
    try:
        text = file.read_text()
    except UnicodeDecodeError as err:
        raise RunError(f"{file}: not valid JSON lines ({err})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except _BAD_JSON:
                raise RunError(f"{file}: line {i} is not valid JSON") from None
    return rows


@dataclass
class Run:
    path: Path
    config: RunConfig
    model: AnoMem
    metrics: dict | None = None
    history: list[dict] = field(default_factory=list)


def load_run(path: Path, device: str = "cpu") -> Run:
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: not a run folder")
    cfg = read_config(path)
    metrics_file = path / METRICS
    return Run(
        path=path,
        config=cfg,
        model=load_model(path, cfg, device),
        metrics=read_json(metrics_file) if metrics_file.is_file() else None,
        history=read_history(path),
    )


@dataclass
class RunSummary:
    name: str
    path: Path
    dataset: str
    normal_class: str
    setting: str
    auroc: float | None
    complete: bool  # has weights and metrics
    error: str | None = None
    state: str = BROKEN  # TRAINING, STOPPED, FINISHED or BROKEN (see `run_state`)


def list_runs(root: Path = DEFAULT_RUNS_DIR) -> list[RunSummary]:
    """Every folder under `root` that looks like a run, newest first; broken ones say why.

    A folder deleted while it is being listed (by another process) is left out.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    stamped = []
    for p in root.iterdir():
        try:
            if p.is_dir() and (p / CONFIG).exists():
                stamped.append((p.stat().st_mtime, p))
        except OSError:  # vanished between listing and stat
            continue
    out = []
    for _, p in sorted(stamped, key=lambda x: x[0], reverse=True):
        state = run_state(p)
        try:
            cfg = read_config(p)
            metrics = read_json(p / METRICS) if (p / METRICS).is_file() else None
            if metrics is not None and not isinstance(metrics, dict):
                raise RunError(f"{p / METRICS}: expected a JSON object")
            out.append(RunSummary(
                p.name, p, cfg.data.dataset, cfg.data.normal_class or "", cfg.data.setting,
                (metrics or {}).get("auroc"), (p / WEIGHTS).is_file() and metrics is not None,
                state=state))
        except RunError as err:
            if not p.is_dir():
                continue
            out.append(RunSummary(p.name, p, "?", "?", "?", None, False, str(err), state=state))
        except OSError:  # its files vanished while being read
            continue
    return out
