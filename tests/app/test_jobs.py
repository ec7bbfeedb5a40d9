"""app/jobs.py: the background job and the board that trains with it, with a fake trainer so
no model is trained."""

from __future__ import annotations

import threading
from contextlib import ExitStack
from pathlib import Path

import pytest

from app import jobs
from core.config import RunConfig
from core.data.base import DataError
from core.presets import preset
from core.runs import CONFIG, WEIGHTS, RunError, is_locked, run_lock
from core.train.checkpoint import CHECKPOINT
from core.train.trainer import Progress, TrainingCancelled


def _row(epoch: int) -> dict:
    return {"epoch": epoch, "stage": 1, "loss": 1.0 / epoch, "usage_layer2": 0.5}


def test_job_reports_progress_rows_and_metrics(tmp_path: Path):
    def fake_train(cfg, out, progress, should_stop):
        progress(Progress("stage1", 0.5, "epoch 1", _row(1)))
        progress(Progress("stage1", 1.0, "epoch 2", _row(2)))
        progress(Progress("stage2", 1.0, "detector fitted"))
        (Path(out) / WEIGHTS).write_bytes(b"")
        return {"auroc": 0.9}

    board = jobs.JobBoard()
    job = board.start(preset("quick"), tmp_path, "my run", train_fn=fake_train)
    assert job.wait(10)
    snap = job.snapshot()
    assert snap.status is jobs.JobStatus.DONE and not snap.running
    assert snap.name == "my-run" and snap.path == tmp_path / "my-run"
    assert [r["epoch"] for r in snap.rows] == [1, 2]
    assert snap.metrics == {"auroc": 0.9} and snap.fraction == 1.0


def test_progress_fraction_spans_the_stages(tmp_path: Path):
    seen = []
    release = threading.Event()

    def work(progress, should_stop):
        progress(Progress("stage1", 0.5, "epoch 1", _row(1)))
        seen.append(job.snapshot().fraction)
        progress(Progress("stage2", 0.5, "fitting"))
        seen.append(job.snapshot().fraction)
        release.wait(5)
        return {}

    job = jobs.BackgroundJob(work, tmp_path / "r")
    job.start()
    release.set()
    assert job.wait(10)
    lo1, hi1 = jobs.STAGE_SPAN["stage1"]
    lo2, hi2 = jobs.STAGE_SPAN["stage2"]
    assert seen == [pytest.approx(lo1 + 0.5 * (hi1 - lo1)), pytest.approx(lo2 + 0.5 * (hi2 - lo2))]


def test_cancel_stops_the_trainer_and_removes_the_unsaved_run(tmp_path: Path):
    started = threading.Event()

    def fake_train(cfg, out, progress, should_stop):
        Path(out, "history.jsonl").write_text("{}\n")
        started.set()
        while not should_stop():
            threading.Event().wait(0.01)
        raise TrainingCancelled([_row(1)])

    board = jobs.JobBoard()
    job = board.start(preset("quick"), tmp_path, "c", train_fn=fake_train)
    assert started.wait(10)
    with pytest.raises(RuntimeError, match="still training"):
        board.start(preset("quick"), tmp_path, "other", train_fn=fake_train)
    job.cancel()
    assert job.wait(10)
    assert job.snapshot().status == jobs.JobStatus.CANCELLED
    assert not (tmp_path / "c").exists()
    assert not (tmp_path / "other").exists()
    # Once the first job has ended, the board accepts a new one.
    quick = board.start(preset("quick"), tmp_path, "next",
                        train_fn=lambda cfg, out, progress, should_stop: {})
    assert quick.wait(10) and quick.snapshot().status == jobs.JobStatus.DONE


