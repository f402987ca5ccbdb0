"""What the specialization analyses share: the choice between aggregate tables and routes, the routes
selection, token keys and expert sets, argument checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from moeviz.analyses.load import run_query
from moeviz.errors import MoevizError
from moeviz.selection import Selection
from moeviz.store.reader import column_names, route_stats_complete, table_names

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


def _typed(df: pd.DataFrame, ints: Sequence[str] = ()) -> pd.DataFrame:
    """Integer columns as int64 (DuckDB aggregates come back as floats or HUGEINT-floats otherwise)."""
    for c in ints:
        if c in df.columns and len(df):
            df[c] = df[c].astype("int64")
    return df


# ---------------------------------------------------------------------------------------------------------------
# vocabulary specialization and top tokens
# ---------------------------------------------------------------------------------------------------------------
