"""Helpers of the app tests: the tiny run's config and ways to open and read a page."""

from __future__ import annotations

import shutil
from pathlib import Path

from streamlit.testing.v1 import AppTest

from core.config import DataConfig, RunConfig
from core.presets import preset

MAIN = Path(__file__).resolve().parents[2] / "app" / "main.py"
TINY_MEMORY = 16


def tiny_config() -> RunConfig:
    """A run that trains in seconds on a CPU: one epoch, 200 images, the pretrained encoder
    reading them at 64 px (not 128), small memories."""
    cfg = preset("quick", DataConfig(dataset="shapes", max_train=200))
    cfg.model.input_size = 64
    cfg.model.memory_size = TINY_MEMORY
    cfg.model.memory_dim = 16
    cfg.model.head_dim = 16
    cfg.train.epochs = 1
    cfg.train.batch_size = 64
    return cfg


def copy_run(run: Path, root: Path, name: str) -> Path:
    return Path(shutil.copytree(run, root / name))


def open_page(page: str | None = None) -> AppTest:
    """Run the real entry point, switch to `page` (a views/ file), fail on any exception."""
    at = AppTest.from_file(str(MAIN), default_timeout=120)
    at.run()
    if page is not None:
        at.switch_page(page)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    """Every markdown, caption, info, error and warning of the page, one string."""
    parts = []
    for kind in ("markdown", "caption", "info", "error", "warning", "success", "subheader"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def images(at: AppTest) -> list:
    """The main area's st.image elements (each may hold several images)."""
    return list(at.main.image)
