"""Expert load: how many assignments each expert of each layer received, and how unevenly they are spread.

All functions are `f(con, sel, ...) -> pandas.DataFrame` and run as one parameterized DuckDB query over the
public schema (`moeviz.store.schema`). They read the exact per-step aggregates (`step_stats`, summed over the
selected ranks) unless the selection asks for domains or tags, which only per-token detail knows: then they
count `routes` joined with `sequences` (a sample of the tokens when the run kept only some; `prob_sum` is then
NULL, since routes hold only the chosen experts' gate weights, not the router's full distribution).

The expert grid comes from `layers.n_experts`, so an expert that received nothing still has a row with 0:
dead experts are exactly the ones a sparse GROUP BY would silently leave out.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from moeviz.analyses.step_buckets import bucketed_step_sql, check_step_bucket
from moeviz.analyses.step_rows import layer_buckets_sql, rollups_available, step_rows_sql
from moeviz.errors import MoevizError, StaleStoreError
from moeviz.selection import Selection
from moeviz.store.reader import STALE_MESSAGE, is_stale
from moeviz.store.rollups import DEAD_THRESHOLD, known_sum

__all__ = ["expert_load", "load_matrix", "imbalance", "max_violation", "expert_counts_sql", "run_query",
           "AnalysisError"]


class AnalysisError(MoevizError, ValueError):
    """An analysis was asked for something it cannot compute from this store or with these arguments."""


def run_query(con, sql: str, params: list, *, error: type[MoevizError] = AnalysisError) -> pd.DataFrame:
    """Run parameterized SQL, turning a missing public table into `error` with a message that says what to do."""
    import duckdb

    try:
        return con.execute(sql, params).df()
    except duckdb.CatalogException as e:
        raise error(
            f"the connection does not expose the moeviz tables this analysis reads ({e}); open a store with "
            "moeviz.store.open_store(path), or build one with moeviz.testing.store_from_routing(...)"
        ) from e
    except duckdb.Error as e:
        if is_stale(e):
            raise StaleStoreError(STALE_MESSAGE) from e
        raise


def expert_counts_sql(sel: Selection, *, by_step: bool, step_bucket: int | None = None,
                      step_tag: str | None = None, rollups: bool = False,
                      only_steps: Sequence[int] | None = None) -> tuple[str, list]:
    """SQL (a SELECT usable as a CTE) and params: one row per run[, step], layer and expert of the selection.

    Columns: run_id, [step,] layer, expert, tokens, assigned, first_choice, prob_sum, n_experts, top_k.
    `tokens` is the number of tokens that reached the layer (summed over ranks and, if not by_step, steps).
    Every expert of the layer has a row (0 when it received nothing).
    `step_bucket` (with by_step): counts summed over buckets of that many steps, `step` = the bucket's first
    step (see moeviz.analyses.step_buckets). `step_tag`: only the steps whose sequences carry that tag
    ('train', 'eval', ...: catalog.step_tags), whole steps, so the aggregates stay exact.
    `rollups=True` (the connection has the roll-up views: `step_rows.rollups_available(con)`) reads the step
    roll-ups for the blocks of steps they sum exactly (moeviz.analyses.step_rows); not with a step_tag.
    `only_steps`: only these steps of the selection (a sample of a long range: `step_rows.step_rows_sql`); not
    with domains or tags.
    """
    if only_steps is not None and sel.needs_sequences:
        raise AnalysisError("only_steps reads the per-step aggregates, which hold no domain or tag")
    step_bucket = check_step_bucket(step_bucket, by_step)
    step = "step, " if by_step else ""
    # the tagged steps as a semi join on their distinct (run, step), not a subquery correlated with each row
    tag_sql = ("SEMI JOIN (SELECT DISTINCT run_id, step FROM sequences WHERE tag = ?) t "
               "ON t.run_id = {a}.run_id AND t.step = {a}.step" if step_tag is not None else "")
    tag_params = [str(step_tag)] if step_tag is not None else []
    if not sel.needs_sequences:
        rows, params = step_rows_sql(None, "step_stats", sel, _STEP_COLUMNS, step_bucket=step_bucket,
                                     by_step=by_step, use_rollups=rollups and step_tag is None,
                                     only_steps=only_steps)
        params = params + tag_params
        counts = f"""
            SELECT s.run_id, {(bucketed_step_sql('s.step', step_bucket) + ' AS step, ' if by_step else '')}s.layer, s.expert,
                   CAST({known_sum("s.tokens")} AS BIGINT) AS tokens, CAST(sum(s.assigned) AS BIGINT) AS assigned,
                   CAST({known_sum("s.first_choice")} AS BIGINT) AS first_choice, {known_sum("s.prob_sum")} AS prob_sum
            FROM {rows} s {tag_sql.format(a='s')} GROUP BY ALL"""
        per_layer_tokens = "max(c.tokens)"
    else:
        where, params = sel.with_(domains=None, tags=None).where("r")
        qwhere, qparams = sel.with_(layers=None).where("q", per_token=True)
        # a semi join: the (small) selected sequences filter the routes; no sequence column is carried along
        counts = f"""
            SELECT r.run_id, {(bucketed_step_sql('r.step', step_bucket) + ' AS step, ' if by_step else '')}r.layer, r.expert,
                   count(*) AS assigned, count(*) FILTER (WHERE r.slot = 0) AS first_choice,
                   CAST(NULL AS DOUBLE) AS prob_sum
            FROM routes r
            SEMI JOIN (SELECT q.run_id, q.step, q.rank, q.seq FROM sequences q WHERE {qwhere}) q
                 ON q.run_id = r.run_id AND q.step = r.step AND q.rank = r.rank AND q.seq = r.seq
            {tag_sql.format(a='r')}
            WHERE {where} GROUP BY ALL"""
        params = qparams + tag_params + params
        per_layer_tokens = "CAST(sum(c.first_choice) AS BIGINT)"  # every kept token has exactly one slot-0 route per layer
    # the layer's shape from `layers`, else from `runs` (a writer that did not write its layers)
    sql = f"""
        WITH c AS ({counts}),
        cells AS (SELECT run_id, {step}layer, {per_layer_tokens} AS tokens, count(c.first_choice) AS fc_known
                  FROM c GROUP BY ALL),
        shape AS (
            SELECT d.run_id, d.layer, coalesce(l.n_experts, ru.n_experts) AS n_experts,
                   coalesce(l.top_k, ru.top_k) AS top_k
            FROM (SELECT DISTINCT run_id, layer FROM cells) d
            LEFT JOIN layers l ON l.run_id = d.run_id AND l.layer = d.layer
            LEFT JOIN runs ru ON ru.run_id = d.run_id),
        grid AS (
            SELECT cells.*, shape.n_experts, shape.top_k, unnest(range(shape.n_experts)) AS expert
            FROM cells JOIN shape ON shape.run_id = cells.run_id AND shape.layer = cells.layer)
        SELECT g.run_id, {('g.step, ' if by_step else '')}g.layer, CAST(g.expert AS INTEGER) AS expert,
               g.tokens, coalesce(c.assigned, 0) AS assigned, CASE WHEN c.first_choice IS NOT NULL THEN c.first_choice
                    WHEN g.fc_known > 0 THEN 0 END AS first_choice,  -- NULL stays NULL (an engine log's slot order)
               c.prob_sum, g.n_experts, g.top_k
        FROM grid g LEFT JOIN c ON c.run_id = g.run_id AND c.layer = g.layer AND c.expert = g.expert
             {('AND c.step = g.step' if by_step else '')}"""
    return sql, params


_STEP_COLUMNS = ("run_id", "step", "layer", "expert", "tokens", "assigned", "first_choice", "prob_sum")


def _check_count(count: str) -> str:
    if count not in ("assigned", "first_choice"):
        raise AnalysisError(f"count must be 'assigned' (all k slots) or 'first_choice' (slot 0); got {count!r}")
    return count


def expert_load(con, sel: Selection = Selection(), *, by_step: bool = True,
                step_bucket: int | None = None) -> pd.DataFrame:
    """Assignments per expert and layer (and step): the raw material of every balance metric.

    Columns: run_id, [step,] layer, expert, tokens, assigned, first_choice, prob_sum, n_experts, top_k,
    load_fraction (share of the layer's assignments, over all k slots), relative_load (load_fraction x E:
    1 = the uniform share), token_share (share of the layer's tokens that chose the expert in any slot).
    `step_bucket=b` (with by_step): one row per bucket of b steps, `step` its first step, every value computed
    from the bucket's summed counts (moeviz.analyses.step_buckets); None = every step.
    """
    base, params = expert_counts_sql(sel, by_step=by_step, step_bucket=step_bucket, rollups=rollups_available(con))
    keys = "run_id, step, layer" if by_step else "run_id, layer"
    sql = f"""
        WITH b AS ({base})
        SELECT *,
               assigned / nullif(sum(assigned) OVER (PARTITION BY {keys}), 0) AS load_fraction,
               n_experts * assigned / nullif(sum(assigned) OVER (PARTITION BY {keys}), 0) AS relative_load,
               assigned / nullif(tokens, 0) AS token_share
        FROM b ORDER BY {keys}, expert"""
    return run_query(con, sql, params)


def load_matrix(con, sel: Selection = Selection()) -> pd.DataFrame:
    """Layer x expert load pooled over the selected steps, in long form (one row per run, layer, expert).

    For a heatmap: `df[df.run_id == r].pivot(index='layer', columns='expert', values='relative_load')`.
    """
    return expert_load(con, sel, by_step=False)


def imbalance(
    con,
    sel: Selection = Selection(),
    *,
    by_step: bool = True,
    dead_threshold: float = 0.1,
    top_n: int | None = None,
    count: str = "assigned",
    step_bucket: int | None = None,
) -> pd.DataFrame:
    """Balance metrics per layer (and step) of the expert load.

    Columns: run_id, [step,] layer, n_experts, top_k, tokens, assignments,
    max_over_mean (busiest expert / mean expert), max_vio = (max - mean) / mean (MaxVio of Wang et al. 2024,
    "Auxiliary-loss-free load balancing", as monitored for DeepSeek-V3; 0 = perfectly balanced),
    cv (coefficient of variation, population std / mean), norm_entropy (entropy of the load fractions / log E:
    1 = uniform, 0 = one expert takes all), dead_experts and dead_share (experts whose share is below
    dead_threshold x the uniform share 1/E), top_n and top_n_coverage (share taken by the N busiest experts;
    N = top_n or the layer's k). `count` picks the load: 'assigned' (all k slots) or 'first_choice' (slot 0).
    `step_bucket=b` (with by_step): one row per bucket of b steps, `step` its first step, each metric that of the
    bucket's summed load (not a mean of per-step metrics; moeviz.analyses.step_buckets); None = every step.
    """
    col = _check_count(count)
    if col == "first_choice":
        from moeviz.analyses.unknowns import require  # unknowns imports this module's AnalysisError

        require(con, sel, "first_choice", "the first-choice load")
    if not (0 <= dead_threshold <= 1):
        raise AnalysisError(f"dead_threshold is a fraction of the uniform share, in [0, 1]; got {dead_threshold}")
    if top_n is not None and int(top_n) < 1:
        raise AnalysisError(f"top_n must be a positive number of experts; got {top_n}")
    if by_step and col == "assigned" and dead_threshold == DEAD_THRESHOLD and top_n is None:
        buckets = layer_buckets_sql(con, sel, check_step_bucket(step_bucket, by_step))
        if buckets is not None:  # one row per bucket and layer instead of E (moeviz.store.rollups)
            return run_query(con, imbalance_from_buckets_sql(buckets[0]), buckets[1])
    base, params = expert_counts_sql(sel, by_step=by_step, step_bucket=step_bucket, rollups=rollups_available(con))
    keys = "run_id, step, layer" if by_step else "run_id, layer"
    # one GROUP BY, no window: a (step, layer)'s experts as a list for the measures that need its total or its
    # ranking (dead experts, top-n coverage, entropy); the windows it replaced (share of the layer's total, a
    # row_number per expert) took 2.6 s of 3.3 s at 100 steps x 58 layers x 256 experts
    sql = f"""
        WITH b AS ({base}),
        g AS (
            SELECT {keys}, any_value(n_experts) AS n_experts, any_value(top_k) AS top_k,
                   any_value(tokens) AS tokens, sum(n) AS total, max(n) AS top, avg(n) AS mean,
                   stddev_pop(n) AS sd, list(n) AS ns
            FROM (SELECT {keys}, n_experts, top_k, tokens, {col} AS n FROM b) GROUP BY {keys})
        SELECT {keys}, n_experts, top_k, tokens, CAST(total AS BIGINT) AS assignments,
               top / nullif(mean, 0) AS max_over_mean,
               (top - mean) / nullif(mean, 0) AS max_vio,
               sd / nullif(mean, 0) AS cv,
               CASE WHEN total > 0 THEN -list_sum(list_transform(ns, x -> CASE WHEN x > 0
                        THEN x / total * ln(x / total) ELSE 0 END)) ELSE 0 END / nullif(ln(n_experts), 0)
                   AS norm_entropy,
               CASE WHEN total > 0 THEN len(list_filter(ns, x -> x / total < ? / n_experts)) ELSE 0 END
                   AS dead_experts,
               CASE WHEN total > 0 THEN len(list_filter(ns, x -> x / total < ? / n_experts)) ELSE 0 END
                   / n_experts AS dead_share,
               CAST(coalesce(?, top_k) AS INTEGER) AS top_n,
               CASE WHEN total > 0 THEN list_sum(list_slice(list_reverse_sort(ns), 1, coalesce(?, top_k))) / total
                   END AS top_n_coverage
        FROM g ORDER BY {keys}"""
    tn = None if top_n is None else int(top_n)
    return run_query(con, sql, params + [float(dead_threshold), float(dead_threshold), tn, tn])


def imbalance_from_buckets_sql(buckets: str) -> str:
    """`imbalance`'s columns from layer_buckets rows (the busiest expert, sum of squares, sum of n ln n, top-k sum
    and dead experts of each bucket's load, stored at compaction): the same formulas over E experts, an expert
    without a row counting 0 (mean = total / E, population variance = sum of squares / E - mean^2)."""
    return f"""
        SELECT run_id, step, layer, n_experts, top_k, tokens, assignments,
               top / nullif(mean, 0) AS max_over_mean, (top - mean) / nullif(mean, 0) AS max_vio,
               sqrt(greatest(sq / n_experts - mean * mean, 0)) / nullif(mean, 0) AS cv,
               CASE WHEN assignments > 0 THEN ln(assignments) - xlogx / assignments ELSE 0 END
                   / nullif(ln(n_experts), 0) AS norm_entropy,
               CAST(dead_experts AS BIGINT) AS dead_experts, dead_experts / n_experts AS dead_share,
               top_k AS top_n,
               CASE WHEN assignments > 0 THEN topk_sum / assignments END AS top_n_coverage
        FROM (SELECT run_id, step, layer, n_experts, top_k, tokens, assigned AS assignments,
                     CAST(assigned_max AS DOUBLE) AS top, assigned / n_experts AS mean, assigned_sq AS sq,
                     assigned_xlogx AS xlogx, dead_experts, topk_sum
              FROM {buckets} lb)
        ORDER BY run_id, step, layer"""


def max_violation(con, sel: Selection = Selection(), *, by_step: bool = True, count: str = "assigned",
                  step_bucket: int | None = None) -> pd.DataFrame:
    """MaxVio (Wang et al. 2024, "Auxiliary-loss-free load balancing"): max_i load_i / mean_i load_i - 1 per layer,
    0 when every expert gets the same load.

    by_step=True: per step (MaxVio_batch: each training batch's own balance, what the bias is nudged against);
    by_step=False: of the whole selection's summed load (MaxVio_global: balance over many batches, which can be
    good while every batch is lopsided). Columns: run_id, [step,] layer, tokens, assignments, max_vio. `count` and
    `step_bucket` as in `imbalance` (a bucket's MaxVio is that of its summed load).
    """
    df = imbalance(con, sel, by_step=by_step, count=count, step_bucket=step_bucket)
    keys = ["run_id"] + (["step"] if by_step else []) + ["layer"]
    return df[keys + ["tokens", "assignments", "max_vio"]].reset_index(drop=True)
