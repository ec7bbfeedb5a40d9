"""How long each page of the explorer takes to render fully the first time, in Chromium.

    python benchmarks/first_visit.py RUN_DIR [RUN_DIR ...] [--out benchmarks/first_visit.md]

For each run: a fresh `streamlit run` (nothing cached in memory) on a runs folder holding that run
alone, then every page in the sidebar's order, each timed from navigation until no spinner,
skeleton or status widget is left and every image has loaded. Needs Debian's chromium and the
playwright package; the runs' data sets must be where their configs say.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["", "prototypes", "umap", "deviation-maps", "compare", "score", "teach",
         "compare-runs"]
SETTLED = """() => {
    const h1 = document.querySelector('h1');
    return h1 && h1.innerText.trim().length > 0
        && !document.querySelector('[data-testid="stStatusWidget"]')
        && !document.querySelector('[data-testid="stSkeleton"]')
        && !document.querySelector('[data-testid="stSpinner"]')
        && !document.querySelector('[data-testid="stProgress"]')
        && Array.from(document.images).every(i => i.complete);
}"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def time_pages(run_dir: Path) -> dict[str, float]:
    """Seconds to the first full render of every page, on a fresh server."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / run_dir.name).symlink_to(run_dir.resolve())
        port = _port()
        env = {**os.environ, "ANOMEM_RUNS": str(root), "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.port",
             str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://localhost:{port}"
        try:
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.3)
            times = {}
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                            args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                for path in PAGES:
                    start = time.perf_counter()
                    page.goto(f"{url}/{path}")
                    page.wait_for_function(SETTLED, timeout=600_000, polling=50)
                    page.wait_for_timeout(300)  # a rerun may start right after the first paint
                    page.wait_for_function(SETTLED, timeout=600_000, polling=50)
                    times[path or "train"] = time.perf_counter() - start - 0.3
                browser.close()
            return times
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "first_visit.md")
    args = ap.parse_args()
    results = {run.name: time_pages(run) for run in args.runs}
    pages = [p or "train" for p in PAGES]
    lines = ["| run | " + " | ".join(pages) + " |", "|---|" + "---:|" * len(pages)]
    for name, times in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{times[p]:.1f}" for p in pages) + " |")
    table = "\n".join(lines) + "\n"
    args.out.write_text("Seconds to the first full render of each page after the app starts "
                        "(`python benchmarks/first_visit.py`).\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
