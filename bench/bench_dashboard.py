"""Dashboard timings in a real browser: `moeviz dashboard STORE` driven page by page in headless Chromium.

    .venv/bin/python bench/bench_dashboard.py --store bench/out/store100m [--port 0] [--out bench/out/dashboard.md]

For every page it measures
  * first chart s: from the navigation (the first page by URL, a cold start; the others by clicking the sidebar
    link, as a user does) until the first Plotly chart is drawn (`.js-plotly-plot` with its SVG), or for pages
    without charts until their content (SQL: the result table);
  * settled s: until Streamlit's script run is over (its running indicator `[data-testid="stStatusWidget"]` gone,
    no stale elements left);
  * widget change s: one widget changed the way a user does (keyboard on a slider, a click on a radio or select
    option, typing in a box), until the page has settled again and the chart (or SQL result) it drives has changed.
Targets (issue #4): first chart <= 3 s, widget change <= 1 s. Prints a Markdown table and writes it, with the
store, the machine load (`uptime`) and the date, to --out. Never sleeps to wait for the page: it waits on the DOM.
Uses /usr/bin/chromium; never runs `playwright install`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: moeviz importable without installing
from moeviz.cli.dashboard_process import free_port, start, stop, wait_until_healthy  # noqa: E402

CHROMIUM = os.environ.get("MOEVIZ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
FIRST_CHART_TARGET_S = 3.0
WIDGET_TARGET_S = 1.0
TIMEOUT_MS = 180_000
RSS_LIMIT_GB = 6.0  # the dashboard server is stopped above this (a shared 24 GiB machine)

# JS: a fingerprint of every drawn Plotly chart (its title and a checksum of its traces), to tell when a chart
# was redrawn. Cheap on purpose: it runs every 50 ms on the browser's main thread, the thread that draws what is
# timed. A JSON.stringify of the data (what it once was) took 0.1 s a poll on the Toy MoE's maps; summing every
# array element still cost the Overview's layer pick ~0.13 s of main thread per change (8 layers x 8 experts x
# 392 steps). So arrays and long strings (base64 arrays) are sampled: their length and at most SAMPLES elements
# (characters) at an even stride, which any of the widget changes timed here alters.
CHART_SIGNATURE = """() => {
    const SAMPLES = 256;
    const h = (v, d) => {
        if (v === null || v === undefined) return 0;
        if (typeof v === 'number') return Number.isFinite(v) ? v : 7;
        if (typeof v === 'boolean') return v ? 1 : 0;
        if (typeof v === 'string') {
            const step = Math.max(1, Math.ceil(v.length / SAMPLES)); let s = v.length;
            for (let i = 0; i < v.length; i += step) s = (s * 31 + v.charCodeAt(i)) % 1000000007;
            return s; }
        if (ArrayBuffer.isView(v) || Array.isArray(v)) {
            const step = Math.max(1, Math.ceil(v.length / SAMPLES)); let s = v.length;
            for (let i = 0; i < v.length; i += step) s = (s + h(v[i], d + 1) * ((i % 89) + 1)) % 1e12;
            if (v.length) s = (s + h(v[v.length - 1], d + 1)) % 1e12;
            return s; }
        if (typeof v === 'object' && d < 6) {
            let s = 0;
            for (const k of Object.keys(v)) if (k[0] !== '_') s = (s * 7 + h(k, d + 1) + h(v[k], d + 1)) % 1e12;
            return s; }
        return 0; };
    return [...document.querySelectorAll('[data-testid="stMain"] .js-plotly-plot')].map(gd => {
        const t = gd.layout && gd.layout.title ? (gd.layout.title.text || '') : '';
        let n = ''; try { n = (gd.data || []).length + ':' + h(gd.data || [], 0); } catch (e) {}
        return t + '#' + n; }).join('|'); }"""
SETTLED = """() => { const app = document.querySelector('[data-testid="stApp"]');
    return app && app.getAttribute('data-test-script-state') === 'notRunning'
        && !document.querySelector('[data-testid="stStatusWidget"]')
        && !document.querySelector('[data-stale="true"]'); }"""
FIRST_CHART = """() => !!document.querySelector('[data-testid="stMain"] [data-testid="stPlotlyChart"] .js-plotly-plot .main-svg')"""


@dataclass
class Page:
    path: str  # url path ('' for the default page)
    title: str  # the page's h1
    widget: str  # what the widget change does, for the table
    change: Callable | None  # page -> None: performs the change
    content: str | None = None  # selector proving a chart-less page's content
    watch: str = "chart"  # what must change after the widget: 'chart' (a Plotly chart) or a selector's text
    nav: str = ""  # the sidebar link's text (default: the title)
    prepare: Callable | None = None  # page -> None: untimed, before the change (open the tab the widget drives)


def _labelled(page, testid: str, label: str, area: str = "stMain"):
    """The widget of kind `testid` whose label is `label`, in the main area or the sidebar."""
    return page.locator(f'[data-testid="{area}"] [data-testid="{testid}"]').filter(
        has=page.locator('[data-testid="stWidgetLabel"]', has_text=label)).first


def _slider_right(label: str, presses: int = 1):
    def go(page):
        thumb = _labelled(page, "stSlider", label).locator('input[type="range"]').first
        thumb.focus()
        for _ in range(presses):
            thumb.press("ArrowRight")
    return go


def _radio(option: str):
    def go(page):
        page.locator('[data-testid="stMain"] [data-testid="stRadio"] label', has_text=option).first.click()
    return go


def _pick_option(page, box, option: str):
    """Open a select or multiselect until `option` shows in its listbox; return the click on it, which is the
    widget change (the harness times from there: opening the list is the browser's own, before any value changes).
    The opener is the widget's combobox input: a label with a help tooltip puts a button before it (what made the
    sidebar's Layers multiselect time out)."""
    combo = box.locator('[role="combobox"]')
    opener = combo.first if combo.count() else box.locator('[data-baseweb="select"], button').first
    opener.click()
    choice = page.get_by_role("option", name=option, exact=True).first
    choice.wait_for(state="visible")
    return choice.click


def _select(label: str, option: str):
    def go(page):
        return _pick_option(page, _labelled(page, "stSelectbox", label), option)
    return go


def _number(label: str, value: str):
    def go(page):
        box = _labelled(page, "stNumberInput", label).locator("input").first
        box.fill(value)
        box.press("Enter")
    return go


def _open_tab(label: str):
    """Open a tab whose charts the widget drives (the Specialization maps' first tab, Domains, is a message on a
    run without domain labels: a layer change there redraws no chart)."""
    def go(page):
        page.get_by_role("tab", name=label).first.click()
        page.wait_for_function(f"() => ({FIRST_CHART})() && ({SETTLED})()", timeout=TIMEOUT_MS, polling=50)
    return go


def _sql(query: str):
    def go(page):
        box = page.locator('[data-testid="stMain"] textarea').first
        box.fill(query)
        box.press("Control+Enter")
    return go


SQL_QUERY = "SELECT layer, sum(assigned) AS assigned FROM step_stats GROUP BY layer ORDER BY layer"  # --sql

PAGES = [
    Page("", "Overview", "sidebar Layers: pick layer 1", None),  # the change is set up in main() (sidebar)
    Page("load", "Load balance", "Step slider: all steps -> first step", _slider_right("Step")),
    Page("aux_loss", "Aux loss", "Pooled loss scale radio", _radio("as transformers reports it")),
    Page("balancing", "Balancing", "Layer select: 0 -> 1", _select("Layer for the bias and the load per expert", "1")),
    Page("capacity", "Capacity", "Capacity factor slider +0.05", _slider_right("Capacity factor")),
    Page("expert_parallel", "Expert parallel", "Placement radio: round robin", _radio("round robin")),
    Page("specialization", "Specialization", "Layer select: 0 -> 1 (tab Vocabulary and positions)",
         _select("Layer for the per-layer maps", "1"), prepare=_open_tab("Vocabulary and positions")),
    Page("tokens", "Tokens", "First token shown slider +8", _slider_right("First token shown"),
         content='[data-testid="stMain"] [data-testid="stHtml"]', watch='[data-testid="stMain"] [data-testid="stHtml"]'),
    Page("bounds", "Bound explorer", "Experts E: 16", _number("Experts E", "16")),
    Page("toy", "Toy MoE", "Map resolution: 51 -> 81", _slider_right("Map resolution")),
    Page("sql", "SQL console", "Run a query on step_stats", _sql(SQL_QUERY),
        content='[data-testid="stDataFrame"]', watch='[data-testid="stMain"] [data-testid="stAlert"]', nav="SQL"),
    Page("compare", "Compare", "Imbalance metric select", _select("Imbalance metric", "coefficient")),
    Page("agreement", "Agreement", "Position bucket 16 -> 32", _slider_right("Position bucket (tokens)")),
]


def _sidebar_layer(page):
    box = _labelled(page, "stMultiSelect", "Layers", area="stSidebar")
    pick = _pick_option(page, box, "1")

    def commit():
        pick()
        page.keyboard.press("Escape")  # close the list; the value changed with the click
    return commit


def _clear_sidebar_layer(page):
    box = _labelled(page, "stMultiSelect", "Layers", area="stSidebar")
    field = box.locator('[role="combobox"]').first
    field.click()
    field.press("Backspace")
    page.keyboard.press("Escape")


PAGES[0].change = _sidebar_layer


def _session_rss_gb(sid: int) -> float:
    """The largest resident set, GB, of the processes in session `sid` (the CLI and its Streamlit server)."""
    biggest = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[3]) != sid:  # field 6: the session id
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    biggest = max(biggest, int(line.split()[1]))
        except (OSError, ValueError):
            continue
    return biggest / 1e6


