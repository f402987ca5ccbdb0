"""Vocabulary specialization: which token ids each expert takes (OLMoE §5), and each expert's top tokens, from
`token_stats` or the routes.

See `moeviz.analyses.specialization` for how these read the store.
"""

from __future__ import annotations

import pandas as pd

from moeviz.analyses.specialization._shared import (
    _check_positive,
    _df,
    _dims_sql,
    _per_run,
    _token_cells,
    _typed,
)
from moeviz.selection import Selection
from moeviz.analyses.unknowns import require

_VOCAB_COLUMNS = ["run_id", "layer", "token_id", "text", "count", "expert", "routed", "specialization", "uniform"]


def vocab_specialization(con, sel: Selection, *, min_count: int = 5, slot0_only: bool = False,
                         source: str = "auto") -> pd.DataFrame:
    """For each token id seen at least `min_count` times, the share of its occurrences routed to its most
    frequent expert (OLMoE's vocabulary specialization, the max over experts).

    Choice (as in OLMoE, where a token "is routed to" each of its top-k experts): an occurrence counts as routed
    to expert e when e is any of its k chosen experts, so `specialization` = routed / count lies in [k/E, 1] and is
    1 when some expert takes every occurrence of the token. With `slot0_only` only the first choice counts
    (range [1/E, 1]); that is the stricter "which expert does this token go to first" reading.
    Ties between experts go to the lowest expert index. Tokens recorded without ids (token_id = -1) are left out.

    Columns: run_id, layer, token_id, text (from `vocab`, NULL if absent), count (occurrences in the layer),
    expert (the most frequent), routed (occurrences routed to it), specialization, uniform (k/E or 1/E: the
    value under routing independent of the token).
    """
    if slot0_only:
        require(con, sel, "first_choice", "first-choice token specialization")
    min_count = _check_positive("min_count", min_count)
    n = "f" if slot0_only else "n"

    def one(run_id: str) -> pd.DataFrame:
        src, params = _token_cells(sel, run_id)
        sql = f"""
            WITH c AS ({src}),
            t AS (
                SELECT layer, token_id, sum(f) AS count,
                       arg_max(expert, CAST({n} AS BIGINT) * 65536 - expert) AS expert, max({n}) AS routed
                FROM c GROUP BY ALL HAVING sum(f) >= ?),
            d AS ({_dims_sql()})
            SELECT t.layer, t.token_id, v.text, t.count, t.expert, t.routed, t.routed / t.count AS specialization,
                   {('1.0' if slot0_only else 'd.top_k')} / d.n_experts AS uniform
            FROM t JOIN d ON d.layer = t.layer
            LEFT JOIN vocab v ON v.run_id = ? AND v.token_id = t.token_id
            ORDER BY t.layer, t.count DESC, t.token_id"""
        return _typed(_df(con, sql, params + [min_count, run_id, run_id]),
                      ints=("layer", "token_id", "count", "expert", "routed"))

    return _per_run(con, sel, _VOCAB_COLUMNS, one, source)


def vocab_specialization_summary(con, sel: Selection, *, min_count: int = 5, slot0_only: bool = False,
                                 source: str = "auto") -> pd.DataFrame:
    """Per run and layer: the vocabulary specialization of `vocab_specialization` averaged over token ids,
    weighted by their counts (so it reads "the fraction of the layer's token occurrences that go to their token's
    favourite expert"), with the number of distinct tokens and occurrences it covers and the uniform baseline."""
    if slot0_only:
        require(con, sel, "first_choice", "first-choice token specialization")
    per_token = vocab_specialization(con, sel, min_count=min_count, slot0_only=slot0_only, source=source)
    cols = ["run_id", "layer", "token_ids", "occurrences", "specialization", "uniform"]
    if per_token.empty:
        return pd.DataFrame({c: pd.Series(dtype="object" if c == "run_id" else "float64") for c in cols})
    out = per_token.groupby(["run_id", "layer"], as_index=False).agg(
        token_ids=("token_id", "size"), occurrences=("count", "sum"), routed=("routed", "sum"),
        uniform=("uniform", "first"),
    )
    out["specialization"] = out["routed"] / out["occurrences"]
    return out[cols]


