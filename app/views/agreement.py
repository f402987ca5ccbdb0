"""Agreement: the same tokens routed twice (two runs, or two step windows of one run), compared token by token:
the log checks, agreement per layer, layers that disagree per token, by position, against the router's margin,
prompt against generated tokens, the swap matrix of a layer, and a sequence's text coloured by disagreement."""

from __future__ import annotations

import streamlit as st

from app.components import guarded, run_page, show_chart, show_table
from app.state import Ctx, slider_steps
from moeviz import charts
from moeviz.analyses.agreement import (
    AgreementError,
    MATCH_BY,
    headline,
    length_warning,
    margin_agreement,
    matched_by_line,
    phase_agreement,
    position_agreement,
    sequence_disagreement,
    sides_without_token_ids,
    summary,
    swap_matrix,
    token_view,
)
from moeviz.analyses.log_checks import checks
from moeviz.selection import Selection

TWO_RUNS, TWO_WINDOWS = "Two runs", "Two step windows of this run"
MATCH_BY_LABELS = {"auto": "key (sample_id where both have one, else the token-id hash)", "sample_id": "sample_id",
                   "seq_key": "token-id hash (seq_key)", "order": "order (i-th sequence of A with i-th of B)"}


def _sides(ctx: Ctx) -> tuple[Selection, Selection, str] | None:
    """The two selections the user picked, and a caption saying what they are."""
    modes = [TWO_RUNS, TWO_WINDOWS] if len(ctx.runs) > 1 else [TWO_WINDOWS]
    mode = st.radio("Compare", modes, horizontal=True, key="agree_mode")
    layers = ctx.sel.layers
    if mode == TWO_RUNS:
        c1, c2 = st.columns(2)
        a = c1.selectbox("Run A", ctx.runs, index=ctx.runs.index(ctx.run_id), key="agree_a")
        b = c2.selectbox("Run B", [r for r in ctx.runs if r != a], key="agree_b")
        return (Selection(run_ids=(a,), layers=layers), Selection(run_ids=(b,), layers=layers),
                f"Every recorded step of run {a} against every recorded step of run {b}; the sidebar's Layers apply.")
    if len(ctx.steps) < 2:
        st.info("This run has one recorded step: pick two runs, or record the same tokens at two steps (a probe "
                "batch, tag='probe').")
        return None
    kept = tuple(v for k in ("agree_wa", "agree_wb") for v in (st.session_state.get(k) or ()))
    steps = slider_steps(list(ctx.steps), keep=kept)  # a long run: ~1,500 stops (app.state.slider_steps)
    c1, c2 = st.columns(2)
    wa = c1.select_slider("Window A (steps)", steps, value=(steps[0], steps[0]), key="agree_wa")
    wb = c2.select_slider("Window B (steps)", steps, value=(steps[-1], steps[-1]), key="agree_wb")
    run = (ctx.run_id,)
    return (Selection(run_ids=run, steps=tuple(wa), layers=layers), Selection(run_ids=run, steps=tuple(wb), layers=layers),
            f"Run {ctx.run_id}, steps {wa[0]}–{wa[1]} against steps {wb[0]}–{wb[1]}; the sidebar's Layers apply.")


