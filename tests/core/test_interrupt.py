"""`anomem train` interrupted by SIGTERM, SIGINT or SIGKILL, then `anomem train --resume`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.runs import CONFIG, HISTORY, METRICS, WEIGHTS, load_run
from core.train.checkpoint import CHECKPOINT, read_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 4
# The from-scratch encoder: its epochs take seconds, so a signal lands mid-training (resuming
# the pretrained encoder's stage 1 is tested in tests/core/train/test_checkpoint.py)
TRAIN = ["train", "--preset", "scratch", "--epochs", str(EPOCHS), "--max-train", "300",
         "--device", "cpu"]


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "core.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_epochs(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.communicate()[1][-2000:]}")
        if (out / HISTORY).is_file() and len((out / HISTORY).read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    proc.kill()
    pytest.fail("no epoch finished in time")


def epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / HISTORY).read_text().splitlines()]


def resume(out: Path) -> subprocess.CompletedProcess:
    """Finish a run; without the explorer's pictures, which these tests do not look at."""
    return subprocess.run([sys.executable, "-m", "core.cli", "train", "--resume", str(out),
                           "--no-explore"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_writes_a_checkpoint_and_resume_finishes_the_run(tmp_path: Path,
                                                                  sig: signal.Signals) -> None:
    out = tmp_path / "run"
    proc = start(*TRAIN, "--out", str(out))
    wait_for_epochs(out, 1, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"anomem train --resume {out}" in err and "Traceback" not in err
    assert (out / CHECKPOINT).is_file() and (out / CONFIG).is_file()
    assert not (out / WEIGHTS).exists()
    _, state = read_checkpoint(out)
    assert state.epoch >= 1 and state.step > 0

    done = resume(out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert epochs(out) == list(range(1, EPOCHS + 1))
    assert not (out / CHECKPOINT).exists()
    assert json.loads((out / METRICS).read_text())["auroc"] > 0.5
    load_run(out)


def test_sigkill_loses_at_most_the_epoch_in_progress(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start(*TRAIN, "--out", str(out))
    wait_for_epochs(out, 2, proc)
    proc.kill()
    proc.communicate(timeout=60)
    _, state = read_checkpoint(out)
    assert state.epoch >= 2  # both finished epochs survived the kill
    done = resume(out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert epochs(out) == list(range(1, EPOCHS + 1))
    assert not (out / "explore.safetensors").exists()  # --no-explore
    load_run(out)


def test_resume_refuses_what_it_cannot_continue(tmp_path: Path) -> None:
    missing = resume(tmp_path / "nope")
    assert missing.returncode == 2 and "no such run folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = resume(tmp_path / "empty")
    assert empty.returncode == 2 and "config.json: missing" in empty.stderr
    assert "Traceback" not in empty.stderr


def test_two_trainings_never_share_a_run_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = start(*TRAIN, "--epochs", "100", "--out", str(out))  # still training meanwhile
    wait_for_epochs(out, 1, first)
    second = subprocess.run([sys.executable, "-m", "core.cli", *TRAIN, "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "already holds a run" in second.stderr
    resumed = resume(out)  # the folder is locked while the first process trains in it
    assert resumed.returncode == 2 and "another process is training this run" in resumed.stderr
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert first.returncode == 130
