"""Consecutive tokens: how often neighbouring tokens go to the same expert, against the random baselines
(Mixtral §5), from `layer_stats`' adjacency columns or the routes.

See `moeviz.analyses.specialization` for how these read the store.
"""

from __future__ import annotations

import math

import pandas as pd

from moeviz.analyses.specialization._shared import (
    _MASK_MAX_EXPERTS,
    _df,
    _dims_sql,
    _expert_set,
    _layer_stats_cover,
    _max_experts,
    _per_run,
    _routes,
    _TokenKey,
    _typed,
)
from moeviz.selection import Selection
from moeviz.analyses.unknowns import require

_CONSEC_COLUMNS = ["run_id", "layer", "pairs", "same_first", "rate_first", "baseline_first", "uniform_first",
                   "first_in_topk", "rate_first_in_topk", "baseline_first_in_topk", "uniform_first_in_topk",
                   "topk_overlap", "rate_topk_overlap", "uniform_topk_overlap"]


def consecutive_agreement(con, sel: Selection, *, topk: bool = True, source: str = "auto") -> pd.DataFrame:
    """How often consecutive tokens (pos and pos+1 of the same sequence, both recorded) share experts, per layer
    (Mixtral §5, Table 5), each against what routing blind to the neighbour would give:

      rate_first              first choices equal
        baseline_first          Σ p_i², p_i = fraction of the layer's tokens whose first choice is i
        uniform_first           1/E (balanced routing)
      rate_first_in_topk      first choice of token t+1 is among the k experts of token t
        baseline_first_in_topk  Σ p_i q_i, q_i = fraction of tokens having i among their k
        uniform_first_in_topk   k/E
      rate_topk_overlap       the k-sets of t and t+1 share an expert (Mixtral's "first or second choice")
        uniform_topk_overlap    1 - C(E-k, k) / C(E, k)  (Mixtral: 1 - 6/8 * 5/7 ≈ 46% for E=8, k=2)
    `pairs` counts consecutive pairs; `same_first`, `first_in_topk`, `topk_overlap` the pairs that agree.

    Cost: the top-k variants need each token's set of experts (one GROUP BY per token, then a window), about 3x
    the work of the first-choice ones, which a window over the slot-0 routes alone gives; `topk=False` computes
    only those (the top-k counts and rates are then NA).
    """
    require(con, sel, "first_choice", "consecutive-token agreement (same first choice)")

    def one(run_id: str) -> pd.DataFrame:
        if _layer_stats_cover(con, sel, run_id, "adjacent_pairs"):
            agree, ex, params = _consecutive_from_aggregates(sel, run_id)
        else:
            agree, ex, params = _consecutive_from_routes(con, sel, run_id, topk)
        sql = f"""
            WITH {agree},
            ex AS ({ex}),
            pq AS (SELECT layer, f / sum(f) OVER (PARTITION BY layer) AS p, n / sum(f) OVER (PARTITION BY layer) AS q
                   FROM ex),
            base AS (SELECT layer, sum(p * p) AS baseline_first, sum(p * q) AS baseline_first_in_topk
                     FROM pq GROUP BY layer),
            d AS ({_dims_sql()})
            SELECT a.layer, a.pairs, a.same_first, a.same_first / a.pairs AS rate_first, b.baseline_first,
                   1.0 / d.n_experts AS uniform_first,
                   a.first_in_topk, a.first_in_topk / a.pairs AS rate_first_in_topk, b.baseline_first_in_topk,
                   d.top_k / d.n_experts AS uniform_first_in_topk,
                   a.topk_overlap, a.topk_overlap / a.pairs AS rate_topk_overlap, d.n_experts, d.top_k
            FROM agree a JOIN base b ON b.layer = a.layer JOIN d ON d.layer = a.layer
            ORDER BY a.layer"""
        df = _df(con, sql, params + [run_id])
        df["uniform_topk_overlap"] = [
            1.0 - math.comb(int(e) - int(k), int(k)) / math.comb(int(e), int(k))
            for e, k in zip(df["n_experts"], df["top_k"])
        ]
        if not topk:
            for c in ("first_in_topk", "rate_first_in_topk", "topk_overlap", "rate_topk_overlap"):
                df[c] = pd.Series(pd.NA, index=df.index, dtype="Float64" if c.startswith("rate") else "Int64")
            return _typed(df, ints=("layer", "pairs", "same_first"))
        return _typed(df, ints=("layer", "pairs", "same_first", "first_in_topk", "topk_overlap"))

    return _per_run(con, sel, _CONSEC_COLUMNS, one, source)


