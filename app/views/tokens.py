"""Tokens: one sequence's text with every token coloured by its expert, one row per layer (Mixtral's figure)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.components import OBSERVATIONAL, run_page, show_chart, show_table
from app.state import Ctx
from app.wide import layer_page
from moeviz import charts
from moeviz.store.catalog import sequence_list, sequence_routes

WINDOW = 256  # tokens shown at once: the text wraps, so a long window stays readable


def _label(row) -> str:
    preview = (row["preview"] or "").replace("\n", " ")
    domain = f" [{row['domain']}]" if row["domain"] else ""
    return f"step {row['step']} · rank {row['rank']} · seq {row['seq']}{domain}: {preview[:60]}"


def render(ctx: Ctx) -> None:
    st.info(ctx.route_note, icon=":material/speed:")
    window = ctx.route_steps or ctx.sel.steps
    seqs = ctx.q_slow("Listing the sequences with per-token detail...", sequence_list, ctx.run_id,
                      steps=None if window is None else tuple(window))
    if seqs.empty:
        st.info("This run kept no per-token detail (see the recording policy: sample_every, max_tokens_per_step).")
        return
    if ctx.sel.steps:
        lo, hi = ctx.sel.steps
        seqs = seqs[(seqs["step"] >= lo) & (seqs["step"] <= hi)]
    if ctx.sel.domains:
        seqs = seqs[seqs["domain"].isin(ctx.sel.domains)]
    if seqs.empty:
        st.info("No sequence with per-token detail in the selected steps and domains.")
        return
    labels = {i: _label(r) for i, r in seqs.reset_index(drop=True).iterrows()}
    rows = seqs.reset_index(drop=True)
    pick = st.selectbox("Sequence", list(labels), format_func=labels.get, key="tokens_seq")
    row = rows.iloc[int(pick)]
    routes = ctx.q(sequence_routes, ctx.run_id, int(row["step"]), int(row["rank"]), int(row["seq"]))
    if ctx.sel.layers is not None:
        routes = routes[routes["layer"].isin(ctx.sel.layers)]
    # a wide model's text, a page of layers at a time: 58 lines of 256 tokens with their experts on hover were
    # 4.9 MB of HTML (1.3 s to build, 4-5 s to show, 10,000-step DeepSeek-V3-shaped run: docs/benchmarks.md)
    page = layer_page(ctx, "tokens")
    if page is not None:
        routes = routes[routes["layer"].isin(page)]
    if not routes.empty and routes["weight"].isna().all():
        st.info("This run holds no gate weights and no slot order (it was imported from an engine log): a token's "
                "colour is the expert the log lists first, not necessarily its top choice.")
    _token_window(routes, row, ctx.n_experts)
    st.caption(OBSERVATIONAL)
    with st.expander("All routes of this sequence"):
        show_table(routes, "sequence-routes")


@st.fragment
def _token_window(routes: pd.DataFrame, row: pd.Series, n_experts: int) -> None:
    """The "First token shown" slider and the text it drives. A fragment: moving the window re-runs and redraws
    this part only, not the sidebar, the sequence list and the table of the sequence's routes."""
    n_pos = int(routes["pos"].nunique()) if not routes.empty else 0
    start = 0
    if n_pos > WINDOW:
        start = st.slider("First token shown", 0, n_pos - WINDOW, 0, step=8, key="tokens_start")
    positions = sorted(routes["pos"].unique())[start : start + WINDOW]
    shown = routes[routes["pos"].isin(positions)]
    span = f"tokens {positions[0]}–{positions[-1]} of {n_pos}" if positions else "no tokens"
    st.markdown(f"**The text, once per MoE layer, each token on the colour of its top expert** "
                f"(step {row['step']}, sequence {row['seq']}, {span}). Hover a token for its experts and weights.")
    st.html(charts.token_text_html(shown, n_experts=n_experts))
    # a toggle, not an expander: Streamlit builds a closed expander's contents on every rerun, so the slider paid
    # for a grid nobody opened (a heat map of 256 tokens x the layers shown, with every expert on hover)
    if st.toggle("Show the same as a grid (token × layer)", key="tokens_grid"):
        fig = charts.token_routes(shown, n_experts=n_experts,
                                  title=f"Top expert of each token, per layer (step {row['step']}, sequence {row['seq']})")
        show_chart(fig, shown, "token-routes", caption="Each cell is a token at one MoE layer, coloured by its top "
                   "expert; hover shows the token, every chosen expert and its gate weight.")


if __name__ == "__main__":
    run_page("Tokens", render)
