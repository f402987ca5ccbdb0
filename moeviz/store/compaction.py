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
import shutil
import time
from pathlib import Path

import pyarrow as pa

from moeviz.errors import StoreError
from moeviz.store import layout, rollups
from moeviz.store.memory import compaction_config
from moeviz.store.schema import SCHEMA_VERSION

ROUTES_FORMATS = ("parquet", "duckdb")
TABLE_FILES_VERSION = 4  # the store schema version that added token_sets files (`_table_files`)
MERGED_HIST_VERSION = 5  # ... that added merged weight_hist rows (bin -1: an expert's few routes in one row)


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
        # a compaction killed after publishing leaves its scratch counts: nothing reads them, remove them first
        scratch = _unlink_with_wal(run_dir / _RouteCounts.FILE)
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
        missing = _missing_compaction_tables(target) if target.exists() else None  # None: no run.duckdb yet
        if n_new or missing is None or missing:
            written: list[tuple[str, int, int, int]] = []  # (name, rank, rows, bytes) of new routes files
            sets: list[tuple[str, int, int, int]] | None = None  # ... of new token_sets files (None: built by SQL)
            counts = _RouteCounts(run_dir) if routes_format == "parquet" and new["routes"] else None
            replaced = [False]  # set once the new run.duckdb, which names the files written here, is renamed in
            try:
                if routes_format == "parquet" and new["routes"]:
                    # token_sets from the routes batches, unless an older run.duckdb lacks the table (then it is
                    # rebuilt from every route by SQL)
                    sets = [] if layout.TOKEN_SETS in layout.FILE_TABLES and (
                        missing is None or layout.TOKEN_SETS not in missing) else None
                    by_rank: dict[int, list[Path]] = {}
                    for p in new["routes"]:
                        by_rank.setdefault(int(p.parent.name[5:]), []).append(p)
                    for rank, paths in sorted(by_rank.items()):
                        routes_file, sets_file = _write_compacted_routes(run_dir, rank, paths, sets is not None,
                                                                         counts)
                        written.append(routes_file)
                        if sets is not None and sets_file is not None:
                            sets.append(sets_file)
                        elif sets is not None and routes_file[2]:  # not exact from batches: SQL for every rank
                            for name, *_ in sets:
                                (run_dir / name).unlink(missing_ok=True)
                            sets = None
                rows = _publish_compacted(run_dir, target, manifest, statuses, new, written,
                                          routes_in_duckdb=routes_format == "duckdb", sets=sets,
                                          counts=counts if counts is not None and counts.ok else None,
                                          replaced=replaced)
            except BaseException:
                if not replaced[0]:  # never published: remove (a crash leaves them to the next compaction)
                    for name, *_ in written + (sets or []):
                        (run_dir / name).unlink(missing_ok=True)
                raise  # published (renamed, then an fsync failed): the new run.duckdb names the files, keep them
            finally:
                if counts is not None:
                    counts.close()
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
        leftovers = scratch + _remove_leftovers(run_dir, [p for p in committed.uncommitted if p.exists()])
    if not rows:
        rows = _compacted_row_counts(target)
    size = target.stat().st_size + sum(b for _, b in published.values())
    return {
        "run_id": manifest.get("run_id"), "run_dir": str(run_dir), "segments_folded": n_new,
        "segment_bytes_folded": bytes_new, "segments_deleted": deleted, "skipped_files": [str(p) for p in skipped],
        "leftovers_removed": leftovers,
        "rows": rows, "compacted_bytes": size,
        "routes_files": sum(1 for n in published if n.startswith(f"{layout.COMPACTED_DIR}/routes/")),
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
                       written: list[tuple[str, int, int, int]], routes_in_duckdb: bool,
                       sets: list[tuple[str, int, int, int]] | None = None,
                       counts: "_RouteCounts | None" = None, replaced: list[bool] | None = None) -> dict[str, int]:
    """Build run.duckdb.tmp (old tables + new segments), fsync it and rename it over run.duckdb: row counts.
    `replaced[0]` is set True right after the rename: from then on the published run.duckdb names the files
    written for it, so a failure after it (the folder's fsync) must not delete them.
    `sets`: the token_sets files written with the routes files (named in `_table_files`), or None: token_sets
    rows of the new routes are then built by SQL into run.duckdb's own table. `counts`: the new routes' counts
    summed while writing the routes files (None: counted by SQL from the files)."""
    from moeviz.store import duckdb_compat

    tmp = run_dir / (layout.COMPACTED + ".tmp")
    _unlink_with_wal(tmp)
    con = duckdb_compat.connect(str(tmp), config=compaction_config())
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
                    layout.BUCKET_TABLES + ("_segments", "_routes_files", "_table_files")):
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
        if sets:
            con.executemany("INSERT INTO _table_files VALUES (?, ?, ?, ?, ?)",
                            [[layout.TOKEN_SETS, *f] for f in sets])
        # tables an older run.duckdb lacks are rebuilt from every route (without one, every route is a new one)
        rebuild = set(layout.COMPACTION_TABLES) - old_tables if target.exists() else set()
        if counts is not None:  # the partial counts of the routes pass, in its scratch file
            counts.detach()
            con.execute(f"ATTACH {duckdb_compat.sql_string(str(counts.path))} AS counts (READ_ONLY)")
        _fold_route_stats(con, run_dir, new["routes"], rebuild=rebuild,
                          skip={layout.TOKEN_SETS} if sets is not None else set(), counts=counts)
        if counts is not None:
            con.execute("DETACH counts")
        rollups.fold(con, new, rebuild=set(layout.ROLLUP_TABLES) - old_tables)
        rollups.fold_buckets(con, new, rebuild=bool(set(layout.BUCKET_TABLES) - old_tables))
        con.executemany("INSERT INTO _rank_status VALUES (?, ?)",
                        [[r, json.dumps(s)] for r, s in sorted(statuses.items())])
        con.executemany("INSERT INTO _meta VALUES (?, ?)",
                        [["schema_version", str(SCHEMA_VERSION)], ["compacted_at", layout.utc_iso()],
                         ["run_id", str(manifest.get("run_id"))]])
        rows = {t: con.execute(f'SELECT count(*) FROM main."{t}"').fetchone()[0] for t in layout.SEGMENT_TABLES}
        rows["routes"] += con.execute("SELECT coalesce(sum(rows), 0) FROM _routes_files").fetchone()[0]
        names_files = con.execute("SELECT count(*) FROM _table_files").fetchone()[0] > 0
        merged_hist = con.execute(f'SELECT count(*) FROM (SELECT 1 FROM main."{layout.WEIGHT_HIST}" '
                                  f'WHERE bin < 0 LIMIT 1)').fetchone()[0] > 0
        con.execute("CHECKPOINT")
    finally:
        con.close()
    _fsync(tmp)
    # token_sets files: a moeviz that reads run.duckdb alone must refuse the run; merged weight_hist rows: one that
    # reads every row as a bin must refuse it
    if merged_hist:
        _raise_manifest_version(run_dir, MERGED_HIST_VERSION)
    elif names_files:
        _raise_manifest_version(run_dir, TABLE_FILES_VERSION)
    os.replace(tmp, target)
    if replaced is not None:
        replaced[0] = True
    _fsync(run_dir)
    return rows


