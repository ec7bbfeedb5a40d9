"""Fixtures of the bad-input suite: a saved tiny run and a folder with one good image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.config import RunConfig
from core.model.anomem import AnoMem
from core.runs import save_model as save_run_model
from tests.bad_input.cases import GOOD_PNG, TINY


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `anomem train` leaves it (config.json and model.safetensors)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("runs") / "tiny"
    save_run_model(path, RunConfig(model=TINY), AnoMem(TINY))
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    (folder / "good.png").write_bytes(GOOD_PNG)
    return folder
