"""The app: Score page uploads, Train page data."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from core.artefacts import ARTEFACTS
from core.data.imageio import (
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_PIXELS,
)
from core.runs import LOCK, list_runs
from tests.bad_input.cases import (
    GOOD_PNG,
    bomb,
    class_folders,
    snapshot,
)


def bad_uploads() -> list[tuple[str, bytes, str]]:
    """(name, content, part of the expected message) of each kind the Score page refuses."""
    rng = np.random.default_rng(7)
    cut = GOOD_PNG[:len(GOOD_PNG) // 2]
    return [
        ("noise.png", rng.bytes(3000), "not in an image format PIL recognises"),
        ("notes.txt", b"just some text\n", "file type '.txt' is not supported (expected one of"),
        ("setup.exe", b"MZ\x90\x00" + rng.bytes(500), "file type '.exe' is not supported"),
        ("cut.png", cut, "truncated file"),
        ("bomb.png", bomb("PNG", 8000, 6000), f"over the limit of {MAX_UPLOAD_PIXELS}"),
        ("huge.png", GOOD_PNG + bytes(MAX_UPLOAD_BYTES), "MB is over the limit of"),
        ("empty.jpg", b"", "empty file"),
    ]


@pytest.fixture
def app_runs(saved_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(saved_run, root / "tiny")
    monkeypatch.setenv("ANOMEM_RUNS", str(root))
    return root


def test_score_page_names_each_refused_upload_then_scores_a_good_one(app_runs: Path) -> None:
    from tests.app.helpers import open_page

    at = open_page("views/score.py")
    before = snapshot(app_runs)
    uploads = bad_uploads()
    at.file_uploader(key="score_files").set_value(
        [(name, data, "application/octet-stream") for name, data, _ in uploads]).run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert len(errors) == len(uploads)
    for (name, _, needle), error in zip(uploads, errors, strict=True):
        assert error.startswith(f"cannot read image {name!r}: ") and needle in error, error
    assert not at.subheader and not at.metric
    assert snapshot(app_runs) == before  # refused files write nothing
    at.file_uploader(key="score_files").set_value([("good.png", GOOD_PNG, "image/png")]).run()
    assert not at.exception and not at.error
    assert [s.value for s in at.subheader] == ["good.png"]
    assert np.isfinite(float({m.label: m.value for m in at.metric}["Anomaly score"]))
    # A scored file may leave the run's explorer artefacts behind (computed on first use, under
    # the run's lock file), never anything else.
    after = snapshot(app_runs)
    assert {k: v for k, v in after.items() if not k.endswith((ARTEFACTS, LOCK))} == before


def test_train_page_shows_a_class_folder_of_unreadable_images(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_job_board: None) -> None:
    from tests.app.helpers import open_page

    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("ANOMEM_RUNS", str(runs))
    monkeypatch.setenv("ANOMEM_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    class_folders(data, {"train": {"other": 2}, "test": {"good": 1, "other": 1}})
    (data / "train" / "good").mkdir()
    (data / "train" / "good" / "noise.png").write_bytes(np.random.default_rng(3).bytes(800))
    (data / "train" / "good" / "cut.png").write_bytes(GOOD_PNG[:300])
    at = open_page()
    at.selectbox(key="train_dataset").set_value("folder").run()
    at.text_input(key="train_root_folder").input(str(data)).run()
    at.selectbox(key="train_normal_folder").set_value("good").run()
    at.button(key="train_start").click().run()
    deadline = time.monotonic() + 60
    while not at.error and time.monotonic() < deadline:  # as the page's polling would
        time.sleep(0.2)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "failed" in errors[0], errors
    assert f"class folder '{data / 'train' / 'good'}': none of its 2 image file(s)" in errors[0]
    for name in ("noise.png", "cut.png"):
        assert repr(str(data / "train" / "good" / name)) in errors[0]
    assert list_runs(runs) == [] and not any(runs.iterdir())
