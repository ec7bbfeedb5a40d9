"""core/bench/runners.py: every method's rows, the report beside them, resuming without
recomputing, and the peers' rows."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.bench import runners
from core.bench.feature_peers import FEATURE_PEERS
from core.bench.peers import make_peers
from core.bench.results import ANOMEM, COLUMNS, Results
from core.bench.runners import AnoMemMethod, PeerMethod, bench, methods_for, peers_for
from core.bench.suites import BenchOptions, Cell, plan
from core.data import ImageSet, Split

pytestmark = pytest.mark.slow


def shapes_options(out: Path) -> BenchOptions:
    """The shapes suite in seconds: AnoMem on the from-scratch encoder (the pretrained one
    reads every image at 128 px, minutes on a CPU), and without the peers on pretrained
    features, for the same reason; both have tests of their own."""
    return BenchOptions(out=out, minutes=0.05, suites=("shapes",), feature_peers=False,
                        preset="scratch")


@pytest.fixture(scope="module")
def shapes_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("bench")
    lines: list[str] = []
    bench(shapes_options(out), lines.append)
    return out, lines


def rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_method_gets_one_row_with_per_type_aurocs(shapes_bench) -> None:
    out, lines = shapes_bench
    got = rows(out)
    methods = [r["method"] for r in got]
    assert methods[0] == ANOMEM and len(methods) == len(set(methods))
    assert {"AnoMem, layer2 only", "AnoMem, layer3 only", "AnoMem, layer4 only",
            "AnoMem, no memory (encoder + kNN)", "AnoMem, no stage 2 (deviation norm)",
            "kNN (pixels, k=2)", "Deep SVDD", "AnoMem, fixed weights", "AnoMem, learned weights",
            "AnoMem, pixels/knn only", "AnoMem, pixels/layout only",
            "AnoMem, layer3/local only"} <= set(methods)
    # AnoMem, 3 scales, 2 ablations, 2 weightings, 8 terms alone, 4 peers
    assert len(methods) == 1 + 3 + 2 + 2 + 8 + 4
    for r in got:
        assert list(r) == list(COLUMNS)
        assert 0 <= float(r["auroc"]) <= 1
    main_row = got[0]
    assert set(json.loads(main_row["by_type"])) == {"object", "style", "local"}
    assert 0 < float(main_row["pixel_auroc"]) <= 1 and float(main_row["train_s"]) > 0
    assert (out / "runs" / "shapes-circle-one-class" / "model.safetensors").is_file()
    assert any(line.startswith("[1/5] shapes") for line in lines)


def test_markdown_report_has_a_table_row_per_method(shapes_bench) -> None:
    out, _ = shapes_bench
    md = (out / "results.md").read_text()
    assert "## shapes (built-in)" in md
    assert "| method | AUROC | local | object | style | pixel AUROC | train s |" in md
    for r in rows(out):
        assert f"| {r['method']} | {100 * float(r['auroc']):.1f} |" in md


def test_a_rerun_computes_nothing_again(shapes_bench, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = shapes_bench
    before = (out / "results.csv").read_bytes()

    def fail(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(runners, "run_anomem", fail)
    monkeypatch.setattr(runners, "run_peer", fail)
    lines: list[str] = []
    bench(shapes_options(out), lines.append)
    assert (out / "results.csv").read_bytes() == before
    assert lines[0].startswith("1 cells, 0 (cell, method) pairs to run")


def test_a_missing_row_is_rerun_from_the_saved_model(shapes_bench,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A benchmark killed after AnoMem trained reuses the run folder instead of retraining."""
    out, _ = shapes_bench
    results = Results.load(out / "results.csv")
    kept = {k: v for k, v in results.rows.items() if not v["method"].startswith("AnoMem")}
    expected = {k: v["auroc"] for k, v in results.rows.items()}
    results.rows = kept
    results.add(next(iter(kept.values())))  # rewrite the CSV without AnoMem's rows
    monkeypatch.setattr(runners, "train_run", lambda *a, **k: pytest.fail("retrained"))
    bench(shapes_options(out), lambda line: None)
    again = Results.load(out / "results.csv").rows
    assert {k: v["auroc"] for k, v in again.items()} == expected


