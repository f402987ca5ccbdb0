"""The probability capacity policy per assignment without ranking every route: weight_hist's cut-off bins, then
one pass over the routes.

Under the probability policy (Megatron's "probs": highest gate weights kept, ties broken by slot, seq, pos) an
expert that received n > C assignments in a step drops its n - C lowest-priority ones. Which ones, and so the
dropped gate weight and the drops by domain, sequence, position or slot, used to need each route's rank within
its expert: a window over every route (a sort: > 60 s over 100 M routes on 2 cores).

Reduction (exact). Bin each route by b = weight_q >> 8 (`weight_hist`, built at compaction, stores per bin the
routes of the same step and expert in higher bins: `above`). The priority order sorts by weight first, so every
route of a higher bin outranks every route of a lower one, and with capacity C the kept routes are:
- every route of the bins with above + assigned <= C;
- none of the bins with above >= C;
- in the one bin with above < C < above + assigned (the cut bin, where the cut falls inside a bin), the first
  keep = C - above routes in priority order.
So only the cut bins' routes (~1/100 of an expert's routes) are ordered. An expert with few routes in a step
(at most layout.WEIGHT_HIST_MERGE_MAX: sampled tokens over many experts) has one merged row instead of its bins
(bin -1, above 0, schema version 5): it is read as one bin holding every route of the expert, so when n > C the cut
falls in it and the pass orders all its routes (at most 64, except where new routes of an already compacted step
met a merged piece: the whole group is then merged, whatever its size), and when n <= C all are kept. In the pass
a route's bin is `bin * binned` (`binned` 0 for a merged expert): every route of a merged expert falls in its
bin 0. The cut bins are a filter over
weight_hist (no window: `above` is stored); one pass over the routes joined to their expert's cut bin classifies
every route: dropped below its expert's cut bin, kept above it, ordered within it.

The join. Every expert of the selection (step, rank, layer, expert, and run) gets one dense integer key, and the
pass joins each route to its expert on that key alone: DuckDB then builds a perfect hash join (an array lookup)
where a hash join on the four columns probed ~2x slower; the bin comparisons are written so that they stay out of
the join condition. With more than ~1-2 M experts in a selection (DuckDB's limit) it falls back to a hash join.

Where the pass runs. The locked-down store connection (store_reader.open_store) scans compacted routes through
pyarrow, ~2x slower than DuckDB's own Parquet reader, and DuckDB cannot estimate that scan's size (it assumes
1 row, duckdb/duckdb#25631), so a join builds its hash table on the 100 M routes. The pass therefore runs in a
private in-memory connection that reads the compacted Parquet files the store's run.duckdb names; the small
inputs (cut bins, sequence or position counts, labels) are computed on the store connection and handed over as
Arrow tables. No SQL typed by a user reaches that connection. Stores without such files (moeviz.testing, or
routes kept inside run.duckdb) stream their routes from the store connection instead.

Three shapes of the pass, fastest first (docs/benchmarks.md has the figures):
- breakdowns by layer/expert/step/rank with `with_weight`: counts and weights from weight_hist; the pass keeps
  only the cut bins' weights (which of two equal weights is dropped does not change a sum);
- breakdowns whose counts a compaction table holds (by sequence, domain or tag from sequence_stats; by position
  over whole runs from position_stats), without weights: the pass keeps only the routes at or below a cut bin,
  and by sequence it does not read positions (routes of one sequence with equal weight and slot drop in position
  order, which no per-sequence count can tell apart);
- anything else (by slot, by position over a step range, weights by sequence): the pass counts every route.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from moeviz.store import duckdb_compat
from moeviz.store import layout
from moeviz.selection import Selection

GROUP_KEYS = ("step", "rank", "layer", "expert")
_LABEL_KEYS = ("step", "rank", "seq")
_ROUTE_DIMS = ("layer", "expert", "step", "rank", "seq", "pos", "slot")
_SEQ_LEVEL = {"run_id", "step", "rank", "seq", "layer", "expert"}  # sequence_stats' keys
_POSITION_LEVEL = {"run_id", "rank", "layer", "pos", "expert"}  # position_stats' keys (summed over steps)


def covers(con, sel: Selection) -> bool:
    """Whether weight_hist holds every route of the selected runs: each is compacted with no live routes
    (`runs.route_stats_complete`) and its run.duckdb has the table (an older one lacks it until `moeviz compact`)."""
    from moeviz.store.reader import column_names, table_names

    if not {"weight_hist", "sequence_stats"} <= table_names(con) or \
            "route_stats_complete" not in column_names(con, "runs"):
        return False
    where, params = Selection(run_ids=sel.run_ids).where("ru")
    runs = con.execute(f"SELECT run_id, route_stats_complete FROM runs ru WHERE {where}", params).fetchall()
    if not runs or not all(c for _, c in runs):
        return False
    have = {r[0] for r in con.execute("SELECT run_id FROM weight_hist GROUP BY run_id").fetchall()}
    return all(r in have for r, _ in runs)


def compacted_routes_files(con) -> dict[str, list[str]] | None:
    """The compacted routes Parquet files of each run attached to a store connection, by run_id, or None when a
    run keeps routes elsewhere (inside run.duckdb, or a connection that is not a store's): those are streamed."""
    from moeviz.store.reader import table_names

    if "_disk_routes" not in table_names(con):
        return None
    files = {}
    for name, path in con.execute("SELECT database_name, path FROM duckdb_databases() "
                                  "WHERE regexp_matches(database_name, '^run[0-9]+$')").fetchall():
        if con.execute(f"SELECT count(*) FROM {name}.main.routes").fetchone()[0]:
            return None
        for (run_id,) in con.execute(f"SELECT DISTINCT run_id FROM {name}.main.runs").fetchall():
            files[run_id] = [str(Path(path).parent / f) for (f,) in
                             con.execute(f"SELECT file FROM {name}.main._routes_files ORDER BY file").fetchall()]
    return files


def drops(con, sel: Selection, by: tuple[str, ...], with_weight: bool, shape: tuple[str, list], cap_sql: str,
          cap_param: float, labels: bool, aggregate: str) -> pd.DataFrame:
    """`aggregate` (a SELECT over `flagged`) run over the rows `flagged`: run_id, every name of `by` (domain and
    tag when `labels`), n (assignments), n_dropped, weight and dropped_weight (gate weight units), covering the
    selection, with its domain/tag filters applied after the ranking (at group='step' other domains compete for
    the same slots). Several rows of `flagged` may share a key: the aggregate sums them.

    `cap_sql` computes C from `g.group_tokens`, `sh.top_k` and `sh.n_experts` (capacity.py's formula) with one
    `?` bound to `cap_param`; `shape` is capacity.py's per-layer (run_id, layer, n_experts, top_k) query."""
    one_run, many_ranks, only_run = con.execute(
        "SELECT count(DISTINCT run_id) = 1, count(DISTINCT rank) > 1, any_value(run_id) FROM weight_hist").fetchone()
    hsel = sel.with_(domains=None, tags=None)
    experts_sql, eparams = _experts_sql(hsel, shape, cap_sql)
    experts = duckdb_compat.arrow_table(con.execute(experts_sql, eparams[:len(shape[1])] + [cap_param]
                                                    + eparams[len(shape[1]):]))
    inputs = {"experts": experts}
    # the run_id predicate decodes a string per route; with one run in the store it selects all of them or none
    rsel = hsel.with_(run_ids=None) if one_run and (sel.run_ids is None or only_run in sel.run_ids) else hsel
    rwhere, rparams = rsel.where("r")
    group_level = set(by) <= set(GROUP_KEYS) and not sel.needs_sequences
    keys = list(dict.fromkeys(([] if one_run else ["run_id"]) + [d for d in by if d in _ROUTE_DIMS]
                              + (list(_LABEL_KEYS) if labels else [])))
    # n per key from a compaction table where one holds it (weights are in no table finer than weight_hist)
    counted_in = None if group_level or with_weight else \
        "sequence_stats" if set(keys) <= _SEQ_LEVEL else \
        "position_stats" if set(keys) <= _POSITION_LEVEL and sel.steps is None else None  # whole runs only
    if counted_in:
        qwhere, qparams = hsel.where("q")
        inputs["totals"] = duckdb_compat.arrow_table(con.execute(
            f"SELECT {', '.join('q.' + k for k in keys)}, sum(q.assigned) AS n, 0 AS w FROM {counted_in} q "
            f"WHERE {qwhere} GROUP BY ALL", qparams))
    if labels:
        inputs["labels"] = duckdb_compat.arrow_table(con.execute(
            "SELECT run_id, step, rank, seq, domain, tag FROM sequences"))
    files = compacted_routes_files(con)
    work = duckdb_compat.connect()
    try:
        for name, table in inputs.items():
            work.register(name, table)
        runs = [r for (r,) in work.execute("SELECT DISTINCT run_id FROM experts ORDER BY run_id").fetchall()]
        dims = _key_dims(work, runs, many_ranks)
        # every expert of the selection under one dense integer key: the pass joins each route to its expert on
        # that key alone, which DuckDB answers with a perfect hash join (an array lookup, ~2x faster than a hash
        # join on (step, layer, expert) over 100 M routes; a second condition in the join would turn it off)
        work.execute(f"""
            CREATE TABLE cut AS SELECT *, {_key_sql('x', dims)} AS k,
                   CASE WHEN partial THEN cut_bin ELSE -1 END AS edge_bin,  -- the bin whose routes are ordered
                   CASE WHEN nd > 0 OR partial THEN cut_bin ELSE -1 END AS reach  -- no route above drops
            FROM (SELECT *, list_position(?, run_id) - 1 AS run_idx FROM experts) x""", [runs])
        if files:
            # not hive_partitioning: the files sit in rank=<r>/ folders, and a `rank` taken from the path (BIGINT)
            # next to the file's statistics (INTEGER) breaks DuckDB's perfect-hash aggregates
            src = "(" + " UNION ALL ".join(
                f"SELECT * REPLACE ({duckdb_compat.sql_string(run)} AS run_id), {i} AS run_idx "
                f"FROM read_parquet({_sql_list(files[run])}, hive_partitioning = false)"
                for i, run in enumerate(runs) if run in files) + ")"
        else:  # stream: the pass scans it once
            src = "routes_stream"
            work.register(src, duckdb_compat.arrow_reader(con.execute(
                f"SELECT *, CAST(round(weight * {layout.WEIGHT_SCALE}) AS INTEGER) AS weight_q, "
                f"list_position(?, r.run_id) - 1 AS run_idx FROM routes r WHERE {rwhere}", [runs] + rparams)))
        join = f"{src} r JOIN cut u ON u.k = {_key_sql('r', dims)}"
        if group_level:
            sql = _group_level_sql(by, join, rwhere)
        else:
            sql = _below_expert_sql(by, keys, join, rwhere, "totals" if counted_in else None, labels, one_run)
        post, pparams = ("TRUE", []) if not sel.needs_sequences else \
            Selection(domains=sel.domains, tags=sel.tags).where("x", per_token=True, seq_alias="x")
        run_param = [only_run] if one_run and not group_level else []
        return work.execute(f"WITH flagged AS (SELECT * FROM ({sql}) x WHERE {post}) {aggregate}",
                            rparams + run_param + pparams).df()
    finally:
        work.close()


def _key_dims(work, runs: list[str], many_ranks: bool) -> list[tuple[str, int, int]]:
    """(column, lowest value, span) of each part of the experts' key, outermost first; a part with one value
    (one run, one rank) is left out. The span is the part's range in `experts`: every selected route falls in it
    (weight_hist holds every route of the selection), so no two experts share a key."""
    lo_step, hi_step, lo_layer, hi_layer, lo_expert, hi_expert, lo_rank, hi_rank = work.execute(
        "SELECT min(step), max(step), min(layer), max(layer), min(expert), max(expert), min(rank), max(rank) "
        "FROM experts").fetchone()
    dims = [("run_idx", 0, len(runs)), ("step", lo_step, hi_step - lo_step + 1)]
    if many_ranks:
        dims.append(("rank", lo_rank, hi_rank - lo_rank + 1))
    dims += [("layer", lo_layer, hi_layer - lo_layer + 1), ("expert", lo_expert, hi_expert - lo_expert + 1)]
    return [d for d in dims if d[2] > 1]


def _key_sql(alias: str, dims: list[tuple[str, int, int]]) -> str:
    """The mixed-radix key ((a - a0) * span_b + (b - b0)) * span_c + ... as a BIGINT expression."""
    sql = "CAST(0 AS BIGINT)"
    for column, lo, span in dims:
        sql = f"({sql} * {span} + ({alias}.{column} - {lo}))"
    return sql


def _sql_list(files: list[str]) -> str:
    return "[" + ", ".join(duckdb_compat.sql_string(f) for f in files) + "]"


def _experts_sql(hsel: Selection, shape: tuple[str, list], cap_sql: str) -> tuple[str, list]:
    """SQL (store connection): one row per step, rank, layer and expert of the selection with n and w (its
    routes and their summed weight_q), nd and wd (those in bins wholly past the capacity: dropped), and the cut:
    routes below cut_bin are dropped and `keep` routes of cut_bin are kept (`partial`: some of cut_bin are
    dropped). An expert with capacity 0 gets cut_bin 256, keep 0: all dropped. A merged expert (one row, bin -1:
    see the module docstring) gets binned 0 and its cut in bin 0, where the pass puts all its routes."""
    hwhere, hparams = hsel.where("h")
    qwhere, qparams = hsel.where("q")
    shape_sql, shape_params = shape
    sql = f"""
        WITH sh AS ({shape_sql}),
        caps AS (
            SELECT g.*, {cap_sql} AS cap FROM (
                SELECT run_id, step, rank, layer, sum(first_choice) AS group_tokens FROM sequence_stats q
                WHERE {qwhere} GROUP BY ALL) g
            JOIN sh ON sh.run_id = g.run_id AND sh.layer = g.layer)
        SELECT h.run_id, h.step, h.rank, h.layer, h.expert, sum(h.assigned) AS n, sum(h.weight_q_sum) AS w,
               coalesce(sum(h.assigned) FILTER (WHERE h.above >= c.cap), 0) AS nd,
               coalesce(sum(h.weight_q_sum) FILTER (WHERE h.above >= c.cap), 0) AS wd,
               -- the lowest bin not wholly dropped has the largest `above` (and above + assigned) among them
               greatest(coalesce(min(h.bin) FILTER (WHERE h.above < c.cap), 256), 0) AS cut_bin,
               CAST(min(h.bin) >= 0 AS INTEGER) AS binned,  -- 0: a merged row, its routes in one bin
               any_value(c.cap) - coalesce(max(h.above) FILTER (WHERE h.above < c.cap), any_value(c.cap)) AS keep,
               coalesce(max(h.above + h.assigned) FILTER (WHERE h.above < c.cap), 0) > any_value(c.cap) AS partial
        FROM weight_hist h JOIN caps c ON c.run_id = h.run_id AND c.step = h.step AND c.rank = h.rank
                                      AND c.layer = h.layer
        WHERE {hwhere} GROUP BY h.run_id, h.step, h.rank, h.layer, h.expert"""
    return sql, shape_params + qparams + hparams


# a route's bin in its expert's weight_hist: every route of a merged expert (binned = 0) in bin 0
_BIN = f"((r.weight_q >> {layout.WEIGHT_BIN_SHIFT}) * u.binned)"
_SCALE = float(layout.WEIGHT_SCALE)
# a route's bin against a column of its expert, written as a difference: a comparison of the two sides would
# become a second join condition (and a perfect hash join needs one); as a difference it filters the join's output
_IN_EDGE = f"{_BIN} - u.edge_bin = 0"


def _group_level_sql(by: tuple[str, ...], join: str, rwhere: str) -> str:
    """Per step and expert from `cut` (weight_hist), plus the cut bins' lowest weights from one pass."""
    return f"""
        WITH edge AS (
            SELECT u.k, r.weight_q, count(*) AS c FROM {join}
            WHERE {rwhere} AND {_IN_EDGE} GROUP BY ALL),
        edge_dropped AS (  -- lowest weights first out
            SELECT e.k, sum(greatest(0, least(e.c, e.before + e.c - cut.keep))) AS nd,
                   sum(greatest(0, least(e.c, e.before + e.c - cut.keep)) * e.weight_q) AS wd
            FROM (SELECT *, coalesce(sum(c) OVER (PARTITION BY k ORDER BY weight_q DESC
                                                  ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
                  FROM edge) e
            JOIN cut ON cut.k = e.k
            GROUP BY ALL)
        SELECT p.run_id{''.join(', p.' + d for d in by)},
               p.n, p.nd + coalesce(ed.nd, 0) AS n_dropped, p.w / {_SCALE} AS weight,
               (p.wd + coalesce(ed.wd, 0)) / {_SCALE} AS dropped_weight
        FROM cut p LEFT JOIN edge_dropped ed ON ed.k = p.k"""


def _below_expert_sql(by: tuple[str, ...], keys: list[str], join: str, rwhere: str, totals: str | None,
                      labels: bool, one_run: bool) -> str:
    """Per `keys` from one pass over the routes: with n and w per key from `totals` (a relation of keys, n, w),
    the pass keeps only the routes at or below their expert's cut bin, else it counts every route. The cut bins'
    routes travel as lists and are ordered after."""
    pos_free = set(keys) <= _SEQ_LEVEL  # routes of one sequence with equal weight and slot: no key tells them apart
    # a cut-bin route's expert (its key) and order, less what the row's keys already hold
    fields = ["weight_q", "slot", "seq"] + ([] if pos_free else ["pos"])
    edge_struct = ", ".join(["'e_k': u.k"] + [f"'e_{f}': r.{f}" for f in fields if f not in keys])

    def col(f: str) -> str:
        return f if f in keys else f"e_{f}"

    order = ", ".join([f"e.{col('weight_q')} DESC"] + [f"e.{col(f)}" for f in fields[1:]])
    kcols = ", ".join(f"r.{k}" for k in keys)
    usekeys = ", ".join(keys)
    by_cols = "".join(", x." + d for d in by if d in _ROUTE_DIMS)
    # each route classified once (below its cut bin: dropped; in it: ordered after), then counted per key
    classified = f"""SELECT {kcols}, r.weight_q, {_BIN} < u.cut_bin AS below, {_BIN} = u.edge_bin AS edge,
                       {{{edge_struct}}} AS es
                FROM {join} WHERE {rwhere}"""
    dropped = "count(*) FILTER (WHERE below) AS nd, coalesce(sum(weight_q) FILTER (WHERE below), 0) AS wd, " \
              "list(es) FILTER (WHERE edge) AS edges"
    if totals is not None:  # the routes above their expert's reach (most of them) leave after the join (as _IN_EDGE)
        pass_sql = f"SELECT {usekeys}, {dropped} FROM ({classified} AND {_BIN} - u.reach <= 0) GROUP BY ALL"
        base, counted = f"{totals} t LEFT JOIN p USING ({usekeys})", "t.n, t.w"
    else:  # every route counted
        pass_sql = f"SELECT {usekeys}, count(*) AS n, sum(weight_q) AS w, {dropped} FROM ({classified}) GROUP BY ALL"
        base, counted = "p", "p.n, p.w"
    label_join = ("LEFT JOIN labels q ON " + ("" if one_run else "q.run_id = x.run_id AND ")
                  + "q.step = x.step AND q.rank = x.rank AND q.seq = x.seq") if labels else ""
    return f"""
        WITH p AS ({pass_sql}),
        e AS (SELECT {usekeys}, unnest(edges, recursive := true) FROM p WHERE len(edges) > 0),
        edge_dropped AS (  -- the cut bin's routes in priority order: weight, slot, seq, pos
            SELECT {usekeys}, count(*) AS nd, sum({col('weight_q')}) AS wd FROM (
                SELECT e.*, cut.keep, row_number() OVER (PARTITION BY e.e_k ORDER BY {order}) AS place
                FROM e JOIN cut ON cut.k = e.e_k)
            WHERE place > keep GROUP BY ALL),
        x AS (
            SELECT {usekeys}, {counted}, coalesce(p.nd, 0) + coalesce(ed.nd, 0) AS nd,
                   coalesce(p.wd, 0) + coalesce(ed.wd, 0) AS wd
            FROM {base} LEFT JOIN edge_dropped ed USING ({usekeys}))
        SELECT {'CAST(? AS VARCHAR) AS run_id' if one_run else 'x.run_id'}{by_cols}
               {', q.domain, q.tag' if labels else ''},
               x.n, x.nd AS n_dropped, x.w / {_SCALE} AS weight, x.wd / {_SCALE} AS dropped_weight
        FROM x {label_join}"""
