"""Bound explorer: the true lower bound (infimum) of the Switch load-balancing loss for E experts and top-k,
the batch that reaches it, the blog's construction and Switch's 1, and this run's losses on the same axis."""

from __future__ import annotations

import streamlit as st

from app.components import bucket_note, guarded, run_page, show_chart
from app.state import Ctx, cached_pure
from moeviz import charts
from moeviz.analyses.aux_loss import switch_loss
from moeviz.analyses.bounds import aux_loss_infimum, blog_construction, infimum_table

CURVE_EXPERTS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def infimum_value(n_experts: int, top_k: int, tokens: int | None = None) -> float | None:
    """The infimum of the Switch loss for E and k."""
    if n_experts < 2 or top_k >= n_experts:
        return 1.0  # one expert, or every expert chosen: every routing gives exactly 1
    return float(cached_pure(aux_loss_infimum, int(n_experts), int(top_k), tokens).value)


def _controls(ctx: Ctx | None) -> tuple[int, int, int | None]:
    run_e = ctx.n_experts if ctx else 8
    run_k = ctx.top_k if ctx else 1
    c1, c2, c3 = st.columns(3)
    e = int(c1.number_input("Experts E", min_value=2, max_value=1024, value=max(2, run_e), key="bound_e"))
    k = int(c2.number_input("Top-k", min_value=1, max_value=e - 1 if e > 1 else 1, value=min(max(1, run_k), max(1, e - 1)),
                            key="bound_k"))
    finite = c3.toggle("A fixed batch of T tokens", key="bound_finite")
    t = int(c3.number_input("Tokens T", min_value=1, max_value=100_000, value=64, key="bound_t")) if finite else None
    return e, k, t


def render(ctx: Ctx | None) -> None:
    e, k, t = _controls(ctx)
    res = cached_pure(aux_loss_infimum, e, k, t)
    blog = cached_pure(blog_construction, e).value if k == 1 else None
    m = st.columns(4)
    m[0].metric("True infimum", f"{res.value:.4f}", help=f"exactly {res.fraction}")
    m[1].metric("Switch's claimed minimum", "1")
    m[2].metric("Blog's construction", f"{blog:.4f}" if blog is not None else "k = 1 only")
    m[3].metric("Reached by", f"{res.tokens_used} tokens", help="attained exactly" if res.attained else "approached as eps → 0")
    st.caption(f"Construction ({res.family}): {res.description}")
    if not res.attained:
        st.caption("The infimum is approached, not attained: the batch drawn is the limit ε → 0. A ringed cell is a "
                   "chosen (top-k) expert; one at probability ~0 is chosen by a tie at the k-th place, which any "
                   "ε > 0 breaks towards it.")
    left, right = st.columns(2)
    with left, guarded("Optimal batch"):
        frame = charts.matrix_frame(res.weights[:200], res.chosen[:200])
        show_chart(charts.bound_matrix(frame, title=f"Router probabilities of the optimal batch (E={e}, k={k})"),
                   frame, "bound-matrix")
    with right, guarded("Bound over E"):
        table = cached_pure(infimum_table, tuple(x for x in CURVE_EXPERTS if x > k), (k,) if k > 1 else (1,))
        show_chart(charts.bound_curve(table, current_experts=e), table, "bound-curve")
    if ctx is None:
        st.info("Open a run in the sidebar to see its observed losses against these bounds.")
        return
    with guarded("This run against the bounds"):
        if (e, k) != (ctx.n_experts, ctx.top_k):
            st.caption(f"The run has E = {ctx.n_experts}, k = {ctx.top_k}; its bounds are drawn below.")
        run_inf = infimum_value(ctx.n_experts, ctx.top_k)
        run_blog = cached_pure(blog_construction, ctx.n_experts).value if ctx.top_k == 1 and ctx.n_experts > 1 else None
        # in buckets on a long run, as every curve over steps: every step of 58 layers x 10,000 steps was 580,000
        # points, re-sent on each rerun of this page (a widget change 2.9 s; docs/benchmarks.md)
        bucket = ctx.step_bucket
        observed = ctx.q(switch_loss, ctx.sel_exact, by_step=True, step_bucket=bucket)
        show_chart(charts.observed_against_bounds(observed, infimum=run_inf, blog=run_blog), observed, "bound-observed",
                   caption=bucket_note(bucket))


if __name__ == "__main__":
    run_page("Bound explorer", render, needs_run=False)
