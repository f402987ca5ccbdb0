"""Step roll-ups: `step_stats` and `layer_stats` summed over ranks and over blocks of 10, 100 and 1,000 steps.

Why: a curve over 100,000 steps is drawn in buckets of ~100 steps (moeviz.analyses.step_buckets), and a total over
a whole run needs no per-step detail, yet both scanned every per-step row (at 100,000 steps x 8 layers x 8
experts: 6.4 M step_stats rows; 58 x 256 experts x 64 ranks: 950 K rows per step). The roll-ups hold the same
sums per block of steps, so a query whose buckets are whole blocks reads 10-1,000 times fewer rows and gets the
same numbers (sums of integers are exact; float sums differ only in the order of additions).

Where they come from: compaction builds them into run.duckdb (`fold` below: the old blocks plus the new segments'
blocks, summed again, so a block that spans two compactions is one row), and the reader's `step_rollups` /
`layer_rollups` views add the segments not yet compacted (a live run) rolled up on the fly, so the views always
sum every row of the run. This module holds the SQL of both; it knows no analysis.
"""

from __future__ import annotations

from moeviz.store import layout

RESOLUTIONS = (10, 100, 1000)  # steps per block; a bucket of b steps reads the largest that divides b

# roll-up table -> (source table, key columns besides run_id and step, summed columns)
SPEC: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "step_rollups": ("step_stats", ("layer", "expert"), ("tokens", "assigned", "first_choice", "prob_sum", "dropped")),
    "layer_rollups": ("layer_stats", ("layer",), ("tokens", "z_loss_sum", "entropy_sum", "dropped",
                                                  "nonfinite_tokens")),
}


def known_sum(expr: str) -> str:
    """SQL: sum(expr) over a group, NULL when any row's expr is NULL. Why: sum() skips NULLs, so a step where one
    rank's tokens (or first_choice, prob_sum) are unknown would get the other ranks' part as if it were the whole;
    unknown is NULL, never a partial number."""
    return f"CASE WHEN count(*) = count({expr}) THEN sum({expr}) END"


def block_start(expr: str, r: int) -> str:
    """SQL: the first step of the r-step block holding step `expr`, rounded down (floor), also for negative steps.
    Why not `(step // r) * r`: DuckDB's integer division rounds toward zero, which put steps -99..-1 into the
    block of 0..99, while the readers (moeviz.analyses.step_rows.pieces) and `build_buckets` split ranges at
    floor boundaries: a range from 0 read the negative steps' drops, and a re-compaction from step 0 deleted them."""
    r = int(r)
    return f"({expr} - ((({expr}) % {r}) + {r}) % {r})"


def _typed(table: str) -> str:
    """The roll-up's columns cast to their on-disk types (sum() of BIGINT is HUGEINT in DuckDB)."""
    return ", ".join(f'CAST("{f.name}" AS {layout.duckdb_type(f.type)}) AS "{f.name}"'
                     for f in layout.DISK_SCHEMAS[table])


def _level_sql(table: str, source: str, r: int, where: str = "TRUE") -> str:
    """SELECT of `table`'s rows at resolution r from `source` (the source table's rows, or the roll-up's rows of a
    finer resolution: both have the keys and the summed columns), limited to `where`."""
    _, keys, sums = SPEC[table]
    k = ", ".join(keys)
    summed = ", ".join(f"{known_sum(c)} AS {c}" for c in sums)
    return (f"SELECT run_id, {r} AS resolution, {block_start('step', r)} AS step, {k}, {summed} "
            f"FROM {source} x WHERE {where} GROUP BY run_id, {block_start('step', r)}, {k}")


def rollup_sql(table: str, source: str) -> str:
    """SELECT of `table`'s rows (every resolution) from `source`, a FROM item with the source table's columns.

    Each resolution is summed from the one below it (10 from the steps, 100 from the 10-step blocks, ...): one
    pass over the per-step rows, not one per resolution (at 1,000 steps x 58 x 256 experts a cross join with the
    resolutions aggregated 3 x 14.8 M rows). For rows summed on the fly (the reader's live segments); compaction
    builds its tables with `build_rollups`, a chunk of steps at a time."""
    levels = []
    below = source
    for r in RESOLUTIONS:
        levels.append(f"r{r} AS ({_level_sql(table, below, r)})")
        below = f"r{r}"
    union = " UNION ALL ".join(f"SELECT * FROM r{r}" for r in RESOLUTIONS)
    return f"""
        SELECT {_typed(table)} FROM (
            WITH {", ".join(levels)}
            {union})"""


