"""Training in a background thread, so the Train page stays responsive while a run trains.

A `BackgroundJob` runs one ready callable, `work(progress=..., should_stop=...) -> metrics`, in
a daemon thread on a run folder; it knows nothing of configs, training or resuming. `JobBoard`
builds that callable from `core.pipeline.train_run` (a new run) or `resume_run` (a stopped one)
and holds at most one running job per app process (the app keeps the board in
`st.cache_resource`, so the job survives reruns, page switches and a closed tab). The page polls
`BackgroundJob.snapshot()`; the thread never calls Streamlit.

Stage 1 checkpoints after every epoch, so a run whose app was shut down mid-training, or that
was stopped from the page, stays in its folder as a resumable run (`JobBoard.resume`).
"""

from __future__ import annotations

import functools
import logging
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from core.config import ConfigError, RunConfig
from core.data.base import DataError
from core.runs import (
    BROKEN,
    STOPPED,
    WEIGHTS,
    RunError,
    files_state,
    new_run_dir,
    run_lock,
)
from core.train.checkpoint import CHECKPOINT
from core.train.progress import Progress, ProgressFn, StopFn, TrainingCancelled

LOG = logging.getLogger(__name__)
FIRST_RUN_MINUTES = 2  # what the quick preset takes on a 2-core CPU (shown, not enforced)
# Share of the whole job each stage ends at: stage 1 dominates, the rest is quick.
STAGE_SPAN = {"data": (0.0, 0.0), "stage1": (0.0, 0.8), "stage2": (0.8, 0.9),
              "evaluate": (0.9, 0.95), "explore": (0.95, 1.0)}
EXPECTED_ERRORS = (ConfigError, DataError, RunError, ValueError, OSError)

TrainFn = Callable[..., dict]  # train_run(cfg, out, ...) or resume_run(path, ...), or a fake


class Work(Protocol):
    """What a job runs: reports through `progress`, polls `should_stop` (TrainingCancelled
    when it does stop) and returns the run's metrics."""

    def __call__(self, *, progress: ProgressFn, should_stop: StopFn) -> dict: ...


class JobStatus(StrEnum):
    """How a job stands: running, or how it ended."""

    RUNNING = "running"
    DONE = "done"  # the work returned its metrics
    FAILED = "failed"
    STOPPED = "stopped"  # stopped from the page; its checkpoint is kept, so it resumes
    CANCELLED = "cancelled"  # stopped before any checkpoint: nothing kept


@dataclass(frozen=True)
class JobState:
    """A consistent copy of a job's progress, safe to read from a page."""

    name: str
    path: Path
    status: JobStatus
    stage: str
    fraction: float  # of the whole job, 0..1
    message: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict | None = None
    error: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # data warnings (skipped images)

    @property
    def running(self) -> bool:
        return self.status == JobStatus.RUNNING