def _raise_manifest_version(run_dir: Path, version: int) -> None:
    """Mark a run whose run.duckdb names table files (`_table_files`, schema version 4) as version 4 in its
    manifest, so that a moeviz that predates the files refuses the run instead of reading part of token_sets (or
    compacting it and dropping the names of the files, which a later compaction then deletes as unpublished); one
    whose weight_hist holds merged rows (version 5) as 5, so that an older moeviz does not take a merged row for
    bin -1 (its probability policy would misplace the cut).
    The version the run's data was written with stays in `data_schema_version` (runs.schema_version shows it,
    and new writes into the run are still refused). Written under a temp name and renamed: whole or absent."""
    path = run_dir / layout.MANIFEST
    body = json.loads(path.read_text())
    if int(body.get("schema_version", 0)) >= version:
        return
    body = dict(body, schema_version=version,
                data_schema_version=int(body.get("data_schema_version", body["schema_version"])))
    tmp = path.with_name(f".{layout.MANIFEST}.compact.tmp")
    try:
        tmp.write_text(json.dumps(body, indent=1))
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _unlink_with_wal(path: Path) -> int:
    """Delete a DuckDB file, its write-ahead log and its spill folder (`<file>.tmp`, left by a process killed
    while DuckDB spilled under the compaction's memory limit) if they exist: how many were deleted."""
    n = 0
    for p in (path, Path(str(path) + ".wal")):
        if p.exists():
            p.unlink(missing_ok=True)
            n += 1
    spill = Path(str(path) + ".tmp")
    if spill.is_dir():
        shutil.rmtree(spill, ignore_errors=True)
        n += 1
    return n


# The tables compaction derives from routes: (table, grouping columns). Counting once at compaction is what
# makes the vocabulary, position and domain analyses of a finished run read 10^2-10^4 times fewer rows than
# `routes` (100M routes: 1.9M token_stats rows, 33K position_stats rows, 800K sequence_stats rows).
_ROUTE_STATS_KEYS = {
    "token_stats": ("run_id", "rank", "layer", "token_id", "expert"),
    "position_stats": ("run_id", "rank", "layer", "pos", "expert"),
    "sequence_stats": ("run_id", "step", "rank", "seq", "layer", "expert"),
}


