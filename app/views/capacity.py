"""Capacity: what a capacity-limited router would drop at a chosen capacity factor and policy, by layer, expert
and domain, and the drop rate over capacity factors with the current choice marked."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import streamlit as st

from app import wide
from app.components import guarded, run_page, show_chart
from app.state import Ctx
from moeviz import charts
from moeviz.analyses.capacity import capacity_drops, drop_curve, model_capacity
from moeviz.analyses.step_rows import buckets_available, expert_drops_available
from moeviz.store.rollups import DROP_FACTORS

CURVE_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)
SLIDER = (0.25, 4.0, 0.05)  # the capacity-factor slider: min, max, step


def _slider_factors(default_cf: float) -> tuple[float, ...]:
    """Every value the capacity-factor slider can take (its grid, and the model's own factor it starts at)."""
    lo, hi, step = SLIDER
    grid = {round(lo + i * step, 2) for i in range(int(round((hi - lo) / step)) + 1)}
    return tuple(sorted(grid | {round(default_cf, 4)}))


def _domain_drops(ctx: Ctx, cf: float | None, default_cf: float, policy: str, group: str,
                  capacity: int | None = None) -> pd.DataFrame:
    """Drops per domain at `cf`, picked from the drops at every slider value, which one cached query fetches.

    Per domain the drops read the per-token routes of the window. `drop_curve` answers every slider value in one
    call (on the 100 M store's 1.8 M-route window: 0.3 s with the position policy, 1.4-1.6 s with the probability
    one, which ranks the window's routes once), so moving the slider runs no query. One factor alone by the
    probability policy takes 0.2 s (weight_hist's cut bins and one pass), but that is one pass per factor.
    A fixed `capacity` is one query of its own."""
    if capacity is not None:
        return ctx.q_slow("Drops per domain from the per-token routes...", capacity_drops, ctx.sel_routes,
                          capacity=capacity, policy=policy, group=group, by=("domain",))
    curve = ctx.q_slow("Drops per domain from the per-token routes...", drop_curve, ctx.sel_routes,
                       _slider_factors(default_cf), policy=policy, group=group, by=("domain",))
    at = curve[np.isclose(curve["capacity_factor"], cf, rtol=0, atol=1e-9)]
    if at.empty:  # a factor off the slider's grid
        return ctx.q_slow("Drops per domain from the per-token routes...", capacity_drops,
                          ctx.sel_routes, cf, policy=policy, group=group, by=("domain",))
    return at.drop(columns="capacity_factor").reset_index(drop=True)


def _stored_only(ctx: Ctx, group: str) -> bool:
    """Whether the factor control offers only the factors the compacted tables answer (step_drops, expert_drops:
    DROP_FACTORS): a run whose replay takes seconds (app.wide.replay_is_slow; 14-19 s per query at 10,000
    steps of 58 x 256, docs/benchmarks.md) and whose tables hold every row, at the groups they hold (per step and
    rank), without a domain filter (which reads per-token routes anyway). Small and live runs keep the continuous
    slider."""
    return (group == "step" and not ctx.sel.needs_sequences and wide.replay_is_slow(ctx)
            and bool(ctx.q(buckets_available)) and bool(ctx.q(expert_drops_available)))


def _stored_factor(c1, default_cf: float, ranks_picked: bool) -> tuple[float, bool]:
    """The capacity factor from a select slider over the stored factors plus the model's own, or one typed in
    when the reader asks for it: (factor, whether the tables answer it: a stored factor, every rank)."""
    options = sorted(set(DROP_FACTORS) | {round(default_cf, 4)})
    other = c1.toggle("Another factor (slow: replays every step)", key="cap_cf_other",
                      help="Factors other than the stored ones replay every step_stats row of the selection: "
                           "tens of seconds on a long run of a wide model.")
    if other:
        cf = float(c1.number_input("Capacity factor (replays every step)", min_value=0.05, max_value=64.0,
                                   value=float(default_cf), step=0.05, key="cap_cf_typed"))
    else:
        cf = float(c1.select_slider("Capacity factor", options, value=round(default_cf, 4), key="cap_cf_stored",
                                    help="Each expert gets C = ceil(CF × tokens × k / E) slots per group; "
                                         "assignments beyond C are dropped."))
    fast = cf in DROP_FACTORS and not ranks_picked
    c1.caption(f"Factors {', '.join(f'{f:g}' for f in DROP_FACTORS)} are read from tables compaction built"
               + ("." if fast else "; a rank filter replays every step of the selection (slow)." if ranks_picked
                  else f"; {cf:g} replays every step of the selection (slow)."))
    return cf, fast


def render(ctx: Ctx) -> None:
    _drops(ctx)


@st.fragment
def _drops(ctx: Ctx) -> None:
    """The capacity factor, policy and group inputs and everything they drive. A fragment: changing an input
    re-runs and redraws this part only, not the sidebar around it."""
    model_cf = ctx.run.get("capacity_factor")
    own = model_capacity(ctx.run.get("config"), model_cf)
    default_cf = own["capacity_factor"] if own["capacity_factor"] else 1.25
    c0, c1, c2, c3 = st.columns([1, 2, 1, 1])
    mode = c0.radio("Capacity", ["factor", "fixed"], index=1 if own["capacity"] else 0, key="cap_mode",
                    format_func={"factor": "capacity factor", "fixed": "fixed slots per expert"}.get,
                    help="A capacity factor scales with the group's tokens (GShard, Megatron); a fixed number of "
                         "slots per expert and group is Switch Transformers' expert_capacity.")
    policy = c2.radio("Drop policy", ["position", "probability"], key="cap_policy",
                      format_func={"position": "first come, first served", "probability": "lowest weight first"}.get)
    group = c3.radio("Group", ["step", "sequence"], index=["step", "sequence"].index(own["group"]), key="cap_group",
                     format_func={"step": "per step and rank", "sequence": "per sequence"}.get,
                     help="The tokens that compete for an expert's slots. The default is the model's own: per "
                          "sequence for a fixed expert_capacity (Switch), else per step.")
    cf, capacity = None, None
    stored = mode == "factor" and _stored_only(ctx, group)
    fast = True  # whether the queries below are answered quickly (else: a spinner)
    if mode == "fixed":
        capacity = int(c1.number_input("Slots per expert and group (expert_capacity)", min_value=0,
                                       max_value=10_000_000, value=own["capacity"] or 8, step=1, key="cap_slots"))
    elif stored:
        cf, fast = _stored_factor(c1, default_cf, ctx.sel.ranks is not None)
    else:
        cf = c1.slider("Capacity factor", SLIDER[0], SLIDER[1], default_cf, SLIDER[2], key="cap_cf",
                       help="Each expert gets C = ceil(CF × tokens × k / E) slots per group; assignments beyond C "
                            "are dropped.")
    q = ctx.q if fast else (lambda fn, *a, **kw: ctx.q_slow(
        f"Replaying every step at capacity factor {cf:g}...", fn, *a, **kw))
    limit = {"capacity": capacity} if capacity is not None else {"capacity_factor": cf}
    recorded = ctx.run.get("dropped")
    recorded = 0 if recorded is None or pd.isna(recorded) else int(recorded)  # NULL: the source cannot say
    if recorded:
        own_text = (f"expert_capacity {own['capacity']} per sequence" if own["capacity"]
                    else f"capacity factor {model_cf}")
        st.info(f"The model itself dropped {recorded:,} assignments while recording ({own_text}); the page starts "
                "on the model's own capacity and grouping, so the drops below reproduce them.")
    routes_sel = ctx.sel_routes if ctx.sel.needs_sequences else ctx.sel  # a domain filter reads per-token routes
    if ctx.sel.needs_sequences or ctx.domains:
        st.info(ctx.route_note + (" The domain filter makes every chart here read them." if ctx.sel.needs_sequences
                                  else " Here: the drops per domain."), icon=":material/speed:")
    total = None
    with guarded("Dropped share"):
        total = q(capacity_drops, routes_sel, policy=policy, group=group, by=(), **limit)
        row = total.iloc[0] if len(total) else None  # one run, no breakdown: one row
        m1, m2, m3 = st.columns(3)
        unknown = row is not None and pd.isna(row["dropped"])  # some selected step's token counts are unknown
        known = row is not None and row["assigned"] and not unknown
        m1.metric("Dropped share", f"{row['drop_rate']:.2%}" if known else "n/a")
        m2.metric("Dropped assignments", "n/a (token counts unknown)" if unknown
                  else f"{int(row['dropped']) if row is not None else 0:,}")
        m3.metric("Assignments", f"{int(row['assigned']) if row is not None else 0:,}")
    left, right = st.columns(2)
    with left, guarded("Drops per layer"):
        by_layer = q(capacity_drops, routes_sel, policy=policy, group=group, by=("layer",), **limit)
        show_chart(charts.drop_bars(by_layer, by="layer", cf=cf, capacity=capacity), by_layer, "drops-layer")
    with right, guarded("Drops per domain"):
        if ctx.domains:
            by_domain = _domain_drops(ctx, cf, default_cf, policy, group, capacity)
            show_chart(charts.drop_bars(by_domain, by="domain", cf=cf, capacity=capacity), by_domain, "drops-domain")
        else:
            st.info("This run has no domain labels.")
    with guarded("Drops per expert"):
        by_expert = q(capacity_drops, routes_sel, policy=policy, group=group, by=("layer", "expert"), **limit)
        show_chart(charts.drop_heatmap(by_expert, cf=cf, capacity=capacity), by_expert, "drops-expert")
    with guarded("Drop-rate curve"):
        # the fixed factors once (cached whatever the slider does), plus the chosen CF from `total` above; on a
        # run with the stored factors only, those (read from step_drops) instead of a replay of every step
        factors = DROP_FACTORS if stored else CURVE_FACTORS
        read = ctx.q if stored and ctx.sel.ranks is None else partial(ctx.q_slow, "Drop rate over capacity factors...")
        curve = read(drop_curve, routes_sel, factors, policy=policy, group=group, by=())
        if cf is not None and round(cf, 4) not in set(factors) and total is not None:
            curve = pd.concat([curve, total.assign(capacity_factor=cf)[curve.columns]], ignore_index=True)
            curve = curve.sort_values(["run_id", "capacity_factor"], ignore_index=True)
        show_chart(charts.drop_curve(curve, current_cf=cf), curve, "drop-curve")


if __name__ == "__main__":
    run_page("Capacity", render)