def fold(con, new_segments: dict[str, list], rebuild: set[str]) -> None:
    """Bring the roll-ups of the run.duckdb being built (`con`, whose main tables already hold the old rows and
    the new segments) up to date: tables in `rebuild` (the old run.duckdb lacks them) from every row of their
    source table; the others from the first step of the new segments on (`build_rollups`)."""
    for table, (source, _, _) in SPEC.items():
        if table in rebuild:
            build_rollups(con, table, None)
            continue
        paths = [str(p) for p in new_segments.get(source, [])]
        if paths:
            since = con.execute("SELECT min(step) FROM read_parquet(?)", [paths]).fetchone()[0]
            if since is not None:
                build_rollups(con, table, int(since))


def build_rollups(con, table: str, since_step: int | None) -> None:
    """(Re)build `table`'s blocks from `since_step` on (None: every block) from the source rows in `con`'s main
    schema, one resolution after the other (each from the one below it), a chunk of whole blocks at a time.

    Why chunks: summed in one GROUP BY, the 10-step blocks of a 100,000-step run of 58 x 256 experts are 148 M
    groups of 1.5 B rows, past compaction's memory limit: DuckDB spilled ~28 GB beside the run. A chunk holds
    about _CHUNK_ROWS source rows (or one block), so memory stays bounded whatever the run's length; and a
    compaction that adds steps re-sums only the blocks from the 1,000-step block of its first new step on
    (recomputed from every row, never merged: a block that spans two compactions is one row)."""
    source = SPEC[table][0]
    first = con.execute(f'SELECT min(step) FROM main."{source}"').fetchone()[0]
    if first is None:
        return
    start = max(int(first), int(since_step)) if since_step is not None else int(first)
    start = start // RESOLUTIONS[-1] * RESOLUTIONS[-1]  # floor (Python's //): the first step of a block of each r
    con.execute(f'DELETE FROM main."{table}" WHERE step >= ?', [start])
    below, where = f'main."{source}"', "TRUE"
    for r in RESOLUTIONS:
        for lo, hi in _chunks(con, below, where, start, r):
            con.execute(f'INSERT INTO main."{table}" SELECT {_typed(table)} FROM ('
                        f'{_level_sql(table, below, r, f"{where} AND step >= {lo} AND step < {hi}")})')
        below, where = f'main."{table}"', f"resolution = {r}"


def _chunks(con, source: str, where: str, start: int, r: int) -> list[tuple[int, int]]:
    """[lo, hi) step ranges over `source`'s rows (`where`, steps from `start`, a multiple of r): the r-step blocks
    that hold rows, in order, packed while they hold at most _CHUNK_ROWS rows together (a larger block alone);
    steps without rows between them cost nothing (sparse steps: 0 and 2**40 in one run)."""
    blocks = con.execute(f"SELECT {block_start('step', r)} AS b, count(*) FROM {source} "
                         f"WHERE {where} AND step >= ? GROUP BY b ORDER BY b", [start]).fetchall()
    chunks: list[tuple[int, int]] = []
    rows = 0
    for b, n in blocks:
        b, n = int(b), int(n)
        if chunks and rows + n <= _CHUNK_ROWS:
            chunks[-1] = (chunks[-1][0], b + r)
            rows += n
        else:
            chunks.append((b, b + r))
            rows = n
    return chunks


# ---- buckets: per (block, layer) statistics of the per-expert load that sums over blocks cannot give ----------

