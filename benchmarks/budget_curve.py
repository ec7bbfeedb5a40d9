"""Does AUROC keep climbing with more training time? AnoMem at several CPU budgets beside the
shallow peers, on CIFAR-10 classes and MVTec AD bottle.

    python benchmarks/budget_curve.py DATA_ROOT [--minutes 3,10,30] [--classes airplane,...]
                                      [--plot-only]

Each budget is one `anomem bench` run (suites cifar10 and mvtec, no deep peer) in its own folder
`benchmarks/budget/m<minutes>/`, resumable like any bench. The curve is drawn from every folder
there, so budgets may be run in several sittings: `assets/budget_curve.png` and
`benchmarks/budget/results.md`.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from core.bench.runners import bench  # noqa: E402
from core.bench.suites import BenchOptions  # noqa: E402

HERE = Path(__file__).resolve().parent / "budget"
PLOT = Path(__file__).resolve().parents[1] / "assets" / "budget_curve.png"
PEERS = ("kNN (pixels)", "IForest", "OCSVM")
EPOCHS = "AnoMem epochs"


def collect(root: Path) -> dict[tuple[str, str], dict[float, float]]:
    """(cell label, method) -> {minutes: AUROC} from every budget folder's results.csv, and
    (cell label, "AnoMem epochs") -> {minutes: stage-1 epochs}."""
    curves: dict[tuple[str, str], dict[float, float]] = {}
    for folder in sorted(root.glob("m*")):
        try:
            minutes = float(folder.name[1:])
        except ValueError:
            continue
        path = folder / "results.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["setting"] != "one-class" or row["kind"] not in ("ours", "peer"):
                    continue
                label = "bottle" if row["suite"] == "mvtec" else \
                    f"{row['suite']}/{row['normal_class']}"
                curves.setdefault((label, row["method"]), {})[minutes] = float(row["auroc"])
                if row["kind"] == "ours" and row["note"].endswith(" epochs"):
                    curves.setdefault((label, EPOCHS), {})[minutes] = float(
                        row["note"].split()[0])
    return curves


def method_of(name: str) -> str:
    """A table's method name without its settings: "kNN (pixels, k=2)" -> "kNN (pixels)"."""
    for short in ("AnoMem", *PEERS):
        if name == EPOCHS:
            return name
        if name.startswith(short.split(" (")[0]):
            return short
    return name


def draw(curves: dict[tuple[str, str], dict[float, float]], out: Path) -> None:
    """One panel per cell: AnoMem's AUROC against its budget, the peers' (budget-free) level."""
    labels = sorted({label for label, _ in curves})
    fig, axes = plt.subplots(1, len(labels), figsize=(3.6 * len(labels), 3.2), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        for (cell, method), points in sorted(curves.items()):
            if cell != label:
                continue
            xs = sorted(points)
            ys = [100 * points[x] for x in xs]
            if method == "AnoMem":
                ax.plot(xs, ys, "o-", color="C0", lw=2, label="AnoMem")
            elif method in PEERS:
                ax.axhline(max(ys), ls="--", lw=1, color=f"C{PEERS.index(method) + 1}",
                           label=method)
        ax.set_xscale("log")
        ax.set_xticks(sorted({x for (c, _), p in curves.items() if c == label for x in p}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(label)
        ax.set_xlabel("training budget (CPU minutes)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("image AUROC (%)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(curves: dict[tuple[str, str], dict[float, float]]) -> str:
    budgets = sorted({m for p in curves.values() for m in p})
    lines = ["| data set | method | " + " | ".join(f"{m:g} min" for m in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for (label, method), points in sorted(curves.items()):
        if method == EPOCHS:
            cells = [f"{points[m]:.0f}" if m in points else "" for m in budgets]
            lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
        elif method == "AnoMem" or method in PEERS:
            cells = [f"{100 * points[m]:.1f}" if m in points else "" for m in budgets]
            lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_root", type=Path)
    ap.add_argument("--minutes", default="3,10,30")
    ap.add_argument("--classes", default="airplane,automobile,cat")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    if not args.plot_only:
        for minutes in (float(m) for m in args.minutes.split(",")):
            opts = BenchOptions(out=HERE / f"m{minutes:g}", minutes=minutes,
                                suites=("cifar10", "mvtec"), data_root=args.data_root,
                                classes=tuple(args.classes.split(",")), deep_peer=False)
            bench(opts)
    curves = collect(HERE)
    curves = {(label, method_of(m)): p for (label, m), p in curves.items()}
    draw(curves, PLOT)
    (HERE / "results.md").write_text(table(curves))
    print(table(curves))


if __name__ == "__main__":
    main()
