"""Load balance: the layer × expert load at one step or pooled, and imbalance metrics per layer over steps."""

from __future__ import annotations

import streamlit as st

from app.components import bucket_note, guarded, run_page, show_chart
from app.state import Ctx, slider_steps
from app.wide import find_expert, is_wide, layer_page
from moeviz import charts
from moeviz.analyses.load import imbalance, load_matrix

ALL = "all selected steps"
# the pooled imbalance table's columns as a reader names them (the data keeps the column names)
TABLE_LABELS = {"layer": "MoE layer", "n_experts": "experts", "top_k": "top-k", "assignments": "assignments",
                "max_over_mean": "busiest / mean", "max_vio": "MaxVio", "cv": "CV of load",
                "norm_entropy": "norm. entropy", "dead_experts": "dead experts", "dead_share": "dead share",
                "top_n": "top-n", "top_n_coverage": "top-n coverage"}


def render(ctx: Ctx) -> None:
    steps = ctx.selected_steps
    if not steps:
        st.info("No steps recorded in this selection yet.")
        return
    c1, c2 = st.columns([3, 1])
    current = st.session_state.get("load_step")
    shown = slider_steps(steps, keep=() if current in (None, ALL) else (current,))  # <= ~1,500 options
    options = [ALL, *shown]
    step = c1.select_slider("Step", options=options, value=ALL, key="load_step",
                            help="Slide to see the load at one step; the left end pools every selected step."
                            + ("" if len(shown) == len(steps) else
                               f" {len(steps):,} steps: every few steps; narrow the sidebar's range for each one."))
    value = c2.radio("Show", ["load_fraction", "relative_load"], key="load_value", horizontal=True,
                     format_func={"load_fraction": "share", "relative_load": "× uniform"}.get)
    found = find_expert(ctx, "load") if is_wide(ctx) else None
    sel = ctx.sel if step == ALL else ctx.sel.with_(steps=(int(step), int(step)))
    where = "over the selected steps" if step == ALL else f"at step {step}"
    with guarded("Load heat map"):
        matrix = ctx.q(load_matrix, sel)
        show_chart(charts.load_heatmap(matrix, value=value, title=f"Load per expert and layer {where}", found=found),
                   matrix, "load-matrix")
        if found is not None:  # the found expert in every layer, against the uniform share
            one = matrix[matrix["expert"] == found]
            show_chart(charts.per_layer_bars(one, y="relative_load", title=f"Expert {found}: load per layer {where}",
                                             y_title="load × E (1 = uniform)", reference=("uniform", 1.0)),
                       one, "load-found")
    with guarded("Imbalance over steps"):
        metric = st.selectbox("Imbalance metric", list(charts.IMBALANCE_METRICS), key="imbalance_metric",
                              format_func=charts.IMBALANCE_METRICS.get)
        bucket = ctx.step_bucket  # a long run's curve in buckets of steps: at most ~1,500 points per line
        page = layer_page(ctx, "imbalance")  # many layers: a page of them at a time (app/wide.py)
        imb = ctx.q(imbalance, ctx.sel if page is None else ctx.sel.with_(layers=page), by_step=True,
                    step_bucket=bucket)
        show_chart(charts.imbalance_lines(imb, metric), imb, "imbalance", caption=bucket_note(bucket))
        pooled = ctx.q(imbalance, sel, by_step=False)
        st.markdown(f"**Imbalance per layer {where}**")
        st.dataframe(pooled.drop(columns=["run_id"], errors="ignore"), hide_index=True, width="stretch",
                     key="imbalance-table", column_config=TABLE_LABELS)


if __name__ == "__main__":
    run_page("Load balance", render)
