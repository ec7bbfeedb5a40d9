"""core/bench/results.py: rows as results.csv stores them, and the keys a rerun looks up."""

from __future__ import annotations

from pathlib import Path

from core.bench.results import COLUMNS, Results, cell_key, make_row, row_key
from core.bench.suites import Cell

UNBALANCED = Cell("cifar10-unbalanced", "folder", "x", "ant", "unbalanced", 0.01, ("bee",))


def test_a_row_is_stored_formatted_and_read_back_as_written(tmp_path: Path) -> None:
    res = Results(tmp_path / "results.csv")
    res.add(make_row(UNBALANCED, "Deep SAD", "peer", 0.123456, pixel_auroc=None,
                     by_type={"bee": 0.987654, "ant": 0.5}, train_s=12.0, note="n"))
    text = (tmp_path / "results.csv").read_text()
    assert text == (",".join(COLUMNS) + "\n"
                    'cifar10-unbalanced,folder,ant,unbalanced,0.0100,bee,Deep SAD,peer,0.1235,,'
                    '"{""ant"": 0.5, ""bee"": 0.9877}",12.0000,n\n')
    again = Results.load(tmp_path / "results.csv")
    assert again.has(UNBALANCED, "Deep SAD") and not again.has(UNBALANCED, "AnoMem")
    again.save()
    assert (tmp_path / "results.csv").read_text() == text  # a rerun rewrites the same bytes


def test_a_row_is_found_under_the_key_its_cell_and_method_give_before_it_runs(
        tmp_path: Path) -> None:
    """A rerun skips a finished (cell, method) whose row came from a hand-written dict too,
    and from a file written before the anomaly_classes column."""
    res = Results(tmp_path / "results.csv")
    res.add({"suite": "cifar10-unbalanced", "normal_class": "ant", "setting": "unbalanced",
             "ratio": 0.01, "method": "Deep SAD", "kind": "peer", "auroc": 0.7})
    assert Results.load(tmp_path / "results.csv").has(UNBALANCED, "Deep SAD")
    old = tmp_path / "old.csv"
    old.write_text("suite,dataset,normal_class,setting,ratio,method,kind,auroc,pixel_auroc,"
                   "by_type,train_s,note\n"
                   "cifar10-unbalanced,folder,ant,unbalanced,0.0100,Deep SAD,peer,0.7,,,,\n")
    assert Results.load(old).has(UNBALANCED, "Deep SAD")


def test_only_the_general_suite_tells_rows_apart_by_their_labelled_classes() -> None:
    general = [Cell("general/digits", "digits", None, "0", "unbalanced", 0.05, (a,))
               for a in ("1", "5")]
    assert cell_key(general[0], "AnoMem") != cell_key(general[1], "AnoMem")
    other = Cell("cifar10-unbalanced", "folder", "x", "ant", "unbalanced", 0.05, ("cat",))
    assert cell_key(other, "AnoMem") == cell_key(
        Cell("cifar10-unbalanced", "folder", "x", "ant", "unbalanced", 0.05, ("dog",)), "AnoMem")
    assert row_key(make_row(general[1], "AnoMem", "ours", 0.9)) == cell_key(general[1], "AnoMem")


def test_a_general_row_computed_again_replaces_its_stored_one(tmp_path: Path) -> None:
    cell = Cell("general/digits", "digits", None, "0", "unbalanced", 0.05, ("5",))
    res = Results(tmp_path / "results.csv")
    res.add(make_row(cell, "AnoMem, fixed weights", "ablation", 0.8))
    again = Results.load(tmp_path / "results.csv")
    again.add(make_row(cell, "AnoMem, fixed weights", "ablation", 0.9))
    assert [r["auroc"] for r in Results.load(tmp_path / "results.csv").rows.values()] == [
        "0.9000"]
