"""The rows an analysis over steps sums: step roll-ups for whole blocks of steps, per-step rows for the rest.

`step_stats` and `layer_stats` hold one row per step (and rank, layer, expert); `step_rollups` and
`layer_rollups` hold the same sums per block of 10, 100 and 1,000 steps (moeviz.store.rollups). An analysis that
sums over steps gets the same numbers from either as long as no block straddles the edge of what it groups: a
bucket of b steps may read the roll-up of resolution r when r divides b (every block then falls inside one
bucket), a total over a step range may read any resolution for the blocks inside the range. So `step_rows_sql`
cuts the selected steps into whole blocks of the coarsest allowed resolution, finer blocks towards the edges, and
single steps at the ends (at most 2 x 3 + 1 pieces), and returns their UNION ALL.

The roll-ups are summed over ranks, so a selection that picks ranks reads the per-step rows; so does a query on a
connection without the roll-up views (a private in-memory store, a copy of a few tables), and one on a store with
live segments (the views roll those up at each query: correct, but slower than the per-step rows). Only columns that are
sums can be read this way: `rank` is not among the columns returned.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from moeviz.selection import Selection
from moeviz.store.reader import buckets_complete, rollups_complete
from moeviz.store.rollups import (BUCKET_RESOLUTIONS, RESOLUTIONS, SPEC, shape_sql as _bucket_shape_sql,
                                  expert_sums_sql, layer_bucket_sql, pooled_bucket_sql, stored_for_every_run)

__all__ = ["step_rows_sql", "pieces", "range_clauses", "rollups_available", "buckets_available",
           "expert_drops_available", "bucket_pieces", "layer_buckets_sql", "pooled_buckets_sql"]

_ROLLUP_OF = {source: table for table, (source, _, _) in SPEC.items()}  # step_stats -> step_rollups


def rollups_available(con) -> bool:
    """Whether reading the roll-ups pays on `con`: it has them and they are compacted (a live run's segments are
    rolled up at each query, slower than the per-step rows: moeviz.store.reader.rollups_complete)."""
    return rollups_complete(con)


def pieces(lo: int | None, hi: int | None, resolutions: tuple[int, ...]) -> list[tuple[int, int | None, int | None]]:
    """(resolution, first step, last step) pieces covering steps lo..hi (None: unbounded), coarsest blocks in the
    middle; resolution 1 = single steps. Each piece of resolution r > 1 starts and ends on a block boundary."""
    res = sorted((r for r in resolutions if r > 1), reverse=True)
    if not res:
        return [(1, lo, hi)]
    if lo is None and hi is None:
        return [(res[0], None, None)]
    r, rest = res[0], tuple(res[1:])
    a = None if lo is None else -(-lo // r) * r  # first block start >= lo
    z = None if hi is None else (hi + 1) // r * r - 1  # last block end <= hi
    if a is not None and z is not None and a > z:
        return pieces(lo, hi, rest)
    left = pieces(lo, a - 1, rest) if a is not None and lo < a else []
    right = pieces(z + 1, hi, rest) if z is not None and z < hi else []
    return left + [(r, a, z)] + right


def step_rows_sql(con, table: str, sel: Selection, columns: tuple[str, ...], *, step_bucket: int | None = None,
                  by_step: bool = True, use_rollups: bool | None = None,
                  only_steps: Sequence[int] | None = None) -> tuple[str, list]:
    """A FROM item (a parenthesised SELECT; alias it) and its params: the rows of `table` ('step_stats' or
    'layer_stats') in `sel`, with `columns` (run_id, step, keys and sums; never rank), whose sums per bucket of
    `step_bucket` steps (by_step) or over all selected steps (not by_step) equal those of the per-step rows.

    Reads the roll-ups where they give the same sums (see the module docstring); `use_rollups=False` never
    does (None: when the connection has them). The selection's domains and tags are not applied (the per-step
    aggregates hold none): callers that honour them read `routes` instead.

    `only_steps`: also keep only these steps (per-step rows, never roll-ups), as a list of constants that DuckDB
    checks against each row group's step range: 500 steps spread over 75,000 of a 58 x 256 run read in 1.4 s and
    1.7 GB, where the rows of the whole range took 26 s and 19 GB (docs/benchmarks.md, #19)."""
    if use_rollups is None:
        use_rollups = rollups_available(con)
    exact = sel.with_(domains=None, tags=None)
    lo, hi = (None, None) if exact.steps is None else (int(exact.steps[0]), int(exact.steps[1]))
    if by_step:
        allowed = tuple(r for r in RESOLUTIONS if step_bucket and int(step_bucket) % r == 0)
    else:
        allowed = RESOLUTIONS
    if not use_rollups or exact.ranks is not None or not allowed or (lo is not None and lo < 0) or \
            only_steps is not None:
        allowed = ()
    cols = ", ".join(columns)
    parts, params = [], []
    rest, rest_params = exact.with_(steps=None).where()
    if only_steps is not None:  # whole numbers written into the SQL (operator.index refuses text and 3.7)
        rest += " AND step IN (" + (", ".join(str(operator.index(x)) for x in only_steps) or "NULL") + ")"
    for r, a, z in pieces(lo, hi, allowed):
        within, p = range_clauses(a, z)
        clauses, p = [rest, *within], list(rest_params) + p
        if r == 1:
            parts.append(f"SELECT {cols} FROM {table} WHERE {' AND '.join(clauses)}")
        else:
            parts.append(f"SELECT {cols} FROM {_ROLLUP_OF[table]} WHERE resolution = {int(r)} AND "
                         + " AND ".join(clauses))
        params += p
    return "(" + " UNION ALL ".join(parts) + ")", params


def range_clauses(first: int | None, last: int | None, column: str = "step") -> tuple[list[str], list]:
    """SQL conditions `column` >= first and <= last (either left out when None) and their parameters: a piece
    of a step range, as `pieces` gives them."""
    clauses, params = [], []
    if first is not None:
        clauses.append(f"{column} >= ?")
        params.append(first)
    if last is not None:
        clauses.append(f"{column} <= ?")
        params.append(last)
    return clauses, params


def buckets_available(con) -> bool:
    """Whether `con` has the bucket tables (layer_buckets, pooled_buckets, step_drops) covering every step_stats
    row (compacted by this moeviz, nothing live: moeviz.store.reader.buckets_complete)."""
    return buckets_complete(con)


def expert_drops_available(con) -> bool:
    """Whether `expert_drops` covers every step_stats row (a store compacted before the table existed lacks it
    until `moeviz compact`; the other bucket tables may still be complete)."""
    return buckets_complete(con, "expert_drops")


def _bucket_of(step_bucket: int | None) -> int:
    return 1 if step_bucket is None else int(step_bucket)


def bucket_pieces(sel: Selection, step_bucket: int | None) -> list[tuple[bool, int | None, int | None]] | None:
    """(from the table?, first step, last step) pieces of the selected steps for a curve in buckets of
    `step_bucket` steps read from layer_buckets/pooled_buckets: the whole buckets inside the range from the
    table, the partial buckets at its edges (a range that starts or ends mid-bucket) from the per-step rows.
    None when the tables cannot answer: a bucket that is no stored resolution, or a selection of ranks."""
    b = _bucket_of(step_bucket)
    if b not in BUCKET_RESOLUTIONS or sel.ranks is not None or sel.needs_sequences:
        return None
    if sel.steps is None:
        return [(True, None, None)]
    lo, hi = int(sel.steps[0]), int(sel.steps[1])
    a, z = -(-lo // b) * b, (hi + 1) // b * b - 1
    if a > z:
        return [(False, lo, hi)]
    return ([(False, lo, a - 1)] if lo < a else []) + [(True, a, z)] + ([(False, z + 1, hi)] if z < hi else [])


_EXPERT_COLUMNS = ("run_id", "step", "layer", "expert", "tokens", "assigned", "first_choice", "prob_sum")


def _computed_buckets_sql(table: str, rows: str, b: int) -> tuple[str, int]:
    """SELECT of `table`'s rows (layer_buckets or pooled_buckets, resolution b) computed from `rows` (a FROM item
    of per-step or rolled-up per-expert rows) with compaction's own SQL, and how many times `rows` appears in it
    (its params repeat that often)."""
    sums = f"({expert_sums_sql(rows, b)})"
    if table == "pooled_buckets":
        return pooled_bucket_sql(sums, b), 1
    return layer_bucket_sql(sums, b, f"({_bucket_shape_sql(rows)})"), 2  # the rows: in the sums and the shape


def _unstored_runs_sql(con, table: str, sel: Selection, b: int, a: int | None, z: int | None) -> tuple[str, list]:
    """`table`'s rows of resolution b for steps a..z (whole buckets) of the selected runs that do not store that
    resolution, computed from the rows (the step roll-ups where exact). Why: compaction builds a resolution above
    1,000 steps only up to the run's last step + 1, so a 5,000-step bucket of a 3,000-step run is in no table,
    and the Compare page asks both runs of different lengths for one bucket."""
    rows, params = step_rows_sql(con, "step_stats", sel.with_(steps=None if a is None else (a, z)),
                                 _EXPERT_COLUMNS, step_bucket=b, by_step=True)
    rows = f"(SELECT * FROM {rows} x WHERE run_id NOT IN (SELECT run_id FROM {table} WHERE resolution = {int(b)}))"
    sql, times = _computed_buckets_sql(table, rows, b)
    return sql, params * times


def _buckets_sql(con, table: str, sel: Selection, step_bucket: int | None) -> tuple[str, list] | None:
    """A FROM item and params: `table`'s rows (one per bucket of `step_bucket` steps [and layer]) of the
    selection: the table's for whole buckets, computed with the same SQL for the partial buckets at the edges of
    the step range and for runs too short to store the resolution. None where the tables cannot answer (see
    `bucket_pieces`, and a store without them: the caller reads step_stats)."""
    parts = bucket_pieces(sel, step_bucket)
    if parts is None or not buckets_available(con):
        return None
    b = _bucket_of(step_bucket)
    rest, rest_params = sel.with_(steps=None, domains=None, tags=None).where()
    sql, params = [], []
    for from_table, a, z in parts:
        clauses, p = [rest], list(rest_params)
        if a is not None:
            clauses += ["step >= ?", "step <= ?"]
            p += [a, z]
        where = " AND ".join(clauses)
        if from_table:
            sql.append(f"SELECT * FROM {table} WHERE resolution = {b} AND {where}")
            params += p
            if not stored_for_every_run(b):
                more, more_params = _unstored_runs_sql(con, table, sel, b, a, z)
                sql.append(more)
                params += more_params
        else:
            more, times = _computed_buckets_sql(table, f"(SELECT * FROM step_stats WHERE {where})", b)
            sql.append(more)
            params += p * times
    return "(" + " UNION ALL BY NAME ".join(sql) + ")", params


def layer_buckets_sql(con, sel: Selection, step_bucket: int | None) -> tuple[str, list] | None:
    """A FROM item and params: layer_buckets rows (one per bucket of `step_bucket` steps and layer) of the
    selection (see `_buckets_sql`)."""
    return _buckets_sql(con, "layer_buckets", sel, step_bucket)


def pooled_buckets_sql(con, sel: Selection, step_bucket: int | None) -> tuple[str, list] | None:
    """Like `layer_buckets_sql` for pooled_buckets (every layer pooled): None also when the selection picks
    layers, since the stored numerator pools them all."""
    if sel.layers is not None:
        return None
    return _buckets_sql(con, "pooled_buckets", sel, step_bucket)
