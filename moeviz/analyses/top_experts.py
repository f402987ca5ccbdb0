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
from moeviz.analyses.step_buckets import bucketed_step_sql, check_step_bucket
from moeviz.analyses.step_rows import layer_buckets_sql, rollups_available, step_rows_sql
from moeviz.selection import Selection

__all__ = ["top_expert_load", "OTHERS"]

OTHERS = -1  # the expert number of the "others" row
# the final SELECT of both paths over their rows_ (one row per shown expert or others, bucket and layer)
_WITH_SHARES = """SELECT *,
               assigned / nullif(sum(assigned) OVER (PARTITION BY run_id, step, layer), 0) AS load_fraction,
               n_experts * assigned / nullif(sum(assigned) OVER (PARTITION BY run_id, step, layer), 0) / experts
                   AS relative_load
        FROM rows_ ORDER BY run_id, step, layer, busy_rank, expert"""


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
    if not sel.needs_sequences:
        buckets = layer_buckets_sql(con, sel, check_step_bucket(step_bucket, True))
        if buckets is not None:
            return _labelled(_top_first(con, sel, int(n), keep, step_bucket, buckets))
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
        {_WITH_SHARES}"""
    return _labelled(run_query(con, sql, params))


def _labelled(df: pd.DataFrame) -> pd.DataFrame:
    df["label"] = [f"others ({int(k)})" if e == OTHERS else f"#{int(r)} · expert {int(e)}"
                   for e, r, k in zip(df["expert"], df["busy_rank"], df["experts"])]
    return df


def _chosen(con, sel: Selection, n: int, keep: list[int]) -> pd.DataFrame:
    """The experts each layer's curve shows (run_id, layer, expert, busy_rank): the n busiest over the selection
    (ties: lower number first) and those in `keep`, ranked from the totals (roll-ups: whole blocks)."""
    base, params = expert_counts_sql(sel, by_step=False, rollups=rollups_available(con))
    keep_sql = f" OR expert IN ({', '.join(str(e) for e in keep)})" if keep else ""
    return run_query(con, f"""
        SELECT run_id, layer, expert, busy_rank FROM (
            SELECT run_id, layer, expert,
                   row_number() OVER (PARTITION BY run_id, layer ORDER BY assigned DESC, expert) AS busy_rank
            FROM ({base}))
        WHERE busy_rank <= {int(n)}{keep_sql}""", params)


def _top_first(con, sel: Selection, n: int, keep: list[int], step_bucket: int | None,
               buckets: tuple[str, list]) -> pd.DataFrame:
    """`top_expert_load` choosing the shown experts first, from the totals: the curve then reads the shown
    experts' rows only (n x layers x buckets, from the step roll-ups where they are exact) and each bucket's layer
    totals from layer_buckets (one row per bucket and layer), the others being the layer's total minus the shown.
    The query of the general path grouped every expert of every bucket (14,848 cells a bucket at 58 x 256)."""
    chosen = _chosen(con, sel, n, keep)
    b = check_step_bucket(step_bucket, True)
    rows, rparams = step_rows_sql(con, "step_stats", sel, ("run_id", "step", "layer", "expert", "assigned",
                                                          "first_choice"), step_bucket=b, by_step=True)
    experts = sorted({int(e) for e in chosen["expert"]}) or [-2]
    lb, lparams = buckets
    sql = f"""
        WITH chosen AS (
            SELECT unnest(?::VARCHAR[]) AS run_id, unnest(?::INTEGER[]) AS layer, unnest(?::INTEGER[]) AS expert,
                   unnest(?::BIGINT[]) AS busy_rank),
        lb AS (SELECT run_id, step, layer, n_experts, top_k, tokens, assigned, first_choice FROM {lb} x),
        shown_counts AS (
            SELECT s.run_id, {bucketed_step_sql('s.step', b)} AS step, s.layer, s.expert,
                   sum(s.assigned) AS assigned, sum(s.first_choice) AS first_choice
            FROM {rows} s SEMI JOIN chosen c ON c.run_id = s.run_id AND c.layer = s.layer AND c.expert = s.expert
            WHERE s.expert IN ({", ".join(map(str, experts))})
            GROUP BY ALL),
        shown AS (
            SELECT lb.run_id, lb.step, lb.layer, c.expert, c.busy_rank, 1 AS experts, lb.tokens,
                   CAST(coalesce(sc.assigned, 0) AS BIGINT) AS assigned,
                   CAST(CASE WHEN lb.first_choice IS NOT NULL THEN coalesce(sc.first_choice, 0) END AS BIGINT)
                       AS first_choice,
                   lb.n_experts, lb.top_k
            FROM lb JOIN chosen c ON c.run_id = lb.run_id AND c.layer = lb.layer
            LEFT JOIN shown_counts sc ON sc.run_id = lb.run_id AND sc.step = lb.step AND sc.layer = lb.layer
                 AND sc.expert = c.expert),
        others AS (
            SELECT lb.run_id, lb.step, lb.layer, {OTHERS} AS expert, {n + 1} AS busy_rank,
                   lb.n_experts - count(s.expert) AS experts, lb.tokens,
                   CAST(lb.assigned - coalesce(sum(s.assigned), 0) AS BIGINT) AS assigned,
                   CAST(lb.first_choice - coalesce(sum(s.first_choice), 0) AS BIGINT) AS first_choice,
                   lb.n_experts, lb.top_k
            FROM lb LEFT JOIN shown s ON s.run_id = lb.run_id AND s.step = lb.step AND s.layer = lb.layer
            GROUP BY lb.run_id, lb.step, lb.layer, lb.n_experts, lb.tokens, lb.assigned, lb.first_choice, lb.top_k
            HAVING lb.n_experts - count(s.expert) > 0),
        rows_ AS (SELECT * FROM shown UNION ALL BY NAME SELECT * FROM others)
        {_WITH_SHARES}"""
    params = [chosen["run_id"].astype(str).tolist(), chosen["layer"].astype(int).tolist(),
              chosen["expert"].astype(int).tolist(), chosen["busy_rank"].astype(int).tolist()]
    return run_query(con, sql, params + lparams + rparams)
