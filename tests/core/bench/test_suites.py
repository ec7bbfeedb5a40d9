"""core/bench/suites.py: the plan of cells, and a module the CLI imports without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from core.bench.suites import BenchOptions, Cell, plan, spread


def test_importing_the_suites_loads_no_torch() -> None:
    """The CLI builds its parser from SUITES: `anomem --help` must not wait for torch."""
    code = ("import sys, core.cli, core.bench.suites; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_spread_picks_evenly_spaced_items_the_first_included() -> None:
    assert spread(list("abcdefghij"), 3) == ["a", "d", "g"]
    assert spread(list("ab"), 3) == ["a", "b"]


def test_cells_name_their_run_folder_and_label() -> None:
    cell = Cell("general/digits", "digits", None, "0", "unbalanced", 0.05, ("5",))
    assert cell.slug == "general-digits-0-unbalanced-0.05-5"
    assert cell.label == "general/digits · 0 5% labelled from 5"
    data = cell.data(seed=3)
    assert (data.normal_class, data.anomaly_ratio, data.anomaly_classes, data.seed) == (
        "0", 0.05, ("5",), 3)
    assert Cell("shapes", "shapes", None, "circle").data(0).anomaly_ratio == 0.05


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
