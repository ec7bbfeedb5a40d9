"""The Train page's form as a run's config, built by core.presets.run_config as the CLI's and
the benchmark's are: the same choices train the same run wherever they are made."""

from __future__ import annotations

from core.config import DataConfig, RunConfig
from core.presets import run_config


def make_config(dataset: str = "shapes", root: str | None = None,
                normal_class: str | None = None, setting: str = "one-class",
                anomaly_ratio: float = 0.05, anomaly_classes: tuple[str, ...] = (),
                preset_name: str = "quick", epochs: int | None = None,
                max_minutes: float | None = None, memory_size: int | None = None,
                seed: int = 0, max_train: int | None = None) -> RunConfig:
    """The RunConfig the form's widgets describe (0 minutes: no budget, 0 images: all);
    raises ConfigError on bad values."""
    data = DataConfig(dataset=dataset, root=root or None, normal_class=normal_class,
                      setting=setting, anomaly_ratio=anomaly_ratio,
                      anomaly_classes=tuple(anomaly_classes), max_train=max_train or None,
                      seed=seed)
    memory = [] if memory_size is None else [f"model.memory_size={int(memory_size)}"]
    return run_config(preset_name, data, epochs=None if epochs is None else int(epochs),
                      minutes=max_minutes or None, seed=int(seed), overrides=memory)


def first_run_config() -> RunConfig:
    """The quick preset on the built-in shapes data, exactly as `anomem train` runs it.

    No time budget: a fixed number of epochs keeps the run reproducible, so the app and the CLI
    give the same metrics for the same seed.
    """
    return make_config()