def test_refit_stage2_changes_the_detector_and_nothing_else(shapes_bench, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """benchmarks/refit_stage2.py: stage 2 fitted again on a finished bench's encoders."""
    spec = importlib.util.spec_from_file_location(
        "refit_stage2", Path(__file__).parents[3] / "benchmarks" / "refit_stage2.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "bench"
    shutil.copytree(shapes_bench[0], out)
    run = out / "runs" / "shapes-circle-one-class"
    auroc = json.loads((run / "metrics.json").read_text())["auroc"]
    assert script.refit(run, [], "cpu") == (auroc, auroc)  # the same detector, refitted

    before, after = script.refit(run, ["model.pixel_layout=false"], "cpu")
    assert before == auroc
    assert json.loads((run / "config.json").read_text())["model"]["pixel_layout"] is False
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["auroc"] == after and "pixels/layout" not in metrics["auroc_by_term"]
    assert metrics["stage2_refit"]["settings"] == ["model.pixel_layout=false"]

    assert script.drop_anomem_rows(out / "results.csv", {run.name}) == 1
    monkeypatch.setattr(runners, "train_run", lambda *a, **k: pytest.fail("retrained"))
    bench(shapes_options(out), lambda line: None)
    again = {r["method"]: float(r["auroc"]) for r in rows(out)}
    assert again[ANOMEM] == pytest.approx(after, abs=1e-4)  # the CSV keeps 4 decimals


def test_a_checkpoint_that_cannot_be_resumed_is_trained_again(tmp_path: Path) -> None:
    opts = BenchOptions(out=tmp_path, minutes=0.03, suites=("shapes",), preset="scratch")
    cell = plan(opts, lambda line: None)[0]
    folder = tmp_path / "runs" / cell.slug
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(runners.anomem_config(cell, opts).to_dict()))
    (folder / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    said: list[str] = []
    from core.data import load_split

    rows = list(runners.run_anomem(cell, load_split(cell.data(0)), opts, said.append))
    assert any("cannot resume" in line and "training again" in line for line in said)
    assert rows[0]["method"] == ANOMEM and (folder / "model.safetensors").is_file()


def test_every_method_is_run_the_same_way_anomem_first(tmp_path: Path) -> None:
    """AnoMem and each peer are Methods named as their rows will be, so a rerun finds a
    finished (cell, method) before building anything."""
    opts = BenchOptions(out=tmp_path, suites=("shapes",), feature_peers=False)
    cell = plan(opts, lambda line: None)[0]
    methods = methods_for(cell, opts)
    assert isinstance(methods[0], AnoMemMethod) and methods[0].name == ANOMEM
    assert all(isinstance(m, PeerMethod) for m in methods[1:])
    assert [m.name for m in methods[1:]] == [p.name for p in peers_for(cell, opts)]
    assert [m.name for m in methods[1:]] == [p.name for p in make_peers(1, 0, "cpu")]


# ---------------------------------------------------------------------------------------------
# the peers on AnoMem's pretrained features


def test_one_class_cells_get_the_feature_peers_at_anomem_input_size(tmp_path: Path) -> None:
    opts = BenchOptions(out=tmp_path, suites=("shapes",))
    cell = plan(opts, lambda line: None)[0]
    peers = peers_for(cell, opts)
    assert [p.name for p in peers[-3:]] == list(FEATURE_PEERS)
    assert [p.name for p in peers[:-3]] == [p.name for p in make_peers(1, 0, "cpu")]
    size = runners.anomem_config(cell, opts).model.input_size
    assert size == 128 and {p.input_size for p in peers[-3:]} == {size}
    wider = BenchOptions(out=tmp_path, suites=("shapes",), overrides=("model.input_size=160",))
    assert {p.input_size for p in peers_for(cell, wider)[-3:]} == {160}
    off = BenchOptions(out=tmp_path, suites=("shapes",), feature_peers=False, deep_peer=False)
    assert not set(FEATURE_PEERS) & {p.name for p in peers_for(cell, off)}
    unbalanced = Cell("x", "digits", None, "0", "unbalanced", 0.1, ("1",))
    assert [p.name for p in peers_for(unbalanced, opts)] == ["Deep SAD"]


class BrightnessPeer:
    """Scores an image by its mean brightness; gives no maps."""

    name = "brightness"

    def fit(self, normals: torch.Tensor, anomalies: torch.Tensor | None = None) -> None:
        pass

    def score(self, images: torch.Tensor) -> np.ndarray:
        return images.float().mean(dim=(1, 2, 3)).double().numpy()


class BrightnessMapPeer(BrightnessPeer):
    """The same, with each pixel's brightness as the anomaly map."""

    def maps(self, images: torch.Tensor) -> np.ndarray:
        return images.float().mean(dim=1).numpy()


def masked_split(with_masks: bool = True) -> Split:
    """4 dark normal images, 4 anomalies with a bright 2x2 patch that their masks mark."""
    images = torch.full((8, 3, 6, 6), 20, dtype=torch.uint8)
    masks = torch.zeros(8, 6, 6, dtype=torch.uint8)
    images[4:, :, 1:3, 2:4] = 250
    masks[4:, 1:3, 2:4] = 1
    test = ImageSet(images=images, labels=torch.tensor([0] * 4 + [1] * 4),
                    types=["normal"] * 4 + ["spot"] * 4, names=[str(i) for i in range(8)],
                    edge=torch.zeros(8, dtype=torch.bool), masks=masks if with_masks else None)
    train = ImageSet(images=images[:4], labels=torch.zeros(4, dtype=torch.long),
                     types=["normal"] * 4, names=["t"] * 4, edge=torch.zeros(4, dtype=torch.bool))
    return Split(train=train, test=test, dataset="toy", normal_class="normal")


def test_run_peer_fills_pixel_auroc_from_maps_on_masked_splits() -> None:
    cell = Cell("toy", "toy", None, "normal")
    [row] = PeerMethod(BrightnessMapPeer()).run(cell, masked_split(), lambda line: None)
    assert row["auroc"] == 1.0 and row["pixel_auroc"] == 1.0
    assert row["method"] == "brightness" and row["kind"] == "peer"
    assert runners.run_peer(cell, masked_split(with_masks=False),
                              BrightnessMapPeer())["pixel_auroc"] is None
    assert runners.run_peer(cell, masked_split(), BrightnessPeer())["pixel_auroc"] is None


