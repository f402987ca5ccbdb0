"""Compaction: fold a run's Parquet segments into `<run>/run.duckdb` and large sorted routes files.

`compact` (run by the last rank's `RunWriter.close`, or `moeviz compact`) folds the small tables into
`<run>/run.duckdb`, written under a new name and renamed over the old one, so a reader that has the old file
open keeps reading it, and `routes` into large zstd Parquet files named in run.duckdb (~2 bytes/route; see
`compact`). It also builds the derived tables that analyses read instead of the routes (token, position and
sequence counts, probe sets, weight histograms) and the step roll-ups they read instead of every step
(`moeviz.store.rollups`).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pyarrow as pa

from moeviz.errors import StoreError
from moeviz.store import layout, rollups
from moeviz.store.schema import SCHEMA_VERSION

ROUTES_FORMATS = ("parquet", "duckdb")


def compact(path, routes_format: str = "parquet") -> dict:
    """Fold every complete segment of a run (or of every run in a folder) into its compacted form.

    The small tables go into `<run>/run.duckdb`. `routes` (routes_format="parquet", the default) goes into one
    new zstd Parquet file per rank and compaction, `<run>/compacted/routes/rank=<r>/part-<gen>-<uuid8>.parquet`
    (~2 bytes/route, against ~7.7 in DuckDB's own storage), named in run.duckdb's `_routes_files`;
    routes_format="duckdb" keeps them in run.duckdb's `routes` table as before. Either way a run can hold both.

    Order, so that a crash at any point leaves a readable store that counts no row twice: (1) write each routes
    file under a hidden name, fsync, rename (readers read only files named in a published run.duckdb, so it is
    invisible); (2) build `run.duckdb.tmp` (old tables + new segments + their names in `_segments` + the new
    routes files in `_routes_files`), fsync, rename it over `run.duckdb`; (3) delete the folded segments; the
    next compaction deletes files left by a crash (unpublished routes files, folded segments). A reader that has
    the old run.duckdb open keeps its inode, and the routes files it names are never rewritten or deleted by a
    later compaction (each adds files), so it keeps working; a reader that lists segments and then opens the new
    file skips those recorded in `_segments`. Refuses a run whose writer is still alive. Idempotent.
    """
    if routes_format not in ROUTES_FORMATS:
        raise StoreError(f"routes_format must be one of {', '.join(ROUTES_FORMATS)}, got {routes_format!r}")
    run_dirs = layout.find_runs(path)
    if len(run_dirs) == 1 and layout.is_run_dir(Path(path).expanduser()):
        return {"runs": [_compact_run_or_say_why(run_dirs[0], routes_format)]}
    out = []
    for run_dir in run_dirs:  # a folder of runs: compact what can be, say why the others were left alone
        try:
            out.append(_compact_run_or_say_why(run_dir, routes_format))
        except StoreError as e:  # a live writer, a damaged run.duckdb: the other runs are still compacted
            out.append({"run_id": layout.run_id_of(run_dir), "run_dir": str(run_dir), "skipped": str(e)})
    return {"runs": out}


def _compact_run_or_say_why(run_dir: Path, routes_format: str) -> dict:
    """`_compact_run`, with a file system that refuses writes (read-only, full, no permission) said in one line:
    what was written is removed by the next compaction, and the store still reads as it was."""
    try:
        return _compact_run(run_dir, routes_format)
    except OSError as e:
        raise StoreError(f"cannot compact {run_dir}: {e.strerror or e} ({e.filename or run_dir}); compaction writes "
                         f"beside the segments, so run it where the folder is writable and has space. The store "
                         f"still reads as it is") from None


class _CompactionLock:
    """An exclusive flock on `<run>/.compact.lock`, so two compactions of one run never interleave."""

    def __init__(self, run_dir: Path, timeout_s: float = 120.0):
        self.path, self.timeout_s = run_dir / layout.LOCK_FILE, timeout_s

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise StoreError(f"another compaction of {self.path.parent} has held {self.path} for "
                                     f"{self.timeout_s:.0f}s; try again later") from None
                time.sleep(0.1)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _compact_run(run_dir: Path, routes_format: str = "parquet") -> dict:
    manifest = layout.read_manifest(run_dir)
    statuses = layout.read_statuses(run_dir)
    live = [s for s in statuses.values() if layout.writer_alive(s)]
    if live:
        s = live[0]
        raise StoreError(f"run {manifest.get('run_id')!r} at {run_dir} is still being written (rank {s.get('rank')}, "
                         f"pid {s.get('pid')} on {s.get('hostname')}): compaction waits until every writer closed; "
                         f"readers see the segments meanwhile")
    target = run_dir / layout.COMPACTED
    with _CompactionLock(run_dir):
        committed = layout.committed_files(run_dir, manifest)  # only whole flushes: never half of one
        found = committed.tables
        folded, published = _compacted_state(target)
        skipped = [p for p in committed.damaged if layout.relative_name(run_dir, p) not in folded]
        _remove_unpublished_routes_files(run_dir, published)  # left by a compaction that crashed before step 2
        new = {t: [p for p in ps if layout.relative_name(run_dir, p) not in folded] for t, ps in found.items()}
        n_new = sum(len(v) for v in new.values())
        bytes_new = sum(p.stat().st_size for ps in new.values() for p in ps)
        rows: dict[str, int] = {}
        # also when nothing is new but run.duckdb predates a derived table: a newer moeviz builds it on `compact`
        if n_new or not target.exists() or _missing_compaction_tables(target):
            written: list[tuple[str, int, int, int]] = []  # (name, rank, rows, bytes) of new routes files
            try:
                if routes_format == "parquet" and new["routes"]:
                    by_rank: dict[int, list[Path]] = {}
                    for p in new["routes"]:
                        by_rank.setdefault(int(p.parent.name[5:]), []).append(p)
                    for rank, paths in sorted(by_rank.items()):
                        written.append(_write_compacted_routes(run_dir, rank, paths))
                rows = _publish_compacted(run_dir, target, manifest, statuses, new, written,
                                          routes_in_duckdb=routes_format == "duckdb")
            except BaseException:
                for name, *_ in written:  # never published: remove (a crash instead leaves them to the next run)
                    (run_dir / name).unlink(missing_ok=True)
                raise
            folded, published = _compacted_state(target)
        # Commit records first, then their segments: a crash in between leaves folded segments that no commit
        # names, which readers leave out and the next compaction removes (never a commit naming a missing file).
        for path in committed.commits:
            body = json.loads(path.read_text())
            if all(e["path"] in folded for e in body["files"]):
                path.unlink(missing_ok=True)
        deleted = 0
        for ps in found.values():  # also removes segments a crashed earlier compaction folded but did not delete
            for p in ps:
                if layout.relative_name(run_dir, p) in folded:
                    p.unlink(missing_ok=True)
                    deleted += 1
        for p in committed.uncommitted:  # folded, then cut from their commit by a crash before their deletion
            if layout.relative_name(run_dir, p) in folded:
                p.unlink(missing_ok=True)
                deleted += 1
        leftovers = _remove_leftovers(run_dir, [p for p in committed.uncommitted if p.exists()])
    if not rows:
        rows = _compacted_row_counts(target)
    size = target.stat().st_size + sum(b for _, b in published.values())
    return {
        "run_id": manifest.get("run_id"), "run_dir": str(run_dir), "segments_folded": n_new,
        "segment_bytes_folded": bytes_new, "segments_deleted": deleted, "skipped_files": [str(p) for p in skipped],
        "leftovers_removed": leftovers,
        "rows": rows, "compacted_bytes": size, "routes_files": len(published),
        "bytes_per_route": (size / rows["routes"]) if rows.get("routes") else None,
    }


def _remove_leftovers(run_dir: Path, uncommitted: list[Path]) -> int:
    """Delete what no commit names (compaction runs only when no writer is alive, so nothing of it can still
    become visible): segments of a flush cut by a crash, hidden temp files of a killed write. How many."""
    n = 0
    for p in uncommitted:
        p.unlink(missing_ok=True)
        n += 1
    for folder in [run_dir / t for t in layout.SEGMENT_TABLES] + [run_dir / layout.COMMITS_DIR]:
        for tmp in folder.glob("rank=*/.*.tmp") if folder.is_dir() else []:
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def _publish_compacted(run_dir: Path, target: Path, manifest: dict, statuses: dict, new: dict[str, list[Path]],
                       written: list[tuple[str, int, int, int]], routes_in_duckdb: bool) -> dict[str, int]:
    """Build run.duckdb.tmp (old tables + new segments), fsync it and rename it over run.duckdb: row counts."""
    from moeviz.store import duckdb_compat

    tmp = run_dir / (layout.COMPACTED + ".tmp")
    for leftover in (tmp, Path(str(tmp) + ".wal")):
        leftover.unlink(missing_ok=True)
    con = duckdb_compat.connect(str(tmp))
    try:
        # no progress bar on the training process's terminal: grouping tens of millions of routes into
        # token_sets takes seconds, and DuckDB draws a bar for any query past two
        con.execute("SET enable_progress_bar = false")
        _create_compacted_tables(con)
        old_tables: set[str] = set()
        if target.exists():
            con.execute(f"ATTACH {duckdb_compat.sql_string(str(target))} AS old (READ_ONLY)")
            old_tables = {r[0] for r in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = 'old'").fetchall()}
            for t in layout.SEGMENT_TABLES + layout.COMPACTION_TABLES + layout.ROLLUP_TABLES + (
                    layout.BUCKET_TABLES + ("_segments", "_routes_files")):
                if t in old_tables:
                    con.execute(f'INSERT INTO main."{t}" BY NAME SELECT * FROM old.main."{t}"')
            con.execute("DETACH old")
        for t, paths in new.items():
            if paths:
                if t != "routes" or routes_in_duckdb:
                    con.execute(f'INSERT INTO main."{t}" BY NAME SELECT * FROM read_parquet(?)',
                                [[str(p) for p in paths]])
                con.executemany("INSERT INTO _segments VALUES (?, ?, ?)",
                                [[t, layout.relative_name(run_dir, p), p.stat().st_size] for p in paths])
        if written:
            con.executemany("INSERT INTO _routes_files VALUES (?, ?, ?, ?)", [list(w) for w in written])
        _fold_route_stats(con, run_dir, new["routes"], rebuild=set(layout.COMPACTION_TABLES) - old_tables)
        rollups.fold(con, new, rebuild=set(layout.ROLLUP_TABLES) - old_tables)
        rollups.fold_buckets(con, new, rebuild=bool(set(layout.BUCKET_TABLES) - old_tables))
        con.executemany("INSERT INTO _rank_status VALUES (?, ?)",
                        [[r, json.dumps(s)] for r, s in sorted(statuses.items())])
        con.executemany("INSERT INTO _meta VALUES (?, ?)",
                        [["schema_version", str(SCHEMA_VERSION)], ["compacted_at", layout.utc_iso()],
                         ["run_id", str(manifest.get("run_id"))]])
        rows = {t: con.execute(f'SELECT count(*) FROM main."{t}"').fetchone()[0] for t in layout.SEGMENT_TABLES}
        rows["routes"] += con.execute("SELECT coalesce(sum(rows), 0) FROM _routes_files").fetchone()[0]
        con.execute("CHECKPOINT")
    finally:
        con.close()
    _fsync(tmp)
    os.replace(tmp, target)
    _fsync(run_dir)
    return rows


# The tables compaction derives from routes: (table, grouping columns). Counting once at compaction is what
# makes the vocabulary, position and domain analyses of a finished run read 10^2-10^4 times fewer rows than
# `routes` (100M routes: 1.9M token_stats rows, 33K position_stats rows, 800K sequence_stats rows).
_ROUTE_STATS_KEYS = {
    "token_stats": ("run_id", "rank", "layer", "token_id", "expert"),
    "position_stats": ("run_id", "rank", "layer", "pos", "expert"),
    "sequence_stats": ("run_id", "step", "rank", "seq", "layer", "expert"),
}


def _fold_route_stats(con, run_dir: Path, new_routes: list[Path], rebuild: set[str]) -> None:
    """Add the routes of this compaction to the tables compaction derives from them (`layout.COMPACTION_TABLES`) in
    the run.duckdb being built.

    Counts are additive, so the new segments' counts are summed with the rows copied from the old run.duckdb;
    probe_sets rows are per token, so the new ones are appended. `rebuild`: the tables the old run.duckdb lacks
    (it predates them, or there is none): those are built from every route of the run (its `routes` table and
    every Parquet file `_routes_files` names, this compaction's included) instead."""
    # explicit casts: without them DuckDB 1.5 fails an internal statistics assertion ("SetMin or SetMax called
    # with Value that does not match") when segment files are aggregated in a UNION with the typed tables
    cols = ", ".join(f'CAST("{f.name}" AS {layout.duckdb_type(f.type)}) AS "{f.name}"' for f in layout.DISK_SCHEMAS["routes"]
                     if f.name in ("run_id", "step", "rank", "seq", "pos", "token_id", "layer", "slot", "expert",
                                   "weight_q", "margin"))
    files = [str(run_dir / r[0]) for r in con.execute("SELECT file FROM _routes_files ORDER BY file").fetchall()]
    every = (f"SELECT {cols} FROM main.routes" + (f" UNION ALL {_parquet_routes(cols, files)}" if files else ""),
             [files] if files else [])  # routes_format="duckdb" compactions keep routes in main.routes
    new_files = [str(p) for p in new_routes]
    fresh = (_parquet_routes(cols, new_files), [new_files]) if new_routes else None
    for table in layout.COMPACTION_TABLES:
        source, params = every if table in rebuild else (fresh or (None, None))
        if source is None:
            continue
        if table == layout.PROBE_SETS:
            con.execute(f'INSERT INTO main."{table}" {_PROBE_SETS_SQL.format(source=source)}', params)
            continue
        if table == layout.TOKEN_SETS:
            con.execute(f'INSERT INTO main."{table}" {token_sets_sql(source, True)}', params)
            continue
        if table == layout.WEIGHT_HIST:
            _fold_weight_hist(con, source, params)
            continue
        k = ", ".join(_ROUTE_STATS_KEYS[table])
        typed = ", ".join(f'CAST("{f.name}" AS {layout.duckdb_type(f.type)}) AS "{f.name}"'
                          for f in layout.DISK_SCHEMAS[table])
        con.execute(f'ALTER TABLE main."{table}" RENAME TO "_old_{table}"')
        con.execute(f"""
            CREATE TABLE main."{table}" AS SELECT {typed} FROM (
                SELECT {k}, sum(assigned) AS assigned, sum(first_choice) AS first_choice FROM (
                    SELECT {k}, assigned, first_choice FROM main."_old_{table}"
                    UNION ALL
                    SELECT {k}, count(*) AS assigned, count(*) FILTER (WHERE slot = 0) AS first_choice
                    FROM ({source}) GROUP BY ALL)
                GROUP BY ALL ORDER BY {k})""", params)
        con.execute(f'DROP TABLE main."_old_{table}"')


def _parquet_routes(cols: str, files: list[str]) -> str:
    """SELECT `cols` FROM read_parquet(?) over routes files, some of which may predate `margin` (schema version 2
    files of an upgraded run): read by name, margin NULL where a file lacks it."""
    import pyarrow.parquet as pq

    have = [("margin" in pq.read_schema(f).names) for f in files]
    if all(have):
        return f"SELECT {cols} FROM read_parquet(?)"
    if any(have):
        return f"SELECT {cols} FROM read_parquet(?, union_by_name = true)"
    no_margin = cols.replace('CAST("margin" AS FLOAT)', "CAST(NULL AS FLOAT)")
    return f"SELECT {no_margin} FROM read_parquet(?)"


def _fold_weight_hist(con, source: str, params: list) -> None:
    """weight_hist = the old table's counts plus the new routes', with `above` recomputed over the sums (a step
    whose routes span two compactions gets one set of bins)."""
    k = "run_id, step, rank, layer, expert, bin"
    typed = ", ".join(f'CAST("{f.name}" AS {layout.duckdb_type(f.type)}) AS "{f.name}"'
                      for f in layout.DISK_SCHEMAS[layout.WEIGHT_HIST])
    con.execute(f'ALTER TABLE main."{layout.WEIGHT_HIST}" RENAME TO "_old_{layout.WEIGHT_HIST}"')
    counts = f"""
        SELECT {k}, sum(assigned) AS assigned, sum(first_choice) AS first_choice, sum(weight_q_sum) AS weight_q_sum
        FROM (SELECT {k}, assigned, first_choice, weight_q_sum FROM main."_old_{layout.WEIGHT_HIST}"
              UNION ALL {_WEIGHT_HIST_SQL.format(source=source)})
        GROUP BY ALL"""
    con.execute(f"""
        CREATE TABLE main."{layout.WEIGHT_HIST}" AS SELECT {typed} FROM ({_WEIGHT_HIST_ABOVE_SQL.format(counts=counts)})
        ORDER BY run_id, step, rank, layer, expert, bin DESC""", params)
    con.execute(f'DROP TABLE main."_old_{layout.WEIGHT_HIST}"')


# Each expert's routes per step counted by weight bin (the counts weight_hist sums; `above` is added over the sums).
_WEIGHT_HIST_SQL = f"""
    SELECT run_id, step, rank, layer, expert, CAST(weight_q >> {layout.WEIGHT_BIN_SHIFT} AS SMALLINT) AS bin,
           count(*) AS assigned, count(*) FILTER (WHERE slot = 0) AS first_choice,
           sum(weight_q) AS weight_q_sum
    FROM ({{source}}) WHERE weight_q IS NOT NULL GROUP BY ALL"""  # routes without a weight (engine logs) have no bin
# weight_hist's rows from such counts: `above`, the routes of the same step and expert in higher bins, which the
# probability policy's cut-off bin is found by (moeviz.analyses.probability_drops)
_WEIGHT_HIST_ABOVE_SQL = """
    SELECT *, coalesce(sum(assigned) OVER (PARTITION BY run_id, step, rank, layer, expert ORDER BY bin DESC
                                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS above
    FROM ({counts})"""


# One row per token and layer of the sequences tagged 'probe' (joined from `sequences`, which compaction has
# folded before): its slot-0 expert and its set of experts as a bitmask (NULL past 64 experts).
_PROBE_SETS_SQL = """
    SELECT r.run_id, r.step, r.rank, r.seq, r.pos, r.layer, CAST(min(r.token_id) AS INTEGER) AS token_id,
           CAST(min(r.expert) FILTER (WHERE r.slot = 0) AS SMALLINT) AS first_expert,
           CASE WHEN max(r.expert) < 64  -- the shift is clamped: the aggregate runs on every row whatever the CASE
                THEN bit_or(CAST(1 AS UBIGINT) << CAST(least(r.expert, 63) AS UBIGINT)) END AS experts
    FROM ({source}) r
    SEMI JOIN (SELECT run_id, step, rank, seq FROM main.sequences WHERE tag = 'probe') q
        ON q.run_id = r.run_id AND q.step = r.step AND q.rank = r.rank AND q.seq = r.seq
    GROUP BY r.run_id, r.step, r.rank, r.seq, r.pos, r.layer
    ORDER BY r.step, r.rank, r.layer, r.seq, r.pos"""


# One row per kept token and layer: its slot-0 expert, its experts as a bitmask (NULL when an expert index is
# outside 0-63), how many routes it has (k) and its margin. Routing agreement joins these rows (one per token and
# layer) instead of grouping k routes per token on each side at query time: the grouping is paid once here.
_TOKEN_SETS_SQL = """
    SELECT r.run_id, r.step, r.rank, r.seq, r.pos, r.layer, CAST(min(r.token_id) AS INTEGER) AS token_id,
           CAST(arg_min(r.expert, r.slot) AS SMALLINT) AS first_expert,
           CASE WHEN max(r.expert) < 64 AND min(r.expert) >= 0  -- the shift is clamped, as in probe_sets
                THEN bit_or(CAST(1 AS UBIGINT) << CAST(greatest(least(r.expert, 63), 0) AS UBIGINT)) END AS experts,
           CAST(least(count(*), 127) AS TINYINT) AS k, {margin} AS margin
    FROM ({source}) r
    GROUP BY r.run_id, r.step, r.rank, r.seq, r.pos, r.layer
    ORDER BY r.step, r.rank, r.layer, r.seq, r.pos"""


def token_sets_sql(source: str, with_margin: bool) -> str:
    """The SELECT that builds `token_sets` rows from a routes query `source` (with a `margin` column if
    `with_margin`, else the margins are NULL). Also used by moeviz.testing, so tests build the table as compaction
    does."""
    margin = "CAST(any_value(r.margin) AS FLOAT)" if with_margin else "CAST(NULL AS FLOAT)"
    return _TOKEN_SETS_SQL.format(source=source, margin=margin)


def _write_compacted_routes(run_dir: Path, rank: int, paths: list[Path]) -> tuple[str, int, int, int]:
    """One compacted routes file from one rank's segments: (name relative to the run, rank, rows, bytes).

    Streams the segments in batches of about COMPACTED_ROW_GROUP_ROWS rows, each sorted by COMPACTED_SORT and
    written as one row group, so memory stays bounded whatever the run's size. Written under a hidden name,
    fsynced, then renamed: the file is whole or absent."""
    import uuid

    import pyarrow.parquet as pq

    folder = layout.compacted_routes_dir(run_dir, rank)
    folder.mkdir(parents=True, exist_ok=True)
    gen = 1 + max([int(p.name[5:11]) for p in folder.glob("part-*.parquet") if p.name[5:11].isdigit()] or [-1])
    name = f"part-{gen:06d}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = folder / f".{name}.tmp"
    schema = layout.DISK_SCHEMAS["routes"]
    n_rows = 0
    try:
        with pq.ParquetWriter(tmp, schema, **layout.compacted_routes_options()) as w:
            pending: list[pa.Table] = []
            pending_rows = 0
            for p in paths:
                part = _with_disk_columns(pq.read_table(p), schema)
                pending.append(part)
                pending_rows += part.num_rows
                if pending_rows >= layout.COMPACTED_ROW_GROUP_ROWS:
                    n_rows += _write_sorted_row_group(w, pending)
                    pending, pending_rows = [], 0
            if pending:
                n_rows += _write_sorted_row_group(w, pending)
        _fsync(tmp)
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(folder)
    return layout.relative_name(run_dir, folder / name), rank, n_rows, (folder / name).stat().st_size


def _with_disk_columns(part: pa.Table, schema: pa.Schema) -> pa.Table:
    """A segment's table in the current on-disk schema: columns an older segment lacks (added by a later schema
    version) are NULL, as the readers show them."""
    cols = [part.column(f.name) if f.name in part.column_names else pa.nulls(part.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema) if part.num_rows else schema.empty_table()


def _write_sorted_row_group(writer, parts: list[pa.Table]) -> int:
    batch = pa.concat_tables(parts).sort_by([(c, "ascending") for c in layout.COMPACTED_SORT])
    writer.write_table(batch, row_group_size=max(1, batch.num_rows))
    return batch.num_rows


def _remove_unpublished_routes_files(run_dir: Path, published: dict[str, tuple[int, int]]) -> None:
    """Delete routes files (and hidden temp files) no published run.duckdb names: a crashed compaction's."""
    root = run_dir / layout.COMPACTED_DIR / "routes"
    if not root.is_dir():
        return
    for p in root.glob("rank=*/*"):
        if p.is_file() and layout.relative_name(run_dir, p) not in published and (
                p.name.endswith(".parquet") or p.name.endswith(".tmp")):
            p.unlink(missing_ok=True)


def _create_compacted_tables(con) -> None:
    for t in layout.SEGMENT_TABLES + layout.COMPACTION_TABLES + layout.ROLLUP_TABLES + layout.BUCKET_TABLES:
        cols = ", ".join(f'"{f.name}" {layout.duckdb_type(f.type)}' for f in layout.DISK_SCHEMAS[t])
        con.execute(f'CREATE TABLE "{t}" ({cols})')
    con.execute("CREATE TABLE _segments (table_name VARCHAR, file VARCHAR PRIMARY KEY, bytes BIGINT)")
    con.execute("CREATE TABLE _routes_files (file VARCHAR PRIMARY KEY, rank INTEGER, rows BIGINT, bytes BIGINT)")
    con.execute("CREATE TABLE _rank_status (rank INTEGER, status_json VARCHAR)")
    con.execute("CREATE TABLE _meta (key VARCHAR, value VARCHAR)")


def _compacted_state(target: Path) -> tuple[set[str], dict[str, tuple[int, int]]]:
    """(names of the segments already folded into run.duckdb, {routes file name: (rows, bytes)} it names)."""
    if not target.exists():
        return set(), {}
    from moeviz.store import duckdb_compat

    try:
        con = duckdb_compat.connect(str(target), read_only=True)
        con.execute("SELECT count(*) FROM _segments").fetchone()
    except Exception as e:  # noqa: BLE001 - never fold more into, or over, a run.duckdb that cannot be read
        from moeviz.store.reader import compacted_damage

        raise StoreError(compacted_damage(target, e)) from None
    try:
        folded = {r[0] for r in con.execute("SELECT file FROM _segments").fetchall()}
        have = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        files = {r[0]: (int(r[1]), int(r[2])) for r in con.execute(
            "SELECT file, rows, bytes FROM _routes_files").fetchall()} if "_routes_files" in have else {}
        return folded, files
    finally:
        con.close()


def _missing_compaction_tables(target: Path) -> set[str]:
    """The tables compaction derives (layout.COMPACTION_TABLES from routes, layout.ROLLUP_TABLES from the per-step
    aggregates) that run.duckdb lacks."""
    from moeviz.store import duckdb_compat

    con = duckdb_compat.connect(str(target), read_only=True)
    try:
        have = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        return set(layout.COMPACTION_TABLES + layout.ROLLUP_TABLES + layout.BUCKET_TABLES) - have
    finally:
        con.close()


def _compacted_row_counts(target: Path) -> dict[str, int]:
    from moeviz.store import duckdb_compat

    con = duckdb_compat.connect(str(target), read_only=True)
    try:
        have = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        rows = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] if t in have else 0
                for t in layout.SEGMENT_TABLES}
        if "_routes_files" in have:
            rows["routes"] += con.execute("SELECT coalesce(sum(rows), 0) FROM _routes_files").fetchone()[0]
        return rows
    finally:
        con.close()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