class RssWatch:
    """The dashboard server's peak RSS, polled every 0.25 s in a thread; stops the server above RSS_LIMIT_GB
    (the page being timed then fails, and the table says why)."""

    def __init__(self, proc):
        import threading

        self.proc, self.peak, self.killed = proc, 0.0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            rss = _session_rss_gb(self.proc.pid)
            self.peak = max(self.peak, rss)
            if rss > RSS_LIMIT_GB and not self.killed:
                self.killed = True
                print(f"dashboard server at {rss:.2f} GB > {RSS_LIMIT_GB:g} GB: stopped", flush=True)
                stop(self.proc)
            self._stop.wait(0.25)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def serving_watched(store: str, port: int | None):
    """(url, RssWatch) of `moeviz dashboard STORE` served in the background while the block runs."""
    port = port or free_port()
    proc = start(store, port)
    watch = RssWatch(proc)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", proc, 120.0)
        yield f"http://127.0.0.1:{port}", watch
    finally:
        watch.close()
        stop(proc)


def _settle(page) -> None:
    page.wait_for_function(SETTLED, timeout=TIMEOUT_MS, polling=50)


def cold_start(page, url: str, run_id: str | None) -> float:
    """Seconds to load the app by URL on the Bound explorer page (the browser loads Streamlit's JavaScript, the
    server imports the app and opens the store for the sidebar); every page is then timed by its sidebar link."""
    t0 = time.perf_counter()
    page.goto(f"{url}/bounds" + (f"?run={run_id}" if run_id else ""), wait_until="commit")
    page.locator("h1", has_text="Bound explorer").first.wait_for(timeout=TIMEOUT_MS)
    # its charts drawn too: until then the browser is still loading and parsing Plotly's JavaScript, and that
    # cost (1-2.5 s here) landed on whichever page was timed first
    page.wait_for_function(FIRST_CHART, timeout=TIMEOUT_MS, polling=50)
    _settle(page)
    return time.perf_counter() - t0


