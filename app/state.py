"""Cached connections and cached query results, and the page context that main.py hands to each page.

The read-only store connection is a shared resource (`st.cache_resource`), keyed by the store path and a refresh
token: live refresh bumps the token, which opens the store again so that segments written since are seen.
Query and analysis results are data (`st.cache_data`), keyed by the function's qualified name, path, token and
arguments; views pass the function itself, so an editor follows every call. Calls on the shared connection are
serialised by a lock.

Users' SQL (the SQL page) never touches that connection: it runs in `sql_sandbox()`, worker processes shared by
every session, each query on a fresh connection of its own (moeviz.store.sandbox).
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from moeviz.analyses.step_buckets import MAX_POINTS, step_bucket_for
from moeviz.errors import StaleStoreError
from moeviz.selection import Selection
from moeviz.store.reader import is_stale

CTX_KEY = "_moeviz_ctx"
STORE_ENV = "MOEVIZ_STORE"


def store_path_from_args(argv: list[str] | None = None) -> str | None:
    """The store path given after `--` to `streamlit run app/main.py -- PATH`, else $MOEVIZ_STORE, else None."""
    argv = sys.argv if argv is None else argv
    if argv and Path(argv[0]).name == "main.py" and len(argv) > 1:
        return argv[1]
    return os.environ.get(STORE_ENV) or None


@dataclass
class SharedConnection:
    """A store connection shared by every session, and the lock that serialises its use.

    A store's views are TEMP views over registered Arrow datasets, which only the connection that made them
    sees (a `cursor()` would not), and a DuckDB connection must not run two queries at once: hence the lock.
    """

    con: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    warnings: tuple[str, ...] = ()  # what the store skipped or repaired while opening (e.g. truncated segments)


@st.cache_resource(max_entries=4, show_spinner=False)
def connection(path: str, token: int) -> SharedConnection:
    """The store's read-only DuckDB connection (one per path and refresh token, shared by sessions)."""
    import warnings

    from moeviz.store import open_store

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        con = open_store(path)
    return SharedConnection(con, warnings=tuple(str(w.message) for w in caught))


