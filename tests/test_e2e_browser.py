"""End to end: `moeviz dashboard` on a recorded run, every page driven in headless Chromium with Playwright.

Asserts each page renders its charts (waiting for Plotly's DOM, never sleeping) and no exception box, saves a
screenshot per page to <SHOTS>/<page>.png and the time to first chart per page to <SHOTS>/timings.json. SHOTS is
test-artifacts/screenshots (git-ignored), so that running the tests leaves the tree as it was; the README's
screenshots are made on purpose, on the demo's store, with `MOEVIZ_SCREENSHOTS=docs/screenshots
MOEVIZ_E2E_STORE=runs/demo MOEVIZ_E2E_RUN=aux python -m pytest -q tests/test_e2e_browser.py -k every_page`
(MOEVIZ_E2E_STORE replaces the synthetic test store, so only that test is meant to run with it). Skipped (by the `browser` marker in conftest) where /usr/bin/chromium
is absent; never runs `playwright install`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from moeviz.cli.dashboard_process import serving

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("MOEVIZ_SCREENSHOTS") or ROOT / "test-artifacts" / "screenshots")
if not SHOTS.is_absolute():
    SHOTS = ROOT / SHOTS
CHROMIUM = os.environ.get("MOEVIZ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

# url path (also the screenshot's name), charts the page must show at least, a selector proving its content
PAGES = [
    ("overview", 2, None),
    ("load", 2, None),
    ("aux_loss", 4, None),
    ("balancing", 3, None),  # load per expert, MaxVio per step and per layer (no bias, no balance stats: info boxes)
    ("capacity", 4, None),
    ("expert_parallel", 3, None),  # GPU x layer load, busiest GPU per placement, traffic (staleness: enough steps)
    ("specialization", 3, None),  # the open tab's map, token flow, mutual information (the other tabs: below)
    ("tokens", 0, ".moeviz-token"),  # the coloured text (the grid is behind a toggle)
    ("bounds", 1, None),
    ("toy", 1, None),
    ("sql", 0, '[data-testid="stDataFrame"]'),
    ("compare", 4, None),
    # the two runs of the test store hold other tokens: the page says what keys each side has (a real pair: charts)
    ("agreement", 0, '[data-testid="stMetric"], [data-testid="stAlert"]'),
]
TITLES = {"overview": "Overview", "load": "Load balance", "aux_loss": "Aux loss", "balancing": "Balancing",
          "capacity": "Capacity",
          "specialization": "Specialization", "tokens": "Tokens", "bounds": "Bound explorer", "toy": "Toy MoE",
          "sql": "SQL console", "compare": "Compare", "expert_parallel": "Expert parallel", "agreement": "Agreement"}
# pages whose analysis module may not be installed: then an info box is what they must show
OPTIONAL = {"bounds": "moeviz.analyses.bounds", "toy": "moeviz.analyses.toy"}


RUN = os.environ.get("MOEVIZ_E2E_RUN") or "main"  # the run every page is opened on


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    if os.environ.get("MOEVIZ_E2E_STORE"):  # e.g. the demo's runs/demo, for the README's screenshots
        return Path(os.environ["MOEVIZ_E2E_STORE"]).resolve()
    sys.path.insert(0, str(Path(__file__).parent))
    from test_app import MAIN, SMALL, VOCAB, write_run_dir

    from moeviz.testing import synthetic_routing

    root = tmp_path_factory.mktemp("e2e-runs")
    write_run_dir(root / "small", synthetic_routing(**SMALL), run_id="small")
    write_run_dir(root / "main", synthetic_routing(**MAIN), run_id="main", vocab=VOCAB)
    return root


@pytest.fixture(scope="module")
def server(store):
    with serving(store, timeout_s=90) as url:  # `moeviz dashboard STORE` in a child process group
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _settle(page, timeout_ms: int = 90_000) -> None:
    """Wait until Streamlit has finished the script run: its root element reports the script state (the
    attribute Streamlit's own end-to-end tests wait on), and elements left from the previous run are gone."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)
    page.wait_for_function("() => !document.querySelector('[data-stale=\"true\"]')", timeout=timeout_ms)


def _visit(page, server: str, name: str, min_charts: int, selector: str | None, first_page: bool) -> float:
    """Open a page and wait for its content; returns seconds until its charts (or the selector) are there.

    The first page is loaded by URL (a cold start: Streamlit's and Plotly's JavaScript load too); the others by
    clicking the sidebar navigation, as a user does, so the time is the page's own (script run + charts)."""
    t0 = time.perf_counter()
    if first_page:
        path = "" if name == "overview" else name  # the default page lives at /
        page.goto(f"{server}/{path}?run={RUN}", wait_until="domcontentloaded")
    else:
        page.locator(f'a[data-testid="stSidebarNavLink"][href$="/{name}"]').click()
    page.locator("h1", has_text=TITLES[name]).first.wait_for(timeout=90_000)
    _settle(page)
    if min_charts:  # every chart element of this run drawn by Plotly, and at least min_charts of them
        page.wait_for_function(
            "n => { const drawn = [...document.querySelectorAll('[data-testid=\"stPlotlyChart\"] .js-plotly-plot')]"
            ".filter(p => p.querySelector('.main-svg')).length;"
            " return drawn >= n && drawn >= document.querySelectorAll('[data-testid=\"stPlotlyChart\"]').length; }",
            arg=min_charts, timeout=90_000)
    if selector:
        page.wait_for_selector(selector, timeout=90_000)
    elapsed = time.perf_counter() - t0
    _settle(page)
    return elapsed


def _screenshot(page, path: Path, width: int) -> None:
    """A screenshot of the whole page: Streamlit scrolls inside its main block, so grow the viewport to fit it."""
    height = page.evaluate("() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
                           " return m ? m.scrollHeight : document.body.scrollHeight; }")
    page.set_viewport_size({"width": width, "height": max(900, min(int(height) + 40, 9000))})
    page.wait_for_function("() => document.readyState === 'complete'")
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": width, "height": 1000})


def test_every_page_renders_in_chromium(server, browser):
    import importlib.util

    SHOTS.mkdir(parents=True, exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1500, "height": 1000})
    page = ctx.new_page()
    timings: dict[str, float | None] = {}
    failures = []
    for i, (name, min_charts, selector) in enumerate(PAGES):
        if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
            min_charts, selector = 0, '[data-testid="stAlert"]'
        try:
            first = _visit(page, server, name, min_charts, selector, first_page=i == 0)
        except Exception as e:  # noqa: BLE001 - record the page and go on, so every page gets its screenshot
            failures.append((name, f"{type(e).__name__}: {str(e).splitlines()[0]}"))
            first = None
        timings[name] = round(first, 3) if first is not None else None
        n_charts = page.locator(".js-plotly-plot").count()
        errors = page.locator('[data-testid="stException"], [role="dialog"]').all_inner_texts()
        _screenshot(page, SHOTS / f"{name}.png", 1500)
        if errors or n_charts < min_charts:
            failures.append((name, n_charts, errors[:1]))
    (SHOTS / "timings.json").write_text(json.dumps({"time_to_charts_s": timings, "note": "first page by URL (cold), "
                                         "the others by clicking the sidebar navigation"}, indent=2) + "\n")
    ctx.close()
    print("time to first chart (s):", timings)
    assert not failures, failures