def _open(page, url: str, spec: Page) -> tuple[float | None, float, str]:
    """(first chart s or None, settled s, note) of opening one page by its sidebar link."""
    t0 = time.perf_counter()
    page.locator('[data-testid="stSidebarNavLink"]', has_text=spec.nav or spec.title).first.click()
    page.locator("h1", has_text=spec.title).first.wait_for(timeout=TIMEOUT_MS)
    first_chart = None
    if spec.content:
        page.wait_for_selector(spec.content, timeout=TIMEOUT_MS)
        first_chart = time.perf_counter() - t0
        _settle(page)
    else:
        # the first chart, or the end of the run (a page that shows a message instead of charts)
        page.wait_for_function(f"() => ({FIRST_CHART})() || ({SETTLED})()", timeout=TIMEOUT_MS, polling=50)
        if page.evaluate(FIRST_CHART):
            first_chart = time.perf_counter() - t0
        _settle(page)
        if first_chart is None and page.evaluate(FIRST_CHART):  # drawn in the same poll as the settle
            first_chart = time.perf_counter() - t0
    settled = time.perf_counter() - t0
    note = ""
    if first_chart is None:
        alerts = page.locator('[data-testid="stMain"] [data-testid="stAlert"]').all_inner_texts()
        note = (alerts[0] if alerts else "no chart").splitlines()[0][:90]
    errors = page.locator('[data-testid="stMain"] [data-testid="stException"]').count()
    if errors:
        note = (note + f" {errors} exception(s)").strip()
    return first_chart, settled, note


