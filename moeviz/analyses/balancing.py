"""Balancing over time: the selection bias of aux-loss-free balancing, next to the load it is meant to even out.

DeepSeek-V3, torchtitan and Megatron-Core balance without (or beside) an auxiliary loss by adding a per-expert
bias to the router's scores before top-k and nudging it every step against the expert's load (Wang et al. 2024,
"Auxiliary-loss-free load balancing strategy for mixture-of-experts"). The bias is invisible in every training
log; the Recorder stores it per step (`expert_bias`), and this module reads it back. MaxVio, the balance metric
those papers report, is `moeviz.analyses.load.max_violation`; the per-sequence losses are
`moeviz.analyses.aux_loss.sequence_balance_loss`.
"""

from __future__ import annotations

import pandas as pd

from moeviz.analyses.load import AnalysisError, imbalance_from_buckets_sql, max_violation, run_query
from moeviz.analyses.step_buckets import bucketed_step_sql, check_step_bucket
from moeviz.analyses.step_rows import layer_buckets_sql
from moeviz.selection import Selection

__all__ = ["expert_bias", "bias_summary", "max_vio_summary"]


def _aggregate_selection(sel: Selection, what: str) -> None:
    if sel.needs_sequences:
        raise AnalysisError(f"{what} is recorded per step and layer, not per sequence: drop the domains/tags "
                            "from the selection")


def expert_bias(con, sel: Selection = Selection(), *, step_bucket: int | None = None) -> pd.DataFrame:
    """The selection bias of each expert per step, as the routers ranked with it during the step.

    Columns: run_id, step, layer, expert, bias (the mean over the selected ranks: data-parallel ranks hold the same
    bias), rank_spread (max - min over ranks within a step: 0 when the ranks agree, as they should). Empty for runs
    whose routers add no bias. `step_bucket=b`: one row per bucket of b steps, `step` its first step, the bias
    averaged over the bucket's steps and rank_spread the largest of its steps' (the bias moves from step to step,
    so a spread over the bucket would never be 0) (moeviz.analyses.step_buckets); None = every step.
    """
    _aggregate_selection(sel, "the expert bias")
    step_bucket = check_step_bucket(step_bucket, True)
    where, params = sel.where("b")
    sql = f"""
        WITH per_step AS (
            SELECT run_id, step, layer, expert, avg(bias) AS bias, count(*) AS n, max(bias) - min(bias) AS spread
            FROM expert_bias b WHERE {where} GROUP BY ALL)
        SELECT run_id, {bucketed_step_sql('step', step_bucket)} AS step, layer, expert,
               sum(bias * n) / sum(n) AS bias, max(spread) AS rank_spread
        FROM per_step GROUP BY ALL ORDER BY run_id, step, layer, expert"""
    # several rows of one step and rank (a step number given twice) count once each in the mean: the same bias
    return run_query(con, sql, params)


def bias_summary(con, sel: Selection = Selection()) -> pd.DataFrame:
    """Per run and layer: how the bias moved over the selected steps.

    Columns: run_id, layer, experts, first_step, last_step, spread_first and spread_last (max - min bias over the
    experts at the first and last selected step: how far apart the bias pushes the experts), mean_abs_change (mean
    over experts of |bias_last - bias_first|). Empty when the run has no bias.
    """
    _aggregate_selection(sel, "the expert bias")
    where, params = sel.where("b")
    sql = f"""
        WITH b AS (SELECT run_id, step, layer, expert, avg(bias) AS bias FROM expert_bias b WHERE {where}
                   GROUP BY ALL),
        ends AS (SELECT run_id, layer, min(step) AS first_step, max(step) AS last_step FROM b GROUP BY ALL),
        pairs AS (
            SELECT e.run_id, e.layer, b.expert, e.first_step, e.last_step,
                   any_value(b.bias) FILTER (WHERE b.step = e.first_step) AS first_bias,
                   any_value(b.bias) FILTER (WHERE b.step = e.last_step) AS last_bias
            FROM b JOIN ends e ON e.run_id = b.run_id AND e.layer = b.layer
            GROUP BY ALL)
        SELECT run_id, layer, count(*) AS experts, any_value(first_step) AS first_step,
               any_value(last_step) AS last_step, max(first_bias) - min(first_bias) AS spread_first,
               max(last_bias) - min(last_bias) AS spread_last, avg(abs(last_bias - first_bias)) AS mean_abs_change
        FROM pairs GROUP BY run_id, layer ORDER BY run_id, layer"""
    return run_query(con, sql, params)


def max_vio_summary(con, sel: Selection = Selection()) -> pd.DataFrame:
    """MaxVio both ways Wang et al. 2024 report it, per run and layer: `global_max_vio` of the selection's summed
    load (MaxVio_global) beside `step_mean_max_vio` and `step_max_max_vio`, the mean and the worst of the per-step
    values (MaxVio_batch). A layer balanced over many steps but lopsided in each has a small global value and a
    large per-step one. Columns: run_id, layer, steps, global_max_vio, step_mean_max_vio, step_max_max_vio.
    """
    whole = max_violation(con, sel, by_step=False)
    cols = ["run_id", "layer", "steps", "global_max_vio", "step_mean_max_vio", "step_max_max_vio"]
    buckets = layer_buckets_sql(con, sel, None)
    if buckets is not None:  # summarised in DuckDB: at 100,000 steps x 58 layers the 5.8 M per-step rows took
        # 4.5 s and 2.9 GB as a pandas frame (the Balancing page's slowest call), 0.8 s and 0.75 GB this way
        steps = run_query(con, f"""
            SELECT run_id, layer, count(max_vio) AS steps, avg(max_vio) AS step_mean_max_vio,
                   max(max_vio) AS step_max_max_vio
            FROM ({imbalance_from_buckets_sql(buckets[0])}) GROUP BY run_id, layer ORDER BY run_id, layer""",
            buckets[1])
    else:
        per_step = max_violation(con, sel, by_step=True)
        steps = per_step.groupby(["run_id", "layer"], sort=True)["max_vio"].agg(
            steps="count", step_mean_max_vio="mean", step_max_max_vio="max").reset_index()
    if steps.empty or whole.empty:
        return pd.DataFrame(columns=cols)
    out = whole.rename(columns={"max_vio": "global_max_vio"})[["run_id", "layer", "global_max_vio"]]
    return out.merge(steps, on=["run_id", "layer"], how="left")[cols]