_TOP_COLUMNS = ["run_id", "layer", "expert", "by", "rank", "token_id", "text", "count", "token_count",
                "expert_share", "lift"]


def top_tokens(con, sel: Selection, *, n: int = 10, min_count: int = 5, slot0_only: bool = False,
               source: str = "auto") -> pd.DataFrame:
    """The top `n` token ids of each expert of each layer, twice: by count (`by` = 'count') and by lift
    (`by` = 'lift').

      count         occurrences of the token routed to the expert (any slot; slot 0 only with `slot0_only`)
      token_count   occurrences of the token in the layer
      expert_share  count / (all occurrences routed to the expert): P(token | expert)
      lift          P(token | expert) / P(token), P(token) = token_count / tokens in the layer; 1 when routing
                    ignores the token, large when the expert singles it out
    Lift ranks only tokens seen at least `min_count` times (rare tokens have huge, meaningless lifts); ties are
    broken by count, then token id. Tokens without ids (-1) are left out.
    """
    if slot0_only:
        require(con, sel, "first_choice", "first-choice token specialization")
    n = _check_positive("n", n)
    min_count = _check_positive("min_count", min_count)
    m = "f" if slot0_only else "n"

    def one(run_id: str) -> pd.DataFrame:
        src, params = _token_cells(sel, run_id)
        # top n per expert with max_by(.., n) (a heap per group) rather than row_number() windows (a sort of every
        # (layer, token, expert) cell). Orders: count desc, token id asc; and count / token_count desc (within one
        # expert that orders as the lift; one correctly rounded division, so equal ratios tie exactly), count
        # desc, token id asc.
        sql = f"""
            WITH c AS ({src}),
            tc AS (SELECT layer, token_id, sum(f) AS token_count FROM c GROUP BY ALL),
            et AS (SELECT layer, expert, sum({m}) AS expert_total FROM c GROUP BY ALL),
            lt AS (SELECT layer, sum(f) AS layer_tokens FROM c GROUP BY layer),
            x AS (
                SELECT c.layer, c.expert, c.token_id, c.{m} AS count, tc.token_count
                FROM c JOIN tc ON tc.layer = c.layer AND tc.token_id = c.token_id WHERE c.{m} > 0),
            tops AS (
                SELECT layer, expert, 'count' AS "by",
                       max_by({{'token_id': token_id, 'count': count, 'token_count': token_count}},
                              {{'c': count, 't': -token_id}}, ?) AS top
                FROM x GROUP BY layer, expert
                UNION ALL
                SELECT layer, expert, 'lift' AS "by",
                       max_by({{'token_id': token_id, 'count': count, 'token_count': token_count}},
                              {{'r': count / token_count, 'c': count, 't': -token_id}}, ?) AS top
                FROM x WHERE token_count >= ? GROUP BY layer, expert),
            picked AS (
                SELECT layer, expert, "by", generate_subscripts(top, 1) AS rank, unnest(top) AS p FROM tops)
            SELECT p.layer, p.expert, p."by", p.rank, p.p.token_id AS token_id, v.text, p.p.count AS count,
                   p.p.token_count AS token_count, p.p.count / et.expert_total AS expert_share,
                   (p.p.count / et.expert_total) / (p.p.token_count / lt.layer_tokens) AS lift
            FROM picked p
            JOIN et ON et.layer = p.layer AND et.expert = p.expert
            JOIN lt ON lt.layer = p.layer
            LEFT JOIN vocab v ON v.run_id = ? AND v.token_id = p.p.token_id
            ORDER BY p.layer, p.expert, p."by", p.rank"""
        return _typed(_df(con, sql, params + [n, n, min_count, run_id]),
                      ints=("layer", "expert", "rank", "token_id", "count", "token_count"))

    return _per_run(con, sel, _TOP_COLUMNS, one, source)


# ---------------------------------------------------------------------------------------------------------------
# position
# ---------------------------------------------------------------------------------------------------------------