def test_sql_console_in_the_browser(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{server}/sql?run=main", wait_until="domcontentloaded")
    assert not page.locator('[role="dialog"]').count()
    page.wait_for_selector('[data-testid="stDataFrame"]', timeout=90_000)
    box = page.locator("textarea").first
    box.fill("SELECT layer, count(*) AS n FROM routes WHERE run_id = 'main' GROUP BY layer ORDER BY layer")
    box.press("Control+Enter")
    page.wait_for_selector("text=3 rows", timeout=60_000)
    box.fill("DROP TABLE runs")
    box.press("Control+Enter")
    page.wait_for_selector("text=read-only", timeout=60_000)
    page.close()


def test_specialization_tabs_draw_their_maps(server, browser):
    """The per-layer maps sit in tabs that run only when opened: each tab, clicked, draws its own charts."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{server}/specialization?run=main", wait_until="domcontentloaded")
    _settle(page)
    for tab, title in (("Tokens", "Top tokens of expert 0"), ("Vocabulary and positions", "by token position"),
                       ("Experts together and in sequence", "Co-activation"), ("Domains", "Expert share of each domain")):
        page.get_by_role("tab", name=tab).click()
        page.locator('[data-testid="stPlotlyChart"] .js-plotly-plot .gtitle', has_text=title).first.wait_for(timeout=90_000)
        _settle(page)
    assert not page.locator('[data-testid="stException"]').count()
    page.close()


def test_live_refresh_follows_a_run_being_written(tmp_path, browser):
    """A running run: the page picks up a new flush by itself (the sidebar's polling fragment), no click."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_app import SMALL, write_run_dir

    from moeviz.testing import synthetic_routing

    writer = write_run_dir(tmp_path / "live", synthetic_routing(**SMALL), run_id="live", close=False, hold_back=1)
    try:
        with serving(tmp_path, timeout_s=90) as url:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url + "/", wait_until="domcontentloaded")
            steps = page.locator('[data-testid="stMetric"]', has_text="Steps recorded")
            steps.locator("text=2").first.wait_for(timeout=90_000)
            assert page.locator('[data-testid="stMetric"]', has_text="Status").inner_text().endswith("running")
            writer.write_flush(writer.pending[0])  # the training process writes step 2
            steps.locator("text=3").first.wait_for(timeout=60_000)  # polled every 5 s by default
            page.close()
    finally:
        writer.close()


@pytest.fixture(scope="module")
def tagged_server(tmp_path_factory):
    """A run that tags its steps train / eval / probe with the same probe tokens each time, as the demo does."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_app import VOCAB, write_run_dir
    from test_dashboard_usability import TAGS

    from moeviz.testing import synthetic_routing

    r = synthetic_routing(n_steps=len(TAGS), n_layers=2, n_experts=4, top_k=2, seqs_per_step=2, seq_len=8, seed=5)
    r["tags"] = [TAGS[s] for s in r["steps"]]
    for s in [i for i, t in enumerate(TAGS) if t == "probe"]:
        r["token_ids"][r["steps"] == s] = r["token_ids"][r["steps"] == TAGS.index("probe")]
    root = tmp_path_factory.mktemp("e2e-tagged")
    write_run_dir(root / "tagged", r, run_id="tagged", vocab=VOCAB)
    with serving(root, timeout_s=90) as url:
        yield url


def test_what_a_new_user_sees(tagged_server, browser):
    """Issue 16 as a user sees it: the Tokens text is real text coloured by expert; router saturation draws a chart
    on first load (the probe steps); every colour bar of a ratio to uniform starts at 0 or above; and no page
    load asks any host but the dashboard (the favicon included), so it works offline."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    foreign = []
    page.on("request", lambda req: None if req.url.startswith(tagged_server) or req.url.startswith("data:")
            else foreign.append(req.url))
    page.goto(f"{tagged_server}/tokens?run=tagged", wait_until="domcontentloaded")
    _settle(page)
    first_line = page.locator('.moeviz-layer[data-layer="0"] .moeviz-token')
    first_line.first.wait_for(timeout=90_000)
    words = first_line.all_inner_texts()
    assert len(words) == 8 and all(w.startswith("<") and w.endswith(">") for w in words), words  # VOCAB's "<id>"
    assert page.locator(".moeviz-token").first.get_attribute("title").startswith("token 0:")
    assert page.locator(".moeviz-token").first.evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"

    page.goto(f"{tagged_server}/specialization?run=tagged", wait_until="domcontentloaded")
    _settle(page)
    page.locator('[data-testid="stPlotlyChart"] .gtitle', has_text="Router saturation: step 1 against step 7") \
        .first.wait_for(timeout=90_000)
    zmins = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')].flatMap(p => (p._fullData || [])"
                          ".filter(t => t.type === 'heatmap').map(t => [p.layout.title.text, t.zmin]))")
    ratio = [(title, z) for title, z in zmins if "against uniform" in title]
    assert ratio and all(z >= 0 for _, z in ratio), zmins

    page.goto(f"{tagged_server}/load?run=tagged", wait_until="domcontentloaded")
    _settle(page)
    page.get_by_text("× uniform").click()
    _settle(page)
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].some(p => (p._fullData || [])"
                           ".some(t => t.type === 'heatmap' && t.zmin === 0 && t.zmax >= 2))", timeout=60_000)
    assert not page.locator('[data-testid="stException"]').count()
    assert not foreign, foreign
    page.close()
