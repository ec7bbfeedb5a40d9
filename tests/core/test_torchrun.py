"""Two processes under torchrun (gloo, CPU) against one: a complete run that loads the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

from core.data import load_split
from core.runs import HISTORY, METRICS, load_run
from core.train.checkpoint import CHECKPOINT
from core.train.scoring import score_images

pytestmark = pytest.mark.slow

# the encoder reads 64 px (not 128): what is compared is one process against two, at a quarter
# of the time
ARGS = ["train", "--epochs", "3", "--max-train", "400", "--device", "cpu", "--seed", "1",
        "--set", "model.input_size=64"]


def anomem(out: Path, processes: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:  # the reference run: only its model and metrics are compared
        cmd = [sys.executable, "-m", "core.cli", *ARGS, "--no-explore", "--out", str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "core.cli", *ARGS, "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    return done, time.perf_counter() - start


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, float]]:
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for n in (2, 1):
        done, seconds = anomem(root / f"p{n}", n)
        assert done.returncode == 0, done.stderr[-3000:]
        out[n] = (root / f"p{n}", seconds)
    return out


def test_two_process_run_is_complete_and_loads_like_a_single_process_run(runs) -> None:
    (two, _), (one, _) = runs[2], runs[1]
    assert not (two / CHECKPOINT).exists()  # superseded by the saved weights
    a, b = load_run(two), load_run(one)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].shape == sb[k].shape for k in sa)
    assert bool(a.model.detector.fitted)
    metrics = json.loads((two / METRICS).read_text())
    assert metrics["processes"] == 2 and metrics["n_test"] == 700
    assert metrics["auroc"] > 0.7  # three short epochs, yet clearly a working detector


def test_two_process_loss_falls(runs) -> None:
    rows = [json.loads(line) for line in (runs[2][0] / HISTORY).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_only_rank_zero_wrote(runs) -> None:
    two = runs[2][0]
    assert sorted(p.name for p in two.iterdir()) == sorted(
        [".lock", "config.json", "explore.safetensors", "history.jsonl", "metrics.json",
         "model.safetensors"])
    assert not any(p.name.endswith(".tmp") for p in two.parent.rglob("*"))


def test_the_two_process_model_scores_images(runs) -> None:
    model = load_run(runs[2][0]).model
    out = model.score(torch.rand(2, 3, 64, 64))
    assert torch.isfinite(out.image).all()


def test_two_processes_score_the_test_images_like_one(runs) -> None:
    """Shards, batch split and seeds differ, so the weights do; the detectors must agree."""
    two, one = load_run(runs[2][0]), load_run(runs[1][0])
    assert two.config.data == one.config.data
    test = load_split(one.config.data).test
    a = score_images(two.model, test.images, with_maps=False).image
    b = score_images(one.model, test.images, with_maps=False).image
    assert spearmanr(a, b).statistic > 0.6
    assert abs(two.metrics["auroc"] - one.metrics["auroc"]) < 0.05
