"""Specialization: which experts take which domains, tokens and positions, which fire together, whether
neighbouring tokens share experts, how tokens flow between layers, and how settled the router is."""

from __future__ import annotations

import streamlit as st

from app.components import OBSERVATIONAL, guarded, run_page, show_chart
from app.state import Ctx
from moeviz import charts
from moeviz.analyses.specialization import (
    coactivation,
    consecutive_agreement,
    domain_share,
    layer_flow,
    mutual_information,
    position_share,
    router_saturation,
    top_tokens,
    vocab_specialization_summary,
)
from moeviz.errors import MoevizError
from moeviz.store.catalog import has_routes, step_tags


def _layer_picker(ctx: Ctx, label: str, key: str, index: int = 0) -> int:
    layers = list(ctx.chosen_layers) or [0]
    return int(st.selectbox(label, layers, index=min(index, len(layers) - 1), key=key))


def _domains(ctx: Ctx, layer: int) -> None:
    if not ctx.domains:
        st.info("This run's sequences carry no domain labels (give `domain=` to the Recorder).")
        return
    share = ctx.q_slow("Domain shares of the per-token routes...", domain_share, ctx.sel_routes)
    show_chart(charts.domain_heatmap(share, layer=layer), share, "domain-share",
               caption="Red: the expert takes more of the domain's tokens than balanced routing would (k/E); "
               "blue: less.")


def _tokens(ctx: Ctx, layer: int) -> None:
    c1, c2, c3 = st.columns(3)
    expert = int(c1.selectbox("Expert", list(range(ctx.n_experts)), key="spec_expert"))
    by = c2.radio("Rank tokens by", ["count", "lift"], horizontal=True, key="spec_by")
    min_count = int(c3.number_input("Min. occurrences (lift)", 1, 1000, 5, key="spec_min_count"))
    top = ctx.q_slow("Top tokens per expert...", top_tokens, ctx.sel_routes, n=15,
                    min_count=min_count)
    show_chart(charts.top_tokens_bars(top, layer=layer, expert=expert, by=by), top, "top-tokens")


def _vocab_and_position(ctx: Ctx, layer: int) -> None:
    left, right = st.columns(2)
    with left, guarded("Vocabulary specialization"):
        summary = ctx.q_slow("Vocabulary specialization...", vocab_specialization_summary,
                             ctx.sel_routes, min_count=3)
        uniform = float(summary["uniform"].iloc[0]) if len(summary) else None
        show_chart(charts.per_layer_bars(summary, y="specialization", title="Vocabulary specialization per layer",
                                         y_title="share of a token's occurrences sent to its favourite expert",
                                         reference=("independent of the token", uniform),
                                         hover=("token_ids", "occurrences")), summary, "vocab-specialization")
    with right, guarded("Position specialization"):
        pos = ctx.q_slow("Position shares...", position_share, ctx.sel_routes)
        show_chart(charts.position_heatmap(pos, layer=layer), pos, "position-share")


def _coactivation_and_agreement(ctx: Ctx, layer: int) -> None:
    left, right = st.columns(2)
    with left, guarded("Co-activation"):
        if ctx.top_k < 2:
            st.info("Co-activation needs top-k ≥ 2: with k = 1 no two experts serve the same token.")
        else:
            co = ctx.q_slow("Co-activation of expert pairs...", coactivation, ctx.sel_routes)
            show_chart(charts.coactivation_heatmap(co, layer=layer), co, "coactivation")
    with right, guarded("Consecutive tokens"):
        agree = ctx.q_slow("Experts of consecutive tokens...", consecutive_agreement,
                           ctx.sel_routes)
        show_chart(charts.consecutive_agreement_bars(agree, layer=layer), agree, "consecutive-agreement")


def _flow(ctx: Ctx) -> None:
    layers = list(ctx.layers)
    if len(layers) < 2:
        st.info("Token flow needs two MoE layers; this run has one.")
        return
    c1, c2 = st.columns(2)
    a = int(c1.selectbox("From layer", layers, index=0, key="flow_a"))
    b = int(c2.selectbox("To layer", layers, index=1, key="flow_b"))
    flow = ctx.q_slow("Token flow between the two layers...", layer_flow, ctx.sel_routes, a, b)
    show_chart(charts.layer_flow_sankey(flow, a, b), flow, "layer-flow")


