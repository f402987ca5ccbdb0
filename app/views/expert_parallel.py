"""Expert parallel: the recorded routing spread over G GPUs by a placement: the load per GPU and layer, the
busiest GPU over steps for each placement, the traffic between GPUs of one layer, and how a balanced placement
fitted on early steps goes stale."""

from __future__ import annotations

import streamlit as st

from app.components import guarded, run_page, show_chart, show_table
from app.state import Ctx
from moeviz import charts
from moeviz.analyses.placement import (
    dispatch_traffic,
    gpu_load,
    local_share,
    placement_comparison,
    placement_staleness,
)

STALENESS_STEPS = 500  # later steps evaluated at most (each a placement search): 7,500 of a 256-expert layer took 13 s

HELP = """
**Placement**: which GPU holds each expert of a layer. *Contiguous*: expert e on GPU ⌊e·G/E⌋ (Megatron-LM and
DeepSpeed). *Round robin*: e mod G. *Balanced*: computed from this selection's load: the redundant replicas go to
the experts with the most load per replica, replicas are packed heaviest first onto the least loaded GPU (at most
⌈(E+R)/G⌉ per GPU, replicas of an expert on distinct GPUs, all in one node when N > 1), then improved by moves and
swaps; never worse than contiguous. A replicated expert's load is split evenly over its replicas.

**GPU load**: the assignments (token copies, one per chosen expert) that reach a GPU's experts, from the exact
per-step counts. **Busiest ÷ mean**: an expert-parallel layer waits for its busiest GPU, so 1.5 means the layer
takes 1.5× as long as an even spread would.

**Traffic**: each token starts on a source GPU: sequence `seq` on GPU seq mod G (the batch dealt to G
data-parallel ranks), or the recording rank mod G. A copy is *local* when its expert sits on that GPU. From the
per-token routes (the window in the sidebar). With a hidden size H, **bytes** = copies × H × 2 (bf16), one way;
*remote bytes* are those of the copies that leave their GPU.

**Staleness**: a balanced placement fitted on the first steps, evaluated on every later step, against one refitted
on each step (what rebalancing every step would reach) and contiguous.
"""


def render(ctx: Ctx) -> None:
    with st.expander("What this page shows"):
        st.markdown(HELP)
    steps = ctx.selected_steps
    if not steps:
        st.info("No steps recorded in this selection yet.")
        return
    c1, c2, c3, c4 = st.columns(4)
    gpus = int(c1.number_input("GPUs", 1, 4096, min(4, ctx.n_experts), key="ep_gpus",
                               help="Expert-parallel GPUs G over which each layer's experts are spread."))
    redundant = int(c2.number_input("Redundant replicas", 0, 4096, 0, key="ep_redundant",
                                    help="Extra expert replicas the balanced placement may place (EPLB's redundant experts)."))
    nodes = int(c3.number_input("Nodes", 1, 512, 1, key="ep_nodes",
                                help="Nodes of G/N GPUs each; a balanced placement keeps an expert's replicas in one node."))
    source = c4.radio("Tokens start", ["sequence", "rank"], key="ep_source", horizontal=True,
                      format_func={"sequence": "seq mod G", "rank": "rank mod G"}.get)
    layers = list(ctx.chosen_layers) or [0]
    layer = st.selectbox("Layer for the curves and the traffic matrix", layers, key="ep_layer")

    with guarded("GPU load heat map"):
        kind = st.radio("Placement", ["contiguous", "round_robin", "balanced"], key="ep_placement", horizontal=True,
                        format_func={"contiguous": "contiguous", "round_robin": "round robin",
                                     "balanced": "balanced"}.get)
        load = ctx.q(gpu_load, ctx.sel, gpus, placement=kind, redundant=redundant if kind == "balanced" else 0,
                     nodes=nodes)
        show_chart(charts.gpu_load_heatmap(load, title=f"Share of each layer's assignments per GPU, {kind}"),
                   load, "ep-gpu-load")

    with guarded("Busiest GPU over steps"):
        # the curve of one layer, in buckets on a long run; balanced is still fitted on every layer's own load
        per_step = ctx.q(placement_comparison, ctx.sel.with_(layers=(int(layer),)), gpus, redundant=redundant,
                         nodes=nodes, by_step=True, step_bucket=ctx.step_bucket)
        show_chart(charts.busiest_gpu_lines(per_step, layer=layer), per_step, "ep-busiest")

    with guarded("Traffic matrix"):
        hidden = int(st.number_input("Hidden size H (0: count token copies only)", 0, 1 << 20, 0, key="ep_hidden",
                                     help="Bytes of the traffic = token copies × H × 2 (bf16)."))
        # balanced: the placement of the heat map (fitted on every selected step), not one fitted on the window
        traffic = ctx.q_slow("Counting the routes between GPUs...", dispatch_traffic, ctx.sel_routes, gpus,
                             placement=kind, source=source, redundant=redundant if kind == "balanced" else 0,
                             nodes=nodes, fit_steps=(steps[0], steps[-1]) if kind == "balanced" else None,
                             hidden_size=hidden or None)
        show_chart(charts.traffic_heatmap(traffic, layer=layer), traffic, "ep-traffic",
                   caption=f"Placement: {kind}. " + ctx.route_note)
        show_table(local_share(traffic, gpus=gpus, nodes=nodes), "ep-local-share")

    with guarded("Staleness"):
        if len(steps) < 2:
            st.info("Staleness needs at least two steps: one to fit on and one to evaluate.")
            return
        window = 1 if len(steps) == 2 else st.slider(  # a slider needs min < max: with two steps, fit on the first
            "Fit the balanced placement on the first steps", 1, len(steps) - 1,
            max(1, min(len(steps) // 4, len(steps) - 1)), key="ep_fit")
        stale = ctx.q(placement_staleness, ctx.sel.with_(layers=(int(layer),)), gpus, (steps[0], steps[window - 1]),
                      redundant=redundant, nodes=nodes, max_steps=STALENESS_STEPS)
        later = len(steps) - window
        sampled = (f" Evaluated on {STALENESS_STEPS:,} of the {later:,} later steps, evenly spaced (the refit is a "
                   "placement search per step)." if later > STALENESS_STEPS else "")
        show_chart(charts.staleness_lines(stale, layer=layer), stale, "ep-staleness",
                   caption=f"Fitted on steps {steps[0]}–{steps[window - 1]}; each later step also gets a placement "
                           f"fitted on itself (refit).{sampled}")


if __name__ == "__main__":
    run_page("Expert parallel", render)
