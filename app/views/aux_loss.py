"""Aux loss: Switch load-balancing loss per layer and pooled (transformers' way), and the router z-loss, over
steps, against the uniform value 1 and the true lower bound for this run's E and k."""

from __future__ import annotations

import streamlit as st

from app.components import bucket_note, guarded, run_page, show_chart
from app.state import Ctx, step_kinds
from app.views.bounds import infimum_value
from app.wide import layer_page
from moeviz import charts
from moeviz.analyses.aux_loss import pooled_switch_loss, switch_loss, z_loss

ALL_STEPS = "all steps"


def _step_kind(ctx: Ctx) -> str | None:
    """A choice of the kind of step (train, eval, probe, ...) when the run tags its steps, training by default:
    that tag (the analyses' `step_tag`), or None for every step. An eval or probe pass routes other tokens than
    the training batches, so mixing them into one curve makes a saw-tooth that is not the training dynamics."""
    kinds, default = step_kinds(ctx)
    if default is None:
        return None
    kind = st.radio("Steps", [*kinds, ALL_STEPS], index=kinds.index(default), horizontal=True, key="aux_steps",
                    help="The run tags its steps (train, eval, probe): each curve shows one kind of step.")
    return None if kind == ALL_STEPS else kind


def render(ctx: Ctx) -> None:
    if ctx.sel.needs_sequences:
        st.info("The losses need the router's full probabilities, kept only as exact per-step aggregates: "
                "the domain filter is ignored on this page.")
    sel = ctx.sel_exact
    kind = _step_kind(ctx)
    # a long run's curves in buckets of steps (at most ~1,500 points per line), of the chosen kind of step only
    over_steps = dict(by_step=True, step_bucket=ctx.step_bucket, step_tag=kind)
    note = bucket_note(ctx.step_bucket)
    bound = None
    with guarded("True lower bound"):
        bound = infimum_value(ctx.n_experts, ctx.top_k)
    bound_text = f"{bound:.4f}" if bound is not None else "n/a"
    st.caption(f"E = {ctx.n_experts} experts, k = {ctx.top_k}: uniform routing gives 1; the true lower bound "
               f"(infimum over routings) is {bound_text}, not the 1 of the Switch paper nor the blog's 1/2. "
               "These losses pool each step's tokens; the per-sequence losses Switch Transformers and DeepSeek-V3 "
               "train on (a mean over batch rows) are on the Balancing page.")
    with guarded("Switch loss per layer"):
        page = layer_page(ctx, "aux")  # many layers: a page of them at a time (app/wide.py)
        per_layer = ctx.q(switch_loss, sel if page is None else sel.with_(layers=page), **over_steps)
        show_chart(charts.aux_loss_lines(per_layer, bound=bound), per_layer, "switch-loss", caption=note)
    with guarded("Pooled Switch loss"):
        pooled = ctx.q(pooled_switch_loss, sel, **over_steps)
        scale = st.radio("Pooled loss scale", ["aux_loss_per_slot", "aux_loss"], horizontal=True, key="aux_scale",
                         format_func={"aux_loss_per_slot": "per slot (1 = uniform)",
                                      "aux_loss": "as transformers reports it (k = uniform)"}.get)
        k = float(ctx.top_k) if scale == "aux_loss" else 1.0
        fig = charts.aux_loss_lines(
            pooled, value=scale, color=None, title="Load-balancing loss pooled over layers (transformers' load_balancing_loss_func)",
            uniform=k, bound=None if bound is None else bound * k,
        )
        show_chart(fig, pooled, "pooled-switch-loss", caption=note)
    with guarded("Router z-loss"):
        z = ctx.q(z_loss, sel, **over_steps)
        show_chart(charts.z_loss_lines(z), z, "z-loss", caption=note)
        show_chart(charts.entropy_lines(z, n_experts=ctx.n_experts), z, "router-entropy", caption=note)


if __name__ == "__main__":
    run_page("Aux loss", render)
