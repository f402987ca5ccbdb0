"""Overview: the model, what was recorded, the run's status, health flags, load and aux loss at a glance."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from app.components import bucket_note, guarded, run_page, show_chart, show_table
from app.state import Ctx, step_kinds
from app.wide import TOP_EXPERTS, find_expert, is_wide, layer_page
from moeviz import charts
from moeviz.analyses.aux_loss import switch_loss
from moeviz.analyses.health import health_summary
from moeviz.analyses.load import expert_load
from moeviz.analyses.top_experts import top_expert_load
from moeviz.store.catalog import route_counts


def _header(ctx: Ctx):
    """The run's header; returns the placeholder of the "Tokens with detail" metric, filled in last."""
    run = ctx.run
    status = str(run.get("status"))
    st.subheader(f"{run.get('run_name') or ctx.run_id} · {run.get('model_class')}")
    top = st.columns(4)
    top[0].metric("Status", status)
    top[1].metric("MoE layers", int(run.get("n_layers") or 0))
    top[2].metric("Experts", ctx.n_experts)
    top[3].metric("Top-k", ctx.top_k)
    low = st.columns(4)
    low[0].metric("Steps recorded", f"{int(run.get('steps') or 0):,}")
    tokens = run.get("tokens")
    low[1].metric("Tokens", "unknown" if tokens is None or pd.isna(tokens) else f"{int(tokens):,}",
                  help=None if tokens is None or not pd.isna(tokens) else
                  "The run's source did not count the tokens (an engine's expert-count dump).")
    detail = low[2].empty()  # filled in after the charts (see render): on a live run the count scans the routes
    detail.metric("Tokens with detail", "…")
    low[3].metric("Sequences", f"{int(run.get('sequences') or 0):,}")
    if status == "failed" and run.get("error"):
        st.error(f"The run failed: {run['error']}")
    elif status == "interrupted":
        st.warning("A writer died without closing the run (kill -9, OOM, node loss): the data ends where it stopped.")
    elif status == "running":
        st.info("The run is being written: with Live refresh on (sidebar) the pages reload as new steps arrive.")
    lost = run.get("recording_errors")
    if lost is not None and not pd.isna(lost) and int(lost) > 0:  # training went on, some steps were not written
        st.warning(f"The recording lost data ({int(lost)} recording error(s); training went on): "
                   f"{run.get('recording_error')}. The pages show what was written.")
    if int(run.get("steps") or 0) == 0:
        st.info("Nothing has been recorded in this run yet.")
    with st.expander("Model config and recording policy"):
        cfg = run.get("config")
        try:
            st.json(json.loads(cfg) if isinstance(cfg, str) else (cfg or {}), expanded=False)
        except (TypeError, ValueError):
            st.code(str(cfg))
        st.write(
            {
                "capacity_factor": run.get("capacity_factor"),
                "world_size": run.get("world_size"),
                "sample_every": run.get("sample_every"),
                "max_tokens_per_step": run.get("max_tokens_per_step"),
                "started_at": str(run.get("started_at")),
                "ended_at": str(run.get("ended_at")),
                "schema_version": run.get("schema_version"),
            }
        )
    return detail


# findings that say the recorded numbers are incomplete: always shown, whatever else was found
_ALWAYS_SHOWN = ("nonfinite_router", "recording_errors")


def _health(health: pd.DataFrame) -> None:
    st.subheader("Health")
    bad = health[health["severity"].isin(["error", "warn"])] if "severity" in health.columns else health
    if bad.empty:
        st.success("No problems found: no collapsed or dead experts, no growing imbalance, no heavy drops, no NaN "
                   "router outputs.")
        return
    n_err = int((bad["severity"] == "error").sum()) if "severity" in bad.columns else 0
    per_check = bad.groupby("check", sort=False).size()  # health_summary sorts worst first: keeps that order
    st.markdown(f"**{n_err} errors, {len(bad) - n_err} warnings**, worst first: "
                + ", ".join(f"{check.replace('_', ' ')} ({n})" for check, n in per_check.items()))
    first = bad.drop_duplicates("check")  # the worst finding of each kind
    always = first["check"].isin(_ALWAYS_SHOWN)  # and never crowded out: the recorded numbers are incomplete
    for _, row in first[always | (~always).cumsum().le(4)].iterrows():
        more = int(per_check[row["check"]]) - 1
        (st.error if row.get("severity") == "error" else st.warning)(
            str(row.get("message")) + (f" (and {more} more like it below)" if more else ""))
    with st.expander(f"All {len(health)} findings"):
        show_table(health, "health")


def render(ctx: Ctx) -> None:
    detail = _header(ctx)
    health_box = st.container()  # drawn above the charts, filled in after them: the charts come first
    load = aux = None
    bucket = ctx.step_bucket  # a long run's curves in buckets of steps: at most ~1,500 points per trace
    wide = is_wide(ctx)
    found = None
    c1, c2 = st.columns([3, 1])
    with c1:
        page = layer_page(ctx, "overview")  # a wide model's panels, a page of layers at a time
    if wide:
        with c2:
            found = find_expert(ctx, "overview")
    sel = ctx.sel if page is None else ctx.sel.with_(layers=page)
    with guarded("Load over steps"):
        if wide:  # 256 lines a panel: the busiest experts, the others summed, and the one asked for
            load = ctx.q(top_expert_load, sel, n=TOP_EXPERTS, always=() if found is None else (found,),
                         step_bucket=bucket)
        else:
            load = ctx.q(expert_load, sel, by_step=True, step_bucket=bucket)
    if load is not None:  # drawn before the aux loss is read: the first chart waits for one query, not two
        with guarded("Load over steps"):
            fig = charts.top_load_small_multiples(load, found=found) if wide else charts.load_small_multiples(load)
            show_chart(fig, load, "overview-load", caption=bucket_note(bucket))
    # the health checks run while the aux loss is read and drawn: started before the load query, they took half
    # of the 2 cores it needed (a 58 x 256 model of 10,000 steps: first chart 4.8 s -> see docs/benchmarks.md)
    health = ctx.q_started(health_summary, ctx.sel_exact)
    _, kind = step_kinds(ctx)  # training steps only when the run also tags eval/probe steps (as the Aux loss page)
    with guarded("Aux loss over steps"):
        aux = ctx.q(switch_loss, sel.with_(domains=None, tags=None), by_step=True, step_bucket=bucket, step_tag=kind)
    if aux is not None:
        with guarded("Aux loss over steps"):
            note = " ".join(x for x in (bucket_note(bucket), kind and f"{kind.capitalize()} steps only (the Aux loss "
                                        "page shows the other kinds).") if x)
            show_chart(charts.aux_loss_small_multiples(aux), aux, "overview-aux", caption=note or None)
    with health_box, guarded("Health summary"), st.spinner("Checking the run's health...", show_time=True):
        _health(health.result())
    with guarded("Tokens with detail"), st.spinner("Counting the per-token routes...", show_time=True):
        # milliseconds from position_stats on a compacted run, a scan of the routes (seconds) on a live one
        counts = ctx.q(route_counts, ctx.run_id)
        detail.metric("Tokens with detail", f"{counts['routed_tokens']:,}",
                      help=f"{counts['route_rows']:,} route rows (token × layer × slot)")


if __name__ == "__main__":
    run_page("Overview", render)
