"""The benchmark's results: one row of results.csv per finished (cell, method).

The file is rewritten atomically after each row; a rerun reads it and skips every (cell, method)
it holds, so an interrupted benchmark resumes where it stopped. Every row is built by
`make_row`, whoever computed it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.bench.suites import Cell
from core.files import write_atomic

COLUMNS = ("suite", "dataset", "normal_class", "setting", "ratio", "anomaly_classes", "method",
           "kind", "auroc", "pixel_auroc", "by_type", "train_s", "note")
ANOMEM = "AnoMem"  # the method its rows name; its ablations' rows start with it
Key = tuple[str, ...]


def make_row(cell: Cell, method: str, kind: str, auroc: float, *,
             pixel_auroc: float | None = None, by_type: dict[str, float] | None = None,
             train_s: float | None = None, note: str = "") -> dict:
    """A row of results.csv, its values as computed (`Results.add` formats them). `kind`:
    "ours" (AnoMem), "ablation" (a part of the benchmarked model) or "peer"."""
    return {"suite": cell.suite, "dataset": cell.dataset, "normal_class": cell.normal_class,
            "setting": cell.setting, "ratio": cell.ratio,
            "anomaly_classes": cell.anomaly_classes, "method": method, "kind": kind,
            "auroc": auroc, "pixel_auroc": pixel_auroc, "by_type": by_type,
            "train_s": train_s, "note": note}


def key(suite: str, normal: str, setting: str, ratio: float | str, anomalies: str,
        method: str) -> Key:
    """A row's identity. Only the general suite draws labels from several classes per ratio,
    so only its rows are told apart by them (older suites' rows have no such column)."""
    anomalies = anomalies if suite.startswith("general/") else ""
    return (suite, normal, setting, f"{float(ratio or 0):g}", anomalies, method)


def cell_key(cell: Cell, method: str) -> Key:
    """The key of `method`'s row on `cell`, known before it runs."""
    return key(cell.suite, cell.normal_class, cell.setting, cell.ratio,
               ",".join(cell.anomaly_classes), method)


def row_key(row: dict) -> Key:
    """The key of a row, as built (labelled classes as a tuple) or as read back from
    results.csv (joined by commas): the same for both, so a row computed again replaces its
    stored one."""
    return key(row["suite"], row["normal_class"], row["setting"], row.get("ratio") or 0.0,
               _fmt(row.get("anomaly_classes")), row["method"])


@dataclass
class Results:
    """results.csv as rows keyed by (suite, class, setting, ratio, labelled classes, method)."""

    path: Path
    rows: dict[Key, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Results:
        res = cls(Path(path))
        if res.path.is_file():
            with open(res.path, newline="") as f:
                for row in csv.DictReader(f):
                    row.setdefault("anomaly_classes", "")  # a file from before the column
                    if set(COLUMNS) <= set(row):
                        res.rows[row_key(row)] = row
        return res

    def has(self, cell: Cell, method: str) -> bool:
        return cell_key(cell, method) in self.rows

    def add(self, row: dict) -> None:
        """Keep `row` (formatted as the CSV stores it) and rewrite the file."""
        self.rows[row_key(row)] = {c: _fmt(row.get(c)) for c in COLUMNS}
        self.save()

    def save(self) -> None:
        """Rewrite results.csv (atomically) from `rows`."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows.values())
        write_atomic(self.path, buf.getvalue())


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict):
        return json.dumps({k: round(x, 4) for k, x in v.items()}, sort_keys=True)
    if isinstance(v, tuple):
        return ",".join(v)
    return str(v)
