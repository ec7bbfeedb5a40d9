"""Putting a run to work: the Python API, `anomem score` on folders, `anomem export` to ONNX."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.cli import main
from core.config import DataConfig, RunConfig
from core.data import load_split
from core.export import ExportError, export_run
from core.inference import Detector, ModelInfo
from core.model.lessons import Kinds
from core.pipeline import train_run
from core.presets import preset
from core.refit import Context, mark_test_image, refit_run, with_lessons
from core.runs import load_run, save_model
from core.train.scoring import score_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["scratch", "quick"])
def trained(request, tmp_path_factory) -> Path:
    """A short run of each encoder on 128 shapes: the from-scratch ResNet and the pretrained
    EfficientNet-Lite0 (at a 32 px input to stay quick)."""
    data = DataConfig(max_train=128)
    cfg = preset(request.param, data)
    cfg.train.epochs, cfg.train.batch_size = 1, 32
    if cfg.model.pretrained:
        cfg.model.input_size = 32
    out = tmp_path_factory.mktemp("deploy") / request.param
    train_run(cfg, out, split=load_split(data), explore=False)
    return out


@pytest.fixture(scope="module")
def test_images(trained: Path) -> torch.Tensor:
    return load_split(load_run(trained).config.data).test.images[::7][:48]


def save_pngs(folder: Path, images: torch.Tensor) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


def test_the_python_api_scores_like_the_model(trained: Path, test_images: torch.Tensor,
                                              tmp_path: Path) -> None:
    run = load_run(trained)
    expected = score_images(run.model, test_images)
    detector = Detector.load(trained)
    hwc = test_images.permute(0, 2, 3, 1).numpy()
    for result in (detector.score(hwc), detector.score(test_images),
                   detector.score(list(hwc)), detector.score_paths(save_pngs(tmp_path,
                                                                             test_images))):
        np.testing.assert_allclose(result.scores, expected.image, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(result.maps, expected.pixel_maps, rtol=1e-2, atol=1e-2)
        assert np.array_equal(result.anomalous, expected.image > detector.info.threshold)
        assert result.scale_maps.shape == (len(test_images), 3, 32, 32)
        for j, scale in enumerate(detector.info.scales):
            np.testing.assert_allclose(result.scale_scores[:, j], expected.per_scale[scale],
                                       rtol=1e-4, atol=1e-4)
    big = np.repeat(np.repeat(hwc[:2], 3, axis=1), 3, axis=2)  # another size: resized
    assert detector.score(big).scores.shape == (2,)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        detector.score(hwc.astype(np.float32))  # floats must be in [0, 1]
    assert detector.info.weights_sha256 and detector.info.normal_class == "circle"


def test_anomem_score_reads_folders_writes_a_csv_and_can_fail_on_anomaly(
        trained: Path, test_images: torch.Tensor, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    paths = save_pngs(tmp_path / "camera" / "day1", test_images[:5])
    paths += save_pngs(tmp_path / "camera" / "day2" / "late", test_images[5:8])
    (tmp_path / "camera" / "notes.txt").write_text("not an image: not searched")
    table = tmp_path / "scores.csv"
    code = main(["score", str(trained), str(tmp_path / "camera"), "--csv", str(table),
                 "--overlays", str(tmp_path / "overlays")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in sorted(paths)]
    rows = list(csv.DictReader(table.open()))
    detector = Detector.load(trained)
    assert list(rows[0]) == ["path", "score", "verdict",
                             *(f"score_{s}" for s in detector.info.scales)]
    anomalous = [row["verdict"] == "anomaly" for row in rows]
    assert code == 0 and len(rows) == 8 and len(list((tmp_path / "overlays").iterdir())) == 8
    code = main(["score", str(trained), *map(str, paths), "--fail-on-anomaly"])
    assert code == (1 if any(anomalous) else 0)
    capsys.readouterr()


@pytest.mark.parametrize("sample", [None])
def test_export_agrees_with_pytorch_and_carries_the_threshold(
        trained: Path, test_images: torch.Tensor, tmp_path: Path, sample: int | None,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.onnx"
    report = export_run(trained, out, images=test_images, sample=sample)
    assert report.checked == len(test_images) and report.verdicts_differ == 0
    assert report.relative_diff < 1e-4
    run_detector, onnx_detector = Detector.load(trained), Detector.load(out)
    assert onnx_detector.info == run_detector.info  # threshold, size, weights' SHA-256 ...
    assert isinstance(onnx_detector.info, ModelInfo)
    a, b = run_detector.score(test_images), onnx_detector.score(test_images[:5])
    np.testing.assert_allclose(b.scores, a.scores[:5], rtol=1e-4, atol=1e-4 * a.scores.std())
    np.testing.assert_allclose(b.maps, a.maps[:5], atol=1e-3)
    # `anomem score --onnx` scores with the export, and refuses another run's export
    paths = save_pngs(tmp_path / "images", test_images[:3])
    assert main(["score", str(trained), *map(str, paths), "--onnx", str(out)]) == 0
    printed = [float(line.split("\t")[1]) for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose(printed, a.scores[:3], atol=2e-4)
    other = Path(shutil.copytree(trained, tmp_path / "other"))
    run = load_run(other)
    run.model.detector.threshold += 1  # another model: its weights' SHA-256 differs
    save_model(other, run.config, run.model)
    assert main(["score", str(other), str(paths[0]), "--onnx", str(out)]) == 2
    assert "not an export of" in capsys.readouterr().err


def test_a_failed_export_leaves_nothing_behind(trained: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import core.export

    def cannot(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::magic\nand a page of details")

    monkeypatch.setattr(core.export.torch.onnx, "export", cannot)
    with pytest.raises(ExportError, match=r"^torch cannot export this model to ONNX: "
                                          r"unsupported operator aten::magic$"):
        export_run(trained, tmp_path / "model.onnx", images=torch.zeros(2, 3, 32, 32,
                                                                        dtype=torch.uint8))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportError, match="ending in .onnx"):
        export_run(trained, tmp_path / "model.bin")


def test_a_taught_run_exports_with_its_lessons(trained: Path, test_images: torch.Tensor,
                                               tmp_path: Path) -> None:
    split = load_split(load_run(trained).config.data)
    cfg = load_run(trained).config
    scores = score_images(load_run(trained).model, split.test.images[:64]).image
    worst = int(np.argmax(scores))
    marks = [mark_test_image(cfg, split, worst, "normal"),
             mark_test_image(cfg, split, int(np.argmin(scores)), "local")]
    refit_run(trained, marks, tmp_path / "taught")
    images = torch.cat([split.test.images[worst:worst + 1], test_images])
    export_run(tmp_path / "taught", tmp_path / "taught.onnx", images=images)
    taught = Detector.load(tmp_path / "taught.onnx")
    lessons = load_run(tmp_path / "taught").model.lessons
    assert lessons is not None
    assert taught.score(images[:1]).scores[0] == pytest.approx(float(lessons.normal_score),
                                                               abs=1e-4)

    # a kind of marked anomalies (a direction) exports too: one that raises half the images;
    # and a sort of marked normals, along the other way, that lowers the other half
    run = load_run(tmp_path / "taught")
    with torch.no_grad():
        score, descriptors = run.model.score_and_describe(images.float() / 255)
    centre = descriptors.mean(0, keepdim=True)
    direction = torch.nn.functional.normalize(descriptors[-1:] - centre, dim=1)
    along = ((descriptors - centre) * direction).sum(1)
    cut = along.median()
    spread = along.std()[None]
    kind = Kinds(centre.repeat(2, 1), torch.cat([direction, -direction]),
                 torch.cat([cut[None], -cut[None]]), torch.cat([cut + spread, -cut + spread]),
                 torch.tensor([0.0, 10.0]))
    context = Context(descriptors, score.image, "encoder", 1.0, {})
    child = with_lessons(run.model, lessons.keys[:0], lessons.anomalous[:0], context, kind, 0)
    assert child.lessons is not None
    weights = child.lessons.kind_weight(descriptors)
    assert (weights > 0).any() and (weights == 0).any()
    shutil.copytree(tmp_path / "taught", tmp_path / "kind")
    cfg = RunConfig.from_dict({**run.config.to_dict(), "model": {
        **run.config.to_dict()["model"], "lessons": child.cfg.lessons, "lesson_kinds": 2}})
    save_model(tmp_path / "kind", cfg, child)
    export_run(tmp_path / "kind", tmp_path / "kind.onnx", images=images)  # checks agreement
    with torch.no_grad():
        expected = child.score(images.float() / 255).image
        without = run.model.score(images.float() / 255).image
    got = torch.as_tensor(Detector.load(tmp_path / "kind.onnx").score(images).scores)
    assert torch.allclose(got.float(), expected, atol=1e-4)
    assert (expected > without + 1e-4).any()  # the kind raised some
    assert (expected < without - 1e-4).any()  # the sort lowered others
