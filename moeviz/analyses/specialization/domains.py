"""Domain specialization: the share of each domain's tokens that each expert takes, per layer (Mixtral §5,
OLMoE §5), from `sequence_stats` or the routes.

See `moeviz.analyses.specialization` for how these read the store.
"""

from __future__ import annotations

import pandas as pd

from moeviz.analyses.specialization._shared import (
    _counts_by_domain,
    _df,
    _dims_sql,
    _per_run,
    _typed,
)
from moeviz.selection import Selection
from moeviz.analyses.unknowns import require

_SHARE_COLUMNS = ["run_id", "layer", "domain", "expert", "tokens", "assigned", "share", "uniform", "ratio"]


def domain_share(con, sel: Selection, *, slot0_only: bool = False, source: str = "auto") -> pd.DataFrame:
    """Expert share per domain and layer against the uniform baseline (Mixtral §5, OLMoE's domain specialization).

    One row per run, layer, domain and expert (every expert of the layer, 0 when it got nothing):
      tokens    tokens of the domain that reached the layer
      assigned  of those, the tokens routed to the expert (any of the k slots; slot 0 only if `slot0_only`)
      share     assigned / tokens: the fraction of the domain's tokens the expert takes; sums to k over experts
                (to 1 with `slot0_only`)
      uniform   k / E (1 / E with `slot0_only`): the share of every expert under perfectly balanced routing
      ratio     share / uniform: > 1 where the expert takes more than its even share of the domain
    Tokens whose sequence has no domain are grouped under domain NULL.
    """
    if slot0_only:
        require(con, sel, "first_choice", "the first-choice domain share")
    assigned = "f" if slot0_only else "n"

    def one(run_id: str) -> pd.DataFrame:
        src, params = _counts_by_domain(sel, run_id, ["layer", "expert"], slot0_only=slot0_only)
        sql = f"""
            WITH c AS (SELECT layer, domain, expert, {assigned} AS assigned, f AS first FROM ({src})),
            t AS (SELECT layer, domain, sum(first) AS tokens FROM c GROUP BY ALL),
            d AS ({_dims_sql()}),
            g AS (SELECT t.layer, t.domain, t.tokens, d.n_experts, d.top_k,
                         unnest(range(d.n_experts)) AS expert
                  FROM t JOIN d ON d.layer = t.layer)
            SELECT g.layer, g.domain, g.expert, g.tokens, coalesce(c.assigned, 0) AS assigned,
                   coalesce(c.assigned, 0) / g.tokens AS share,
                   {('1.0' if slot0_only else 'g.top_k')} / g.n_experts AS uniform,
                   (coalesce(c.assigned, 0) / g.tokens)
                       / ({('1.0' if slot0_only else 'g.top_k')} / g.n_experts) AS ratio
            FROM g LEFT JOIN c ON c.layer = g.layer AND c.expert = g.expert
                               AND c.domain IS NOT DISTINCT FROM g.domain
            ORDER BY g.layer, g.domain NULLS LAST, g.expert"""
        return _typed(_df(con, sql, params + [run_id]), ints=("layer", "expert", "tokens", "assigned"))

    return _per_run(con, sel, _SHARE_COLUMNS, one, source)


def domain_share_first_choice(con, sel: Selection, *, source: str = "auto") -> pd.DataFrame:
    """`domain_share` counting only the top (slot 0) choice: the share of the domain's tokens whose first choice
    is the expert (sums to 1 over experts), against 1/E."""
    require(con, sel, "first_choice", "the first-choice domain share")
    return domain_share(con, sel, slot0_only=True, source=source)
