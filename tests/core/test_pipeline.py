"""End to end on the built-in shapes: train, save, reload, score; both settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core import pipeline
from core.config import DataConfig
from core.data import DataError, load_split
from core.pipeline import evaluate_run, train_run
from core.presets import preset
from core.runs import CONFIG, HISTORY, METRICS, WEIGHTS, RunError, load_run
from core.train.scoring import score_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes_split():
    return load_split(DataConfig())


TRAINED = {}  # run folder -> the model object train_run saved there, as it was in memory


@pytest.fixture(scope="module", params=["quick", "scratch"])
def one_class_run(request, tmp_path_factory, shapes_split):
    """A short run of each encoder: the pretrained one (quick) and the from-scratch ResNet."""
    cfg = preset(request.param, DataConfig())
    cfg.train.epochs = 4
    if request.param == "quick":
        cfg.model.input_size = 64  # the encoder at half its default size: a quarter of the time
    out = tmp_path_factory.mktemp("runs") / f"one-class-{request.param}"

    def keep(path, cfg, model):
        TRAINED[path] = model
        save(path, cfg, model)

    save = pipeline.save_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "save_model", keep)
        metrics = train_run(cfg, out, split=shapes_split, explore=False)  # test_artefacts.py
    return out, metrics


def test_one_class_run_folder_is_complete(one_class_run):
    out, metrics = one_class_run
    for name in (WEIGHTS, CONFIG, METRICS, HISTORY):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / HISTORY).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    scales = load_run(out).config.model.scales
    assert all(0 < r[f"usage_{s}"] <= 1 for r in rows for s in scales)
    assert rows[-1]["loss"] < rows[0]["loss"]
    required = {"auroc", "auroc_by_type", "aupr", "fpr_at_95_tpr", "pixel_auroc",
                "train_seconds", "n_train", "n_test"}
    assert required <= set(json.loads((out / METRICS).read_text()))
    assert metrics["n_train"] == 1200 and metrics["n_test"] == 700


def test_every_anomaly_kind_is_detected_well_above_chance(one_class_run):
    _, metrics = one_class_run
    assert set(metrics["auroc_by_type"]) == {"object", "style", "local"}
    for kind, value in metrics["auroc_by_type"].items():
        assert value > 0.75, (kind, value)
    assert metrics["pixel_auroc"] > 0.85


def test_reloaded_run_scores_like_the_trained_one(one_class_run, shapes_split):
    out, metrics = one_class_run
    trained = score_images(TRAINED[out], shapes_split.test.images[:64])
    reloaded = score_images(load_run(out).model, shapes_split.test.images[:64])
    assert TRAINED[out] is not load_run(out).model
    np.testing.assert_allclose(reloaded.image, trained.image, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reloaded.pixel_maps, trained.pixel_maps, atol=1e-3)
    for term, values in trained.terms.items():
        np.testing.assert_allclose(reloaded.terms[term], values, rtol=1e-5, atol=1e-5)
    assert reloaded.pixel_maps.shape == (64, 32, 32)
    if load_run(out).config.preset != "scratch":
        return  # evaluating again is the same code for both encoders: once, on the faster one
    recomputed = evaluate_run(out)
    assert recomputed["auroc"] == pytest.approx(metrics["auroc"], abs=1e-6)
    assert recomputed["train_seconds"] == metrics["train_seconds"]


def test_threshold_flags_few_normals(one_class_run):
    _, metrics = one_class_run
    # The threshold is the 95% quantile of held-out normal scores.
    assert metrics["fpr_at_threshold"] < 0.2
    assert metrics["tpr_at_threshold"] > metrics["fpr_at_threshold"]


def test_unbalanced_setting_end_to_end(tmp_path, shapes_split):
    data = DataConfig(setting="unbalanced", anomaly_ratio=0.05)
    split = load_split(data)
    assert int(split.train.labels.sum()) == 60
    cfg = preset("quick", data)
    cfg.train.epochs = 3
    cfg.model.input_size = 64  # the encoder at half its default size: a quarter of the time
    metrics = train_run(cfg, tmp_path / "unbalanced", split=split, explore=False)
    run = load_run(tmp_path / "unbalanced")
    assert bool(run.model.detector.clf_weight.any()), "the labelled anomalies trained no head"
    assert metrics["n_train_anomalies"] == 60
    for kind, value in metrics["auroc_by_type"].items():
        assert value > 0.75, (kind, value)


def test_same_seed_gives_the_same_model(tmp_path):
    data = DataConfig(max_train=128)
    split = load_split(data)
    cfg = preset("quick", data)
    cfg.train.epochs, cfg.train.batch_size = 1, 32
    cfg.model.input_size = 64
    first = train_run(cfg, tmp_path / "a", split=split, explore=False)
    second = train_run(cfg, tmp_path / "b", split=split, explore=False)
    assert first["auroc"] == second["auroc"]
    a, b = load_run(tmp_path / "a").model, load_run(tmp_path / "b").model
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_a_failed_evaluation_keeps_the_trained_model_and_says_how_to_finish(
        tmp_path, monkeypatch):
    data = DataConfig(max_train=64)
    split = load_split(data)
    cfg = preset("scratch", data)
    cfg.train.epochs, cfg.train.batch_size = 1, 32

    def broken(*args, **kwargs):
        raise ValueError("Input contains infinity")

    monkeypatch.setattr(pipeline, "evaluate", broken)
    with pytest.raises(RunError, match=r"trained and saved.*infinity.*anomem evaluate"):
        train_run(cfg, tmp_path / "run", split=split, explore=False)
    monkeypatch.undo()
    assert (tmp_path / "run" / WEIGHTS).is_file()
    metrics = evaluate_run(tmp_path / "run")  # the promised way to finish the run
    assert (tmp_path / "run" / METRICS).is_file() and 0 <= metrics["auroc"] <= 1


def _tall_category(root, rng):
    """An MVTec-layout category of 24 x 60 px noise photos (width x height, like KolektorSDD's
    205 x 512); each defect is a bright horizontal scratch one pixel high."""
    from PIL import Image

    def photo(path, scratch=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        array = (rng.random((60, 24)) * 60 + 80).astype(np.uint8)
        if scratch is not None:
            array[scratch, 4:20] = 255
        Image.fromarray(array).save(path)
        return array

    for i in range(40):
        photo(root / "train" / "good" / f"{i:03d}.png")
    for i in range(8):
        photo(root / "test" / "good" / f"{i:03d}.png")
        row = int(rng.integers(5, 55))
        photo(root / "test" / "scratch" / f"{i:03d}.png", scratch=row)
        mask = np.zeros((60, 24), dtype=np.uint8)
        mask[row, 4:20] = 255
        (root / "ground_truth" / "scratch").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return root


def test_a_tall_data_set_trains_and_scores_at_its_aspect(tmp_path):
    """Non-square photos are read at their aspect end to end: the config records the shape,
    the maps have it, and a reloaded run scores an image file of another size the same way."""
    from core.data.imageio import read_image

    root = _tall_category(tmp_path / "tall", np.random.default_rng(0))
    data = DataConfig(dataset="mvtec", root=str(root), image_size=32)
    cfg = preset("quick", data)
    cfg.train.epochs, cfg.train.holdout = 2, 0.25
    cfg.model.input_size = 64
    metrics = train_run(cfg, tmp_path / "run", explore=False)
    run = load_run(tmp_path / "run")
    assert run.config.model.shape == (96, 32)  # 32 x 2.5 = 80 -> a multiple of 32
    assert json.loads((tmp_path / "run" / CONFIG).read_text())["model"]["image_shape"] == [96, 32]
    assert run.model.map_size("stage3_s8") == (24, 8)  # the encoder sees 192 x 64 px
    assert metrics["auroc"] > 0.9 and metrics["pixel_auroc"] > 0.9
    image = read_image(root / "test" / "scratch" / "000.png", run.config.model.shape, 3)
    scored = score_images(run.model, torch.from_numpy(image).permute(2, 0, 1)[None])
    assert scored.pixel_maps.shape == (1, 96, 32)
    squashed = DataConfig(dataset="mvtec", root=str(root), image_size=32, keep_aspect=False)
    run.config.data = squashed
    with pytest.raises(DataError, match=r"read at 32 x 32 px, but the model reads 96 x 32"):
        pipeline.evaluate(run.model, load_split(squashed))
