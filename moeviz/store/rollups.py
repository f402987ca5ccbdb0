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


def _typed(table: str) -> str:
    """The roll-up's columns cast to their on-disk types (sum() of BIGINT is HUGEINT in DuckDB)."""
    return ", ".join(f'CAST("{f.name}" AS {layout.duckdb_type(f.type)}) AS "{f.name}"'
                     for f in layout.DISK_SCHEMAS[table])


def rollup_sql(table: str, source: str) -> str:
    """SELECT of `table`'s rows (every resolution) from `source`, a FROM item with the source table's columns.

    Each resolution is summed from the one below it (10 from the steps, 100 from the 10-step blocks, ...): one
    pass over the per-step rows, not one per resolution (at 1,000 steps x 58 x 256 experts a cross join with the
    resolutions aggregated 3 x 14.8 M rows)."""
    _, keys, sums = SPEC[table]
    k = ", ".join(keys)
    levels = []
    below = source
    for r in RESOLUTIONS:
        summed = ", ".join(f"sum({c}) AS {c}" for c in sums)
        levels.append(f"""r{r} AS (
            SELECT run_id, {r} AS resolution, (step // {r}) * {r} AS step, {k}, {summed}
            FROM {below} x GROUP BY run_id, (step // {r}) * {r}, {k})""")
        below = f"r{r}"
    union = " UNION ALL ".join(f"SELECT * FROM r{r}" for r in RESOLUTIONS)
    return f"""
        SELECT {_typed(table)} FROM (
            WITH {", ".join(levels)}
            {union})"""


def fold(con, new_segments: dict[str, list], rebuild: set[str]) -> None:
    """Bring the roll-ups of the run.duckdb being built (`con`, whose main tables already hold the old rows and
    the new segments) up to date: tables in `rebuild` (the old run.duckdb lacks them) from every row of their
    source table; the others by adding the new segments' blocks to the old ones (then summed per block)."""
    for table, (source, keys, sums) in SPEC.items():
        if table in rebuild:
            con.execute(f'INSERT INTO main."{table}" {rollup_sql(table, f"main.{source}")}')
            continue
        paths = [str(p) for p in new_segments.get(source, [])]
        if not paths:
            continue
        # the new segments through a table shaped like the source: BY NAME reads a segment written before a
        # column existed (layer_stats.nonfinite_tokens) with NULL there, as compaction's own insert does
        con.execute(f'CREATE TEMP TABLE _new_rows AS SELECT * FROM main."{source}" WHERE FALSE')
        con.execute("INSERT INTO _new_rows BY NAME SELECT * FROM read_parquet(?, union_by_name = true)", [paths])
        group = ", ".join(("run_id", "resolution", "step") + keys)
        summed = ", ".join(f"sum({c}) AS {c}" for c in sums)
        con.execute(f'ALTER TABLE main."{table}" RENAME TO "_old_{table}"')
        con.execute(f"""
            CREATE TABLE main."{table}" AS SELECT {_typed(table)} FROM (
                SELECT {group}, {summed} FROM (
                    SELECT * FROM main."_old_{table}"
                    UNION ALL BY NAME
                    {rollup_sql(table, "_new_rows")})
                GROUP BY {group} ORDER BY resolution, step, {", ".join(keys)})""")
        con.execute(f'DROP TABLE main."_old_{table}"')
        con.execute("DROP TABLE _new_rows")
