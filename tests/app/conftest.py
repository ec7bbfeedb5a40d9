"""App test fixtures: one tiny trained run for the session, and the app's entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.pipeline import train_run
from tests.app.helpers import tiny_config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("runs") / "tiny"
    train_run(tiny_config(), path)
    return path


@pytest.fixture
def runs_dir(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ANOMEM_RUNS pointing at a folder that holds only the tiny run."""
    monkeypatch.setenv("ANOMEM_RUNS", str(tiny_run.parent))
    return tiny_run.parent


@pytest.fixture
def empty_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("ANOMEM_RUNS", str(root))
    return root


@pytest.fixture(autouse=True)
def fresh_job_board(clean_job_board: None) -> None:
    """Each test starts without a training job left over from another test."""