def _change(page, spec: Page) -> tuple[float | None, str]:
    """Seconds from the widget change until the page settled and what it drives changed, or None + why."""
    if spec.change is None:
        return None, "no widget"
    if spec.prepare is not None:
        spec.prepare(page)
        _settle(page)
    if spec.watch == "chart":
        before = page.evaluate(CHART_SIGNATURE)
        if not before:
            return None, "no chart to change"
    else:
        before = " ".join(page.locator(spec.watch).all_inner_texts())
    t0 = time.perf_counter()
    try:
        commit = spec.change(page)
        if callable(commit):  # a select: the list is open, the click on the option changes the value
            t0 = time.perf_counter()
            commit()
    except Exception as e:  # noqa: BLE001 - a widget this store does not show (e.g. one run: no Compare)
        return None, f"widget not shown ({type(e).__name__})"
    if spec.watch == "chart":
        page.wait_for_function(f"before => ({CHART_SIGNATURE})() !== before && ({SETTLED})()", arg=before,
                               timeout=TIMEOUT_MS, polling=50)
    else:
        page.wait_for_function(
            "([sel, before]) => [...document.querySelectorAll(sel)].map(e => e.innerText).join(' ') !== before",
            arg=[spec.watch, before], timeout=TIMEOUT_MS, polling=50)
        _settle(page)
    return time.perf_counter() - t0, ""


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def run(store: str, port: int | None, run_id: str | None, pages: list[str] | None) -> list[dict]:
    from playwright.sync_api import sync_playwright

    rows = []
    with serving_watched(store, port) as (url, watch), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(20_000)  # finding and using widgets; the waits on the app pass their own
        chosen = [s for s in PAGES if pages is None or (s.path or "overview") in pages]
        cold = cold_start(page, url, run_id)
        rows.append({"page": "(cold start: app by URL, Bound explorer)", "first": None, "settled": cold,
                     "widget": "", "change": None, "met": "n/a", "rss": watch.peak, "load": os.getloadavg()[0],
                     "note": "browser loads Streamlit, server opens the store"})
        print(f"cold start {cold:.2f} s", flush=True)
        for spec in chosen:
            try:
                first, settled, note = _open(page, url, spec)
                change, why = _change(page, spec)
                if spec.change is _sidebar_layer:
                    _clear_sidebar_layer(page)
                    _settle(page)
            except Exception as e:  # noqa: BLE001 - report the page and go on to the next one
                first = settled = change = None
                note, why = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}", ""
                if not watch.killed:  # a server stopped by the watch answers no cold start: the row says so below
                    cold_start(page, url, run_id)
            ok_first = first is not None and first <= FIRST_CHART_TARGET_S
            ok_change = change is not None and change <= WIDGET_TARGET_S
            if first is None and change is None:
                met = "n/a"
            else:
                met = "yes" if (ok_first or first is None) and (ok_change or change is None) else "no"
            rows.append({"page": spec.title, "first": first, "settled": settled, "widget": spec.widget,
                         "change": change, "met": met, "rss": watch.peak, "load": os.getloadavg()[0],
                         "note": "; ".join(x for x in (note, why) if x)})
            print(f"{spec.title}: first chart {_fmt(first)} s, settled {_fmt(settled)} s, "
                  f"{spec.widget}: {_fmt(change)} s, server peak RSS so far {watch.peak:.2f} GB {note} {why}",
                  flush=True)
            if watch.killed:
                rows[-1]["note"] = (rows[-1]["note"] + f" server stopped above {RSS_LIMIT_GB:g} GB").strip()
                break
        browser.close()
    return rows


