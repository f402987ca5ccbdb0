"""Co-activation: how often expert j is chosen with expert i for the same token (OLMoE §5), from `pair_stats`
or the routes.

See `moeviz.analyses.specialization` for how these read the store.
"""

from __future__ import annotations

import pandas as pd

from moeviz.analyses.specialization._shared import (
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

_COACT_COLUMNS = ["run_id", "layer", "expert_i", "expert_j", "tokens_i", "tokens_ij", "p_j_given_i", "baseline"]


def coactivation(con, sel: Selection, *, source: str = "auto") -> pd.DataFrame:
    """How often experts fire together: P(j | i) = tokens routed to both i and j / tokens routed to i, over the
    k experts chosen for the same token in the same layer (OLMoE §5 co-activation), for every ordered pair
    i != j of the layer's experts (0 counts included; p is NaN where i took no token).

    `baseline` = (k-1)/(E-1): P(j | i) when each token's k experts are a uniformly random k-subset.
    """

    def one(run_id: str) -> pd.DataFrame:
        if _layer_stats_cover(con, sel, run_id, "coactive_pairs"):
            pc, lay, params = _coactivation_from_aggregates(sel, run_id)
        else:
            pc, lay, params = _coactivation_from_routes(con, sel, run_id)
        sql = f"""
            WITH {pc},
            lay AS ({lay}),
            d AS ({_dims_sql()}),
            gi AS (SELECT d.layer, d.n_experts, d.top_k, unnest(range(d.n_experts)) AS i FROM d JOIN lay USING (layer)),
            g AS (SELECT gi.*, unnest(range(gi.n_experts)) AS j FROM gi)
            SELECT g.layer, g.i AS expert_i, g.j AS expert_j, coalesce(ci.c, 0) AS tokens_i,
                   coalesce(cij.c, 0) AS tokens_ij,
                   CASE WHEN coalesce(ci.c, 0) > 0 THEN coalesce(cij.c, 0) / ci.c END AS p_j_given_i,
                   CASE WHEN g.n_experts > 1 THEN (g.top_k - 1) / (g.n_experts - 1) END AS baseline
            FROM g
            LEFT JOIN pc ci ON ci.layer = g.layer AND ci.i = g.i AND ci.j = g.i
            LEFT JOIN pc cij ON cij.layer = g.layer AND cij.i = g.i AND cij.j = g.j
            WHERE g.i <> g.j
            ORDER BY g.layer, g.i, g.j"""
        df = _df(con, sql, params + [run_id])
        df["p_j_given_i"] = df["p_j_given_i"].astype("float64")
        df["baseline"] = df["baseline"].astype("float64")
        return _typed(df, ints=("layer", "expert_i", "expert_j", "tokens_i", "tokens_ij"))

    return _per_run(con, sel, _COACT_COLUMNS, one, source)


def _coactivation_from_routes(con, sel: Selection, run_id: str) -> tuple[str, str, list]:
    """CTEs of `coactivation` from the routes: pc(layer, i, j, c) with c = tokens having both i and j (and
    c = tokens having i where i = j), the layers with tokens, and their parameters. Each token's set of experts
    is one GROUP BY over its routes; sets are counted, then expanded into pairs (few distinct sets)."""
    key = _TokenKey.of(con, sel, run_id)
    agg, members = _expert_set(_max_experts(con, run_id))
    src, params = _routes(sel, run_id, f"r.layer, {key.tok} AS tok, r.expert")
    pc = f"""t AS (SELECT layer, {agg} AS m FROM ({src}) r GROUP BY layer, tok),
            sets AS (SELECT layer, m, count(*) AS n FROM t GROUP BY ALL),
            mem AS (SELECT layer, n, {members} AS ex FROM sets),
            one AS (SELECT layer, n, ex, unnest(ex) AS i FROM mem),
            pairs AS (SELECT layer, n, i, unnest(ex) AS j FROM one),
            pc AS (SELECT layer, i, j, sum(n) AS c FROM pairs GROUP BY ALL)"""
    return pc, "SELECT DISTINCT layer FROM sets", params


def _coactivation_from_aggregates(sel: Selection, run_id: str) -> tuple[str, str, list]:
    """The same CTEs from the exact aggregates: pair_stats (i < j, mirrored) and step_stats.assigned (i = j,
    the tokens that chose i). These count every token of every selected step, not only the sampled ones."""
    where, wparams = sel.with_(run_ids=None).where("x")
    pc = f"""pc AS (
                SELECT layer, expert_i AS i, expert_j AS j, sum(tokens) AS c FROM pair_stats x
                WHERE x.run_id = ? AND {where} GROUP BY ALL
                UNION ALL
                SELECT layer, expert_j AS i, expert_i AS j, sum(tokens) AS c FROM pair_stats x
                WHERE x.run_id = ? AND {where} GROUP BY ALL
                UNION ALL
                SELECT layer, expert AS i, expert AS j, sum(assigned) AS c FROM step_stats x
                WHERE x.run_id = ? AND {where} GROUP BY ALL)"""
    lay = f"SELECT layer FROM layer_stats x WHERE x.run_id = ? AND {where} GROUP BY layer HAVING sum(tokens) > 0"
    params = [str(run_id), *wparams] * 4
    return pc, lay, params


# ---------------------------------------------------------------------------------------------------------------
# consecutive tokens
# ---------------------------------------------------------------------------------------------------------------