@st.cache_resource(show_spinner=False)
def sql_sandbox():
    """The SQL page's worker pool, one for the server, under the limits `moeviz dashboard --sql-timeout
    --sql-memory` set ($MOEVIZ_SQL_TIMEOUT, $MOEVIZ_SQL_MEMORY). A query gets half the cores, so that one user's
    SQL leaves the others' pages some."""
    from moeviz.store.sandbox import SqlLimits, SqlSandbox

    return SqlSandbox(SqlLimits.from_env(), threads=max(1, (os.cpu_count() or 2) // 2))


def store_warnings(path: str, token: int) -> tuple[str, ...]:
    """Warnings raised while opening the store (shown in the sidebar)."""
    return connection(path, token).warnings


def qualified_name(fn) -> str:
    """`moeviz.analyses.load.imbalance`: what a cached result is keyed by (a function object is not hashed)."""
    return f"{fn.__module__}.{fn.__qualname__}"


def call(fn: Callable, path: str, token: int, *args, **kwargs) -> Any:
    """`fn(con, *args, **kwargs)` on the store's shared connection, one call at a time (not cached).

    A compaction that folds segments the connection was reading makes it stale: then the store is opened again
    (for every session: they share the connection) and the call runs once more."""
    shared = connection(path, token)
    try:
        with shared.lock:
            return fn(shared.con, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised unless the connection went stale
        if not (isinstance(e, StaleStoreError) or is_stale(e)):
            raise
    connection.clear()
    shared = connection(path, token)
    with shared.lock:
        return fn(shared.con, *args, **kwargs)


@st.cache_data(max_entries=1000, ttl=3600, show_spinner=False)
def _cached_call(name: str, _fn: Callable, path: str, token: int, *args, **kwargs) -> Any:
    # `_fn` is left out of the cache key (Streamlit skips parameters named with a leading underscore): `name` is it
    return call(_fn, path, token, *args, **kwargs)


def cached(fn: Callable, path: str, token: int, *args, **kwargs) -> Any:
    """`call`, cached as data: the same function with the same arguments on the same store version runs once."""
    return _cached_call(qualified_name(fn), fn, path, token, *args, **kwargs)


@st.cache_data(max_entries=200, ttl=3600, show_spinner=False)
def _cached_pure_call(name: str, _fn: Callable, *args, **kwargs) -> Any:
    return _fn(*args, **kwargs)


def cached_pure(fn: Callable, *args, **kwargs) -> Any:
    """A cached call of a function that needs no store (bounds, toy model)."""
    return _cached_pure_call(qualified_name(fn), fn, *args, **kwargs)


def steps_within(steps: list[int], span: tuple[int, int] | None) -> list[int]:
    """The recorded `steps` inside a step range (first, last), inclusive; all of them when `span` is None."""
    lo, hi = span or (min(steps, default=0), max(steps, default=0))
    return [s for s in steps if lo <= s <= hi]


def step_kinds(ctx: "Ctx") -> tuple[list[str], str | None]:
    """(the kinds of step the run tags, sorted; the default kind a curve of losses shows): 'train' (else the first
    kind) when the run tags two kinds or more, None (every step) otherwise. An eval or probe pass routes other
    tokens than the training batches: mixed into one curve it makes a saw-tooth that is not the training."""
    from moeviz.store.catalog import step_tags

    kinds = sorted(ctx.q(step_tags, ctx.run_id)["tag"].dropna().unique().tolist())
    if len(kinds) < 2:
        return kinds, None
    return kinds, "train" if "train" in kinds else kinds[0]


def slider_steps(steps: list[int], keep: tuple = ()) -> list[int]:
    """The options of a slider over recorded steps: all of them up to MAX_POINTS, else the first and last
    recorded step of every block of b steps (b among 1, 2, 5, 10, 20, ... so that ~MAX_POINTS options remain: a
    range then covers whole blocks, e.g. 1,000-1,999, or 1,000-1,990 when steps are logged every 10), the run's
    first and last step, and the values in `keep` that are recorded steps (the slider's current value, which a
    live run's growing b must not drop). Why: a select slider sends every option to the browser and lists them
    on every rerun; 10,000 steps made the sidebar the slowest part of a cold start. Narrowing the range reaches
    every step (the range's own slider then thins less)."""
    if len(steps) <= MAX_POINTS:
        return list(steps)
    b = step_bucket_for(steps[0], steps[-1], max(2, MAX_POINTS // 2))
    ends: dict[int, tuple[int, int]] = {}  # block -> (first, last) recorded step
    for s in steps:
        lo, hi = ends.get(s // b, (s, s))
        ends[s // b] = (min(lo, s), max(hi, s))
    recorded = set(steps)
    return sorted({s for pair in ends.values() for s in pair} | {steps[0], steps[-1]}
                  | {s for s in keep if s in recorded})


@dataclass(frozen=True)
class Ctx:
    """What every page needs: where the store is, which run, and the sidebar's selection."""

    path: str
    token: int
    run_id: str
    run: dict  # the run_overview row: model_class, n_layers, n_experts, top_k, status, steps, tokens, ...
    sel: Selection  # run, steps, layers, ranks, domains chosen in the sidebar
    steps: tuple[int, ...] = ()  # every recorded step of the run
    layers: tuple[int, ...] = ()  # every MoE layer of the run
    domains: tuple[str, ...] = ()  # every domain label of the run
    runs: tuple[str, ...] = field(default=())  # every run id in the store (for Compare)
    # the steps the per-token analyses read (the last steps of the selection, a few million routes), and an
    # upper bound of the route rows one step holds; None = every selected step
    route_steps: tuple[int, int] | None = None
    routes_per_step: int = 0

    def q(self, fn: Callable, *args, **kwargs) -> Any:
        """A cached query or analysis on this store: `ctx.q(imbalance, ctx.sel)`."""
        return cached(fn, self.path, self.token, *args, **kwargs)

    def q_started(self, fn: Callable, *args, **kwargs) -> "Started":
        """`q` started in a worker thread: its DuckDB work runs while this thread builds and sends figures (DuckDB
        releases the GIL). `.result()` waits for it. Queries still take turns on the shared connection."""
        return Started(self.q, fn, *args, **kwargs)

    def q_slow(self, message: str, fn: Callable, *args, **kwargs) -> Any:
        """`q` for an analysis that reads per-token routes: a spinner with `message` while it runs (a cached
        result comes back before the spinner shows)."""
        with st.spinner(message, show_time=True):
            return self.q(fn, *args, **kwargs)

    @property
    def sel_routes(self) -> Selection:
        """The selection for analyses that read per-token routes: the sidebar's, cut to the per-token window."""
        return self.in_route_window(self.sel)

    def in_route_window(self, sel: Selection) -> Selection:
        """`sel` cut to the per-token window (Compare applies it to a two-run selection)."""
        return sel if self.route_steps is None else sel.with_(steps=self.route_steps)

    @property
    def window_steps(self) -> list[int]:
        """The recorded steps inside the per-token window."""
        lo, hi = self.route_steps or self.sel.steps or (min(self.steps, default=0), max(self.steps, default=0))
        return [s for s in self.steps if lo <= s <= hi]

    @property
    def route_note(self) -> str:
        """What the per-token analyses read, as the note every such page shows."""
        steps = self.window_steps
        if not steps:
            return "Per-token analyses: no steps selected."
        rows = len(steps) * self.routes_per_step
        size = f"~{rows / 1e6:.1f} M routes" if rows >= 100_000 else f"~{rows:,} routes"
        span = f"{steps[0]}–{steps[-1]}" if len(steps) > 1 else f"{steps[0]}"
        return (f"Per-token analyses use steps {span} ({size} at most, {len(steps)} of {len(self.steps)} steps); "
                "widen in the sidebar (Per-token window).")

    @property
    def selected_steps(self) -> list[int]:
        """The recorded steps inside the sidebar's step range (every recorded step when it sets none)."""
        return steps_within(self.steps, self.sel.steps)

    @property
    def step_span(self) -> tuple[int, int] | None:
        """The first and last recorded step of the selection, or None when it holds no recorded step."""
        chosen = self.selected_steps
        return (chosen[0], chosen[-1]) if chosen else None

    @property
    def step_bucket(self) -> int:
        """Steps per point of every curve over steps: 1 while the selection spans at most ~1,500 steps, more
        beyond, so that no trace sends more points than a screen has pixels (moeviz.analyses.step_buckets)."""
        span = self.step_span
        return 1 if span is None else step_bucket_for(*span)

    @property
    def n_experts(self) -> int:
        return int(self.run.get("n_experts") or 1)

    @property
    def top_k(self) -> int:
        return int(self.run.get("top_k") or 1)

    @property
    def sel_exact(self) -> Selection:
        """The selection without domains/tags: what the exact per-step aggregates can answer."""
        return self.sel.with_(domains=None, tags=None)

    @property
    def chosen_layers(self) -> tuple[int, ...]:
        return tuple(self.sel.layers) if self.sel.layers is not None else self.layers


class Started:
    """A call running in a worker thread; `result()` joins it and returns its value or raises its exception.

    The worker carries the page's script-run context, so the cached call in it behaves (and logs) as it would in
    the page's own thread."""

    def __init__(self, fn, *args, **kwargs) -> None:
        from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        add_script_run_ctx(self._thread, get_script_run_ctx())
        self._thread.start()

    def _run(self, fn, args, kwargs) -> None:
        try:
            self._value = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the page's thread by result()
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def set_context(ctx: Ctx | None) -> None:
    st.session_state[CTX_KEY] = ctx


def current_context() -> Ctx | None:
    return st.session_state.get(CTX_KEY)