def table(rows: list[dict]) -> str:
    lines = [("| page | first chart s | page settled s | widget | widget change s | target met | server peak RSS GB "
              "(so far) | load (1 min) | note |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['page']} | {_fmt(r['first'])} | {_fmt(r['settled'])} | {r['widget']} | {_fmt(r['change'])} "
                     f"| {r['met']} | {_fmt(r.get('rss'))} | {_fmt(r.get('load'))} | {r['note'].replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="a run folder or folder of runs")
    ap.add_argument("--port", type=int, default=0, help="port of the dashboard (0 = a free one)")
    ap.add_argument("--run", default=None, help="run id to open (default: the dashboard's first)")
    ap.add_argument("--pages", default=None, help="comma-separated url paths (overview,load,...) to time only those")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "dashboard.md"), help="Markdown file to write ('' = none)")
    ap.add_argument("--sql", default=SQL_QUERY, help="the query the SQL console page runs (its widget change)")
    args = ap.parse_args(argv)
    sql_page = next(p for p in PAGES if p.path == "sql")
    sql_page.change = _sql(args.sql)
    if args.sql != SQL_QUERY:
        sql_page.widget = f"Run: {args.sql[:70]}"
    if not Path(args.store).exists():
        print(f"no such store: {args.store}", file=sys.stderr)
        return 2
    if not Path(CHROMIUM).exists():
        print(f"no Chromium at {CHROMIUM} (set MOEVIZ_CHROMIUM)", file=sys.stderr)
        return 2
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    started = dt.datetime.now(dt.timezone.utc)
    rows = run(args.store, args.port or None, args.run, args.pages.split(",") if args.pages else None)
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    md = table(rows)
    print(md)
    if args.out:
        head = (f"# Dashboard timings in the browser\n\n"
                f"Store: `{args.store}`. Date: {started:%Y-%m-%d %H:%M} UTC. Machine: {platform.node()}, "
                f"{os.cpu_count()} cores. Load (`uptime`) before: `{load_before}`; after: `{load_after}`.\n\n"
                f"Measured by `bench/bench_dashboard.py` in headless Chromium (Playwright). First chart: from the "
                f"click on the page's sidebar link (after one cold start by URL, in the first row) to the first drawn Plotly "
                f"chart (the SQL page: its result table). Page settled: Streamlit's running indicator gone. Widget "
                f"change: from the input to the page settled with the chart (or result) changed. Targets: first "
                f"chart <= {FIRST_CHART_TARGET_S:g} s, widget change <= {WIDGET_TARGET_S:g} s.\n\n")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(head + md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
