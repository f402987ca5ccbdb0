"""Expert specialization: what the experts of each layer have learned to take (domains, tokens, positions),
which experts fire together, how routing of neighbouring tokens and of successive layers relates, and how
settled the router is between two checkpoints.

Every function is `f(con, sel, ...) -> pandas.DataFrame` over the public schema (`moeviz.schema`) and carries
`run_id` so that two runs compare side by side. Where counts suffice, the functions taking `source` read tables
~10^2-10^4 times smaller than `routes` (`source="auto"`, the default, whenever those cover the selection):

- co-activation, consecutive-token agreement and the flow between two layers: `pair_stats`, `layer_stats`'
  adjacency columns and `flow_stats`, counted by the Recorder on the device over every token of every step (not
  only the sampled ones); not for selections with domains or tags, which select tokens;
- vocabulary specialization, top tokens, NMI with the token, position shares: `token_stats` and
  `position_stats` (routes counted per token id / position, layer and expert by compaction), for selections of
  whole runs (no steps, domains or tags);
- domain shares and NMI with the domain: `sequence_stats` (routes counted per sequence), for any selection;
- router saturation: `probe_sets` (each probe token's set of experts, built by compaction), for the probe batch.

Otherwise they read the per-token detail in `routes` (joined with `sequences` for domains and tags).
`source="routes"` forces the routes; `source="aggregates"` raises a SpecializationError saying why when the tables
cannot serve. The metrics follow the papers that introduced them:

- Mixtral (Jiang et al. 2024, §5 "Routing analysis"): expert share per domain and layer; repeated assignments of
  consecutive tokens (first choice, and first-or-second choice) against their random baselines.
- OLMoE (Muennighoff et al. 2024, §5): domain and vocabulary specialization (the fraction of a domain's or a
  token's occurrences routed to an expert, the chosen experts being all k of the top-k), co-activation, and router
  saturation (overlap of the top-k sets of the same tokens at two checkpoints).

How it runs (why the SQL looks the way it does): each run is queried on its own (`run_id = ?`), so that grouping
keys are small integers, never strings. Analyses that need one row per token (co-activation, consecutive tokens,
layer flow) pack (step, rank, seq, pos) into one BIGINT from the selection's extents (`_TokenKey`), and hold the
set of a token's experts as a bitmask (`bit_or(1 << expert)`) when the layer has at most 64 experts, as a sorted
list otherwise. Every route of a token is assumed to be recorded (the collectors write all k slots of a kept
token); each token has exactly one slot-0 route per layer, so `count(*) FILTER (slot = 0)` counts tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from moeviz.errors import MoevizError
from moeviz.load import run_query
from moeviz.store_reader import column_names, route_stats_complete, table_names
from moeviz.selection import Selection

__all__ = [
    "SpecializationError",
    "SOURCES",
    "DEFAULT_POSITION_BINS",
    "domain_share",
    "domain_share_first_choice",
    "vocab_specialization",
    "vocab_specialization_summary",
    "top_tokens",
    "position_share",
    "coactivation",
    "consecutive_agreement",
    "layer_flow",
    "router_saturation",
    "saturation_curve",
    "mutual_information",
]

# Left edges of the position buckets: 0, 1, 2-3, 4-7, ... (the first tokens behave unlike the rest).
DEFAULT_POSITION_BINS: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_MASK_MAX_EXPERTS = 64  # experts that fit a UBIGINT bitmask


class SpecializationError(MoevizError, ValueError):
    """A specialization analysis got arguments it cannot work with, or the store lacks what it needs."""


# ---------------------------------------------------------------------------------------------------------------
# shared plumbing
# ---------------------------------------------------------------------------------------------------------------


def _df(con, sql: str, params: list) -> pd.DataFrame:
    return run_query(con, sql, params, error=SpecializationError)


class _RunId(str):
    """A run id with what `_routes` needs to know of the run beyond its id.

    `alone`: the store holds this run only (`store_reader.holds_one_run`), so the run_id predicate is left out.

    `seq_steps`: the steps holding a sequence of the selection's domains and tags (None: the selection has none,
    or too many steps match to help). The semi-join with `sequences` must look at every route; a constant
    `step IN (...)` lets the scan skip the row groups of other steps first. A saturation curve over the 12 probe
    steps of a 100M-route store went from 14.2 s to 1.0 s.

    `route_stats`: `token_stats` and `sequence_stats` count every route of the run (`runs.route_stats_complete`).
    `one_rank`: the run has a single rank, so the rows of token_stats/position_stats are already one per cell.
    `source`: the caller's choice among SOURCES (see `_from_aggregates`).
    `tables`: the tables and views the connection has (`store_reader.table_names`), read once per call.
    """

    alone: bool = False
    seq_steps: tuple[int, ...] | None = None
    route_stats: bool = False
    one_rank: bool = False
    source: str = "auto"
    tables: frozenset[str] = frozenset()

    @staticmethod
    def of(run_id: str, alone: bool, seq_steps: tuple[int, ...] | None = None, route_stats: bool = False,
           one_rank: bool = False, source: str = "auto", tables: frozenset[str] = frozenset()) -> "_RunId":
        r = _RunId(run_id)
        r.alone, r.seq_steps, r.route_stats, r.one_rank, r.source = alone, seq_steps, route_stats, one_rank, source
        r.tables = tables
        return r


# Where an analysis reads its counts: "auto" = the aggregate tables when they cover the selection, else `routes`;
# "aggregates" = the aggregate tables or a SpecializationError saying why not; "routes" = always the routes.
SOURCES = ("auto", "aggregates", "routes")


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise SpecializationError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
    return source


def _from_aggregates(run_id: "_RunId", usable: bool, why_not: str) -> bool:
    """Whether to read the aggregate tables for this run: `usable` says whether they cover the selection."""
    if run_id.source == "routes":
        return False
    if run_id.source == "aggregates" and not usable:
        raise SpecializationError(f"run {str(run_id)!r}: {why_not}; use source='auto' or 'routes'")
    return usable


def _whole_run_stats_usable(sel: Selection, run_id: "_RunId", table: str) -> bool:
    """token_stats and position_stats count routes over all steps and sequences: usable for a selection of
    layers and ranks only."""
    return _from_aggregates(
        run_id, run_id.route_stats and sel.steps is None and not sel.needs_sequences,
        f"{table} covers whole runs (no step, domain or tag selection) once they are compacted")


def _sequence_stats_usable(run_id: "_RunId") -> bool:
    return _from_aggregates(run_id, run_id.route_stats,
                            "sequence_stats exists once a run is compacted and no routes were written since")


def _layer_stats_cover(con, sel: Selection, run_id: "_RunId", column: str) -> bool:
    """Whether layer_stats' `column` (filled by the Recorder on the device) is known for every selected step,
    rank and layer, so an analysis may read the exact aggregates. Domains and tags select tokens, which the
    aggregates do not break down."""
    if run_id.source == "routes":
        return False
    usable = not sel.needs_sequences and column in column_names(con, "layer_stats") and (
        column != "coactive_pairs" or "pair_stats" in run_id.tables)
    if usable:
        where, params = sel.with_(run_ids=None).where("l")
        n, known = con.execute(f"SELECT count(*), count({column}) FROM layer_stats l WHERE l.run_id = ? AND {where}",
                               [str(run_id), *params]).fetchone()
        usable = n > 0 and n == known
    return _from_aggregates(run_id, usable, f"layer_stats.{column} is not recorded for every selected step and layer "
                            "(a store written before it existed, or by RunWriter without it) or the selection has "
                            "domains or tags")


_MAX_PREFILTER_STEPS = 256  # longer IN lists prune little and cost a hash probe per route


def _sequence_steps(con, sel: Selection, run_id: str) -> tuple[int, ...] | None:
    """The steps of run_id with a sequence in the selection's domains and tags, ignoring its steps (callers may
    widen the steps: `router_saturation`), or None when the selection has no domains or tags or too many match."""
    if not sel.needs_sequences:
        return None
    swhere, params = Selection(domains=sel.domains, tags=sel.tags).where("s", per_token=True)
    steps = _df(con, f"SELECT DISTINCT step FROM sequences s WHERE s.run_id = ? AND {swhere} ORDER BY step",
                [run_id, *params])["step"]
    return tuple(int(x) for x in steps) if len(steps) <= _MAX_PREFILTER_STEPS else None


def _per_run(con, sel: Selection, columns: list[str], one_run, source: str = "auto") -> pd.DataFrame:
    """`one_run(run_id) -> DataFrame` for each run of the selection, stacked, with `run_id` first."""
    _check_source(source)
    frames = []
    # one read of `runs` for what every run needs (which runs, alone, complete, one rank); first, so that a
    # connection without the moeviz tables gets SpecializationError here
    runs = _df(con, "SELECT * FROM runs ORDER BY run_id", [])
    all_ids = [str(r) for r in runs["run_id"].drop_duplicates()]
    run_ids = [r for r in all_ids if sel.run_ids is None or r in sel.run_ids]
    alone = len(all_ids) == 1  # as store_reader.holds_one_run
    tables = frozenset(table_names(con))
    complete = route_stats_complete(con, runs, tables)
    one_rank_runs = set(runs.loc[runs["world_size"] == 1, "run_id"]) if "world_size" in runs.columns else set()
    for run_id in run_ids:
        one_rank = run_id in one_rank_runs or (sel.ranks is not None and len(set(sel.ranks)) == 1)
        run_id = _RunId.of(run_id, alone, _sequence_steps(con, sel, run_id), complete.get(run_id, False), one_rank,
                           source, tables)
        df = one_run(run_id)
        if len(df):
            df.insert(0, "run_id", run_id)
            frames.append(df[columns])
    if not frames:
        text = ("run_id", "domain", "text", "by", "variable", "slots")
        return pd.DataFrame({c: pd.Series(dtype="object" if c in text else "float64") for c in columns})
    return pd.concat(frames, ignore_index=True)


def _routes(sel: Selection, run_id: str, cols: str, *, extra: str = "") -> tuple[str, list]:
    """A SELECT of `cols` from one run's routes in the selection (alias r), and its parameters.

    The selection's domains and tags keep the routes whose sequence matches, through a semi-join with that run's
    `sequences` on (step, rank, seq): integer keys only, and a route is never duplicated by the join.
    """
    rwhere, rparams = sel.with_(run_ids=None, domains=None, tags=None).where("r")
    seq_join, sparams = "", []
    if sel.needs_sequences:
        swhere, seq_params = Selection(domains=sel.domains, tags=sel.tags).where("s", per_token=True)
        seq_join = (f"SEMI JOIN (SELECT step, rank, seq FROM sequences s WHERE s.run_id = ? AND {swhere}) s "
                    "ON s.step = r.step AND s.rank = r.rank AND s.seq = r.seq")
        sparams = [run_id, *seq_params]
    if getattr(run_id, "alone", False):
        run_where, run_params = "TRUE", []
    else:
        run_where, run_params = "r.run_id = ?", [run_id]
    seq_steps = getattr(run_id, "seq_steps", None)
    if sel.needs_sequences and seq_steps is not None:  # constants: lets the scan skip other steps' row groups
        run_where += f" AND r.step IN ({', '.join(map(str, seq_steps))})" if seq_steps else " AND FALSE"
    sql = (f"SELECT {cols} FROM routes r {seq_join} WHERE {run_where} AND {rwhere} "
           f"{('AND ' + extra) if extra else ''}")
    return sql, [*sparams, *run_params, *rparams]


def _counts_by_domain(
    sel: Selection, run_id: str, keys: Sequence[str], *, known_domain: bool = False, slot0_only: bool = False
) -> tuple[str, list]:
    """A SELECT of one run's route counts per `keys` (routes columns) and domain: n (routes), f (slot-0 routes).

    Routes are first counted per sequence and then joined with `sequences`, so the join touches one row per
    sequence, layer and key instead of one per route (about twice as fast as joining every route). The
    selection's domains and tags filter the sequences; `known_domain` also drops sequences without a domain.
    `slot0_only` reads the slot-0 routes alone (then n = f), half the rows to aggregate.
    """
    cols = ", ".join(f"r.{k}" for k in keys)
    if set(keys) <= {"layer", "expert"} and _sequence_stats_usable(run_id):
        rwhere, rparams = sel.with_(run_ids=None, domains=None, tags=None).where("r")
        n = "r.first_choice" if slot0_only else "r.assigned"
        src = (f"SELECT r.step, r.rank, r.seq, {cols}, {n} AS n, r.first_choice AS f FROM sequence_stats r "
               f"WHERE r.run_id = ? AND {rwhere}")
        p1 = [str(run_id), *rparams]
    else:
        src, p1 = _routes(sel.with_(domains=None, tags=None), run_id,
                          f"r.step, r.rank, r.seq, {cols}, count(*) AS n, count(*) FILTER (WHERE r.slot = 0) AS f",
                          extra="r.slot = 0" if slot0_only else "")
        src += " GROUP BY ALL"
    swhere, p2 = Selection(domains=sel.domains, tags=sel.tags).where("s", per_token=True)
    if known_domain:
        swhere += " AND s.domain IS NOT NULL"
    join = "JOIN" if (sel.needs_sequences or known_domain) else "LEFT JOIN"
    outer = ", ".join(f"c.{k}" for k in keys)
    sql = f"""
        SELECT {outer}, s.domain, sum(c.n) AS n, sum(c.f) AS f
        FROM ({src}) c
        {join} (SELECT step, rank, seq, domain FROM sequences s WHERE s.run_id = ? AND {swhere}) s
            ON s.step = c.step AND s.rank = c.rank AND s.seq = c.seq
        GROUP BY ALL"""
    return sql, [*p1, run_id, *p2]


def _dims_sql() -> str:
    """Per layer of one run (parameter: run_id): n_experts and top_k, from `layers`, else from `runs`."""
    return (
        "SELECT l.layer, coalesce(l.n_experts, u.n_experts) AS n_experts, coalesce(l.top_k, u.top_k) AS top_k "
        "FROM layers l LEFT JOIN runs u ON u.run_id = l.run_id WHERE l.run_id = ?"
    )


def _max_experts(con, run_id: str) -> int:
    row = con.execute(f"SELECT max(n_experts) FROM ({_dims_sql()})", [run_id]).fetchone()
    if row is None or row[0] is None:
        raise SpecializationError(
            f"run {run_id!r} has no rows in `layers`, so its number of experts is unknown; "
            "the store writer records them (RunWriter.write_layers) — rebuild or repair the run"
        )
    return int(row[0])


def _token_cells(sel: Selection, run_id: str) -> tuple[str, list]:
    """A SELECT of one run's (layer, token_id, expert) cells with routes: n (routes), f (slot-0 routes).
    Tokens without ids (-1) are left out. A pivot over experts (`count(*) FILTER (WHERE expert = e)` per expert,
    grouped by (layer, token_id)) was tried and measured slower on 10M routes: it evaluates 2E predicates per
    route. A compacted run has these cells counted over all its steps in `token_stats` (used when the selection
    covers every step and sequence)."""
    if _whole_run_stats_usable(sel, run_id, "token_stats"):
        where, params = sel.with_(run_ids=None).where("t")
        if run_id.one_rank:  # one row per cell already: a GROUP BY over ~2M cells would cost 2/3 of the query
            return (f"SELECT t.layer, t.token_id, t.expert, t.assigned AS n, t.first_choice AS f "
                    f"FROM token_stats t WHERE t.run_id = ? AND t.token_id <> -1 AND {where}", [str(run_id), *params])
        return (f"SELECT t.layer, t.token_id, t.expert, sum(t.assigned) AS n, sum(t.first_choice) AS f "
                f"FROM token_stats t WHERE t.run_id = ? AND t.token_id <> -1 AND {where} GROUP BY ALL",
                [str(run_id), *params])
    src, params = _routes(sel, run_id, "r.layer, r.token_id, r.expert, count(*) AS n, "
                          "count(*) FILTER (WHERE r.slot = 0) AS f", extra="r.token_id <> -1")
    return src + " GROUP BY ALL", params

@dataclass(frozen=True)
class _TokenKey:
    """Integer keys for one run's selected tokens: `seq` packs (step, rank, seq), `tok` adds pos.

    Packing is exact (mixed radix over the selection's extents), so a BIGINT key replaces a 4-column key in
    GROUP BY, joins and window partitions; when the extents would overflow 62 bits the keys are HUGEINT.
    """

    seq: str
    tok: str

    @staticmethod
    def of(con, sel: Selection, run_id: str) -> "_TokenKey":
        sql, params = _routes(
            sel.with_(domains=None, tags=None), run_id,
            "min(r.step), max(r.step), min(r.rank), max(r.rank), min(r.seq), max(r.seq), min(r.pos), max(r.pos)",
        )
        ext = con.execute(sql, params).fetchone()
        if ext is None or ext[0] is None:
            ext = (0, 0, 0, 0, 0, 0, 0, 0)
        s0, s1, r0, r1, q0, q1, p0, p1 = (int(x) for x in ext)
        n_r, n_q, n_p = r1 - r0 + 1, q1 - q0 + 1, p1 - p0 + 1
        wide = (s1 - s0 + 1) * n_r * n_q * n_p >= 2**62
        step = f"CAST(r.step - {s0} AS HUGEINT)" if wide else f"(r.step - {s0})"
        seq = f"(({step} * {n_r} + (r.rank - {r0})) * {n_q} + (r.seq - {q0}))"
        return _TokenKey(seq=seq, tok=f"({seq} * {n_p} + (r.pos - {p0}))")


def _expert_set(n_experts: int) -> tuple[str, str]:
    """SQL aggregate of a token's experts (a bitmask or a sorted list) and the SQL list of the set's experts
    given that aggregate as `m` (for expanding a set back into experts)."""
    if n_experts <= _MASK_MAX_EXPERTS:
        return (
            "bit_or(CAST(1 AS UBIGINT) << CAST(r.expert AS INTEGER))",
            f"list_filter(range({n_experts}), lambda e: ((m >> CAST(e AS INTEGER)) & CAST(1 AS UBIGINT)) = 1)",
        )
    return "list_sort(list(r.expert))", "m"


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SpecializationError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------------------------
# domain share
# ---------------------------------------------------------------------------------------------------------------

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
    return domain_share(con, sel, slot0_only=True, source=source)


def _typed(df: pd.DataFrame, ints: Sequence[str] = ()) -> pd.DataFrame:
    """Integer columns as int64 (DuckDB aggregates come back as floats or HUGEINT-floats otherwise)."""
    for c in ints:
        if c in df.columns and len(df):
            df[c] = df[c].astype("int64")
    return df


# ---------------------------------------------------------------------------------------------------------------
# vocabulary specialization and top tokens
# ---------------------------------------------------------------------------------------------------------------

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

_FLOW_COLUMNS = ["run_id", "layer_a", "expert_a", "layer_b", "expert_b", "tokens", "share_of_a"]


def layer_flow(con, sel: Selection, layer_a: int, layer_b: int, *, slot0_only: bool = True,
               source: str = "auto") -> pd.DataFrame:
    """Tokens going from expert i of `layer_a` to expert j of `layer_b` (the links of a Sankey diagram).

    With `slot0_only` a token counts once, for its first choices in both layers; otherwise once for every pair
    (i among its k experts in layer_a, j among its k in layer_b), so a token adds k_a * k_b links. Only tokens
    recorded in both layers count. `share_of_a` = tokens / all links leaving expert i of layer_a. The selection's
    `layers` are ignored (the two layers are given); only pairs with tokens > 0 are listed.

    Reads `flow_stats` (every token, counted on the device) when it holds layer_a -> layer_b for every selected
    step (by default the Recorder counts each layer and the next) and the selection has no domains or tags;
    otherwise pairs each token's routes in the two layers (the sampled tokens).
    """
    layer_a, layer_b = int(layer_a), int(layer_b)

    def one(run_id: str) -> pd.DataFrame:
        if _flow_stats_cover(con, sel, run_id, layer_a, layer_b):
            where, params = sel.with_(run_ids=None, layers=None).where("x")
            sql = f"""
                SELECT expert_a, expert_b, sum({'first_tokens' if slot0_only else 'topk_pairs'}) AS tokens
                FROM flow_stats x WHERE x.run_id = ? AND x.layer_a = ? AND x.layer_b = ? AND {where}
                GROUP BY ALL HAVING sum({'first_tokens' if slot0_only else 'topk_pairs'}) > 0"""
            df = _df(con, sql, [str(run_id), layer_a, layer_b, *params])
        else:
            # a join of the two layers' routes on the token's own keys: no pass over the routes for the extents a
            # packed key needs (_TokenKey), and no GROUP BY into one group per token (100M routes: 5.0-5.4 s ->
            # 3.0-3.5 s)
            slot = "r.slot = 0" if slot0_only else ""
            cols = "r.step, r.rank, r.seq, r.pos, r.expert"
            src_a, pa = _routes(sel.with_(layers=(layer_a,)), run_id, cols, extra=slot)
            src_b, pb = _routes(sel.with_(layers=(layer_b,)), run_id, cols, extra=slot)
            sql = f"""
                SELECT a.expert AS expert_a, b.expert AS expert_b, count(*) AS tokens
                FROM ({src_a}) a JOIN ({src_b}) b USING (step, rank, seq, pos) GROUP BY ALL"""
            df = _df(con, sql, pa + pb)
        df.insert(0, "layer_a", layer_a)
        df.insert(2, "layer_b", layer_b)
        df["share_of_a"] = df["tokens"] / df.groupby("expert_a")["tokens"].transform("sum")
        df = df.sort_values(["expert_a", "expert_b"], ignore_index=True)
        return _typed(df, ints=("expert_a", "expert_b", "tokens"))

    return _per_run(con, sel, _FLOW_COLUMNS, one, source)


def _flow_stats_cover(con, sel: Selection, run_id: "_RunId", layer_a: int, layer_b: int) -> bool:
    """Whether flow_stats holds layer_a -> layer_b for every selected step and rank in which layer_a routed
    tokens. Domains and tags select tokens, which flow_stats does not break down."""
    if run_id.source == "routes":
        return False
    usable = not sel.needs_sequences and "flow_stats" in run_id.tables
    if usable:
        where, params = sel.with_(run_ids=None, layers=None).where("x")
        have, want = con.execute(
            f"""SELECT (SELECT count(*) FROM (SELECT DISTINCT step, rank FROM flow_stats x
                        WHERE x.run_id = ? AND x.layer_a = ? AND x.layer_b = ? AND {where})),
                       (SELECT count(*) FROM layer_stats x WHERE x.run_id = ? AND x.layer = ? AND x.tokens > 0
                        AND {where})""",
            [str(run_id), layer_a, layer_b, *params, str(run_id), layer_a, *params]).fetchone()
        usable = want > 0 and have == want
    return _from_aggregates(run_id, usable, f"flow_stats does not hold layers {layer_a} -> {layer_b} for every "
                            "selected step (the Recorder counts each layer and the next, every pair with "
                            "flow_stats='all'; older stores have none) or the selection has domains or tags")


# ---------------------------------------------------------------------------------------------------------------
# router saturation
# ---------------------------------------------------------------------------------------------------------------

_SAT_COLUMNS = ["run_id", "step", "ref_step", "layer", "tokens", "overlap", "saturation", "top1_agreement"]


def router_saturation(con, sel: Selection, step_a: int, step_b: int, *, source: str = "auto") -> pd.DataFrame:
    """OLMoE's router saturation between two checkpoints: for the same tokens (same run, rank, seq and pos, e.g. a
    fixed probe batch recorded with tag='probe' at steps a and b), the mean of |topk_a ∩ topk_b| / k, per layer;
    `top1_agreement` is the fraction whose first choice is the same.

    Columns: run_id, step (= step_a), ref_step (= step_b), layer, tokens (matched tokens), overlap (Σ |∩|),
    saturation, top1_agreement. The selection's `steps` are ignored (the two steps are given); restrict it to the
    probe batch with `tags=('probe',)`. Raises if the two steps hold different token ids at the same positions.
    Reads `probe_sets` (the probe tokens' expert sets, built at compaction) when both steps are probe steps of a
    compacted run and the selection has no domains; otherwise the routes.
    """
    return _saturation(con, sel, int(step_b), steps_a=[int(step_a)], source=source)


def saturation_curve(con, sel: Selection, ref_step: int | None = None, *, source: str = "auto") -> pd.DataFrame:
    """Router saturation of every selected step against `ref_step` (default: the last selected step of each run),
    as OLMoE plots it against the final checkpoint. Same columns as `router_saturation`, one row per step and
    layer (the reference step itself included, at saturation 1). Reads `probe_sets` for a selection of the probe
    batch (`tags=('probe',)`, no domains) of a compacted run; otherwise the routes."""
    return _saturation(con, sel, None if ref_step is None else int(ref_step), steps_a=None, source=source)


def _saturation(con, sel: Selection, ref_step: int | None, steps_a: list[int] | None, source: str) -> pd.DataFrame:
    def one(run_id: str) -> pd.DataFrame:
        ref = ref_step
        probe = _probe_sets_cover(con, sel, run_id, ref, steps_a)
        if ref is None:
            if probe:
                where, params = sel.with_(run_ids=None, layers=None, tags=None).where("x")
                src = f"SELECT max(x.step) FROM probe_sets x WHERE x.run_id = ? AND {where}"
                params = [str(run_id), *params]
            else:
                src, params = _routes(sel, run_id, "max(r.step)")
            ref = con.execute(src, params).fetchone()[0]
            if ref is None:
                return pd.DataFrame()
        pairs, params = (_saturation_from_probe_sets if probe else _saturation_from_routes)(sel, run_id, ref, steps_a)
        sql = f"""
            WITH {pairs},
            d AS ({_dims_sql()})
            SELECT p.step, p.layer, p.tokens, p.overlap, p.overlap / (p.tokens * d.top_k) AS saturation,
                   p.top1 / p.tokens AS top1_agreement, p.mismatched
            FROM p JOIN d ON d.layer = p.layer
            ORDER BY p.step, p.layer"""
        df = _df(con, sql, params + [run_id])
        bad = df[df["mismatched"] > 0]
        if len(bad):
            raise SpecializationError(
                f"run {run_id!r}: step(s) {sorted(set(bad['step'].astype(int)))} and step {ref} hold different token "
                "ids at the same (rank, seq, pos), so their routing cannot be compared token by token; record a "
                "fixed probe batch (tag='probe') at each checkpoint and select it with Selection(tags=('probe',))"
            )
        if steps_a is not None and df.empty:
            raise SpecializationError(
                f"run {run_id!r}: no token is recorded at both step {steps_a[0]} and step {ref} (same rank, seq, pos) "
                "in this selection; router saturation compares the same tokens at two checkpoints — record a fixed "
                "probe batch (tag='probe') at both"
            )
        df.insert(1, "ref_step", ref)
        return _typed(df, ints=("step", "ref_step", "layer", "tokens", "overlap"))

    return _per_run(con, sel, _SAT_COLUMNS, one, source)


def _saturation_from_routes(sel: Selection, run_id: "_RunId", ref: int, steps_a: list[int] | None) -> tuple[str, list]:
    """CTEs ending in p(step, layer, tokens, top1, mismatched, overlap) from the routes of the compared steps."""
    sel_a = sel if steps_a is None else sel.with_(steps=None)
    src_a, pa = _routes(sel_a, run_id, "r.step, r.rank, r.seq, r.pos, r.layer, r.slot, r.expert, r.token_id",
                        extra=(f"r.step IN ({', '.join('?' for _ in steps_a)})" if steps_a is not None else ""))
    pa = pa + (steps_a or [])
    src_b, pb = _routes(sel.with_(steps=(ref, ref)), run_id,
                        "r.rank, r.seq, r.pos, r.layer, r.slot, r.expert, r.token_id")
    ctes = f"""a AS ({src_a}), b AS ({src_b}),
        top AS (
            SELECT a.step, a.layer, count(*) AS tokens, count(*) FILTER (WHERE a.expert = b.expert) AS top1,
                   count(*) FILTER (WHERE a.token_id <> b.token_id) AS mismatched
            FROM a JOIN b ON a.rank = b.rank AND a.seq = b.seq AND a.pos = b.pos AND a.layer = b.layer
            WHERE a.slot = 0 AND b.slot = 0 GROUP BY ALL),
        ov AS (
            SELECT a.step, a.layer, count(*) AS overlap
            FROM a JOIN b ON a.rank = b.rank AND a.seq = b.seq AND a.pos = b.pos AND a.layer = b.layer
                         AND a.expert = b.expert
            GROUP BY ALL),
        p AS (SELECT top.*, coalesce(ov.overlap, 0) AS overlap FROM top
              LEFT JOIN ov ON ov.step = top.step AND ov.layer = top.layer)"""
    return ctes, pa + pb


def _saturation_from_probe_sets(sel: Selection, run_id: "_RunId", ref: int,
                                steps_a: list[int] | None) -> tuple[str, list]:
    """The same p from probe_sets: one row per token and layer, its experts as a bitmask, so a token's overlap
    is bit_count(a & b) and no routes are read (100 M routes: 12 probe steps of 2,048 tokens)."""
    base = sel.with_(run_ids=None, tags=None)
    wa, pa = (base if steps_a is None else base.with_(steps=None)).where("x")
    wb, pb = base.with_(steps=(ref, ref)).where("x")
    in_a = f" AND x.step IN ({', '.join('?' for _ in steps_a)})" if steps_a is not None else ""
    cols = "x.step, x.rank, x.seq, x.pos, x.layer, x.token_id, x.first_expert, x.experts"
    ctes = f"""a AS (SELECT {cols} FROM probe_sets x WHERE x.run_id = ? AND {wa}{in_a}),
        b AS (SELECT {cols} FROM probe_sets x WHERE x.run_id = ? AND {wb}),
        p AS (
            SELECT a.step, a.layer,
                   count(*) FILTER (WHERE a.first_expert IS NOT NULL AND b.first_expert IS NOT NULL) AS tokens,
                   count(*) FILTER (WHERE a.first_expert = b.first_expert) AS top1,
                   count(*) FILTER (WHERE a.first_expert IS NOT NULL AND b.first_expert IS NOT NULL
                                    AND a.token_id <> b.token_id) AS mismatched,
                   sum(bit_count(a.experts & b.experts)) AS overlap
            FROM a JOIN b ON a.rank = b.rank AND a.seq = b.seq AND a.pos = b.pos AND a.layer = b.layer
            GROUP BY ALL HAVING tokens > 0)"""
    return ctes, [str(run_id), *pa, *(steps_a or []), str(run_id), *pb]


def _probe_sets_cover(con, sel: Selection, run_id: "_RunId", ref: int | None, steps_a: list[int] | None) -> bool:
    """Whether probe_sets holds every token the routes version would compare: the run is compacted (no live
    routes), the selection has no domains, the layers have at most 64 experts, and either the selection is the
    probe batch (tags = ('probe',)) or every sequence of the two given steps is a probe sequence."""
    if run_id.source == "routes":
        return False
    only_probe = sel.tags is not None and set(sel.tags) == {"probe"}
    usable = (run_id.route_stats and "probe_sets" in run_id.tables and sel.domains is None
              and (only_probe or (steps_a is not None and ref is not None)))
    if usable:
        steps = None if steps_a is None else sorted({*steps_a, ref})
        step_in = f" AND {{a}}.step IN ({', '.join('?' for _ in steps)})" if steps is not None else ""
        rwhere, rparams = Selection(ranks=sel.ranks).where("q")
        non_probe, nparams = ("0", []) if only_probe else (  # sequences the routes version would compare too
            f"(SELECT count(*) FROM sequences q WHERE q.run_id = ? AND {rwhere}{step_in.format(a='q')} "
            "AND q.tag IS DISTINCT FROM 'probe')", [str(run_id), *rparams, *(steps or [])])
        xwhere, xparams = sel.with_(run_ids=None, tags=None, steps=None if steps is not None else sel.steps).where("x")
        non_probe, have, wide = con.execute(
            f"SELECT {non_probe}, count(DISTINCT x.step), count(*) FILTER (WHERE x.experts IS NULL) FROM probe_sets x "
            f"WHERE x.run_id = ? AND {xwhere}{step_in.format(a='x')}",
            [*nparams, str(run_id), *xparams, *(steps or [])]).fetchone()
        usable = non_probe == 0 and wide == 0 and have == (len(steps) if steps is not None else have) and have > 0
    return _from_aggregates(run_id, usable, "probe_sets holds the probe steps of compacted runs with at most 64 "
                            "experts per layer: select the probe batch (tags=('probe',)) or two steps whose sequences "
                            "are all probe sequences, without domains")


# ---------------------------------------------------------------------------------------------------------------
# mutual information
# ---------------------------------------------------------------------------------------------------------------

_MI_COLUMNS = ["run_id", "layer", "variable", "slots", "n", "mi", "h_expert", "h_variable", "nmi"]


def mutual_information(con, sel: Selection, *, variables: Sequence[str] = ("token", "domain"),
                       source: str = "auto") -> pd.DataFrame:
    """Normalized mutual information between the expert and the token id, and between the expert and the domain,
    per layer: how much knowing one tells about the other (0 = independent, 1 = each determines the other).

    Two joint distributions per variable X (column `slots`):
      'first'  one observation per token: (X, its first-choice expert)
      'all'    one observation per route: (X, expert) for each of the token's k experts
    MI and entropies are in nats; NMI uses the arithmetic mean, as scikit-learn's default
    (`normalized_mutual_info_score(average_method='arithmetic')`): NMI = I(E; X) / ((H(E) + H(X)) / 2), with
    sklearn's conventions: 1 when both variables are constant, 0 when only one is.
    Tokens without ids (-1) are left out of 'token'; tokens without a domain are left out of 'domain'.
    """
    unknown = set(variables) - {"token", "domain"}
    if unknown or not variables:
        raise SpecializationError(
            f"variables must be a non-empty subset of ('token', 'domain'); got {tuple(variables)}"
        )

    def sums(run_id: str, variable: str) -> pd.DataFrame:
        """Per layer and slots: N and Σ c ln c over the joint cells and both marginals."""
        if variable == "token":
            src, params = _token_cells(sel, run_id)
            src = f"SELECT layer, token_id AS x, expert, n, f FROM ({src})"
        else:
            src, params = _counts_by_domain(sel, run_id, ["layer", "expert"], known_domain=True)
            src = f"SELECT layer, domain AS x, expert, n, f FROM ({src})"
        sql = f"""
            WITH c AS ({src}),
            j AS (
                SELECT layer, sum(f) AS n_first, sum(n) AS n_all,
                       sum(CASE WHEN f > 0 THEN f * ln(f) END) AS sxy_first, sum(n * ln(n)) AS sxy_all
                FROM c GROUP BY layer),
            mx AS (
                SELECT layer, sum(CASE WHEN vf > 0 THEN vf * ln(vf) END) AS sx_first,
                       count(*) FILTER (WHERE vf > 0) AS nx_first,
                       sum(vn * ln(vn)) AS sx_all, count(*) AS nx_all
                FROM (SELECT layer, x, sum(f) AS vf, sum(n) AS vn FROM c GROUP BY ALL) GROUP BY layer),
            my AS (
                SELECT layer, sum(CASE WHEN vf > 0 THEN vf * ln(vf) END) AS se_first,
                       count(*) FILTER (WHERE vf > 0) AS ne_first,
                       sum(vn * ln(vn)) AS se_all, count(*) AS ne_all
                FROM (SELECT layer, expert, sum(f) AS vf, sum(n) AS vn FROM c GROUP BY ALL) GROUP BY layer)
            SELECT * FROM j JOIN mx USING (layer) JOIN my USING (layer) ORDER BY layer"""
        wide = _df(con, sql, params)
        return pd.concat([
            pd.DataFrame({
                "slots": slots, "layer": wide["layer"], "n": wide[f"n_{slots}"], "s_xy": wide[f"sxy_{slots}"],
                "s_x": wide[f"sx_{slots}"], "s_y": wide[f"se_{slots}"], "nx": wide[f"nx_{slots}"],
                "ny": wide[f"ne_{slots}"],
            })
            for slots in ("first", "all")
        ], ignore_index=True)

    def one(run_id: str) -> pd.DataFrame:
        frames = []
        for variable in variables:
            s = sums(run_id, variable)
            if s.empty:
                continue
            s["variable"] = variable
            frames.append(s)
        if not frames:
            return pd.DataFrame()
        s = pd.concat(frames, ignore_index=True)
        s[["s_xy", "s_x", "s_y"]] = s[["s_xy", "s_x", "s_y"]].astype("float64").fillna(0.0)
        n = s["n"].astype("float64")
        ln_n = np.log(n)
        h_xy = ln_n - s["s_xy"] / n
        h_x = ln_n - s["s_x"] / n
        h_e = ln_n - s["s_y"] / n
        mi = (h_x + h_e - h_xy).clip(lower=0.0)
        denom = (h_x + h_e) / 2
        both_constant = (s["nx"] <= 1) & (s["ny"] <= 1)
        nmi = np.where(both_constant, 1.0, np.where(denom > 0, mi / denom.where(denom > 0, 1.0), 0.0))
        out = pd.DataFrame({
            "layer": s["layer"].astype("int64"), "variable": s["variable"], "slots": s["slots"],
            "n": n.astype("int64"), "mi": mi, "h_expert": h_e.clip(lower=0.0), "h_variable": h_x.clip(lower=0.0),
            "nmi": np.clip(nmi, 0.0, 1.0),
        })
        return out.sort_values(["layer", "variable", "slots"], ignore_index=True)

    return _per_run(con, sel, _MI_COLUMNS, one, source)
