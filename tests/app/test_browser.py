"""Every page in a real browser: `streamlit run` in a subprocess, driven by Debian's Chromium.

Fails on any Streamlit exception box and saves a screenshot of each page (to a temporary
folder, and to $ANOMEM_SCREENSHOTS when it is set). Playwright never downloads a browser here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.data import load_split
from core.refit import mark_test_image, refit_run
from core.runs import load_run
from tests.app.helpers import copy_run

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGES = {  # url path -> title
    "": "Train",
    "prototypes": "Prototypes",
    "umap": "UMAP",
    "deviation-maps": "Deviation maps",
    "compare": "Compare anomaly types",
    "score": "Score images",
    "teach": "Teach",
    "compare-runs": "Compare runs",
}
SETTLED = """() => {
    const h1 = document.querySelector('h1');
    const shown = (h1 && h1.innerText.trim().length > 0)
        || document.querySelector('[data-testid="stException"]');
    return shown
        && !document.querySelector('[data-testid="stStatusWidget"]')
        && !document.querySelector('[data-testid="stSkeleton"]')
        && !document.querySelector('[data-testid="stSpinner"]')
        && !document.querySelector('[data-testid="stProgress"]')
        && Array.from(document.images).every(i => i.complete);
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run and a refit of it, so that Teach and Compare runs have something to show."""
    root = tmp_path_factory.mktemp("browser-runs")
    parent = copy_run(tiny_run, root, "tiny")
    run = load_run(parent)
    split = load_split(run.config.data)
    refit_run(parent, [mark_test_image(run.config, split, i, "normal") for i in range(3)],
              root / "tiny-refit")
    return root


@pytest.fixture(scope="module")
def server(runs: Path) -> Iterator[str]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (install Debian's chromium package)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    port = _free_port()
    env = {**os.environ, "ANOMEM_RUNS": str(runs),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.port", str(port),
         "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                pytest.fail(f"streamlit did not start: {err[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_every_page_renders_without_an_exception(server: str, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    folders = [tmp_path]
    if os.environ.get("ANOMEM_SCREENSHOTS"):
        folders.append(Path(os.environ["ANOMEM_SCREENSHOTS"]))
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            for path, title in PAGES.items():
                page.goto(f"{server}/{path}")
                page.wait_for_function(SETTLED, timeout=90_000)
                page.wait_for_timeout(700)  # a rerun may start right after the first paint
                page.wait_for_function(SETTLED, timeout=90_000)
                if page.locator('[data-testid="stPlotlyChart"]').count():
                    page.wait_for_selector('[data-testid="stPlotlyChart"] .main-svg',
                                           timeout=30_000)
                    page.wait_for_timeout(1000)  # WebGL traces draw after the SVG layers
                errors = page.locator('[data-testid="stException"]')
                assert errors.count() == 0, f"/{path}: {errors.first.inner_text()}"
                assert page.locator("h1").first.inner_text().strip() == title
                alerts = page.locator('[data-testid="stAlertContentError"]')
                assert alerts.count() == 0, f"/{path}: {alerts.first.inner_text()}"
                assert page.get_by_text("Train a run first").count() == 0, f"/{path}: no run"
                for folder in folders:
                    page.screenshot(path=str(folder / f"{path or 'train'}.png"),
                                    full_page=True)
        finally:
            browser.close()
    assert len(list(tmp_path.glob("*.png"))) == len(PAGES)
