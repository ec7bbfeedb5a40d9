"""app/train_form.py: the Train page's form values as a run's config."""

from __future__ import annotations

import pytest

from app import train_form
from core.config import ConfigError, DataConfig
from core.presets import preset


def test_make_config_applies_the_page_values() -> None:
    cfg = train_form.make_config(
        dataset="digits", normal_class="3", setting="unbalanced", anomaly_ratio=0.1,
        anomaly_classes=("5",), preset_name="paper", epochs=7, max_minutes=2.5, memory_size=33,
        seed=4, max_train=100)
    assert cfg.preset == "paper" and cfg.model.width == 1.0
    assert (cfg.train.epochs, cfg.train.max_minutes, cfg.train.seed) == (7, 2.5, 4)
    assert cfg.model.memory_size == 33
    assert cfg.data.anomaly_classes == ("5",) and cfg.data.max_train == 100
    assert cfg.data.seed == 4
    assert train_form.make_config(max_minutes=0, max_train=0).train.max_minutes is None
    with pytest.raises(ConfigError):
        train_form.make_config(epochs=0)
    with pytest.raises(ConfigError):
        train_form.make_config(memory_size=1)


def test_the_page_epochs_win_over_a_budget() -> None:
    """The page always sends its epoch count: a budget only ends a run earlier."""
    cfg = train_form.make_config(preset_name="scratch", epochs=3, max_minutes=1.0)
    assert (cfg.train.epochs, cfg.train.max_minutes) == (3, 1.0)


def test_the_first_run_is_the_cli_default() -> None:
    first = train_form.first_run_config()
    assert (first.data.dataset, first.preset) == ("shapes", "quick")
    assert first.train.max_minutes is None  # reproducible: epochs, not a time budget
    assert first.to_dict() == preset("quick", DataConfig()).to_dict()
