"""core/bench/tables.py: results.md's tables from the rows of results.csv."""

from __future__ import annotations

from pathlib import Path

from core.bench.feature_peers import FEATURE_PEERS
from core.bench.results import ANOMEM, Results, make_row
from core.bench.suites import BenchOptions, Cell
from core.bench.tables import SHALLOW, general_tables, render_markdown


def test_unbalanced_report_puts_the_one_class_number_beside_the_ratios(tmp_path: Path) -> None:
    res = Results(tmp_path / "r.csv")
    one = Cell("cifar10", "folder", "x", "airplane")
    for ratio, value in ((0.01, 0.7), (0.1, 0.8)):
        cell = Cell("cifar10-unbalanced", "folder", "x", "airplane", "unbalanced", ratio,
                    ("automobile",))
        res.add(make_row(cell, ANOMEM, "ours", value, by_type={"a": 1.0}, train_s=1.0))
    res.add(make_row(one, ANOMEM, "ours", 0.65, by_type={"a": 1.0}, train_s=1.0))
    md = render_markdown(res, BenchOptions(out=tmp_path))
    assert "| method | one-class (0%) | 1% | 10% |" in md
    assert "| AnoMem | 65.0 | 70.0 | 80.0 |" in md
    assert ("Deep SAD (Ruff et al. 2020), published, GPU-scale (mean over classes) |  | 72.6 "
            "| 79.8 |") in md
    assert "| AnoMem | 65.0 |" in md.split("## CIFAR-10, one-class")[1]


def test_general_tables_count_wins_and_order_the_unbalanced_pairs() -> None:
    def row(cls: str, method: str, auroc: float, setting: str = "one-class",
            ratio: float = 0.0, labelled: str = "", by_type: str = "") -> dict:
        return {"suite": "general/digits", "dataset": "digits", "normal_class": cls,
                "setting": setting, "ratio": f"{ratio:.4f}", "anomaly_classes": labelled,
                "method": method, "kind": "", "auroc": str(auroc), "pixel_auroc": "",
                "by_type": by_type, "train_s": "", "note": ""}

    knn = SHALLOW[0]
    rows = [row("0", ANOMEM, 0.9), row("0", knn, 0.8), row("3", ANOMEM, 0.7),
            row("3", knn, 0.75),
            row("0", ANOMEM, 0.95, "unbalanced", 0.1, "5", '{"5": 0.99, "1": 0.9}'),
            row("0", ANOMEM, 0.92, "unbalanced", 0.01, "5", '{"5": 0.97, "1": 0.9}'),
            row("0", ANOMEM, 0.91, "unbalanced", 0.01, "1", '{"1": 0.93, "5": 0.9}')]
    text = general_tables(rows)
    assert "AnoMem at or above pixel kNN on 1 of 2 classes" in text
    unbalanced = text.split("## General suite, unbalanced")[1]
    lines = [line for line in unbalanced.splitlines() if line.startswith("| digits")]
    assert [line.split(" | ")[2:4] for line in lines] == [["1", "1%"], ["5", "1%"],
                                                          ["5", "10%"]]
    assert lines[2].rstrip(" |").split(" | ")[5:9] == ["90.0", "95.0", "99.0", "90.0"]


def test_general_tables_put_the_feature_peers_beside_anomem() -> None:
    def row(cls: str, method: str, auroc: float) -> dict:
        return {"suite": "general/digits", "dataset": "digits", "normal_class": cls,
                "setting": "one-class", "ratio": "0.0000", "anomaly_classes": "",
                "method": method, "kind": "", "auroc": str(auroc), "pixel_auroc": "",
                "by_type": "", "train_s": "", "note": ""}

    dn2, padim, patchcore = FEATURE_PEERS
    rows = [row("0", ANOMEM, 0.9), row("0", dn2, 0.8), row("0", patchcore, 0.95),
            row("3", ANOMEM, 0.7), row("3", dn2, 0.6), row("3", padim, 0.65)]
    text = general_tables(rows)
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
