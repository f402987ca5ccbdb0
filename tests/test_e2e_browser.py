"""End to end: `moeviz dashboard` on a recorded run, every page driven in headless Chromium with Playwright.

Asserts each page renders its charts (waiting for Plotly's DOM, never sleeping) and no exception box, saves a
screenshot per page to docs/screenshots/<page>.png and the time to first chart per page to
docs/screenshots/timings.json. Skipped (by the `browser` marker in conftest) where /usr/bin/chromium is absent;
never runs `playwright install`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = os.environ.get("MOEVIZ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

# url path, screenshot name, charts the page must show at least, a selector that proves the page's content
PAGES = [
    ("", "overview", 2, None),
    ("load", "load", 2, None),
    ("aux_loss", "aux_loss", 4, None),
    ("capacity", "capacity", 4, None),
    ("specialization", "specialization", 1, None),
    ("tokens", "tokens", 1, None),
    ("bounds", "bounds", 1, None),
    ("toy", "toy", 1, None),
    ("sql", "sql", 0, '[data-testid="stDataFrame"]'),
    ("compare", "compare", 4, None),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)  # polling the server's health endpoint, not waiting for the page
    raise TimeoutError(f"the dashboard did not answer at {url} within {timeout_s} s")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_app import MAIN, SMALL, VOCAB, write_run_dir

    from moeviz.testing import synthetic_routing

    root = tmp_path_factory.mktemp("e2e-runs")
    write_run_dir(root / "small", synthetic_routing(**SMALL), run_id="small")
    write_run_dir(root / "main", synthetic_routing(**MAIN), run_id="main", vocab=VOCAB)
    return root


@pytest.fixture(scope="module")
def server(store):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeviz.cli", "dashboard", str(store), "--port", str(port), "--host", "127.0.0.1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        # the CLI runs streamlit as its child: end the CLI's whole process group we started, by our own pid
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _settle(page, timeout_ms: int = 60_000) -> None:
    """Wait until Streamlit has finished the script run (its 'Running...' status widget is gone)."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout_ms)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " || !document.querySelector('[data-testid=\"stStatusWidget\"]').innerText.includes('Running')",
        timeout=timeout_ms,
    )


def test_every_page_renders_in_chromium(server, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1500, "height": 1000})
    page = ctx.new_page()
    timings: dict[str, float | None] = {}
    failures = []
    for path, name, min_charts, selector in PAGES:
        t0 = time.perf_counter()
        page.goto(f"{server}/{path}?run=main", wait_until="domcontentloaded")
        first = None
        if min_charts:
            page.wait_for_selector('[data-testid="stPlotlyChart"] .js-plotly-plot', timeout=90_000)
            first = time.perf_counter() - t0
            page.wait_for_function("n => document.querySelectorAll('.js-plotly-plot .main-svg').length >= n",
                                   arg=min_charts, timeout=90_000)
        if selector:
            page.wait_for_selector(selector, timeout=90_000)
            first = first or time.perf_counter() - t0
        _settle(page)
        timings[name] = round(first, 3) if first is not None else None
        n_charts = page.locator(".js-plotly-plot").count()
        errors = page.locator('[data-testid="stException"]').all_inner_texts()
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
        if errors or n_charts < min_charts:
            failures.append((name, n_charts, errors[:1]))
    (SHOTS / "timings.json").write_text(json.dumps({"time_to_first_chart_s": timings}, indent=2) + "\n")
    ctx.close()
    assert not failures, failures
    print("time to first chart (s):", timings)


def test_sql_console_in_the_browser(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{server}/sql?run=main", wait_until="domcontentloaded")
    page.wait_for_selector('[data-testid="stDataFrame"]', timeout=90_000)
    box = page.locator("textarea").first
    box.fill("SELECT layer, count(*) AS n FROM routes WHERE run_id = 'main' GROUP BY layer ORDER BY layer")
    box.press("Control+Enter")
    page.wait_for_selector("text=3 rows", timeout=60_000)
    box.fill("DROP TABLE runs")
    box.press("Control+Enter")
    page.wait_for_selector("text=read-only", timeout=60_000)
    page.close()