def _fold_route_stats(con, run_dir: Path, new_routes: list[Path], rebuild: set[str], skip: set[str] = frozenset(),
                      counts: "_RouteCounts | None" = None) -> None:
    """Add the routes of this compaction to the tables compaction derives from them (`layout.COMPACTION_TABLES`) in
    the run.duckdb being built.

    Counts are additive, so the new segments' counts are summed with the rows copied from the old run.duckdb;
    probe_sets rows are per token, so the new ones are appended. `rebuild`: the tables the old run.duckdb lacks
    (it predates them, or there is none): those are built from every route of the run (its `routes` table and
    every Parquet file `_routes_files` names, this compaction's included) instead. `skip`: tables whose rows of
    the new routes were written as files already (token_sets, see _TokenSetsFile). `counts`: the new routes'
    token, position, sequence and weight-bin counts, summed while the routes files were written: summed here
    instead of grouping the new routes again."""
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
        if source is None or table in skip:
            continue
        if table == layout.PROBE_SETS:
            con.execute(f'INSERT INTO main."{table}" {_PROBE_SETS_SQL.format(source=source)}', params)
            continue
        if table == layout.TOKEN_SETS:
            con.execute(f'INSERT INTO main."{table}" {token_sets_sql(source, True)}', params)
            continue
        partial = counts.source(table) if counts is not None and table in _RouteCounts.KEYS and table not in rebuild \
            else None
        if table == layout.WEIGHT_HIST:
            if partial is None:
                _fold_weight_hist(con, source, params)
            else:
                _fold_weight_hist_counts(con, partial, final=counts.disjoint)
            continue
        k = ", ".join(_ROUTE_STATS_KEYS[table])
        typed = ", ".join(f'CAST("{f.name}" AS {layout.duckdb_type(f.type)}) AS "{f.name}"'
                          for f in layout.DISK_SCHEMAS[table])
        con.execute(f'ALTER TABLE main."{table}" RENAME TO "_old_{table}"')
        if partial is not None:
            new_counts, params = f"SELECT {k}, assigned, first_choice FROM {partial}", []
        else:
            new_counts = (f"SELECT {k}, count(*) AS assigned, count(*) FILTER (WHERE slot = 0) AS first_choice "
                          f"FROM ({source}) GROUP BY ALL")
        con.execute(f"""
            CREATE TABLE main."{table}" AS SELECT {typed} FROM (
                SELECT {k}, sum(assigned) AS assigned, sum(first_choice) AS first_choice FROM (
                    SELECT {k}, assigned, first_choice FROM main."_old_{table}"
                    UNION ALL
                    {new_counts})
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


def _fold_weight_hist_counts(con, counts: str, final: bool) -> None:
    """Add the new routes' weight-bin counts (the table `counts` of _RouteCounts) to weight_hist: appended as
    they are when they are `final` rows (`above` computed per batch) of steps the table does not hold yet, else
    summed with the old rows and `above` recomputed (a step whose routes span two compactions or two batches)."""
    overlap = con.execute(f"""
        SELECT count(*) FROM main."{layout.WEIGHT_HIST}" w
        SEMI JOIN (SELECT DISTINCT run_id, step, rank FROM {counts}) n
            ON n.run_id = w.run_id AND n.step = w.step AND n.rank = w.rank""").fetchone()[0]
    if final and not overlap:
        con.execute(f'INSERT INTO main."{layout.WEIGHT_HIST}" BY NAME SELECT * FROM {counts}')
    else:
        _fold_weight_hist(con, None, [], new_counts="SELECT run_id, step, rank, layer, expert, bin, assigned, "
                                                    f"first_choice, weight_q_sum FROM {counts}")


def _fold_weight_hist(con, source: str | None, params: list, new_counts: str | None = None) -> None:
    """weight_hist = the old table's counts plus the new routes', with `above` recomputed over the sums (a step
    whose routes span two compactions gets one set of bins) and small experts merged (_WEIGHT_HIST_ROWS_SQL)."""
    k = "run_id, step, rank, layer, expert, bin"
    typed = ", ".join(f'CAST("{f.name}" AS {layout.duckdb_type(f.type)}) AS "{f.name}"'
                      for f in layout.DISK_SCHEMAS[layout.WEIGHT_HIST])
    con.execute(f'ALTER TABLE main."{layout.WEIGHT_HIST}" RENAME TO "_old_{layout.WEIGHT_HIST}"')
    counts = f"""
        SELECT {k}, sum(assigned) AS assigned, sum(first_choice) AS first_choice, sum(weight_q_sum) AS weight_q_sum
        FROM (SELECT {k}, assigned, first_choice, weight_q_sum FROM main."_old_{layout.WEIGHT_HIST}"
              UNION ALL {new_counts or _WEIGHT_HIST_SQL.format(source=source)})
        GROUP BY ALL"""
    con.execute(f"""
        CREATE TABLE main."{layout.WEIGHT_HIST}" AS SELECT {typed} FROM ({_WEIGHT_HIST_ROWS_SQL.format(counts=counts)})
        ORDER BY run_id, step, rank, layer, expert, bin DESC""", params)
    con.execute(f'DROP TABLE main."_old_{layout.WEIGHT_HIST}"')


# Each expert's routes per step counted by weight bin (the counts weight_hist sums; `above` is added over the sums).
_WEIGHT_HIST_SQL = f"""
    SELECT run_id, step, rank, layer, expert, CAST(weight_q >> {layout.WEIGHT_BIN_SHIFT} AS SMALLINT) AS bin,
           count(*) AS assigned, count(*) FILTER (WHERE slot = 0) AS first_choice,
           sum(weight_q) AS weight_q_sum
    FROM ({{source}}) WHERE weight_q IS NOT NULL GROUP BY ALL"""  # routes without a weight (engine logs) have no bin
# weight_hist's rows from such counts (summed per bin; a merged row, bin -1, may sit beside bins when a step's
# routes span two compactions or batches): `above`, the routes of the same step and expert in higher bins, which the
# probability policy's cut-off bin is found by (moeviz.analyses.probability_drops); and an expert with at most
# WEIGHT_HIST_MERGE_MAX routes, or with a merged row among its counts, as one merged row (bin -1, above 0). A merged
# row's routes have no bins left, so a merged expert whose routes grow past the limit in a later fold stays merged
# (exact, only slower to order at query time); it takes a step split across compactions or batches.
_WEIGHT_HIST_ROWS_SQL = f"""
    SELECT run_id, step, rank, layer, expert,
           CAST(CASE WHEN merged THEN {layout.WEIGHT_HIST_MERGED_BIN} ELSE bin END AS SMALLINT) AS bin,
           sum(assigned) AS assigned, sum(first_choice) AS first_choice, sum(weight_q_sum) AS weight_q_sum,
           CASE WHEN merged THEN 0 ELSE min(above) END AS above
    FROM (
        SELECT *, coalesce(sum(assigned) OVER (PARTITION BY run_id, step, rank, layer, expert ORDER BY bin DESC
                                               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS above,
               sum(assigned) OVER (PARTITION BY run_id, step, rank, layer, expert) <= {layout.WEIGHT_HIST_MERGE_MAX}
               OR min(bin) OVER (PARTITION BY run_id, step, rank, layer, expert) < 0 AS merged
        FROM ({{counts}}))
    GROUP BY run_id, step, rank, layer, expert, merged, CASE WHEN merged THEN {layout.WEIGHT_HIST_MERGED_BIN} ELSE bin END"""


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


class _TokenSetsFile:
    """The token_sets rows of one rank's compacted routes, computed from the sorted batches the routes file is
    written from (each (token, layer) group is a run of consecutive rows there) and written as a zstd Parquet file
    beside it: no second scan of the routes and no GROUP BY over them in DuckDB.

    Exact only when no group spans two batches: `_write_compacted_routes` cuts batches at step boundaries, and
    a batch whose first step is not after every step already written (a step larger than a batch, steps out of
    order across segments), or a null in a grouping column, turns it off (`ok` False): compaction then builds
    token_sets with `token_sets_sql` instead, as before."""

    def __init__(self, run_dir: Path, rank: int, name: str):
        import pyarrow.parquet as pq

        self.folder = layout.compacted_table_dir(run_dir, layout.TOKEN_SETS, rank)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.final, self.tmp = self.folder / name, self.folder / f".{name}.tmp"
        self.writer = pq.ParquetWriter(self.tmp, layout.DISK_SCHEMAS[layout.TOKEN_SETS],
                                       **layout.compacted_table_options(layout.TOKEN_SETS))
        self.ok, self.rows, self.last_step = True, 0, None

    def add(self, batch: pa.Table, groupable: bool) -> None:
        """Add the rows of one batch sorted by COMPACTED_SORT (`groupable`: see _groupable)."""
        if not self.ok or not batch.num_rows:
            return
        step = batch.column("step").to_numpy()
        if not groupable or (self.last_step is not None and step[0] <= self.last_step):
            self.ok = False  # not exact from batches: token_sets_sql builds the table instead
            return
        self.last_step = int(step[-1])
        sets = token_sets_of_sorted(batch)
        self.writer.write_table(sets, row_group_size=max(1, sets.num_rows))
        self.rows += sets.num_rows

    def close(self) -> tuple[str, int, int, int] | None:
        """Publish the file under its final name: (name, rank, rows, bytes), or None (and no file) if not ok."""
        self.writer.close()
        if not self.ok or not self.rows:
            self.tmp.unlink(missing_ok=True)
            return None
        _fsync(self.tmp)
        os.replace(self.tmp, self.final)
        _fsync(self.folder)
        return self.final, self.rows, self.final.stat().st_size

    def discard(self) -> None:
        try:
            self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# A batch's weight-bin counts (routes without a weight have no bin), in the order `above` is summed in
_BATCH_WEIGHT_BINS_SQL = f"""
    SELECT step, layer, expert, CAST(weight_q >> {layout.WEIGHT_BIN_SHIFT} AS SMALLINT) AS bin,
           count(*) AS assigned, count(*) FILTER (WHERE slot = 0) AS first_choice,
           CAST(sum(weight_q) AS BIGINT) AS weight_q_sum
    FROM _batch {{only}} WHERE weight_q IS NOT NULL GROUP BY ALL ORDER BY step, layer, expert, bin DESC"""
# ... and per expert (one group per expert: ~16x fewer than per bin where experts get a few routes each)
_BATCH_EXPERTS_SQL = """
    SELECT step, layer, expert, count(*) AS assigned, count(*) FILTER (WHERE slot = 0) AS first_choice,
           CAST(sum(weight_q) AS BIGINT) AS weight_q_sum
    FROM _batch WHERE weight_q IS NOT NULL GROUP BY ALL"""


def _batch_weight_rows(con) -> pa.Table:
    """One batch's weight_hist rows (step, layer, expert, bin, assigned, first_choice, weight_q_sum, above), sorted
    by (step, layer, expert, bin descending): the routes counted per expert first, a merged row (bin -1, above 0)
    for each expert of at most WEIGHT_HIST_MERGE_MAX routes, and bins only for the larger experts' routes (all of
    them, with no join, when every expert is larger): grouping per bin gave ~1 group per route at the sampled
    DeepSeek-V3 shape. The numpy/Arrow form of _WEIGHT_HIST_ROWS_SQL for one batch's routes."""
    import numpy as np
    import pyarrow.compute as pc

    from moeviz.store import duckdb_compat

    experts = duckdb_compat.arrow_table(con.execute(_BATCH_EXPERTS_SQL))
    big = pc.greater(experts.column("assigned"), layout.WEIGHT_HIST_MERGE_MAX)  # [experts]
    n_big = pc.sum(big).as_py() or 0
    if n_big == experts.num_rows:  # every expert binned (also no routes with a weight)
        return with_above(duckdb_compat.arrow_table(con.execute(_BATCH_WEIGHT_BINS_SQL.format(only=""))))
    small = experts.filter(pc.invert(big))
    merged = pa.table({"step": small.column("step"), "layer": small.column("layer"), "expert": small.column("expert"),
                       "bin": pa.array(np.full(small.num_rows, layout.WEIGHT_HIST_MERGED_BIN, np.int16)),
                       "assigned": small.column("assigned"), "first_choice": small.column("first_choice"),
                       "weight_q_sum": small.column("weight_q_sum"),
                       "above": pa.array(np.zeros(small.num_rows, np.int64))})
    if not n_big:
        return merged
    con.register("_big", experts.filter(big).select(["step", "layer", "expert"]))
    try:
        bins = with_above(duckdb_compat.arrow_table(con.execute(_BATCH_WEIGHT_BINS_SQL.format(
            only="SEMI JOIN _big USING (step, layer, expert)"))))
    finally:
        con.unregister("_big")
    return pa.concat_tables([merged.cast(bins.schema), bins]).sort_by(
        [("step", "ascending"), ("layer", "ascending"), ("expert", "ascending"), ("bin", "descending")])


class _RouteCounts:
    """The counts of token_stats, position_stats, sequence_stats and weight_hist over the routes batches of a
    compaction, grouped per batch in the pass that writes the routes files, so that the routes are read and
    decoded once: the partial counts go into tables of a scratch DuckDB file beside the run
    (`<run>/.compact-counts.duckdb`, on disk: at 10^9 routes they are 10^8-10^9 rows), and publishing sums them.

    weight_hist rows are final per batch (with `above`) when no step's routes span two batches of a rank
    (`disjoint`); otherwise they are summed and `above` recomputed by SQL at publication. `ok` False (a null in a
    grouping column, a batch mixing run ids or ranks): compaction counts the routes by SQL from the files."""

    KEYS = {"token_stats": ("layer", "token_id", "expert"), "position_stats": ("layer", "pos", "expert"),
            "sequence_stats": ("step", "seq", "layer", "expert"), layout.WEIGHT_HIST: ("step", "layer", "expert", "bin")}
    FILE = ".compact-counts.duckdb"

    def __init__(self, run_dir: Path):
        self.ok, self.disjoint = True, True
        self.path = run_dir / self.FILE
        self.rows = {t: 0 for t in self.KEYS}
        self.last_step: dict[int, int] = {}  # rank -> last step of its batches so far
        self.con = None

    def _connect(self):
        from moeviz.store import duckdb_compat

        _unlink_with_wal(self.path)
        con = duckdb_compat.connect(str(self.path), config=compaction_config())
        con.execute("SET enable_progress_bar = false")
        for table, keys in self.KEYS.items():
            cols = ["run_id", "rank", *keys, "assigned", "first_choice"] + (
                ["weight_q_sum", "above"] if table == layout.WEIGHT_HIST else [])
            types = {f.name: layout.duckdb_type(f.type) for f in layout.DISK_SCHEMAS[table]}
            con.execute(f'CREATE TABLE "{table}" ({", ".join(f"{c} {types[c]}" for c in cols)})')
        return con

    def add(self, batch: pa.Table, groupable: bool) -> None:
        """Count one batch (`groupable`: see _groupable; if not, the routes are counted by SQL instead)."""
        if not self.ok or not batch.num_rows:
            return
        if not groupable:
            self.ok = False
            return
        run_id, rank = batch.column("run_id")[0].as_py(), batch.column("rank")[0].as_py()
        if rank in self.last_step and batch.column("step")[0].as_py() <= self.last_step[rank]:
            self.disjoint = False
        self.last_step[rank] = batch.column("step")[-1].as_py()
        from moeviz.store import duckdb_compat

        if self.con is None:
            self.con = self._connect()
        # run_id and rank are constants of the batch: grouping by them cost a string per route
        self.con.register("_batch", batch.select(["step", "seq", "pos", "token_id", "layer", "slot", "expert",
                                                  "weight_q"]))
        try:
            for table, keys in self.KEYS.items():
                k = ", ".join(keys)
                if table == layout.WEIGHT_HIST:  # `above` by a cumulative sum (a window cost 2x the grouping)
                    self.con.register("_bins", _batch_weight_rows(self.con))
                    self.con.execute(f'INSERT INTO "{table}" BY NAME SELECT $1 AS run_id, $2 AS rank, * FROM _bins',
                                     [run_id, rank])
                    self.con.unregister("_bins")
                    self.rows[table] += 1
                    continue
                sql = (f"SELECT $1 AS run_id, $2 AS rank, {k}, count(*) AS assigned, "
                       f"count(*) FILTER (WHERE slot = 0) AS first_choice FROM _batch GROUP BY {k}")
                self.con.execute(f'INSERT INTO "{table}" BY NAME {sql}', [run_id, rank])
                self.rows[table] += 1
        finally:
            self.con.unregister("_batch")

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None
        _unlink_with_wal(self.path)

    def source(self, name: str) -> str | None:
        """The partial counts of one table as `counts.<name>` for a connection that attached the scratch file as
        `counts` (None if no batch had rows)."""
        return f'counts."{name}"' if self.rows[name] else None

    def detach(self) -> None:
        """Close the writing connection, so that the building connection can attach the file."""
        if self.con is not None:
            self.con.close()
            self.con = None


def with_above(bins: pa.Table) -> pa.Table:
    """Weight-bin counts sorted by (step, layer, expert, bin descending) with `above` added: the routes of the
    same step, layer and expert in higher bins (the numpy form of _WEIGHT_HIST_ROWS_SQL's window)."""
    import numpy as np

    assigned = bins.column("assigned").to_numpy()  # [rows]
    new = np.zeros(bins.num_rows, dtype=bool)  # [rows] True where a (step, layer, expert) starts
    new[:1] = True
    for k in ("step", "layer", "expert"):
        v = bins.column(k).to_numpy()
        new[1:] |= v[1:] != v[:-1]
    before = np.cumsum(assigned) - assigned  # [rows] routes in the rows before this one
    start = np.maximum.accumulate(np.where(new, np.arange(bins.num_rows), 0))  # [rows] its partition's first row
    return bins.append_column("above", pa.array(before - before[start], pa.int64()))


def _constant(batch: pa.Table, *columns: str) -> bool:
    """Whether each column holds one value across the batch (run_id and rank do within one rank's routes)."""
    import pyarrow.compute as pc

    return all(len(pc.unique(batch.column(c))) <= 1 for c in columns)


# The columns token_sets and the route counts group by: a NULL in any of them leaves the batch to the SQL path
_GROUPING_COLUMNS = ("run_id", "step", "rank", "seq", "pos", "layer", "slot", "token_id", "expert")


def _groupable(batch: pa.Table) -> bool:
    """Whether a batch's token_sets rows and counts can be taken from it directly (_TokenSetsFile, _RouteCounts):
    no NULL in a grouping column, and one run_id and rank (checked once per batch for both)."""
    return not any(batch.column(c).null_count for c in _GROUPING_COLUMNS) and _constant(batch, "run_id", "rank")


def token_sets_of_sorted(batch: pa.Table) -> pa.Table:
    """token_sets rows (layout.DISK_SCHEMAS["token_sets"]) of routes sorted by COMPACTED_SORT with one run_id and
    rank and no nulls in the grouping columns: the numpy form of `token_sets_sql` over those rows.

    A group is a run of rows with equal (step, layer, seq, pos); within it rows go by slot, so the first row's
    expert is arg_min(expert, slot). margin: the group's largest non-null value (its slot rows carry one value;
    token_sets_sql's any_value takes any of them)."""
    import numpy as np

    step = batch.column("step").to_numpy()  # [rows]
    layer = batch.column("layer").to_numpy()
    seq = batch.column("seq").to_numpy()
    pos = batch.column("pos").to_numpy()
    expert = batch.column("expert").to_numpy().astype(np.int64)  # [rows]
    new = np.ones(len(step), dtype=bool)  # [rows] True where a (token, layer) group starts
    new[1:] = (step[1:] != step[:-1]) | (layer[1:] != layer[:-1]) | (seq[1:] != seq[:-1]) | (pos[1:] != pos[:-1])
    starts = np.flatnonzero(new)  # [groups]
    counts = np.diff(np.append(starts, len(step)))  # [groups]
    bits = np.left_shift(np.uint64(1), np.clip(expert, 0, 63).astype(np.uint64))  # [rows]
    in_mask = (np.maximum.reduceat(expert, starts) < 64) & (np.minimum.reduceat(expert, starts) >= 0)  # [groups]
    margin = batch.column("margin")
    if margin.null_count == len(margin):
        margins = pa.nulls(len(starts), pa.float32())
    else:
        m = margin.to_numpy(zero_copy_only=False).astype(np.float32)  # [rows], NaN where NULL
        top = np.fmax.reduceat(m, starts)  # [groups] NaN where every slot row is NULL
        margins = pa.array(top, mask=np.isnan(top), type=pa.float32())
    first = batch.slice(0, 1)
    cols = {
        "run_id": pa.array([first.column("run_id")[0].as_py()] * len(starts), pa.string()),
        "step": pa.array(step[starts], pa.int64()),
        "rank": pa.array(np.full(len(starts), first.column("rank")[0].as_py(), dtype=np.int32)),
        "seq": pa.array(seq[starts], pa.int32()),
        "pos": pa.array(pos[starts], pa.int32()),
        "layer": pa.array(layer[starts], pa.int16()),
        "token_id": pa.array(np.minimum.reduceat(batch.column("token_id").to_numpy(), starts), pa.int32()),
        "first_expert": pa.array(expert[starts].astype(np.int16)),
        "experts": pa.array(np.bitwise_or.reduceat(bits, starts), pa.uint64(), mask=~in_mask),
        "k": pa.array(np.minimum(counts, 127).astype(np.int8)),
        "margin": margins,
    }
    return pa.Table.from_pydict(cols, schema=layout.DISK_SCHEMAS[layout.TOKEN_SETS])


def _write_compacted_routes(run_dir: Path, rank: int, paths: list[Path], with_sets: bool = False,
                            counts: "_RouteCounts | None" = None
                            ) -> tuple[tuple[str, int, int, int], tuple[str, int, int, int] | None]:
    """One compacted routes file from one rank's segments: ((name relative to the run, rank, rows, bytes), the
    same for its token_sets file, or None when `with_sets` is False or the sets could not be built from the
    batches (see _TokenSetsFile)). `counts`: summed over the batches as they are written (see _RouteCounts).

    Streams the segments in batches of about COMPACTED_ROW_GROUP_ROWS rows, each sorted by COMPACTED_SORT and
    written as one row group, so memory stays bounded whatever the run's size. A batch ends at a step boundary
    (the rows of its last step go on to the next batch), so that no token's rows span two batches. Written under
    a hidden name, fsynced, then renamed: the file is whole or absent."""
    import uuid

    import pyarrow.parquet as pq

    folder = layout.compacted_routes_dir(run_dir, rank)
    folder.mkdir(parents=True, exist_ok=True)
    gen = 1 + max([int(p.name[5:11]) for p in folder.glob("part-*.parquet") if p.name[5:11].isdigit()] or [-1])
    name = f"part-{gen:06d}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = folder / f".{name}.tmp"
    schema = layout.DISK_SCHEMAS["routes"]
    n_rows = 0
    sets = _TokenSetsFile(run_dir, rank, name) if with_sets else None
    try:
        with pq.ParquetWriter(tmp, schema, **layout.compacted_routes_options()) as w:
            pending: list[pa.Table] = []
            pending_rows = 0
            for p in paths:
                part = _with_disk_columns(pq.read_table(p), schema)
                pending.append(part)
                pending_rows += part.num_rows
                if pending_rows >= layout.COMPACTED_ROW_GROUP_ROWS:
                    batch, rest = _split_last_step(_sorted(pending), pending_rows >= 16 * layout.COMPACTED_ROW_GROUP_ROWS)
                    n_rows += _write_row_group(w, batch, sets, counts)
                    pending, pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
            if pending:
                n_rows += _write_row_group(w, _sorted(pending), sets, counts)
        _fsync(tmp)
        os.replace(tmp, folder / name)
        done = sets.close() if sets else None
    except BaseException:
        tmp.unlink(missing_ok=True)
        if sets:
            sets.discard()
        raise
    _fsync(folder)
    routes = (layout.relative_name(run_dir, folder / name), rank, n_rows, (folder / name).stat().st_size)
    return routes, (None if done is None else (layout.relative_name(run_dir, done[0]), rank, done[1], done[2]))


def _with_disk_columns(part: pa.Table, schema: pa.Schema) -> pa.Table:
    """A segment's table in the current on-disk schema: columns an older segment lacks (added by a later schema
    version) are NULL, as the readers show them."""
    cols = [part.column(f.name) if f.name in part.column_names else pa.nulls(part.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema) if part.num_rows else schema.empty_table()


def _sorted(parts: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(parts).sort_by([(c, "ascending") for c in layout.COMPACTED_SORT])


def _split_last_step(batch: pa.Table, force: bool) -> tuple[pa.Table, pa.Table]:
    """(the rows before the batch's last step, the rows of that step), which go on to the next batch; the whole
    batch and nothing when it holds one step (unless `force`: a step of more than 16 row groups is written in
    pieces, and its token_sets are then built by SQL)."""
    step = batch.column("step")
    if step.null_count:
        return batch, batch.slice(0, 0)
    values = step.to_numpy()
    cut = int(values.searchsorted(values[-1], side="left"))
    if cut == 0:
        return (batch, batch.slice(0, 0)) if force else (batch.slice(0, 0), batch)
    return batch.slice(0, cut), batch.slice(cut)


def _write_row_group(writer, batch: pa.Table, sets: "_TokenSetsFile | None", counts: "_RouteCounts | None") -> int:
    if not batch.num_rows:
        return 0
    writer.write_table(batch, row_group_size=max(1, batch.num_rows))
    if (sets is not None and sets.ok) or (counts is not None and counts.ok):
        groupable = _groupable(batch)
        if sets is not None:
            sets.add(batch, groupable)
        if counts is not None:
            counts.add(batch, groupable)
    return batch.num_rows


def _remove_unpublished_routes_files(run_dir: Path, published: dict[str, tuple[int, int]]) -> None:
    """Delete routes and token_sets files (and hidden temp files) no published run.duckdb names: a crashed
    compaction's."""
    for table in ("routes",) + layout.FILE_TABLES:
        root = run_dir / layout.COMPACTED_DIR / table
        if not root.is_dir():
            continue
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
    # derived tables kept as Parquet files beside run.duckdb (layout.FILE_TABLES): which file holds which table
    con.execute("CREATE TABLE _table_files (table_name VARCHAR, file VARCHAR PRIMARY KEY, rank INTEGER, rows BIGINT, "
                "bytes BIGINT)")
    con.execute("CREATE TABLE _rank_status (rank INTEGER, status_json VARCHAR)")
    con.execute("CREATE TABLE _meta (key VARCHAR, value VARCHAR)")


def _compacted_state(target: Path) -> tuple[set[str], dict[str, tuple[int, int]]]:
    """(names of the segments already folded into run.duckdb, {routes or token_sets file name: (rows, bytes)} it
    names)."""
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
        if "_table_files" in have:  # token_sets files (count toward the compacted bytes, never deleted)
            files.update({r[0]: (int(r[1]), int(r[2])) for r in con.execute(
                "SELECT file, rows, bytes FROM _table_files").fetchall()})
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
