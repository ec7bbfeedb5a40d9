"""Train page: training from the form in the background, and errors shown, never raised."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from app import state, train_form
from core import pipeline
from core.runs import CHECKPOINT, list_runs
from tests.app.helpers import open_page, texts


def _fill(at: AppTest, max_train: int, name: str) -> None:
    at.number_input(key="train_epochs_quick").set_value(1)
    at.number_input(key="train_memory_quick").set_value(16)
    at.number_input(key="train_max_train").set_value(max_train)
    at.text_input(key="train_name").input(name)


@pytest.fixture
def fewer_test_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs trained here evaluate every fifth test image: what these tests check is the page
    and the job, and scoring the whole test set would take most of their time."""
    load = pipeline.load_split

    def every_fifth(cfg, *args, **kwargs):
        split = load(cfg, *args, **kwargs)
        return dataclasses.replace(split, test=split.test.subset(range(0, len(split.test), 5)))

    monkeypatch.setattr(pipeline, "load_split", every_fifth)


@pytest.fixture
def smaller_encoder_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """The form's runs read their images at 64 px (not 128): the encoder's forward passes are
    most of their time, and what these tests check is the page and the job."""
    make = train_form.run_config

    def at_64(*args, **kwargs):
        cfg = make(*args, **kwargs)
        cfg.model.input_size = 64
        return cfg

    monkeypatch.setattr(train_form, "run_config", at_64)


def _wait_until_done(at: AppTest, timeout: float = 300) -> None:
    """Rerun the page (as its polling fragment would) until the job has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if at.success or at.error or at.warning:
            return
        time.sleep(0.5)
    raise AssertionError("training did not end in time")


def test_form_trains_a_run_that_becomes_selectable(empty_runs: Path, fewer_test_images: None,
                                                  smaller_encoder_input: None,
                                                  monkeypatch: pytest.MonkeyPatch):
    gate = threading.Event()  # training waits for it: the page is seen while the job runs
    train_run = pipeline.train_run

    def gated(*args, **kwargs):
        assert gate.wait(120)
        return train_run(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train_run", gated)
    at = open_page()
    _fill(at, max_train=200, name="form run")
    at.button(key="train_start").click().run()
    assert not at.exception
    assert at.get("progress") and at.button(key="train_start").disabled
    assert not at.success
    gate.set()
    _wait_until_done(at)
    assert not at.error, [e.value for e in at.error]
    assert "form-run" in at.success[0].value and "AUROC" in at.success[0].value
    runs = list_runs(empty_runs)
    assert [(r.name, r.complete, r.dataset) for r in runs] == [("form-run", True, "shapes")]
    # The finished run is selected in the sidebar, so the explorer pages open it.
    assert at.sidebar.selectbox(key="run_path").value == str(empty_runs / "form-run")
    charts = at.get("plotly_chart")
    assert len(charts) == 2  # loss and memory-usage curves from the history rows


def _folder_without_anomalies(root: Path) -> Path:
    """A class-folder data set whose test split holds normal images only."""
    for split, n in (("train", 6), ("test", 2)):
        folder = root / split / "good"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(folder / f"{i}.png")
    return root


def test_failed_training_shows_the_error(empty_runs: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ANOMEM_CACHE", str(tmp_path / "cache"))
    data = _folder_without_anomalies(tmp_path / "data")
    at = open_page()
    at.selectbox(key="train_dataset").set_value("folder").run()
    at.text_input(key="train_root_folder").input(str(data)).run()
    assert at.selectbox(key="train_normal_folder").value == "good"
    _fill(at, max_train=0, name="no-anomalies")
    at.button(key="train_start").click().run()
    _wait_until_done(at)
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "failed" in errors[0] and "anomalous images" in errors[0]
    assert list_runs(empty_runs) == []  # the unsaved run folder is removed
    assert not any(empty_runs.iterdir())


def test_invalid_settings_are_refused_before_training(empty_runs: Path):
    at = open_page()
    _fill(at, max_train=2, name="too-small")
    at.button(key="train_start").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("Invalid settings:")
    assert "max_train" in errors[0]
    assert state.job_board().current is None and not any(empty_runs.iterdir())


def test_data_errors_are_shown_and_block_training(empty_runs: Path, tmp_path: Path):
    at = open_page()
    at.selectbox(key="train_dataset").set_value("folder").run()
    assert "Enter the folder" in texts(at)
    missing = tmp_path / "no-such-folder"
    at.text_input(key="train_root_folder").input(str(missing)).run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and str(missing) in errors[0] and "not a folder" in errors[0]
    assert at.button(key="train_start").disabled


def _start_and_stop(name: str, folder: Path) -> AppTest:
    """Start a 3-epoch run from the form into `folder` and press Stop once it has a
    checkpoint: stopped before its first one (while the encoder reads the training images,
    which takes longer on a busy machine), a run is cancelled and nothing is kept."""
    at = open_page()
    _fill(at, max_train=200, name=name)
    at.number_input(key="train_epochs_quick").set_value(3)
    at.button(key="train_start").click().run()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (folder / CHECKPOINT).is_file():
        time.sleep(0.1)
    at.button(key="train_cancel").click().run()
    _wait_until_done(at)
    return at


def test_a_stopped_run_is_kept_and_resumes_to_a_complete_run(empty_runs: Path,
                                                             fewer_test_images: None,
                                                             smaller_encoder_input: None):
    at = _start_and_stop("stop me", empty_runs / "stop-me")
    assert not at.error, [e.value for e in at.error]
    assert "was stopped" in at.warning[0].value
    folder = empty_runs / "stop-me"
    assert (folder / "checkpoint.safetensors").is_file()
    assert not (folder / "model.safetensors").exists()
    assert "stop-me" in texts(at) and "step" in texts(at)  # listed under Stopped runs

    at.button(key=f"train_resume_{folder}").click().run()
    assert not at.exception
    deadline = time.monotonic() + 90  # the page still shows the stop warning until then
    while time.monotonic() < deadline and not (folder / "metrics.json").exists():
        time.sleep(0.5)
    _wait_until_done(at)
    assert any("stop-me" in s.value and "finished" in s.value for s in at.success)
    runs = list_runs(empty_runs)
    assert [(r.name, r.complete) for r in runs] == [("stop-me", True)]
    assert not (folder / "checkpoint.safetensors").exists()


def test_a_stopped_run_can_be_deleted(empty_runs: Path):
    at = _start_and_stop("drop me", empty_runs / "drop-me")
    assert (empty_runs / "drop-me" / "checkpoint.safetensors").is_file()
    at.button(key=f"train_delete_{empty_runs / 'drop-me'}").click().run()
    assert not at.exception
    assert not (empty_runs / "drop-me").exists()