@pytest.mark.parametrize(
    ("error", "message"),
    [(DataError("data root '/x' is not a folder"), "data root '/x' is not a folder"),
     (KeyError("boom"), "KeyError: 'boom'")],
)
def test_failure_becomes_a_message(tmp_path: Path, error: Exception, message: str):
    def work(progress, should_stop):
        raise error

    job = jobs.BackgroundJob(work, tmp_path / "f").start()
    assert job.wait(10)
    snap = job.snapshot()
    assert snap.status == jobs.JobStatus.FAILED and snap.error == message


@pytest.mark.filterwarnings("ignore:skipped 1 unreadable")
def test_data_warnings_of_the_job_reach_its_snapshot(tmp_path: Path):
    """Only the job's own thread's warnings: another session loading data is not its news."""
    from core.data.imageio import warn_skipped

    warned, other_done = threading.Event(), threading.Event()

    def work(progress, should_stop):
        warn_skipped(["'broken.png': truncated file"], "'/data'")
        warned.set()
        assert other_done.wait(10)
        return {}

    job = jobs.BackgroundJob(work, tmp_path / "w").start()
    assert warned.wait(10)
    other = threading.Thread(target=lambda: warn_skipped(["'x.png': other"], "'/y'"))
    other.start()
    other.join()
    other_done.set()
    assert job.wait(10)
    notes = job.snapshot().notes
    assert len(notes) == 1 and "broken.png" in notes[0] and "'/data'" in notes[0]


def test_a_job_seen_ended_has_released_its_run(tmp_path: Path):
    """The page offers Resume/Delete once the job has ended: by then the lock must be free."""
    out = tmp_path / "r"
    out.mkdir()
    held = ExitStack()
    held.enter_context(run_lock(out))
    released_late = threading.Event()
    held.callback(released_late.wait, 0.5)  # runs before the lock is released: a slow release

    def work(progress, should_stop):
        return {}

    job = jobs.BackgroundJob(work, out, held=held).start()
    while job.running:
        threading.Event().wait(0.005)
    assert not is_locked(out)
    assert job.wait(10)


@pytest.mark.parametrize(
    ("saved", "ending", "status"),
    [(CHECKPOINT, TrainingCancelled([]), jobs.JobStatus.STOPPED),
     (WEIGHTS, KeyError("late"), jobs.JobStatus.FAILED)],
)
def test_a_new_run_that_saved_something_is_kept(tmp_path: Path, saved: str, ending: Exception,
                                                status: jobs.JobStatus):
    """Stopped after a checkpoint (resumable) or failed after its weights (usable): kept."""
    cfg = RunConfig()
    given = []

    def fake_train(cfg, out, progress, should_stop):
        given.append((cfg, out))
        (Path(out) / saved).write_bytes(b"")
        raise ending

    job = jobs.JobBoard().start(cfg, tmp_path, "kept", train_fn=fake_train)
    assert job.wait(10)
    assert given == [(cfg, tmp_path / "kept")]
    assert job.snapshot().status == status
    assert (tmp_path / "kept" / saved).is_file() and not is_locked(tmp_path / "kept")


def test_resume_works_in_the_stopped_folder_and_never_deletes_it(tmp_path: Path):
    run = tmp_path / "stopped"
    run.mkdir()
    (run / CONFIG).write_text("{}")
    (run / CHECKPOINT).write_bytes(b"")
    given = []

    def fake_resume(path, progress, should_stop):
        given.append(path)
        (Path(path) / CHECKPOINT).unlink()  # a folder left with nothing to resume still stays
        raise DataError("the data moved")

    board = jobs.JobBoard()
    job = board.resume(run, train_fn=fake_resume)
    assert job.wait(10)
    assert given == [run]
    snap = job.snapshot()
    assert snap.status == jobs.JobStatus.FAILED and snap.error == "the data moved"
    assert (run / CONFIG).is_file() and not is_locked(run)
    with pytest.raises(RunError, match="no checkpoint to resume from"):
        board.resume(run, train_fn=fake_resume)  # nothing to resume any more: refused
    assert given == [run] and not is_locked(run) and (run / CONFIG).is_file()