def _saturation(ctx: Ctx) -> None:
    tagged = ctx.q(step_tags, ctx.run_id)
    probe_steps = sorted(int(s) for s in tagged.loc[tagged["tag"] == "probe", "step"].unique())
    if len(probe_steps) >= 2:  # the same tokens at each checkpoint: the steps that can be compared
        steps, tags = probe_steps, ("probe",)
        st.caption(f"The probe batch (the same tokens each time) was recorded at steps "
                   f"{_step_list(probe_steps)}: any two of them can be compared.")
    else:
        steps, tags = list(ctx.steps), None
        st.caption("Router saturation compares the same tokens at two steps. This run recorded no probe batch "
                   "(tag 'probe') at two steps or more, so only steps that saw the same token ids can be compared.")
    if len(steps) < 2:
        st.info("Router saturation compares two steps; this run has one.")
        return
    c1, c2 = st.columns(2)
    a = int(c1.selectbox("Step", steps, index=0, key="sat_a"))
    b = int(c2.selectbox("Against step", steps, index=len(steps) - 1, key="sat_b"))
    sel = ctx.sel.with_(steps=None, tags=tags)
    try:
        sat = ctx.q_slow("Router saturation...", router_saturation, sel, a, b)
    except MoevizError as e:
        st.info(f"Router saturation compares the same tokens at two steps: {e}")
        return
    show_chart(charts.per_layer_bars(sat, y="saturation", title=f"Router saturation: step {a} against step {b}",
                                     y_title="mean |top-k(a) ∩ top-k(b)| / k", reference=("identical routing", 1.0),
                                     hover=("tokens", "top1_agreement")), sat, "router-saturation")


def _step_list(steps: list[int], most: int = 12) -> str:
    """"1, 63, 125" (with "…" in the middle of a long list)."""
    shown = steps if len(steps) <= most else [*steps[: most // 2], "…", *steps[-most // 2 :]]
    return ", ".join(str(s) for s in shown)


def _mutual_information(ctx: Ctx) -> None:
    mi = ctx.q_slow("Mutual information...", mutual_information, ctx.sel_routes)
    first = mi[mi["slots"] == "first"] if "slots" in mi.columns else mi
    show_chart(charts.per_layer_bars(first, y="nmi", color="variable", title="Normalised mutual information with the first-choice expert",
                                     y_title="NMI (0 = independent, 1 = determined)", hover=("mi", "n")), mi, "mutual-information")


def _domains_tab(ctx: Ctx, layer: int) -> None:
    with guarded("Domain specialization"):
        _domains(ctx, layer)


def _tokens_tab(ctx: Ctx, layer: int) -> None:
    with guarded("Top tokens"):
        _tokens(ctx, layer)


# (tab label, what draws it): the per-layer maps, one group per tab
MAP_TABS = [
    ("Domains", _domains_tab),
    ("Tokens", _tokens_tab),
    ("Vocabulary and positions", _vocab_and_position),
    ("Experts together and in sequence", _coactivation_and_agreement),
]
MAP_TAB_KEY = "spec_tab"


@st.fragment
def _per_layer_maps(ctx: Ctx) -> None:
    """The layer picker and the maps it drives, one group of maps per tab. A fragment: changing the layer re-runs
    and redraws this part only, not the flow, saturation and mutual-information sections below.

    The tabs run only the open tab's code (`on_change="rerun"`), so a layer change rebuilds and redraws one or two
    charts, not six: with all six on the page, the browser drew each new chart twice (Streamlit remounts a chart
    whose figure changed, and its theme pass draws it again) and the layer change took 1.15 s over 100 M routes.
    Switching tabs re-runs this fragment only."""
    layer = _layer_picker(ctx, "Layer for the per-layer maps", "spec_layer")
    tabs = st.tabs([label for label, _ in MAP_TABS], key=MAP_TAB_KEY, on_change="rerun")
    for tab, (_, draw) in zip(tabs, MAP_TABS):
        if tab.open:
            with tab:
                draw(ctx, layer)


def render(ctx: Ctx) -> None:
    if not ctx.q(has_routes, ctx.run_id):
        st.info("This run kept no per-token detail, which every specialization view reads.")
        return
    st.info(ctx.route_note, icon=":material/speed:")
    st.caption(OBSERVATIONAL)
    _per_layer_maps(ctx)
    st.subheader("Flow between layers")
    with guarded("Token flow"):
        _flow(ctx)
    st.subheader("Router saturation and mutual information")
    left, right = st.columns(2)
    with left, guarded("Router saturation"):
        _saturation(ctx)
    with right, guarded("Mutual information"):
        _mutual_information(ctx)


if __name__ == "__main__":
    run_page("Specialization", render)
