"""One runs folder shared by the app, a CLI and the benchmark: a run another process holds is
never offered for deletion nor touched, and buttons act on the run they name."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.bench.runners import bench
from core.bench.suites import BenchOptions
from core.pipeline import train_run
from core.runs import CONFIG, HISTORY, RunError, delete_run, list_runs, run_state
from core.train.trainer import TrainingCancelled
from tests.app.helpers import open_page, texts, tiny_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def stopped_run(root: Path, name: str) -> Path:
    """A run stopped after its first epoch: a checkpoint, no weights."""
    cfg = tiny_config()
    cfg.train.epochs = 3
    epochs: list[dict] = []
    with pytest.raises(TrainingCancelled):
        train_run(cfg, root / name, progress=lambda p: p.row and epochs.append(p.row),
                  should_stop=lambda: bool(epochs))
    assert run_state(root / name) == "stopped"
    return root / name


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding a run folder's lock, as a training CLI does."""
    folder.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+b'); "
            "fcntl.flock(f.fileno(), fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder / ".lock")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_app_never_offers_a_live_cli_run_and_deletes_exactly_the_stopped_one(empty_runs: Path):
    old_a, old_b = stopped_run(empty_runs, "old-a"), stopped_run(empty_runs, "old-b")
    live = empty_runs / "live"
    cli = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "train", "--dataset", "shapes", "--epochs", "200",
         "--max-train", "300", "--device", "cpu", "--out", str(live)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not ((live / HISTORY).is_file() and (live / HISTORY).read_text().strip()):
            assert cli.poll() is None, cli.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the CLI finished no epoch in time"
            time.sleep(0.2)
        assert run_state(live) == "training"

        at = open_page()
        assert "Training in another process (1)" in [e.label for e in at.expander]
        assert "**live** ·" in texts(at)
        keys = {b.key for b in at.button}
        assert not any(str(live) in k for k in keys), "a live run must offer no button"
        assert {f"train_delete_{old_a}", f"train_delete_{old_b}"} <= keys

        os.utime(old_a)  # the list reorders: old-a is now newer than old-b
        assert [r.name for r in list_runs(empty_runs)][-1] == "old-b"
        at.button(key=f"train_delete_{old_b}").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        assert not old_b.exists() and old_a.is_dir() and (live / CONFIG).is_file()

        with pytest.raises(RunError, match="another process"):
            delete_run(live)
        assert (live / CONFIG).is_file() and cli.poll() is None  # untouched, still training
    finally:
        cli.kill()
        cli.wait()


def test_bench_leaves_a_run_another_process_holds(tmp_path: Path):
    folder = tmp_path / "runs" / "shapes-circle-one-class"
    holder = hold_lock(folder)
    (folder / CONFIG).write_text("{}")  # a run that looks broken: the bench would retrain it
    lines: list[str] = []
    try:
        bench(BenchOptions(out=tmp_path, minutes=0.05, suites=("shapes",), deep_peer=False,
                           feature_peers=False, preset="scratch"),
              lines.append)
    finally:
        holder.kill()
        holder.wait()
    assert (folder / CONFIG).read_text() == "{}"  # not deleted, not retrained
    assert any("skipped" in line and "another process" in line for line in lines)
    assert any("kNN" in line for line in lines)  # the other methods of the cell still ran
