"""Position specialization: the share of the tokens at each position bucket that each expert takes, from
`position_stats` or the routes.

See `moeviz.analyses.specialization` for how these read the store.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from moeviz.analyses.specialization._shared import (
    DEFAULT_POSITION_BINS,
    SpecializationError,
    _df,
    _dims_sql,
    _per_run,
    _routes,
    _typed,
    _whole_run_stats_usable,
)
from moeviz.selection import Selection
from moeviz.analyses.unknowns import require

_POSITION_COLUMNS = ["run_id", "layer", "bucket", "pos_lo", "pos_hi", "expert", "tokens", "assigned", "share",
                     "uniform", "ratio"]


def _check_bins(bins: Sequence[int]) -> list[int]:
    try:
        edges = [int(b) for b in bins]
    except (TypeError, ValueError):
        raise SpecializationError(
            f"bins must be a sequence of integer left edges, e.g. (0, 1, 2, 4, 8); got {bins!r}"
        ) from None
    if not edges or any(b < 0 for b in edges) or any(b2 <= b1 for b1, b2 in zip(edges, edges[1:])):
        raise SpecializationError(
            f"bins must be non-empty, non-negative and strictly increasing left edges of position buckets; got {edges}"
        )
    return edges


def position_share(con, sel: Selection, *, bins: Sequence[int] = DEFAULT_POSITION_BINS,
                   slot0_only: bool = False, source: str = "auto") -> pd.DataFrame:
    """Expert share per position bucket and layer: do some experts take the first tokens of a sequence?

    `bins` are the buckets' left edges: bucket i holds positions [bins[i], bins[i+1]) and the last one is open
    (`pos_hi` NULL); positions below bins[0] are left out. Same columns and meaning as `domain_share`, with the
    bucket in place of the domain: share = assigned / tokens in the bucket (sums to k over experts, 1 with
    `slot0_only`), uniform = k/E (1/E), ratio = share / uniform.
    """
    if slot0_only:
        require(con, sel, "first_choice", "the first-choice position share")
    edges = _check_bins(bins)
    assigned = "count(*) FILTER (WHERE slot = 0)" if slot0_only else "count(*)"

    def one(run_id: str) -> pd.DataFrame:
        if _whole_run_stats_usable(sel, run_id, "position_stats"):
            where, params = sel.with_(run_ids=None).where("p")
            params = [str(run_id), *params]
            counts = f"""SELECT layer, pos, expert, sum({'first_choice' if slot0_only else 'assigned'}) AS assigned,
                                sum(first_choice) AS first
                         FROM position_stats p WHERE p.run_id = ? AND {where} GROUP BY ALL"""
        else:
            src, params = _routes(sel, run_id, "r.layer, r.pos, r.expert, r.slot")
            counts = f"""SELECT layer, pos, expert, {assigned} AS assigned, count(*) FILTER (WHERE slot = 0) AS first
                         FROM ({src}) r GROUP BY ALL"""
        sql = f"""
            WITH b0 AS (SELECT unnest(CAST(? AS BIGINT[])) AS pos_lo),
            b AS (SELECT row_number() OVER (ORDER BY pos_lo) - 1 AS bucket, pos_lo,
                         lead(pos_lo) OVER (ORDER BY pos_lo) AS pos_hi FROM b0),
            c AS ({counts}),
            cb AS (
                SELECT c.layer, b.bucket, c.expert, sum(c.assigned) AS assigned, sum(c.first) AS first
                FROM c JOIN b ON c.pos >= b.pos_lo AND (b.pos_hi IS NULL OR c.pos < b.pos_hi) GROUP BY ALL),
            t AS (SELECT layer, bucket, sum(first) AS tokens FROM cb GROUP BY ALL),
            d AS ({_dims_sql()}),
            g AS (SELECT t.layer, t.bucket, t.tokens, d.n_experts, d.top_k, unnest(range(d.n_experts)) AS expert
                  FROM t JOIN d ON d.layer = t.layer)
            SELECT g.layer, g.bucket, b.pos_lo, b.pos_hi, g.expert, g.tokens, coalesce(cb.assigned, 0) AS assigned,
                   coalesce(cb.assigned, 0) / g.tokens AS share,
                   {('1.0' if slot0_only else 'g.top_k')} / g.n_experts AS uniform,
                   (coalesce(cb.assigned, 0) / g.tokens)
                       / ({('1.0' if slot0_only else 'g.top_k')} / g.n_experts) AS ratio
            FROM g JOIN b ON b.bucket = g.bucket
            LEFT JOIN cb ON cb.layer = g.layer AND cb.bucket = g.bucket AND cb.expert = g.expert
            ORDER BY g.layer, g.bucket, g.expert"""
        df = _df(con, sql, [edges] + params + [run_id])
        df["pos_hi"] = df["pos_hi"].astype("Int64")
        return _typed(df, ints=("layer", "bucket", "pos_lo", "expert", "tokens", "assigned"))

    return _per_run(con, sel, _POSITION_COLUMNS, one, source)


# ---------------------------------------------------------------------------------------------------------------
# co-activation
# ---------------------------------------------------------------------------------------------------------------