# steps per block of layer_buckets / pooled_buckets: every bucket analyses.step_buckets.step_bucket_for picks
BUCKET_RESOLUTIONS = tuple(m * 10 ** p for p in range(7) for m in (1, 2, 5))
DROP_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)  # step_drops' capacity factors (drop_curve's defaults)
DEAD_THRESHOLD = 0.1  # layer_buckets.dead_experts: share below this x the uniform share (imbalance's default)
_CHUNK_STEPS = 1000  # blocks up to this many steps are built a chunk of steps at a time (bounded memory)
_CHUNK_ROWS = 20_000_000  # step_stats rows per chunk, about (~1 GB of per-expert sums in DuckDB)


def _parent(r: int) -> int:
    """The largest resolution below r that divides it (1 for the smallest): r's blocks are sums of its blocks."""
    return max((p for p in BUCKET_RESOLUTIONS if p < r and r % p == 0), default=1)


def stored_for_every_run(r: int) -> bool:
    """Whether every compacted run stores blocks of r steps: those up to _CHUNK_STEPS always; larger ones only up
    to the run's last step + 1 (`build_buckets`), so a reader computes them for shorter runs."""
    return int(r) <= _CHUNK_STEPS


def shape_sql(table: str) -> str:
    """Experts and k per (run, layer) of `table`'s rows: `layers`, else `runs` (a writer that wrote no layers).
    The metadata tables of run.duckdb hold one row per writing rank: deduplicated here."""
    return f"""
        SELECT d.run_id, d.layer, coalesce(l.n_experts, ru.n_experts) AS n_experts,
               coalesce(l.top_k, ru.top_k) AS top_k
        FROM (SELECT DISTINCT run_id, layer FROM {table}) d
        LEFT JOIN (SELECT run_id, layer, any_value(n_experts) AS n_experts, any_value(top_k) AS top_k
                   FROM layers GROUP BY ALL) l ON l.run_id = d.run_id AND l.layer = d.layer
        LEFT JOIN (SELECT run_id, any_value(n_experts) AS n_experts, any_value(top_k) AS top_k
                   FROM runs GROUP BY ALL) ru ON ru.run_id = d.run_id"""


def expert_sums_sql(source: str, r: int, where: str = "TRUE") -> str:
    """Per (run, block of r steps, layer, expert) sums of `source` (rows with run_id, step, layer, expert,
    tokens, assigned, first_choice, prob_sum; any number of ranks and rows per step): the block's load."""
    step = "step" if r == 1 else block_start("step", r)
    return f"""
        SELECT run_id, CAST({step} AS BIGINT) AS step, layer, expert, CAST({known_sum("tokens")} AS BIGINT) AS tokens,
               CAST(sum(assigned) AS BIGINT) AS assigned, CAST({known_sum("first_choice")} AS BIGINT) AS first_choice,
               {known_sum("prob_sum")} AS prob_sum
        FROM {source} WHERE {where} GROUP BY ALL"""


def layer_bucket_sql(sums: str, r: int, shape: str) -> str:
    """SELECT of layer_buckets rows (resolution r) from `sums` (a FROM item of per-block per-expert sums, as
    `expert_sums_sql`) and `shape` (a FROM item: run_id, layer, n_experts, top_k). The same SQL builds the table
    at compaction and, at query time, the partial buckets at the edges of a step range."""
    return f"""
        SELECT run_id, CAST({int(r)} AS INTEGER) AS resolution, step, CAST(layer AS SMALLINT) AS layer,
               CAST(n_experts AS INTEGER) AS n_experts, CAST(top_k AS INTEGER) AS top_k,
               CAST(len(ns) AS INTEGER) AS experts_seen, CAST(tokens AS BIGINT) AS tokens,
               CAST(total AS BIGINT) AS assigned, CAST(first_choice AS BIGINT) AS first_choice,
               CAST(list_max(ns) AS BIGINT) AS assigned_max,
               list_sum(list_transform(ns, x -> CAST(x AS DOUBLE) * x)) AS assigned_sq,
               list_sum(list_transform(ns, x -> CASE WHEN x > 0 THEN x * ln(x) ELSE 0 END)) AS assigned_xlogx,
               CAST(coalesce(list_sum(list_slice(list_reverse_sort(ns), 1, top_k)), 0) AS BIGINT) AS topk_sum,
               CAST(CASE WHEN total > 0 THEN n_experts - len(ns)
                         + len(list_filter(ns, x -> x / total < {DEAD_THRESHOLD!r} / n_experts)) ELSE 0 END
                    AS INTEGER) AS dead_experts,
               prob_dot
        FROM (
            SELECT e.run_id, e.step, e.layer, any_value(sh.n_experts) AS n_experts, any_value(sh.top_k) AS top_k,
                   max(e.tokens) AS tokens, sum(e.assigned) AS total, {known_sum("e.first_choice")} AS first_choice,
                   list(e.assigned) AS ns, {known_sum("e.assigned * e.prob_sum")} AS prob_dot
            FROM {sums} e JOIN {shape} sh ON sh.run_id = e.run_id AND sh.layer = e.layer
            GROUP BY e.run_id, e.step, e.layer)"""


