"""Shared fixtures: a model small enough that a forward pass takes milliseconds on a CPU."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from core.config import ModelConfig

TINY_MODEL = dict(image_size=32, width=0.125, memory_size=8, memory_dim=8, head_dim=8,
                  scales=("layer2", "layer3", "layer4"), pixel_memory=64, pixel_size=8)


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> Iterator[None]:
    """Test tensors are tiny: on a busy 2-core machine, intra-op threads cost more than they
    save (a 32 px forward pass takes ~0.6 s with two threads, ~2 ms with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _one_image_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One image cache for the session and the processes it starts: the built-in shapes are
    drawn once per size, and nothing is written under the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANOMEM_CACHE", str(tmp_path_factory.mktemp("anomem-cache")))
        yield


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Pin one thread again before each test and its fixtures: fitting a UMAP (numba) puts
    torch back on every core, and every later test would then run ~50x slower."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture
def make_model_config() -> Callable[..., ModelConfig]:
    """Factory of ModelConfigs with the smallest widths the model accepts; overrides win."""

    def make(**overrides) -> ModelConfig:
        return ModelConfig(**{**TINY_MODEL, **overrides})

    return make


@pytest.fixture
def tiny_cfg(make_model_config: Callable[..., ModelConfig]) -> ModelConfig:
    return make_model_config()


@pytest.fixture
def clean_job_board() -> Iterator[None]:
    """No app training job left over from another test, and none left behind."""
    from app import state

    state.job_board.clear()
    yield
    board = state.job_board()
    if board.current is not None:
        board.current.cancel()
        board.current.wait(60)
    state.job_board.clear()
