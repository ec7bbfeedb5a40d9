"""core/cli.py: bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from core.cli import EXIT_BAD_INPUT, _config_from_args, _parser, main
from core.config import ModelConfig, RunConfig
from core.data.imageio import read_image
from core.model.anomem import AnoMem
from core.presets import PRETRAINED_EPOCHS, UNBOUNDED_EPOCHS
from core.runs import CONFIG, load_run, save_model
from core.train.scoring import score_images


def assert_one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("anomem: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def saved_run(tmp_path: Path, tiny_cfg: ModelConfig) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "run"
    save_model(path, RunConfig(model=tiny_cfg), AnoMem(tiny_cfg))
    return path


def test_unknown_normal_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--normal-class", "hexagon", "--out", str(tmp_path / "r")])
    assert code == EXIT_BAD_INPUT
    assert_one_line_error(capsys, "'hexagon'", "circle")


def test_folder_dataset_needs_a_data_root(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--dataset", "folder", "--out", str(tmp_path / "r")])
    assert code == EXIT_BAD_INPUT
    assert_one_line_error(capsys, "--data-root")


def test_missing_data_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-folder"
    code = main(["train", "--dataset", "folder", "--data-root", str(missing),
                 "--out", str(tmp_path / "r")])
    assert code == EXIT_BAD_INPUT
    assert_one_line_error(capsys, str(missing), "not a folder")


def test_evaluate_with_malformed_config(saved_run: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    (saved_run / CONFIG).write_text('{"model": ')
    assert main(["evaluate", str(saved_run)]) == EXIT_BAD_INPUT
    assert_one_line_error(capsys, str(saved_run / CONFIG), "not valid JSON")


def test_evaluate_a_folder_that_is_not_a_run(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(tmp_path)]) == EXIT_BAD_INPUT
    assert_one_line_error(capsys, "config.json")


def test_score_a_missing_image(saved_run: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.png"
    assert main(["score", str(saved_run), str(missing)]) == EXIT_BAD_INPUT
    assert_one_line_error(capsys, str(missing))


def test_score_a_file_that_is_not_an_image(saved_run: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    assert main(["score", str(saved_run), str(bogus)]) == EXIT_BAD_INPUT
    assert_one_line_error(capsys, "notes.png")


def test_out_pointing_at_an_existing_run(saved_run: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in saved_run.iterdir())
    assert main(["train", "--out", str(saved_run)]) == EXIT_BAD_INPUT
    assert_one_line_error(capsys, "already holds a run")
    assert sorted(p.name for p in saved_run.iterdir()) == before


@pytest.mark.parametrize(("args", "needle"), [
    (["--epochs", "0"], "epochs"),
    (["--image-size", "4"], "image_size"),
    (["--anomaly-ratio", "0"], "anomaly_ratio"),
    (["--shift-fraction", "0"], "shift_fraction"),
    (["--set", "model.rotaton=true"], "no field 'model.rotaton'"),
    (["--set", "train.w_rotation=-1"], "w_rotation"),
])
def test_out_of_range_options(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              args: list[str], needle: str) -> None:
    assert main(["train", *args, "--out", str(tmp_path / "r")]) == EXIT_BAD_INPUT
    assert_one_line_error(capsys, needle)


def test_max_train_below_four(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--dataset", "digits", "--normal-class", "0", "--max-train", "3",
                 "--epochs", "1", "--out", str(tmp_path / "r")])
    assert code == EXIT_BAD_INPUT
    assert_one_line_error(capsys, "max_train=3", "at least 4")


def test_too_few_normal_training_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Three normal images load fine, but cannot be split into fit and calibration sets."""
    monkeypatch.setenv("ANOMEM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "fruit"
    for split, name, count in (("train", "apple", 3), ("test", "apple", 1), ("test", "pear", 1)):
        for i in range(count):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 12), (40 * i, 90, 60)).save(root / split / name / f"{i}.png")
    code = main(["train", "--dataset", "folder", "--data-root", str(root), "--normal-class",
                 "apple", "--image-size", "16", "--epochs", "1", "--out", str(tmp_path / "r")])
    assert code == EXIT_BAD_INPUT
    assert_one_line_error(capsys, "normal training images", "got 3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--dataset", "digits", "--normal-class", "0", "--device", "cuda",
                 "--epochs", "1", "--out", str(tmp_path / "r")])
    assert code == EXIT_BAD_INPUT
    assert_one_line_error(capsys, "cuda", "no CUDA GPU")


def test_datasets_lists_shapes_and_its_classes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    shapes_line = next(i for i, line in enumerate(lines) if line.startswith("shapes "))
    assert lines[shapes_line + 1].split("classes:")[1].strip() == \
        "circle, square, triangle, cross"
    assert any(line.startswith("folder ") and "needs --data-root" in line for line in lines)


def test_datasets_with_a_bad_root_still_lists_everything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets", "--data-root", str(tmp_path / "nowhere")]) == 0
    out = capsys.readouterr().out
    assert "circle, square, triangle, cross" in out
    assert "not a folder" in out


def test_score_prints_one_line_per_image_and_saves_distinct_overlays(
        saved_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = []
    for folder, value in (("a", 40), ("b", 200)):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "000.png"  # the same file name twice
        Image.new("RGB", (32, 32), (value, value, value)).save(path)
        paths.append(str(path))
    out = tmp_path / "overlays"
    assert main(["score", str(saved_run), *paths, "--overlays", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths
    run = load_run(saved_run)  # the printed scores are the model's on those very images
    images = torch.stack([torch.tensor(read_image(Path(p), 32, 3)).permute(2, 0, 1)
                          for p in paths])
    expected = score_images(run.model, images, with_maps=False).image
    threshold = float(run.model.detector.threshold)
    for line, score in zip(lines, expected, strict=True):
        printed, verdict = line.split("\t")[1:]
        assert printed == f"{score:.4f}"
        assert verdict == ("anomaly" if score > threshold else "normal")
    assert sorted(p.name for p in out.iterdir()) == ["000_000_overlay.png", "001_000_overlay.png"]


@pytest.mark.parametrize(("args", "message"), [
    (["--suites", "shapes,nope"], "--suites: unknown nope"),
    (["--ratios", "0.1,x"], "--ratios '0.1,x': expected numbers"),
    (["--ratios", "2"], "expected numbers in (0, 1]"),
    (["--minutes", "0"], "--minutes 0.0: expected a positive budget"),
    (["--data-root", "/no/such/folder"], "--data-root /no/such/folder: not a folder"),
])
def test_bench_cli_refuses_bad_options(args: list[str], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--out", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("preset", "epochs"), [("quick", PRETRAINED_EPOCHS),
                                                ("scratch", UNBOUNDED_EPOCHS)])
def test_a_budget_without_epochs_follows_the_one_epoch_rule(preset: str, epochs: int) -> None:
    """--max-minutes alone: a from-scratch encoder trains until the budget is spent, a frozen
    pretrained one stops at its preset's epochs (or earlier); --epochs always wins."""
    base = ["train", "--preset", preset, "--max-minutes", "2", "--out", "x"]
    cfg = _config_from_args(_parser().parse_args(base))
    assert (cfg.train.epochs, cfg.train.max_minutes) == (epochs, 2.0)
    cfg = _config_from_args(_parser().parse_args([*base, "--epochs", "3",
                                                  "--shift-fraction", "0.25"]))
    assert (cfg.train.epochs, cfg.train.shift_fraction) == (3, 0.25)