def pooled_bucket_sql(sums: str, r: int) -> str:
    """SELECT of pooled_buckets rows (resolution r) from per-block per-expert sums over every layer."""
    return f"""
        SELECT run_id, CAST({int(r)} AS INTEGER) AS resolution, step, {known_sum("a * p")} AS prob_dot
        FROM (SELECT run_id, step, expert, sum(assigned) AS a, {known_sum("prob_sum")} AS p FROM {sums} GROUP BY ALL)
        GROUP BY run_id, step"""


def capacity(factor: str, tokens: str, k: str, e: str) -> str:
    """SQL of C = ceil(CF * tokens * k / E) (rounded to 9 decimals first so that 1.25 * 64 * 2 / 8 stays 20): the
    one definition, which moeviz.analyses.capacity uses too, so that step_drops equals capacity_drops."""
    return f"CAST(ceil(round(CAST({factor} AS DOUBLE) * {tokens} * {k} / {e}, 9)) AS BIGINT)"


def row_drops(factor: str) -> str:
    """SQL: one step_stats row `s`'s drops max(0, n - C) at capacity factor `factor` (SQL: a literal or `?`) with
    its own tokens and its layer's shape `sh` (one rank's group, as capacity_drops(group='step') reads a row);
    NULL where its tokens are unknown (DuckDB's greatest/least skip a NULL C, which would count every assignment
    as dropped). The one definition: step_drops, expert_drops and capacity_drops' edge steps use it."""
    return (f"CASE WHEN s.tokens IS NOT NULL THEN greatest(0, least(s.assigned, s.assigned - "
            f"{capacity(factor, 's.tokens', 'sh.top_k', 'sh.n_experts')})) END")


def _drop_exprs() -> list[str]:
    """Per DROP_FACTORS, SQL summing a group of step_stats rows' drops; NULL when any row's tokens are unknown."""
    return [f"CAST({known_sum(row_drops(repr(float(f))))} AS BIGINT)" for f in DROP_FACTORS]


EXPERT_DROP_RESOLUTIONS = (100, 1000)  # expert_drops' blocks; both divide _CHUNK_STEPS, so a chunk holds whole blocks


def drop_sums_sql(source: str, shape: str, where: str = "TRUE") -> str:
    """SELECT of each step_stats row's drops max(0, n - C) at each of DROP_FACTORS (d0, d1, ...) with its own
    tokens (one rank's group, as capacity_drops(group='step') reads a row), NULL where the token counts are
    unknown, summed two ways in one pass: per step and layer (per_step = 1: step_drops) and per 100-step block,
    layer and expert (per_step = 0: expert_drops). Why one pass: two separate queries scanned the rows and
    computed the drops twice (bench/bench_bucket_build.py on 2,000 steps of 58 x 256: 10.6 + 16.9 s as two
    passes, 16.5 s as one, at similar load; docs/benchmarks.md)."""
    r = EXPERT_DROP_RESOLUTIONS[0]
    drops = ", ".join(f"{expr} AS d{i}" for i, expr in enumerate(_drop_exprs()))
    return f"""
        SELECT CAST(GROUPING(s.expert) AS INTEGER) AS per_step, s.run_id, s.step,
               CAST({block_start("s.step", r)} AS BIGINT) AS block, CAST(s.layer AS SMALLINT) AS layer,
               CAST(s.expert AS SMALLINT) AS expert, CAST(sum(s.assigned) AS BIGINT) AS assigned, {drops}
        FROM {source} s JOIN {shape} sh ON sh.run_id = s.run_id AND sh.layer = s.layer
        WHERE s.assigned > 0 AND {where}
        GROUP BY GROUPING SETS ((s.run_id, s.step, s.layer),
                                (s.run_id, {block_start("s.step", r)}, s.layer, s.expert))"""


