"""The sidebar: which store and run, which steps, layers, ranks and domains, and live refresh.

`build()` returns the page context (`app.state.Ctx`) or None after showing why there is none (no path, a path
that does not exist, a store that cannot be opened, a store with no runs).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import streamlit as st

from app.components import error_message
from app.state import Ctx, cached, slider_steps, store_path_from_args, store_warnings
from moeviz.analyses.unknowns import steps_with_sequences, summed_ranks
from moeviz.selection import Selection
from moeviz.store.catalog import (
    domain_list,
    layer_list,
    list_runs,
    rank_list,
    routes_per_step,
    run_overview,
    run_progress,
    steps_list,
)

TOKEN_KEY = "refresh_token"
SEEN_KEY = "_moeviz_seen_progress"
ROUTE_BUDGET = 2_000_000  # route rows the per-token analyses read by default


def _store_path() -> str | None:
    if "store_path" not in st.session_state:
        st.session_state["store_path"] = store_path_from_args() or ""
    path = st.text_input(
        "Store",
        key="store_path",
        help="A run folder or a folder of runs (what `moeviz dashboard PATH` was given).",
    ).strip()
    if not path:
        st.info("Give the path of a run folder or a folder of runs, e.g. `runs/`.")
        return None
    if not Path(path).exists():
        st.error(f"No such file or folder: `{path}`. Record a run first (`moeviz demo` or a `Recorder`), "
                 "or give the folder that holds it.")
        return None
    return path


def _run_label(runs, run_id: str) -> str:
    row = runs[runs["run_id"] == run_id].iloc[0]
    name = row["run_name"] if row["run_name"] and row["run_name"] != run_id else ""
    return f"{run_id}{f' ({name})' if name else ''} · {row['status']}"


def _pick_run(runs) -> str:
    ids = runs["run_id"].tolist()
    wanted = st.query_params.get("run")
    if "run_id" not in st.session_state or st.session_state["run_id"] not in ids:
        st.session_state["run_id"] = wanted if wanted in ids else ids[0]
    run_id = st.selectbox("Run", ids, key="run_id", format_func=lambda r: _run_label(runs, r))
    st.query_params["run"] = run_id
    return run_id


def _pick_steps(steps: list[int]) -> tuple[int, int] | None:
    if not steps:
        st.caption("No steps recorded yet.")
        return None
    if len(steps) == 1:
        st.caption(f"One step recorded: {steps[0]}.")
        return (steps[0], steps[0])
    current = st.session_state.get("steps")
    options = slider_steps(steps, keep=tuple(current) if isinstance(current, (tuple, list)) else ())
    lo, hi = st.select_slider("Steps", options=options, value=(options[0], options[-1]), key="steps",
                              help=None if len(options) == len(steps) else
                              f"{len(steps):,} steps: the slider stops at the ends of blocks of steps; narrow the "
                              "range to reach each step.")
    return (int(lo), int(hi))


WINDOW_KEY = "route_window_steps"  # the number input's own state
WINDOW_CHOICE_KEY = "_moeviz_route_window_choice"  # the number of steps the user chose, None = the default


def _remember_window_choice() -> None:
    st.session_state[WINDOW_CHOICE_KEY] = st.session_state.get(WINDOW_KEY)


def _pick_route_window(steps: list[int], step_sel: tuple[int, int] | None, per_step: int,
                       routed: list[int] | None = None) -> tuple[int, int] | None:
    """How many of the selected steps (the last ones) the per-token analyses read: by default as many as hold
    ROUTE_BUDGET routes, so that those pages answer in seconds on a store of any size.

    The number shown is the user's own choice (kept apart from the widget, which Streamlit forgets while it is
    not drawn) cut to the selected steps, else the default: narrowing the Steps range and widening it again
    gives the user's number (or the default) back instead of staying at the narrow range's count. The widget's
    value is set through session state only (no `value=`), which is what Streamlit asks for."""
    from moeviz.store.catalog import route_window

    lo, hi = step_sel or (steps[0], steps[-1]) if steps else (0, 0)
    chosen = [s for s in steps if lo <= s <= hi]
    if not chosen:
        return None
    kept = set(routed or ())
    if kept and any(s in kept for s in chosen) and not all(s in kept for s in chosen):
        chosen = [s for s in chosen if s in kept]  # the window's steps: those with per-token detail
    default = route_window(chosen, per_step, ROUTE_BUDGET)
    n_default = sum(1 for s in chosen if default[0] <= s <= default[1])
    choice = st.session_state.get(WINDOW_CHOICE_KEY)
    if choice is None and n_default >= len(chosen):
        return None  # every selected step fits and the user asked for nothing: nothing to cut, nothing to ask
    n = max(1, min(int(choice if choice is not None else n_default), len(chosen)))
    st.session_state[WINDOW_KEY] = n
    n = int(st.number_input(
        "Per-token window (steps)", min_value=1, max_value=len(chosen), step=1, key=WINDOW_KEY,
        on_change=_remember_window_choice,
        help=f"Specialization, Tokens and the per-domain drops read per-token routes (~{per_step:,} a step at "
             f"most): they use the last N selected steps. The default keeps them near {ROUTE_BUDGET / 1e6:g} M "
             "routes; more steps take longer (a spinner shows progress).",
    ))
    n = min(n, len(chosen))
    return (int(chosen[-n]), int(chosen[-1]))


def _pick_many(label: str, options: list, key: str, help: str) -> tuple | None:
    """A multiselect where nothing chosen means everything (None, so SQL does not filter)."""
    if len(options) <= 1:
        return None
    chosen = st.multiselect(label, options, key=key, help=help, placeholder="all")
    return tuple(chosen) if chosen and len(chosen) < len(options) else None


def _live_refresh(path: str, token: int, run_id: str, progress: dict) -> None:
    running = progress.get("status") == "running"
    st.session_state.setdefault("live", running)
    live = st.toggle("Live refresh", key="live", help="Poll the store and reload when new steps arrive.")
    interval = st.number_input("Every (seconds)", min_value=1, max_value=3600, value=5, step=1, key="live_every",
                               disabled=not live)
    if st.button("Reload now", key="reload"):
        st.session_state[TOKEN_KEY] = token + 1
        st.rerun()
    if not live:
        st.caption("Live refresh paused.")
        return
    st.session_state[SEEN_KEY] = progress

    @st.fragment(run_every=float(interval))
    def watch() -> None:
        try:
            now = _fresh_progress(path, run_id)  # a fresh connection sees segments written since the page loaded
        except Exception as e:  # noqa: BLE001
            st.caption(f"Live refresh could not read the store: {e}")
            return
        st.caption(f"Checked {_dt.datetime.now().strftime('%H:%M:%S')}: {now['steps']} steps, status {now['status']}.")
        if now != st.session_state.get(SEEN_KEY):
            st.session_state[TOKEN_KEY] = st.session_state.get(TOKEN_KEY, 0) + 1
            st.rerun(scope="app")

    watch()


def _fresh_progress(path: str, run_id: str) -> dict:
    import warnings

    from moeviz.store import open_store
    from moeviz.store.catalog import run_progress

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the page's own connection already reported what the store skipped
        con = open_store(path)
    try:
        return run_progress(con, run_id)
    finally:
        con.close()


def build() -> Ctx | None:
    """Draw the sidebar and return the page context, or None (with a message saying why)."""
    with st.sidebar:
        path = _store_path()
        if path is None:
            return None
        token = int(st.session_state.setdefault(TOKEN_KEY, 0))
        try:
            runs = cached(list_runs, path, token)
        except Exception as e:  # noqa: BLE001 - nonexistent, corrupt, newer-schema stores become messages
            error_message(f"Could not open the store `{path}`", e)
            return None
        for message in store_warnings(path, token):
            st.warning(message)
        if runs.empty:
            st.info(f"The store `{path}` holds no runs yet. Start recording, then press Reload now.")
            if st.button("Reload now", key="reload-empty"):
                st.session_state[TOKEN_KEY] = token + 1
                st.rerun()
            return None
        run_id = _pick_run(runs)
        try:
            overview = cached(run_overview, path, token, run_id, count_routes=False)
            per_step = cached(routes_per_step, path, token, run_id)
            routed = cached(steps_with_sequences, path, token, run_id)
            steps = cached(steps_list, path, token, run_id)
            layers = cached(layer_list, path, token, run_id)["layer"].astype(int).tolist()
            ranks = cached(rank_list, path, token, run_id)
            domains = cached(domain_list, path, token, run_id)
            progress = cached(run_progress, path, token, run_id)
            summed = cached(summed_ranks, path, token, Selection(run_ids=(run_id,)))
        except Exception as e:  # noqa: BLE001
            error_message(f"Could not read run `{run_id}`", e)
            return None
        step_sel = _pick_steps(steps)
        route_steps = _pick_route_window(steps, step_sel, per_step, routed)
        layer_sel = _pick_many("Layers", layers, "layers", "MoE layers to include (empty = all).")
        rank_sel = _pick_many("Ranks", ranks, "ranks", "Ranks (GPUs) to include (empty = all).")
        if summed is not None:  # a rank filter there would show the group's sums as one rank's, or nothing
            st.caption(f"Steps {summed['first_step']}-{summed['last_step']} ({summed['steps']} steps) hold the step "
                       f"aggregates of {summed['ranks']} ranks summed at recording (reduce_ranks): their counts "
                       f"appear under rank {', '.join(map(str, summed['writers']))} (each group's first) and no "
                       "rank's own counts are known there; "
                       "the rank filter selects their routes only.")
        domain_sel = _pick_many("Domains", domains, "domains",
                                "Domains of the sequences (empty = all). Filtering by domain reads the sampled "
                                "per-token detail instead of the exact aggregates.")
        st.divider()
        _live_refresh(path, token, run_id, progress)
    sel = Selection(run_ids=(run_id,), steps=step_sel, layers=layer_sel, ranks=rank_sel, domains=domain_sel)
    run = overview.iloc[0].to_dict()
    return Ctx(
        path=path, token=token, run_id=run_id, run=run, sel=sel, steps=tuple(steps), layers=tuple(layers),
        domains=tuple(domains), runs=tuple(runs["run_id"].tolist()), route_steps=route_steps,
        routes_per_step=int(per_step),
    )
