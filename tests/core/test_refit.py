"""core/refit.py and `anomem refit`: marks refit stage 2 as a new run; bad marks write nothing."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from core import artefacts
from core.cli import EXIT_BAD_INPUT, main
from core.config import DataConfig
from core.data import NORMAL, DataError, load_split
from core.explore import inspect_image
from core.model.lessons import Kinds
from core.pipeline import evaluate, train_run
from core.refit import (
    REFIT,
    VIEWS,
    Context,
    lesson_story,
    mark_test_image,
    mark_upload,
    marked_reach,
    refit_run,
)
from core.runs import CHECKPOINT, CONFIG, WEIGHTS, RunError, load_run, run_lock
from tests.app.helpers import tiny_config

pytestmark = pytest.mark.slow


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "parent"
    train_run(tiny_config(), out)
    return out


@pytest.fixture(scope="module")
def split(parent: Path):
    return load_split(load_run(parent).config.data)


def png(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def test_refit_saves_a_new_run_and_leaves_the_parent_alone(parent: Path, split, tmp_path: Path):
    before = snapshot(parent)
    cfg = load_run(parent).config
    normals = np.flatnonzero(split.test.labels.numpy() == 0)[:3]
    marks = [mark_test_image(cfg, split, int(i), "normal") for i in normals]
    marks.append(mark_upload("odd.png", png(tmp_path / "odd.png", (250, 0, 250)).read_bytes(),
                             "local", cfg))
    report = refit_run(parent, marks, tmp_path / "child")
    assert snapshot(parent) == before  # the parent is never written
    child = load_run(tmp_path / "child")
    assert child.config.lineage.parent == "parent"
    assert [m["source"] for m in child.config.lineage.marks] == [
        *(f"test:{i}" for i in normals), "odd.png"]
    assert [m["label"] for m in child.config.lineage.marks] == ["normal"] * 3 + ["local"]
    assert all(len(m["sha256"]) == 64 for m in child.config.lineage.marks)
    assert report.n_test == len(split.test) - 3  # the marked test images are left out
    assert report.n_normal_marks == 3 and report.n_anomaly_marks == 1
    assert set(report.after["auroc_by_type"]) == set(report.before["auroc_by_type"])
    saved = json.loads((tmp_path / "child" / REFIT).read_text())
    assert saved["parent"] == "parent" and saved["before"] == report.before
    # everything the parent fitted is kept bit for bit; the marks became lessons
    p_state, c_state = load_run(parent).model.state_dict(), child.model.state_dict()
    assert set(c_state) - set(p_state) == {f"lessons.{b}" for b in (
        "keys", "whiten", "sight", "radius", "anomalous", "normal_score", "alarm_score",
        "kind_centre", "kind_direction", "kind_cut", "kind_top", "kind_relief")}
    for key in p_state:
        assert np.array_equal(p_state[key].numpy(), c_state[key].numpy()), key
    lessons = child.model.lessons
    assert len(lessons.keys) == 4 * VIEWS and int(lessons.anomalous.sum()) == VIEWS
    assert not torch.allclose(lessons.whiten, torch.eye(len(lessons.whiten)))  # the normals'
    assert child.config.model.lessons == 4 * VIEWS
    # the test set was not scored again: the parent's explorer data, taught, says what a full
    # evaluation would, and the child's explorer data is written from it
    full, _ = evaluate(child.model, split)
    saved = json.loads((tmp_path / "child" / "metrics.json").read_text())
    for key in ("auroc", "aupr", "fpr_at_threshold", "pixel_auroc", "auroc_by_scale"):
        assert saved[key] == pytest.approx(full[key], abs=1e-6), key
    assert artefacts.load(tmp_path / "child") is not None
    # explorer data saved under an earlier rule of the lessons (here: scores off by one) is
    # read with this version's: the taught scores are made again from the untaught ones
    art = artefacts.load(tmp_path / "child")
    stale = dataclasses.replace(art.scored, image=art.scored.image + 1.0)
    artefacts.save(tmp_path / "child", dataclasses.replace(art, scored=stale))
    shown = artefacts.ensure(tmp_path / "child", child.model, split, 0).scored.image
    assert np.allclose(shown, art.scored.image, atol=1e-6)


def test_bad_marks_are_refused_and_nothing_is_written(parent: Path, split, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]):
    before = snapshot(parent)
    out = tmp_path / "child"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert main(["refit", str(parent), "--normal", str(bad), "--out", str(out)]) == \
        EXIT_BAD_INPUT
    assert "bad.png" in capsys.readouterr().err
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (21 * 2**20))
    assert main(["refit", str(parent), "--normal", str(big), "--out", str(out)]) == \
        EXIT_BAD_INPUT
    assert "over the limit" in capsys.readouterr().err
    good = png(tmp_path / "good.png", (10, 200, 30))
    assert main(["refit", str(parent), "--anomaly", str(good), "--out", str(out)]) == \
        EXIT_BAD_INPUT
    assert "TYPE=FILE" in capsys.readouterr().err

    other = load_run(parent).config
    other.data = DataConfig(dataset="digits")  # a mark made on a run of another data set
    foreign = mark_test_image(other, load_split(other.data), 0, "normal")
    with pytest.raises(DataError, match="another data set"):
        refit_run(parent, [foreign], out)
    with pytest.raises(DataError, match="nothing to refit"):
        refit_run(parent, [], out)
    with run_lock(parent), pytest.raises(RunError, match="is training"):
        refit_run(parent, [mark_test_image(load_run(parent).config, split, 0, "normal")], out)
    assert not out.exists() and snapshot(parent) == before


def test_a_broken_parent_is_refused(parent: Path, split, tmp_path: Path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG).write_text((parent / CONFIG).read_text())
    (broken / CHECKPOINT).write_bytes(b"x")  # a stopped run: no weights yet
    mark = mark_test_image(load_run(parent).config, split, 0, "normal")
    with pytest.raises(RunError, match="is stopped"):
        refit_run(broken, [mark], tmp_path / "child")
    assert not (tmp_path / "child").exists()


def test_the_cli_refits_with_files(parent: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]):
    normal = png(tmp_path / "n.png", (30, 30, 30))
    anomaly = png(tmp_path / "a.png", (255, 255, 0))
    out = tmp_path / "child"
    assert main(["refit", str(parent), "--normal", str(normal), "--anomaly",
                 f"object={anomaly}", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 normal and 1 anomaly marks" in text and "false-positive rate" in text
    marks = load_run(out).config.lineage.marks
    assert [(m["source"], m["label"]) for m in marks] == [(str(normal), "normal"),
                                                          (str(anomaly), "object")]
    data = io.BytesIO(normal.read_bytes())
    assert Image.open(data).size == (32, 32)


@torch.no_grad()
def test_a_marked_false_alarm_clears_its_look_alike_and_a_refit_keeps_its_parents_lessons(
        parent: Path, split, tmp_path: Path):
    run = load_run(parent)
    cfg, model = run.config, run.model
    test = split.test
    images = test.images.float() / 255
    normal = np.flatnonzero(test.labels.numpy() == 0)
    scores = model.score(images[normal]).image
    worst = int(normal[int(scores.argmax())])  # the most alarming normal
    look_alike = (images[worst:worst + 1] * 0.97).clamp(0, 1)  # a little darker
    before = float(model.score(look_alike).image[0])
    refit_run(parent, [mark_test_image(cfg, split, worst, "normal")], tmp_path / "child")
    child = load_run(tmp_path / "child").model
    assert child.lessons is not None
    assert float(child.score(images[worst:worst + 1]).image[0]) == pytest.approx(
        float(child.lessons.normal_score), abs=1e-4)
    assert float(child.score(look_alike).image[0]) < before
    # the explorer tells a score its lessons moved from the detector's own
    report_before = inspect_image(model, test.images[worst])
    report = inspect_image(child, test.images[worst])
    assert report_before.untaught is None and report_before.moved_by_lessons == 0
    assert report.untaught == pytest.approx(report_before.score, abs=1e-5)
    assert report.moved_by_lessons < 0 and report.score == pytest.approx(
        float(child.lessons.normal_score), abs=1e-4)
    # elsewhere far from the mark, scores are the parent's
    far = child.lessons.reach(child.score_and_describe(images)[1])[0] == 0
    assert far.any()
    assert torch.allclose(child.score(images[far]).image, model.score(images[far]).image)

    other = int(normal[int(scores.argmin())])
    refit_run(tmp_path / "child", [mark_test_image(cfg, split, other, "normal")],
              tmp_path / "grandchild")
    grandchild = load_run(tmp_path / "grandchild").model
    assert grandchild.lessons is not None and len(grandchild.lessons.keys) == 2 * VIEWS
    assert torch.equal(grandchild.lessons.keys[:VIEWS], child.lessons.keys)
    assert torch.equal(grandchild.lessons.sight[:VIEWS], child.lessons.sight)
    assert torch.allclose(grandchild.lessons.radius[:VIEWS], child.lessons.radius, rtol=1e-4)


@torch.no_grad()
def test_marked_anomalies_of_a_type_teach_a_kind_that_later_refits_keep(parent: Path, split,
                                                                         tmp_path: Path):
    cfg = load_run(parent).config
    types = np.array(split.test.types)
    kind = sorted(set(types[split.test.labels.numpy() == 1]))[0]
    of_kind = np.flatnonzero(types == kind)[:3]
    report = refit_run(parent, [mark_test_image(cfg, split, int(i), kind) for i in of_kind],
                       tmp_path / "child")
    [summary] = report.lessons["kinds"]
    assert summary["label"] == kind and summary["marks"] == 3
    child = load_run(tmp_path / "child")
    assert child.config.model.lesson_kinds == int(summary["generalises"])
    assert child.model.lessons is not None
    assert len(child.model.lessons.kind_cut) == child.config.model.lesson_kinds
    one = refit_run(tmp_path / "child", [mark_test_image(cfg, split, int(of_kind[0]), kind)],
                    tmp_path / "grandchild")
    assert one.lessons["kinds"] == []  # one mark of a type teaches no kind ...
    grandchild = load_run(tmp_path / "grandchild").model
    assert grandchild.lessons is not None  # ... and the child's is kept
    assert torch.equal(grandchild.lessons.kind_direction, child.model.lessons.kind_direction)


@torch.no_grad()
def test_marked_normals_are_checked_for_a_sort_and_what_it_teaches_is_saved(
        parent: Path, split, tmp_path: Path):
    """Darker copies of test normals, marked normal: the refit records whether they are of one
    sort (and whether it is taught); a taught sort is a kind row that lowers scores, kept by
    later refits."""
    cfg = load_run(parent).config
    normal = np.flatnonzero(split.test.labels.numpy() == 0)
    darker = (split.test.images[normal[:4]].float() * 0.5).to(torch.uint8)
    marks = []
    for i, image in enumerate(darker):
        data = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(data, format="PNG")
        marks.append(mark_upload(f"dark{i}.png", data.getvalue(), NORMAL, cfg))
    report = refit_run(parent, marks, tmp_path / "child")
    sort = report.lessons["sort"]
    assert sort["marks"] == 4 and {"left_out_z", "relief", "taught"} <= set(sort)
    # marks of one sort reach only their nearest held-out normal: the sort carries the lesson
    assert report.lessons["reach"] == (1.0 if sort["taught"] else
                                       report.lessons["rehearsed_reach"])
    assert ("images marked normal" in lesson_story(report.lessons)) is True
    child = load_run(tmp_path / "child")
    assert child.config.model.lesson_kinds == int(sort["taught"])
    lessons = child.model.lessons
    assert lessons is not None
    assert torch.equal(lessons.kind_relief > 0, torch.tensor([True] * int(sort["taught"])))
    if sort["taught"]:
        assert float(lessons.kind_relief[0]) == pytest.approx(sort["relief"])
    one = refit_run(tmp_path / "child", marks[:1], tmp_path / "grandchild")
    assert one.lessons["sort"] is None  # one mark cannot show a sort ...
    kept = load_run(tmp_path / "grandchild").model.lessons
    assert kept is not None and torch.equal(kept.kind_relief, lessons.kind_relief)  # ... kept


def test_marked_normals_of_a_taught_sort_or_too_few_reach_their_nearest_normal_alone():
    context = Context(torch.zeros(3, 4), torch.zeros(3), "encoder", 1.3, {})
    sort = Kinds(torch.zeros(1, 4), torch.ones(1, 4), torch.zeros(1), torch.ones(1),
                 torch.tensor([2.0]))
    assert marked_reach(context, Kinds.none(4), 3) == 1.3
    assert marked_reach(context, sort._replace(relief=torch.zeros(1)), 3) == 1.3  # a kind
    assert marked_reach(context, sort, 3) == 1.0
    # one or two marked normals reach their look-alikes alone, whatever the rehearsal found
    assert marked_reach(context, Kinds.none(4), 2) == 1.0
    assert marked_reach(context, Kinds.none(4), 0) == 1.0


@torch.no_grad()
def test_a_run_taught_before_sights_loads_and_scores_as_it_did(parent: Path, split,
                                                               tmp_path: Path):
    """Lesson keys saved by an earlier version (query blocks only, the row of unit norm, no
    sight) load as keys that see the queries, with the distances they were made with."""
    cfg = load_run(parent).config
    refit_run(parent, [mark_test_image(cfg, split, 0, "normal"),
                       mark_test_image(cfg, split, len(split.test) - 1, "local")],
              tmp_path / "now")
    now = tmp_path / "now"
    state = load_file(now / "model.safetensors")
    n = len(load_run(now).model.scales) * 2
    width = state["lessons.keys"].shape[1] - load_run(now).model.descriptor_blocks["encoder"]
    state["lessons.keys"][:, width:] = 0  # today's equivalent of an earlier key ...
    state["lessons.sight"][:] = True
    state["lessons.sight"][:, -1] = False  # ... sees the queries only
    save_file(state, now / "model.safetensors")
    earlier = {**state, "lessons.keys": state["lessons.keys"][:, :width] / n ** 0.5}
    del earlier["lessons.sight"]
    shutil.copytree(now, tmp_path / "earlier")
    save_file(earlier, tmp_path / "earlier" / "model.safetensors")
    images = split.test.images.float() / 255
    a = load_run(now).model.score(images).image
    b = load_run(tmp_path / "earlier").model.score(images).image
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, load_run(parent).model.score(images).image)  # it was taught


def test_a_runs_lesson_context_is_made_once_while_its_weights_stay(
        parent: Path, split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Foresee and the refit after it (or a second refit) share the run's held-out context."""
    import core.refit as refit

    made = []
    real = refit.lesson_context
    monkeypatch.setattr(refit, "lesson_context", lambda *a: made.append(a) or real(*a))
    monkeypatch.setattr(refit, "_contexts", {})
    marks = [mark_test_image(load_run(parent).config, split, 0, NORMAL)]
    refit_run(parent, marks, tmp_path / "a")
    refit_run(parent, marks, tmp_path / "b")
    assert len(made) == 1
    first, second = (load_run(tmp_path / n).model.lessons for n in "ab")
    assert first is not None and second is not None  # the first refit changed nothing shared
    assert torch.equal(first.radius, second.radius) and torch.equal(first.keys, second.keys)
    copy = tmp_path / "copy"
    shutil.copytree(parent, copy)
    refit_run(copy, marks, tmp_path / "c")  # another run folder: its own
    stat = (copy / WEIGHTS).stat()
    os.utime(copy / WEIGHTS, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    refit_run(copy, marks, tmp_path / "d")  # its weights written again: made again
    assert len(made) == 3


def test_the_lesson_caption_says_what_marked_normals_see_and_why():
    tried = {"encoder x1.2": {"cleared": 0.4, "ordinary_reached": 0.05, "auroc_loss": 0.001,
                              "detection_loss": 0.0},
             "queries x1": {"cleared": 0.1, "ordinary_reached": 0.0, "auroc_loss": 0.0,
                            "detection_loss": 0.0}}
    story = lesson_story({"sight": "encoder", "reach": 1.2, "evidence": {"tried": tried}})
    assert "encoder's deepest features" in story and "1.2 times" in story
    assert "of the 2 lessons rehearsed" in story and "other false alarms (40%" in story
    assert "at most as far as its nearest" in story  # no shrink recorded: the whole distance
    assert "small tail of all normals" in story
    kinds = lesson_story({"sight": "encoder", "reach": 1.0, "kinds": [
        {"label": "scratch", "marks": 5, "left_out_z": 1.25, "generalises": True},
        {"label": "dent", "marks": 3, "left_out_z": -0.4, "generalises": False}]})
    assert "The 5 images marked 'scratch' teach their kind" in kinds and "1.2 spreads" in kinds
    assert "marked 'dent' teach nothing beyond their look-alikes" in kinds
    assert "-0.4 spreads" in kinds and "+1 needed" in kinds
    only = lesson_story({"sight": "encoder", "reach": 1.0, "keys": 16, "anomaly_keys": 16,
                         "kinds": []})
    assert "marked normal" not in only and only.startswith("A marked anomaly reaches")
    shrunk = lesson_story({"sight": "queries", "reach": 1.0, "evidence": {"tried": {}},
                           "anomaly_keys": 8, "anomaly_shrink": 0.8})
    assert "0.8 times its distance" in shrunk
    tried["encoder x1"] = {"cleared": 0.0, "ordinary_reached": 0.0, "auroc_loss": 0.01,
                           "detection_loss": 0.2}
    costly = lesson_story({"sight": "encoder", "reach": 1.0, "evidence": {"tried": tried}})
    assert "none of the 3 lessons" in costly and "so the default" in costly
    assert "reaches at most as far as its nearest held-out normal" in costly
    sorts = {"marks": 6, "left_out_z": 4.2, "generalises": True, "relief": 1.5,
             "auroc_loss": 0.001, "detection_loss": 0.0, "taught": True}
    sorted_ = lesson_story({"sight": "encoder", "reach": 1.0, "rehearsed_reach": 1.2,
                            "evidence": {"tried": tried}, "sort": sorts})
    assert "reaches as far as its nearest held-out normal: the marks are of one sort" in sorted_
    assert "rehearsed on held-out false alarms, 1.2 times" in sorted_
    assert "The 6 images marked normal are of one sort" in sorted_ and "4.2 spreads" in sorted_
    assert "up to 1.50 lower" in sorted_ and "0% of the pseudo-anomalies caught" in sorted_
    few = lesson_story({"sight": "encoder", "reach": 1.0, "rehearsed_reach": 1.3,
                        "marked_normals": 2, "evidence": {"tried": tried}})
    assert "nearest held-out normal (its look-alikes): 2 marked normals are too few" in few
    assert "rehearsed on held-out false alarms, 1.3 times, is for a batch" in few
    costly_sort = lesson_story({"sight": "encoder", "reach": 1.0,
                                "sort": {**sorts, "taught": False, "detection_loss": 0.3}})
    assert "would have cost 30% of the pseudo-anomalies caught" in costly_sort
    assert "only their look-alikes are cleared" in costly_sort
    apart = lesson_story({"sight": "encoder", "reach": 1.0,
                          "sort": {**sorts, "generalises": False, "left_out_z": -1.3}})
    assert "are not of one sort" in apart and "-1.3 spreads" in apart and "+2 needed" in apart
    few = lesson_story({"sight": "encoder", "reach": 1.0, "evidence": {"tried": {}}})
    assert "too few held-out false alarms" in few
    # a refit saved before sights: what it did, no made-up reason
    old = lesson_story({"reach": 1.1, "reach_evidence": {"reaches": {}}})
    assert "memory queries" in old and "1.1 times" in old and "too few" not in old
