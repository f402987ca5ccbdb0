"""Balancing over time: the selection bias of aux-loss-free balancing beside each expert's load, MaxVio per step and
over the selection, and the balance losses the families compute per sequence."""

from __future__ import annotations

import streamlit as st

from app.components import bucket_note, guarded, run_page, show_chart, show_table
from app.state import Ctx
from app.wide import TOP_EXPERTS, is_wide
from moeviz import charts
from moeviz.analyses.aux_loss import sequence_balance_loss
from moeviz.analyses.balancing import bias_summary, expert_bias, max_vio_summary
from moeviz.analyses.load import expert_load, max_violation
from moeviz.analyses.top_experts import top_expert_load

HELP = """
**Selection bias** (aux-loss-free balancing: DeepSeek-V3's `e_score_correction_bias`, torchtitan's and
Megatron-Core's `expert_bias`): a per-expert number added to the router's scores before top-k, not to the gate
weights, and nudged by the training loop after every step against the expert's load (up when the expert took less
than its share). The Recorder copies it on the device when each step's first forward starts, so a point is the bias
the routers ranked with in that step. Beside it, each expert's load as a multiple of the uniform share: an expert
whose bias keeps climbing is one the router keeps starving.

**MaxVio** (Wang et al. 2024): busiest expert ÷ mean expert − 1, 0 when balanced. *Per step*: each batch's own
balance (MaxVio_batch). *Over the selection*: of the summed load of every selected step (MaxVio_global), which can
be good while every batch is lopsided.

**Per-sequence balance losses**, as the families compute them, from sums recorded on the device: *Switch*
(transformers' `switch_transformers.load_balancing_loss_func`): per batch row E · Σ fᵢ Pᵢ, f the share of the
row's tokens that chose expert i, P their mean softmax probability, then the mean over rows; uniform routing gives
k. The pooled value per stack is the model's own `encoder_aux_loss` / `decoder_aux_loss`. *DeepSeek-V3's
complementary sequence-wise loss* (without α): Σ fᵢ Pᵢ per sequence with fᵢ = E/(k·T) × tokens that chose i and Pᵢ
the mean normalised sigmoid affinity; uniform gives 1. The Aux loss page's Switch loss pools a step's tokens
before the product, which differs once a step has several sequences.
"""


def render(ctx: Ctx) -> None:
    with st.expander("What this page shows"):
        st.markdown(HELP)
    if ctx.sel.needs_sequences:
        st.info("The bias and the balance losses are recorded per step and layer, not per domain: the domain "
                "filter is ignored on this page.")
    sel = ctx.sel_exact
    bucket = ctx.step_bucket  # a long run's curves in buckets of steps: at most ~1,500 points per line
    note = bucket_note(bucket)
    layers = list(ctx.chosen_layers) or [0]
    layer = st.selectbox("Layer for the bias and the load per expert", layers, key="bal_layer")

    one = sel.with_(layers=(int(layer),))  # the two charts draw one layer: read only it
    bias_note = None if note is None else (f"Bucketed: each point is the bias averaged over {bucket:,} steps (plotted "
                                           f"at the bucket's first step). Narrow the step range to see every step.")
    with guarded("Selection bias"):
        bias = ctx.q(expert_bias, one, step_bucket=bucket)
        if bias.empty:
            st.info("This run has no selection bias: its routers add none before top-k (only DeepSeek-V3-style "
                    "routers, torchtitan's and Megatron-Core's expert bias have one), or it was recorded before "
                    "moeviz stored it. The load per expert and MaxVio below still show how balanced it is.")
        if is_wide(ctx):  # the busiest experts and the others summed: 256 lines x 1,000 buckets took 0.96 s to read
            load = ctx.q(top_expert_load, one, n=TOP_EXPERTS, step_bucket=bucket)  # and megabytes to draw
        else:
            load = ctx.q(expert_load, one, by_step=True, step_bucket=bucket)
        if bias.empty:  # the load alone, full width
            show_chart(charts.expert_load_lines(load, layer=layer), load, "bal-load", caption=note)
        else:
            c1, c2 = st.columns(2)
            with c1:
                show_chart(charts.expert_bias_lines(bias, layer=layer), bias, "bal-bias", caption=bias_note)
            with c2:
                show_chart(charts.expert_load_lines(load, layer=layer), load, "bal-load", caption=note)
            show_table(ctx.q(bias_summary, sel), "bal-bias-summary")

    with guarded("MaxVio"):
        per_step = ctx.q(max_violation, sel, by_step=True, step_bucket=bucket)
        show_chart(charts.imbalance_lines(per_step, "max_vio"), per_step, "bal-maxvio", caption=note)
        summary = ctx.q(max_vio_summary, sel)
        show_table(summary, "bal-maxvio-summary")
        show_chart(charts.per_layer_bars(summary, y="global_max_vio",
                                         title="MaxVio of each layer over the selected steps",
                                         y_title="busiest ÷ mean − 1"), summary, "bal-maxvio-global")

    with guarded("Per-sequence balance losses"):
        per_layer = ctx.q(sequence_balance_loss, sel, by_step=True, step_bucket=bucket)
        if per_layer.empty:
            st.info("No per-sequence balance losses for this run: they are recorded on the device by the Recorder "
                    "(balance_stats); a run recorded before moeviz stored them, or imported from an engine log, "
                    "has none. The Aux loss page shows the losses of each step's pooled tokens.")
            return
        for convention in ("switch", "deepseek_v3_seq"):
            show_chart(charts.sequence_loss_lines(per_layer, convention=convention, top_k=ctx.top_k), per_layer,
                       f"bal-seq-{convention}", caption=note)
        pooled = ctx.q(sequence_balance_loss, sel, pooled=True, by_step=False)
        st.markdown("**Pooled over layers as each family's training code pools them, over the selected steps**")
        show_table(pooled, "bal-seq-pooled")
        st.caption("Switch: f and P pooled over a stack's layers (from its first through the last selected layer), "
                   "so over a whole stack it is the model's encoder_aux_loss / decoder_aux_loss; DeepSeek-V3: the "
                   "mean of the layers' losses.")


if __name__ == "__main__":
    run_page("Balancing", render)
