"""Compare: two runs side by side on shared axes (load, aux loss, drops, domain specialization)."""

from __future__ import annotations

import streamlit as st

from app.components import OBSERVATIONAL, bucket_note, guarded, run_page, show_chart
from app.state import Ctx, steps_within
from moeviz import charts
from moeviz.analyses.aux_loss import pooled_switch_loss
from moeviz.analyses.capacity import capacity_drops
from moeviz.analyses.load import imbalance, load_matrix
from moeviz.analyses.specialization import domain_share
from moeviz.analyses.step_buckets import step_bucket_for
from moeviz.selection import Selection
from moeviz.store.catalog import steps_list


def _scope(sel: Selection) -> str:
    """What of the two runs the page shows: the sidebar's steps, layers and ranks apply to both."""
    parts = [f"steps {sel.steps[0]}–{sel.steps[1]}" if sel.steps else "every step",
             f"layers {', '.join(str(x) for x in sel.layers)}" if sel.layers is not None else "every layer"]
    if sel.ranks is not None:
        parts.append(f"ranks {', '.join(str(x) for x in sel.ranks)}")
    return (f"Both runs, {', '.join(parts)} (the sidebar's Steps, Layers and Ranks apply to both). The sidebar's "
            "domains do not apply here.")


def _step_bucket(ctx: Ctx, sel: Selection) -> int:
    """Steps per point of both runs' curves: from the span of the selected steps either run recorded, so that
    the longer run also stays under ~1,500 points per line and both runs' points share their x positions."""
    steps = [s for run in sel.run_ids for s in ctx.q(steps_list, run)]
    chosen = steps_within(steps, sel.steps)
    return step_bucket_for(min(chosen), max(chosen)) if chosen else 1


def render(ctx: Ctx) -> None:
    if len(ctx.runs) < 2:
        st.info("This store holds one run. Point the dashboard at a folder of runs to compare two of them.")
        return
    c1, c2 = st.columns(2)
    a = c1.selectbox("Run A", ctx.runs, index=ctx.runs.index(ctx.run_id), key="cmp_a")
    others = [r for r in ctx.runs if r != a]
    b = c2.selectbox("Run B", others, key="cmp_b")
    sel = Selection(run_ids=(a, b), steps=ctx.sel.steps, layers=ctx.sel.layers, ranks=ctx.sel.ranks)
    st.caption(_scope(sel))
    bucket = _step_bucket(ctx, sel)
    with guarded("Load per expert and layer"):
        load = ctx.q(load_matrix, sel)
        show_chart(charts.compare_heatmaps(load, value="relative_load", runs=(a, b),
                                           title="Load per expert and layer against uniform, run by run"),
                   load, "compare-load")
    with guarded("Switch loss"):
        pooled = ctx.q(pooled_switch_loss, sel, by_step=True, step_bucket=bucket)
        fig = charts.aux_loss_lines(pooled, value="aux_loss_per_slot", color="run_id",
                                    title="Load-balancing loss pooled over layers, per slot (1 = uniform)")
        show_chart(fig, pooled, "compare-aux", caption=bucket_note(bucket))
    with guarded("Imbalance"):
        imb = ctx.q(imbalance, sel, by_step=True, step_bucket=bucket)
        metric = st.selectbox("Imbalance metric", list(charts.IMBALANCE_METRICS), key="cmp_metric",
                              format_func=charts.IMBALANCE_METRICS.get)
        show_chart(charts.compare_lines(imb, y=metric, y_title=charts.IMBALANCE_METRICS[metric],
                                        title=f"Imbalance over steps: {charts.IMBALANCE_METRICS[metric]}"),
                   imb, "compare-imbalance", caption=bucket_note(bucket))
    with guarded("Capacity drops"):
        cf = st.slider("Capacity factor", 0.25, 4.0, 1.25, 0.05, key="cmp_cf")
        drops = ctx.q(capacity_drops, sel, cf, by=("layer",))
        show_chart(charts.bars(drops, x="layer", y="drop_rate", color="run_id", title=f"Dropped share per layer at CF {cf:g}",
                               x_title="MoE layer", y_title="dropped / assigned", hover=["dropped", "assigned"]),
                   drops, "compare-drops")
    with guarded("Domain specialization"):
        st.caption(ctx.route_note)
        share = ctx.q_slow("Domain shares of both runs' per-token routes...", domain_share,
                           ctx.in_route_window(sel))
        if share["domain"].notna().any():
            layers = sorted(share["layer"].unique())
            layer = int(st.selectbox("Layer", layers, key="cmp_layer"))
            show_chart(charts.compare_domain_share(share, runs=(a, b), layer=layer), share, "compare-domains",
                       caption=OBSERVATIONAL)
        else:
            st.info("Neither run's sequences carry domain labels.")


if __name__ == "__main__":
    run_page("Compare", render)
