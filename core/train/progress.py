"""What the trainer reports while it works, and how it is told to stop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Progress:
    stage: str  # "stage1", "stage2" or "evaluate"
    done: float  # fraction of the stage in [0, 1]
    message: str
    row: dict[str, Any] | None = None  # a finished epoch's history row


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


class TrainingCancelled(RuntimeError):
    """`should_stop` asked the trainer to stop; the partial history is attached, and the
    checkpoint's folder when one was written (the run can be resumed from it)."""

    def __init__(self, history: list[dict], checkpoint_dir: Path | None = None) -> None:
        super().__init__("training cancelled")
        self.history = history
        self.checkpoint_dir = checkpoint_dir
