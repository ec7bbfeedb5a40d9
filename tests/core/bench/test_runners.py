"""core/bench/run.py: the plan, the rows, the report, and resuming without recomputing."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.bench import run as bench_run
from core.bench.feature_peers import FEATURE_PEERS
from core.bench.run import ANOMEM, COLUMNS, BenchOptions, Cell, Results, bench, plan
from core.cli import main
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

    monkeypatch.setattr(bench_run, "run_anomem", fail)
    monkeypatch.setattr(bench_run, "run_peer", fail)
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
    monkeypatch.setattr(bench_run, "train_run", lambda *a, **k: pytest.fail("retrained"))
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
    monkeypatch.setattr(bench_run, "train_run", lambda *a, **k: pytest.fail("retrained"))
    bench(shapes_options(out), lambda line: None)
    again = {r["method"]: float(r["auroc"]) for r in rows(out)}
    assert again[ANOMEM] == pytest.approx(after, abs=1e-4)  # the CSV keeps 4 decimals


def test_plan_skips_absent_data_and_says_why(tmp_path: Path) -> None:
    said: list[str] = []
    cells = plan(BenchOptions(out=tmp_path, data_root=tmp_path), said.append)
    assert [c.suite for c in cells] == ["shapes"]
    assert any(line.startswith("cifar10: skipped") for line in said)
    assert any(line.startswith("mvtec: skipped") and "mvtec_ad/bottle" in line for line in said)


def test_plan_of_cifar_and_a_path(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for c in ("ant", "bee", "cat"):
            folder = tmp_path / "cifar10" / split / c
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / "0.png")
    opts = BenchOptions(out=tmp_path, data_root=tmp_path, suites=("cifar10",
                        "cifar10-unbalanced"), paths=(tmp_path / "cifar10",), classes=("bee",),
                        ratios=(0.01, 0.1))
    cells = plan(opts, lambda line: None)
    assert [(c.suite, c.normal_class, c.setting, c.ratio, c.anomaly_classes) for c in cells] == [
        ("cifar10", "bee", "one-class", 0.0, ()),
        ("cifar10-unbalanced", "ant", "unbalanced", 0.01, ("bee",)),
        ("cifar10-unbalanced", "ant", "unbalanced", 0.1, ("bee",)),
        ("path:cifar10", "bee", "one-class", 0.0, ()),
    ]
    # named as its row will be before it runs, so a rerun finds that row and skips it
    assert [p.name for p in bench_run.peers_for(cells[1], opts)] == ["Deep SAD"]
    results = bench_run.Results(tmp_path / "results.csv")
    results.add({"suite": "cifar10-unbalanced", "normal_class": "ant", "setting": "unbalanced",
                 "ratio": 0.01, "method": "Deep SAD", "kind": "peer", "auroc": 0.7})
    assert bench_run.Results.load(tmp_path / "results.csv").has(cells[1], "Deep SAD")


def test_general_plan_with_classes_of_one_set_only(tmp_path: Path) -> None:
    """`--classes good` keeps the MVTec-layout sets and plans nothing for a class-folder set
    with none of the classes named (no unbalanced cells without a one-class cell)."""
    for split in ("train", "test"):
        for c in ("ant", "bee"):
            folder = tmp_path / "cifar10" / split / c
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / "0.png")
    opts = BenchOptions(out=tmp_path, data_root=tmp_path, suites=("general",),
                        classes=("good",), ratios=(0.05,))
    cells = plan(opts, lambda line: None)
    assert [c.suite for c in cells if c.suite.endswith("cifar10")] == []


def test_unbalanced_report_puts_the_one_class_number_beside_the_ratios(tmp_path: Path) -> None:
    res = Results(tmp_path / "r.csv")
    one = Cell("cifar10", "folder", "x", "airplane")
    for ratio, value in ((0.01, 0.7), (0.1, 0.8)):
        cell = Cell("cifar10-unbalanced", "folder", "x", "airplane", "unbalanced", ratio,
                    ("automobile",))
        res.add({**bench_run._metrics_row(cell, ANOMEM, "ours", np.array([0, 1]),
                                          np.array([0.0, 1.0]), ["normal", "a"], 1.0),
                 "auroc": value})
    res.add({**bench_run._metrics_row(one, ANOMEM, "ours", np.array([0, 1]),
                                      np.array([0.0, 1.0]), ["normal", "a"], 1.0),
             "auroc": 0.65})
    md = bench_run.render_markdown(res, BenchOptions(out=tmp_path))
    assert "| method | one-class (0%) | 1% | 10% |" in md
    assert "| AnoMem | 65.0 | 70.0 | 80.0 |" in md
    assert ("Deep SAD (Ruff et al. 2020), published, GPU-scale (mean over classes) |  | 72.6 "
            "| 79.8 |") in md
    assert "| AnoMem | 65.0 |" in md.split("## CIFAR-10, one-class")[1]


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


def test_a_checkpoint_that_cannot_be_resumed_is_trained_again(tmp_path: Path) -> None:
    opts = BenchOptions(out=tmp_path, minutes=0.03, suites=("shapes",), preset="scratch")
    cell = plan(opts, lambda line: None)[0]
    folder = tmp_path / "runs" / cell.slug
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(bench_run.anomem_config(cell, opts).to_dict()))
    (folder / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    said: list[str] = []
    from core.data import load_split

    rows = list(bench_run.run_anomem(cell, load_split(cell.data(0)), opts, said.append))
    assert any("cannot resume" in line and "training again" in line for line in said)
    assert rows[0]["method"] == ANOMEM and (folder / "model.safetensors").is_file()


def test_the_cli_offers_exactly_the_benchmark_suites() -> None:
    from core import cli

    assert cli.SUITES == bench_run.SUITES  # kept apart so `anomem --help` stays light
    assert cli.DEFAULT_SUITES == bench_run.DEFAULT_SUITES


def test_general_tables_count_wins_and_order_the_unbalanced_pairs() -> None:
    def row(cls: str, method: str, auroc: float, setting: str = "one-class",
            ratio: float = 0.0, labelled: str = "", by_type: str = "") -> dict:
        return {"suite": "general/digits", "dataset": "digits", "normal_class": cls,
                "setting": setting, "ratio": f"{ratio:.4f}", "anomaly_classes": labelled,
                "method": method, "kind": "", "auroc": str(auroc), "pixel_auroc": "",
                "by_type": by_type, "train_s": "", "note": ""}

    knn = bench_run.SHALLOW[0]
    rows = [row("0", ANOMEM, 0.9), row("0", knn, 0.8), row("3", ANOMEM, 0.7),
            row("3", knn, 0.75),
            row("0", ANOMEM, 0.95, "unbalanced", 0.1, "5", '{"5": 0.99, "1": 0.9}'),
            row("0", ANOMEM, 0.92, "unbalanced", 0.01, "5", '{"5": 0.97, "1": 0.9}'),
            row("0", ANOMEM, 0.91, "unbalanced", 0.01, "1", '{"1": 0.93, "5": 0.9}')]
    text = bench_run.general_tables(rows)
    assert "AnoMem at or above pixel kNN on 1 of 2 classes" in text
    unbalanced = text.split("## General suite, unbalanced")[1]
    lines = [line for line in unbalanced.splitlines() if line.startswith("| digits")]
    assert [line.split(" | ")[2:4] for line in lines] == [["1", "1%"], ["5", "1%"],
                                                          ["5", "10%"]]
    assert lines[2].rstrip(" |").split(" | ")[5:9] == ["90.0", "95.0", "99.0", "90.0"]


# ---------------------------------------------------------------------------------------------
# the peers on AnoMem's pretrained features


def test_one_class_cells_get_the_feature_peers_at_anomem_input_size(tmp_path: Path) -> None:
    opts = BenchOptions(out=tmp_path, suites=("shapes",))
    cell = plan(opts, lambda line: None)[0]
    peers = bench_run.peers_for(cell, opts)
    assert [p.name for p in peers[-3:]] == list(FEATURE_PEERS)
    assert [p.name for p in peers[:-3]] == [p.name for p in bench_run.make_peers(1, 0, "cpu")]
    size = bench_run.anomem_config(cell, opts).model.input_size
    assert size == 128 and {p.input_size for p in peers[-3:]} == {size}
    wider = BenchOptions(out=tmp_path, suites=("shapes",), overrides=("model.input_size=160",))
    assert {p.input_size for p in bench_run.peers_for(cell, wider)[-3:]} == {160}
    off = BenchOptions(out=tmp_path, suites=("shapes",), feature_peers=False, deep_peer=False)
    assert not set(FEATURE_PEERS) & {p.name for p in bench_run.peers_for(cell, off)}
    unbalanced = Cell("x", "digits", None, "0", "unbalanced", 0.1, ("1",))
    assert [p.name for p in bench_run.peers_for(unbalanced, opts)] == ["Deep SAD"]


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
    row = bench_run.run_peer(cell, masked_split(), BrightnessMapPeer())
    assert row["auroc"] == 1.0 and row["pixel_auroc"] == 1.0
    assert row["method"] == "brightness" and row["kind"] == "peer"
    assert bench_run.run_peer(cell, masked_split(with_masks=False),
                              BrightnessMapPeer())["pixel_auroc"] is None
    assert bench_run.run_peer(cell, masked_split(), BrightnessPeer())["pixel_auroc"] is None


def test_general_tables_put_the_feature_peers_beside_anomem() -> None:
    def row(cls: str, method: str, auroc: float) -> dict:
        return {"suite": "general/digits", "dataset": "digits", "normal_class": cls,
                "setting": "one-class", "ratio": "0.0000", "anomaly_classes": "",
                "method": method, "kind": "", "auroc": str(auroc), "pixel_auroc": "",
                "by_type": "", "train_s": "", "note": ""}

    dn2, padim, patchcore = FEATURE_PEERS
    rows = [row("0", ANOMEM, 0.9), row("0", dn2, 0.8), row("0", patchcore, 0.95),
            row("3", ANOMEM, 0.7), row("3", dn2, 0.6), row("3", padim, 0.65)]
    text = bench_run.general_tables(rows)
    assert "at or above the best same-backbone peer" in text
    assert "on 1 of 2." in text  # class 0: PatchCore 95 beats AnoMem 90; class 3: AnoMem wins
    header = next(line for line in text.splitlines() if line.startswith("| data set"))
    cols = header.strip("| ").split(" | ")
    line = next(line for line in text.splitlines() if line.startswith("| digits"))
    cells = dict(zip(cols, line.strip("| ").split(" | "), strict=True))
    assert cols.index(dn2) == cols.index(ANOMEM) + 5  # after AnoMem and its four ablations
    assert (cells[ANOMEM], cells[dn2], cells[padim], cells[patchcore]) == (
        "80.0", "70.0", "65.0", "95.0")
    assert cells["AnoMem >= best same-backbone"] == "1/2"
    assert cells["above best same-backbone"] == "no"  # mean 80 against PatchCore's 95