def _unnest_factors() -> str:
    """SQL: one row per factor of a `drop_sums_sql` row (capacity_factor, assigned, dropped)."""
    factors = ", ".join(repr(float(f)) for f in DROP_FACTORS)
    return (f"unnest([{factors}]::DOUBLE[]) AS capacity_factor, assigned, "
            f"unnest([{', '.join(f'd{i}' for i in range(len(DROP_FACTORS)))}]) AS dropped")


def step_drops_sql(sums: str) -> str:
    """SELECT of step_drops rows from `sums` (a FROM item of `drop_sums_sql` rows): drops per step and layer."""
    return f"SELECT run_id, step, layer, {_unnest_factors()} FROM {sums} WHERE per_step = 1"


def expert_drops_sql(sums: str) -> str:
    """SELECT of expert_drops rows of 100-step blocks from `sums` (`drop_sums_sql` rows): drops per block, layer
    and expert; NULL where any of the block's rows has unknown tokens. Why blocks and not steps: per step that
    would be 14,848 rows a step at 58 x 256, as many as step_stats itself; a block of 100 is 100 times fewer, and
    a range's edges are read from step_stats."""
    return (f"SELECT run_id, CAST({EXPERT_DROP_RESOLUTIONS[0]} AS INTEGER) AS resolution, block AS step, layer, "
            f"expert, {_unnest_factors()} FROM {sums} WHERE per_step = 0")


def coarser_expert_drops_sql(r: int, where: str = "TRUE") -> str:
    """SELECT of expert_drops rows of r-step blocks summed from its 100-step blocks (sums of drops are exact;
    NULL stays NULL: known_sum)."""
    r = int(r)
    return f"""
        SELECT run_id, CAST({r} AS INTEGER) AS resolution, CAST({block_start("step", r)} AS BIGINT) AS step,
               layer, expert,
               capacity_factor, CAST(sum(assigned) AS BIGINT) AS assigned,
               CAST({known_sum("dropped")} AS BIGINT) AS dropped
        FROM expert_drops WHERE resolution = {EXPERT_DROP_RESOLUTIONS[0]} AND {where}
        GROUP BY run_id, {block_start("step", r)}, layer, expert, capacity_factor"""