def _consecutive_from_aggregates(sel: Selection, run_id: str) -> tuple[str, str, list]:
    """CTE `agree` (per layer: pairs and the pairs that agree) and the SELECT of `ex` (per layer and expert:
    f = tokens choosing it first, n = tokens having it among their k) from layer_stats and step_stats, with their
    parameters. Exact over every token of the selected steps."""
    where, wparams = sel.with_(run_ids=None).where("x")
    agree = f"""agree AS (
                SELECT layer, sum(adjacent_pairs) AS pairs, sum(same_first) AS same_first,
                       sum(first_in_topk) AS first_in_topk, sum(topk_overlap) AS topk_overlap
                FROM layer_stats x WHERE x.run_id = ? AND {where} GROUP BY layer HAVING sum(adjacent_pairs) > 0)"""
    ex = (f"SELECT layer, expert, sum(first_choice) AS f, sum(assigned) AS n FROM step_stats x "
          f"WHERE x.run_id = ? AND {where} GROUP BY ALL")
    return agree, ex, [str(run_id), *wparams] * 2


def _consecutive_from_routes(con, sel: Selection, run_id: str, topk: bool) -> tuple[str, str, list]:
    """The same from the routes: a window over each sequence's recorded tokens (pairs: pos and pos + 1 both
    recorded). `topk=False` skips the per-token sets of experts (the top-k counts are then NULL)."""
    key = _TokenKey.of(con, sel, run_id)
    n_exp = _max_experts(con, run_id)
    agg, _ = _expert_set(n_exp)
    if n_exp <= _MASK_MAX_EXPERTS:
        has_first = "((pm >> CAST(f AS INTEGER)) & CAST(1 AS UBIGINT)) = 1"
        overlap = "(pm & m) <> 0"
    else:
        has_first = "list_contains(pm, f)"
        overlap = "list_has_any(pm, m)"
    src, params = _routes(sel, run_id, f"r.layer, {key.seq} AS sk, r.pos, r.expert, r.slot")
    if topk:
        tokens = f"""SELECT layer, sk, pos, {agg} AS m, min(expert) FILTER (WHERE slot = 0) AS f
                     FROM ({src}) r GROUP BY layer, sk, pos"""
        lags, counts = ", m, lag(m) OVER win AS pm", (
            f"count(*) FILTER (WHERE {has_first}) AS first_in_topk, "
            f"count(*) FILTER (WHERE {overlap}) AS topk_overlap")
    else:  # one slot-0 route per token: no per-token GROUP BY needed
        tokens = f"SELECT layer, sk, pos, expert AS f FROM ({src}) r WHERE slot = 0"
        lags, counts = "", "CAST(NULL AS BIGINT) AS first_in_topk, CAST(NULL AS BIGINT) AS topk_overlap"
    agree = f"""t AS ({tokens}),
            w AS (
                SELECT layer, pos, f, lag(pos) OVER win AS pp, lag(f) OVER win AS pf{lags}
                FROM t WINDOW win AS (PARTITION BY layer, sk ORDER BY pos)),
            agree AS (
                SELECT layer, count(*) AS pairs, count(*) FILTER (WHERE f = pf) AS same_first, {counts}
                FROM w WHERE pp = pos - 1 GROUP BY layer)"""
    ex = (f"SELECT r.layer, r.expert, count(*) FILTER (WHERE r.slot = 0) AS f, count(*) AS n "
          f"FROM ({src}) r GROUP BY ALL")
    return agree, ex, params + params


# ---------------------------------------------------------------------------------------------------------------
# layer flow
# ---------------------------------------------------------------------------------------------------------------