def render(ctx: Ctx) -> None:
    st.caption("Tokens are matched by their sequence's key (sample_id where both sides have one, else the hash of "
               "its token ids) and position, whatever their step, rank or batch row. Only tokens whose routes were "
               "kept on both sides are compared.")
    picked = _sides(ctx)
    if picked is None:
        return
    a, b, scope = picked
    st.caption(scope)
    by = st.selectbox("Match sequences by", MATCH_BY, key="agree_match_by", format_func=MATCH_BY_LABELS.get,
                      help="order: for logs without token ids or request ids (a Megatron trace, an SGLang "
                           "per-token dump imported without --sample-ids)")
    kw = {"match_by": by}
    try:
        got = ctx.q_slow("Matching the tokens of both sides...", summary, a, b, **kw)
    except AgreementError as e:  # nothing in common: say what keys each side has, not an error box
        st.info(str(e).replace("pass --match-by order (match_by='order'", "choose 'order' above (--match-by order"))
        return
    m = got["matched"].iloc[0]
    if by == "order" or int(m["ids_compared"]) < int(m["matched"]):  # only the order or the keys vouch for some
        st.warning(matched_by_line(m, ctx.q(sides_without_token_ids, a, b)))
    if length_warning(m):
        st.warning(length_warning(m))
    per_layer, counts, hist = got["layers"], got["matched"], got["tokens"]
    h = headline(per_layer, hist, counts)
    c = st.columns(4)
    c[0].metric("Matched tokens", f"{h['matched']:,}")
    c[1].metric("Unmatched (A / B)", f"{int(counts['unmatched_a'].iloc[0]):,} / {int(counts['unmatched_b'].iloc[0]):,}")
    c[2].metric("Decisions with another expert set", f"{100 * h['decisions_differing']:.2f}%")
    c[3].metric("Tokens with ≥ 1 differing layer", f"{100 * h['tokens_differing']:.2f}%")
    with guarded("Log checks"):
        found = ctx.q(checks, a, b, **kw)
        bad = found[found["status"] != "ok"]
        for r in bad.itertuples():
            st.warning(f"Log check {r.status} ({'A' if r.side == 'a' else 'B' if r.side == 'b' else 'A against B'}, "
                       f"{r.check}): {r.detail}")
        if bad.empty:
            st.caption("Log checks: ok (no sentinel, out-of-range or duplicate expert ids, no all-zero rows, "
                       "positions aligned).")
    with guarded("Agreement per layer"):
        show_chart(charts.agreement_bars(per_layer), per_layer, "agree-layers")
    with guarded("Layers that differ per token"):
        show_chart(charts.disagreement_histogram(hist), hist, "agree-hist")
    with guarded("Agreement by position"):
        bucket = int(st.select_slider("Position bucket (tokens)", [1, 2, 4, 8, 16, 32, 64, 128], value=16,
                                      key="agree_bucket"))
        pos = ctx.q(position_agreement, a, b, bucket=bucket, **kw)
        show_chart(charts.position_agreement_heatmap(pos), pos, "agree-pos")
    with guarded("Disagreement by margin"):
        mg = ctx.q(margin_agreement, a, b, **kw)
        show_chart(charts.margin_agreement_bars(mg), mg, "agree-margin")
        if mg["margin_side"].isna().all():
            st.caption("Neither side has margins: routes.margin is NULL for every matched decision (engine logs "
                       "carry none; the Recorder writes them).")
    with guarded("Prompt and generated tokens"):
        ph = ctx.q(phase_agreement, a, b, **kw)
        show_chart(charts.phase_agreement_bars(ph), ph, "agree-phase")
        unknown = int(ph.loc[ph["phase"] == "unknown", "tokens"].sum())
        if unknown:
            st.caption(f"{unknown:,} matched token(s) have no known prompt length (sequences.prompt_tokens is NULL "
                       "on both sides): they are counted as 'unknown'.")
    with guarded("Swap matrix"):
        layer = int(st.selectbox("Layer", per_layer["layer"].tolist(), key="agree_layer"))
        sw = ctx.q(swap_matrix, a, b, layer, **kw)
        show_chart(charts.swap_heatmap(sw, layer=layer, n_experts=ctx.n_experts), sw, "agree-swaps")
        with st.expander("Swaps as a table"):
            show_table(sw.sort_values("tokens", ascending=False), "agree-swaps-table")
    with guarded("Token view"):
        seqs = ctx.q(sequence_disagreement, a, b, limit=50, **kw)
        labels = [f"run {r.run_id}, step {r.step}, rank {r.rank}, row {r.seq}: {100 * r.tokens_differing:.0f}% of "
                  f"{r.tokens} tokens differ" for r in seqs.itertuples()]
        i = st.selectbox("Sequence (most disagreeing first)", range(len(labels)), format_func=lambda j: labels[j],
                         key="agree_seq")
        r = seqs.iloc[int(i or 0)]
        tv = ctx.q(token_view, a, b, run_id=str(r["run_id"]), step=int(r["step"]), rank=int(r["rank"]),
                   seq=int(r["seq"]), **kw)
        st.html(charts.disagreement_text_html(tv, n_layers=len(per_layer)))


if __name__ == "__main__":
    run_page("Agreement", render)