def build_buckets(con, since_step: int | None = None) -> None:
    """Build (or bring up to date) layer_buckets, pooled_buckets, step_drops and expert_drops on `con`, whose
    step_stats, layers and runs hold every row of the run(s), and whose bucket tables exist (maybe empty).

    `since_step`: the first step that new rows touch (None: rebuild everything). A block's statistics are not
    sums of its parts' statistics, so the blocks from there on are recomputed from the per-step rows, never
    merged: the rows of blocks up to 1,000 steps from the chunk of steps holding since_step on, the larger
    blocks (from step_rollups' 1,000-step sums) and the pooled ones entirely. Blocks up to 1,000 steps are built
    a chunk of whole 1,000-step blocks at a time, so memory stays bounded whatever the run's length."""
    lo_hi = con.execute("SELECT min(step), max(step), count(*) FROM step_stats").fetchone()
    if lo_hi[0] is None:
        return
    first, last, n_rows = int(lo_hi[0]), int(lo_hi[1]), int(lo_hi[2])
    start = first if since_step is None else max(first, int(since_step))
    start = start // _CHUNK_STEPS * _CHUNK_STEPS
    con.execute("DELETE FROM layer_buckets WHERE step >= ? AND resolution <= ?", [start, _CHUNK_STEPS])
    con.execute("DELETE FROM layer_buckets WHERE resolution > ?", [_CHUNK_STEPS])
    con.execute("DELETE FROM pooled_buckets WHERE step >= ? OR resolution > ?", [start, _CHUNK_STEPS])
    con.execute("DELETE FROM step_drops WHERE step >= ?", [start])
    con.execute("DELETE FROM expert_drops WHERE step >= ?", [start])  # start: a multiple of every block
    con.execute(f"CREATE OR REPLACE TEMP TABLE _shape AS {shape_sql('step_stats')}")
    per_chunk_step = max(1, n_rows // max(1, last - first + 1))
    chunk = _CHUNK_STEPS * max(1, _CHUNK_ROWS // (per_chunk_step * _CHUNK_STEPS))
    small = [r for r in BUCKET_RESOLUTIONS if r <= _CHUNK_STEPS]
    # only the chunks that hold rows: steps may be sparse (0 and 2**40 in one run)
    firsts = [start + int(r[0]) * chunk for r in con.execute(
        f"SELECT DISTINCT (step - ?) // {int(chunk)} FROM step_stats WHERE step >= ? ORDER BY 1",
        [start, start]).fetchall()]
    for c0 in firsts:
        where = f"step >= {int(c0)} AND step < {int(c0 + chunk)}"
        con.execute(f"CREATE OR REPLACE TEMP TABLE _drop_sums AS {drop_sums_sql('step_stats', '_shape', where)}")
        con.execute(f"INSERT INTO step_drops BY NAME {step_drops_sql('_drop_sums')}")
        con.execute(f"INSERT INTO expert_drops BY NAME {expert_drops_sql('_drop_sums')}")
        con.execute("DROP TABLE _drop_sums")
        for r in EXPERT_DROP_RESOLUTIONS[1:]:
            con.execute(f"INSERT INTO expert_drops BY NAME {coarser_expert_drops_sql(r, where)}")
        for r in small:  # each resolution from the sums of the one it is made of (1 from the rows)
            src = f"(SELECT * FROM step_stats WHERE {where})" if r == 1 else f"_sums_{_parent(r)}"
            con.execute(f"CREATE OR REPLACE TEMP TABLE _sums_{r} AS {expert_sums_sql(src, r)}")
            con.execute(f"INSERT INTO layer_buckets BY NAME {layer_bucket_sql(f'_sums_{r}', r, '_shape')}")
            con.execute(f"INSERT INTO pooled_buckets BY NAME {pooled_bucket_sql(f'_sums_{r}', r)}")
        for r in small:
            con.execute(f"DROP TABLE _sums_{r}")
    big = [r for r in BUCKET_RESOLUTIONS if _CHUNK_STEPS < r <= max(_CHUNK_STEPS, last + 1)]
    if big:
        con.execute("CREATE OR REPLACE TEMP TABLE _sums_1000 AS " + expert_sums_sql(
            f"step_rollups", _CHUNK_STEPS, f"resolution = {_CHUNK_STEPS}"))
        for r in big:
            con.execute(f"CREATE OR REPLACE TEMP TABLE _sums_{r} AS {expert_sums_sql(f'_sums_{_parent(r)}', r)}")
            con.execute(f"INSERT INTO layer_buckets BY NAME {layer_bucket_sql(f'_sums_{r}', r, '_shape')}")
            con.execute(f"INSERT INTO pooled_buckets BY NAME {pooled_bucket_sql(f'_sums_{r}', r)}")
        for r in [_CHUNK_STEPS] + big:
            con.execute(f"DROP TABLE _sums_{r}")
    con.execute("DROP TABLE _shape")


def fold_buckets(con, new_segments: dict[str, list], rebuild: bool) -> None:
    """Bring the bucket tables of the run.duckdb being built up to date (see `build_buckets`): all of them from
    every row when `rebuild` (the old run.duckdb lacks one), else the blocks from the first step of the new
    step_stats segments on."""
    if rebuild:
        for t in layout.BUCKET_TABLES:
            con.execute(f'DELETE FROM main."{t}"')
        build_buckets(con, None)
        return
    paths = [str(p) for p in new_segments.get("step_stats", [])]
    if paths:
        since = con.execute("SELECT min(step) FROM read_parquet(?)", [paths]).fetchone()[0]
        if since is not None:
            build_buckets(con, int(since))
