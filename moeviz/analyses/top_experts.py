"""The busiest experts of each layer over steps, the rest summed as "others": load curves a wide layer can draw.

A DeepSeek-V3-sized layer has 256 experts; 256 lines per panel (58 panels) is a figure of megabytes that no one
can read. What a reader looks for in a load curve is the experts that take most (collapse, hot experts) and how
much the rest takes together, so `top_expert_load` keeps the n experts with the most assignments over the
selection per layer, one row per step (or bucket) each, and sums the others into one row (expert = -1). An
expert asked for by number (`always`: the dashboard's "find expert") is kept whatever its rank.
"""

from __future__ import annotations

import pandas as pd

from moeviz.analyses.load import AnalysisError, expert_counts_sql, run_query
from moeviz.analyses.step_rows import rollups_available
from moeviz.selection import Selection

__all__ = ["top_expert_load", "OTHERS"]

OTHERS = -1  # the expert number of the "others" row


def top_expert_load(con, sel: Selection = Selection(), *, n: int = 8, always: tuple[int, ...] = (),
                    step_bucket: int | None = None) -> pd.DataFrame:
    """Per layer, the `n` experts with the most assignments over the selected steps (ties: lower number first)
    and the experts in `always`, one row each per step (or bucket of `step_bucket` steps, see
    moeviz.analyses.step_buckets), plus one row per step with the other experts' counts summed (expert = -1;
    absent when every expert is shown).

    Columns: run_id, step, layer, expert, busy_rank (1 = busiest over the selection; for others, n + 1),
    experts (1, or how many experts the others row sums), tokens, assigned, first_choice, n_experts, top_k,
    load_fraction (share of the layer's assignments in that step), relative_load (load_fraction x E / experts:
    1 = the uniform share of each expert in the row), label ('#1 · expert 17', 'others (248)').
    """
    if int(n) < 1:
        raise AnalysisError(f"n must be a positive number of experts; got {n}")
    keep = sorted({int(e) for e in always})
    base, params = expert_counts_sql(sel, by_step=True, step_bucket=step_bucket, rollups=rollups_available(con))
    keep_sql = f" OR expert IN ({', '.join(str(e) for e in keep)})" if keep else ""
    sql = f"""
        WITH b AS ({base}),
        ranked AS (
            SELECT run_id, layer, expert,
                   row_number() OVER (PARTITION BY run_id, layer ORDER BY sum(assigned) DESC, expert) AS busy_rank
            FROM b GROUP BY run_id, layer, expert),
        shown AS (
            SELECT run_id, layer, expert,
                   CASE WHEN busy_rank <= {int(n)}{keep_sql} THEN expert ELSE {OTHERS} END AS shown_expert,
                   CASE WHEN busy_rank <= {int(n)}{keep_sql} THEN busy_rank ELSE {int(n) + 1} END AS shown_rank
            FROM ranked),
        rows_ AS (
            SELECT b.run_id, b.step, b.layer, s.shown_expert AS expert, min(s.shown_rank) AS busy_rank,
                   count(*) AS experts, any_value(b.tokens) AS tokens,
                   CAST(sum(b.assigned) AS BIGINT) AS assigned, CAST(sum(b.first_choice) AS BIGINT) AS first_choice,
                   any_value(b.n_experts) AS n_experts, any_value(b.top_k) AS top_k
            FROM b JOIN shown s ON s.run_id = b.run_id AND s.layer = b.layer AND s.expert = b.expert
            GROUP BY b.run_id, b.step, b.layer, s.shown_expert)
        SELECT *,
               assigned / nullif(sum(assigned) OVER (PARTITION BY run_id, step, layer), 0) AS load_fraction,
               n_experts * assigned / nullif(sum(assigned) OVER (PARTITION BY run_id, step, layer), 0) / experts
                   AS relative_load
        FROM rows_ ORDER BY run_id, step, layer, busy_rank, expert"""
    df = run_query(con, sql, params)
    df["label"] = [f"others ({int(k)})" if e == OTHERS else f"#{int(r)} · expert {int(e)}"
                   for e, r, k in zip(df["expert"], df["busy_rank"], df["experts"])]
    return df