class BackgroundJob:
    """A ready `work` callable in a daemon thread on the run folder `out`, with progress,
    history rows and a stop button.

    A stopped run keeps its checkpoint and can be resumed. When the job made the folder
    (`new_folder`), a run that failed or was stopped before its first checkpoint is deleted,
    so it never shows up as a broken run; one that failed after saving its weights is kept
    (they are usable). A folder that existed before the job is never deleted.
    """

    def __init__(self, work: Work, out: Path, *, new_folder: bool = False,
                 held: ExitStack | None = None) -> None:
        self.out, self._work, self._new_folder = Path(out), work, new_folder
        # The run's lock, taken when its folder was created and released when the job ends,
        # so no other process can write into the folder while the data loads or delete it.
        self._held = held or ExitStack()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._status, self._stage, self._fraction = JobStatus.RUNNING, "data", 0.0
        self._message = "loading the data"
        self._rows: list[dict[str, Any]] = []
        self._metrics: dict | None = None
        self._error: str | None = None
        self._notes: list[str] = []
        self._started, self._ended = time.monotonic(), None
        self._thread = threading.Thread(target=self._run, name=f"job-{self.out.name}",
                                        daemon=True)

    def start(self) -> BackgroundJob:
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the work to stop after its current step."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the thread ends (tests, shutdown); True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        with self._lock:
            return self._status == JobStatus.RUNNING

    def snapshot(self) -> JobState:
        with self._lock:
            end = self._ended if self._ended is not None else time.monotonic()
            return JobState(
                name=self.out.name, path=self.out, status=self._status, stage=self._stage,
                fraction=self._fraction, message=self._message, rows=list(self._rows),
                metrics=self._metrics, error=self._error, seconds=end - self._started,
                notes=list(self._notes),
            )

    def _on_progress(self, p: Progress) -> None:
        lo, hi = STAGE_SPAN.get(p.stage, (0.0, 1.0))
        with self._lock:
            self._stage, self._message = p.stage, p.message
            self._fraction = max(self._fraction, lo + (hi - lo) * float(p.done))
            if p.row is not None:
                self._rows.append(dict(p.row))

    def _finish(self, status: JobStatus, message: str, error: str | None = None,
                metrics: dict | None = None) -> None:
        with self._lock:
            self._status, self._message, self._error = status, message, error
            self._metrics = metrics
            self._ended = time.monotonic()
            if status == JobStatus.DONE:
                self._fraction = 1.0

    def _note(self, message: str) -> None:
        with self._lock:
            self._notes.append(message)

    def _run(self) -> None:
        notes = _ThreadNotes(threading.get_ident(), self._note)
        data_log = logging.getLogger("core.data")
        data_log.addHandler(notes)
        ending: tuple = (JobStatus.FAILED, "training failed", "the job ended unexpectedly", None)
        try:
            # The lock is released before the job reports its end: a page that sees the job
            # ended must also see the run free to resume or delete.
            with self._held:
                ending = self._do_work()
        finally:
            data_log.removeHandler(notes)
            self._finish(*ending)

    def _do_work(self) -> tuple[JobStatus, str, str | None, dict | None]:
        """Run the work, and say how the job ended: (status, message, error, metrics)."""
        try:
            metrics = self._work(progress=self._on_progress, should_stop=self._stop.is_set)
        except TrainingCancelled:
            self._discard()
            if (self.out / CHECKPOINT).is_file():
                return JobStatus.STOPPED, "training stopped: resumable", None, None
            return JobStatus.CANCELLED, "training cancelled", None, None
        except EXPECTED_ERRORS as err:
            self._discard()
            return JobStatus.FAILED, "training failed", str(err), None
        except Exception as err:  # a bug must still end as a message on the page
            LOG.exception("training job %s failed", self.out.name)
            self._discard()
            return JobStatus.FAILED, "training failed", f"{type(err).__name__}: {err}", None
        return JobStatus.DONE, "training finished", None, metrics

    def _discard(self) -> None:
        """Delete the folder this job made unless it holds weights or a checkpoint to resume
        from.

        The job still holds the run's lock here and takes it once more to re-check the files
        (`delete_run` would refuse: the job's own hold counts as a second holder), so a folder
        another process holds is never touched.
        """
        if not self._new_folder or not self.out.is_dir():
            return  # an existing run: never delete what was there before this job
        if (self.out / WEIGHTS).exists() or (self.out / CHECKPOINT).exists():
            return
        try:
            with run_lock(self.out, create=False):  # the job's own: depth 2 in this process
                if files_state(self.out) == BROKEN:
                    shutil.rmtree(self.out, ignore_errors=True)
        except RunError as err:
            LOG.warning("run folder %s left in place: %s", self.out, err)


class _ThreadNotes(logging.Handler):
    """Passes on the data warnings logged by one thread (the job's), not by other sessions."""

    def __init__(self, thread: int, sink: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.thread, self.sink = thread, sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.sink(record.getMessage())


class JobBoard:
    """The app's training jobs: one runs at a time, the latest stays visible."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: BackgroundJob | None = None

    @property
    def current(self) -> BackgroundJob | None:
        return self._current

    def start(self, cfg: RunConfig, root: Path, name: str,
              train_fn: TrainFn | None = None) -> BackgroundJob:
        """Create the run folder and train `cfg` there with `train_fn` (default
        `core.pipeline.train_run`); RuntimeError if a job is running."""
        if train_fn is None:
            from core.pipeline import train_run as train_fn  # looked up now: tests replace it
        with self._lock:
            if self._current is not None and self._current.running:
                raise RuntimeError(
                    f"run {self._current.out.name!r} is still training: cancel it or wait"
                )
            out = new_run_dir(Path(root), name)
            held = ExitStack()
            held.enter_context(run_lock(out))  # before any other process can find the folder
            work = functools.partial(train_fn, cfg, out)
            self._current = BackgroundJob(work, out, new_folder=True, held=held).start()
            return self._current

    def resume(self, path: Path, train_fn: TrainFn | None = None) -> BackgroundJob:
        """Continue a stopped run in its own folder with `train_fn` (default
        `core.pipeline.resume_run`); RuntimeError if a job is running."""
        if train_fn is None:
            from core.pipeline import resume_run as train_fn  # looked up now: tests replace it
        with self._lock:
            if self._current is not None and self._current.running:
                raise RuntimeError(
                    f"run {self._current.out.name!r} is still training: stop it or wait"
                )
            held = ExitStack()
            held.enter_context(run_lock(path, create=False))  # refused if another process has it
            if files_state(path) != STOPPED:  # checked under the lock, which is now ours
                held.close()
                raise RunError(f"{path}: no checkpoint to resume from (or already finished)")
            work = functools.partial(train_fn, Path(path))
            self._current = BackgroundJob(work, Path(path), held=held).start()
            return self._current
