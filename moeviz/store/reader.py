"""Reading a moeviz store: read-only DuckDB views over compacted runs and live segments; query; store_info.

A run's routes are the union of its live segments (minus those run.duckdb's `_segments` says are folded), the
compacted Parquet files run.duckdb's `_routes_files` names, and run.duckdb's own `routes` table (compactions
with routes_format="duckdb"). Both Parquet kinds are scanned by one pyarrow dataset.

`open_store(path)` is cheap (a few tens of milliseconds plus a directory listing): a reader that wants to see
new flushes of a live run opens the store again (the dashboard does so on refresh). A connection is a snapshot
of the files that existed when it was opened: a flush written later is not in it, and if a compaction deletes
segments the connection was reading, its next query over them fails with a "file not found" error: open again.

Lock-down, for SQL typed by users: the views' own database is opened read-only (CREATE/INSERT fail, and every
database attached to it is read-only too), the compacted `run.duckdb` files are attached before DuckDB's local
file system is disabled (an attached database keeps reading through its open handle), and the Parquet segments
are scanned by pyarrow datasets registered on the connection, not by DuckDB's file system. So no query can read
or write any file (`read_csv('/etc/passwd')`, `COPY ... TO`, `ATTACH`, `INSTALL` all fail), and the
configuration is locked. (DuckDB's `allowed_directories` was not enough: it also lets `COPY ... TO` write into
the allowed folder, and it implicitly allows writing over attached database files.)
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from moeviz.errors import StoreError
from moeviz.store import layout, rollups
from moeviz.store.schema import TABLES


class StoreWarning(UserWarning):
    """Something in a store was skipped or repaired; the data that could be read is still correct."""


class UncompactedRunWarning(StoreWarning):
    """A finished run whose segments were left for `moeviz compact`: nothing is wrong with its data (`moeviz check`
    notes it without counting it as a finding), but reading it is slower until it is compacted."""


@dataclass
class _RunFiles:
    """What a reader found in one run folder, listed before its run.duckdb is opened (see open_store)."""

    run_dir: Path
    manifest: dict
    statuses: dict[int, dict]
    segments: dict[str, list[Path]]
    skipped: dict[Path, str] = field(default_factory=dict)  # damaged files left out -> why
    uncommitted: list[Path] = field(default_factory=list)  # segment files no commit names (see layout)
    damage: str | None = None  # why run.duckdb could not be opened: the run then reads 'damaged'
    route_stats_complete: bool = False  # run.duckdb's token_stats/sequence_stats count every route (no live ones)
    partial_tables: set[str] = field(default_factory=set)  # FILE_TABLES with a named file skipped (missing rows)

    @classmethod
    def scan(cls, run_dir: Path) -> "_RunFiles":
        manifest = layout.read_manifest(run_dir)  # refuses a store newer than this moeviz
        found = layout.committed_files(run_dir, manifest)  # only what commits name: never half a flush
        return cls(run_dir, manifest, layout.read_statuses(run_dir), found.tables, found.damaged, found.uncommitted)

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id") or self.run_dir.name)

    @property
    def compacted(self) -> Path:
        return self.run_dir / layout.COMPACTED


# ---------------------------------------------------------------------------------------------------- open_store


def open_store(path, *, memory_limit: int | None = None, threads: int | None = None, spill: bool = False):
    """A read-only, locked-down DuckDB connection with the views of moeviz.store.schema over a run or a folder of runs.

    `memory_limit` (bytes) and `threads` set DuckDB's settings of those names before the configuration is locked
    (default: DuckDB's own, 80% of the RAM and one thread per core); the SQL sandbox sets them for user queries.
    `spill`: past `memory_limit`, DuckDB writes intermediate results (the routes of two 80 M-route runs grouped
    per token and layer) to a private folder in the system's temp folder, which it removes at close; without it a
    query over that limit fails (and below a default limit the kernel may kill the process: 17.9 GB for
    `agreement.summary` from those routes). Only for connections that run no untrusted SQL (`moeviz agree`, the
    benches): spilling needs DuckDB's local file system, and with it enabled DuckDB lets SQL write over the
    attached run.duckdb files (`COPY ... TO '<run>/run.duckdb'`); other paths stay refused.
    `path` may also be a list of such paths (`moeviz agree` opens two run folders side by side); two folders
    holding one run id are refused, as within one folder.
    Raises StoreNotFoundError when `path` holds no run, SchemaVersionError when a run is newer than this moeviz.
    Incomplete Parquet files (a copy in progress, a truncated file) are skipped with a StoreWarning.
    """
    runs = [_RunFiles.scan(d) for d in _run_dirs(path)]  # 1. list segments ...
    con = _read_only_connection(memory_limit, threads, spill)
    try:
        compacted = _attach_compacted(con, runs)  # 2. ... then open run.duckdb: a segment listed in 1 and
        for i, run in enumerate(runs):  # folded by a compaction in between is found in `_segments` here
            folded = compacted.get(i, {}).get("folded", set())
            run.segments = {t: [p for p in ps if layout.relative_name(run.run_dir, p) not in folded]
                            for t, ps in run.segments.items()}
            run.skipped = {p: why for p, why in run.skipped.items()
                           if layout.relative_name(run.run_dir, p) not in folded}
            run.uncommitted = [p for p in run.uncommitted if layout.relative_name(run.run_dir, p) not in folded]
            tables = compacted.get(i, {}).get("tables", {})
            run.route_stats_complete = set(layout.ROUTE_STATS_TABLES) <= set(tables) and not run.segments["routes"]
            run.segments["routes"] += _published_routes_files(run, compacted.get(i, {}).get("routes_files", {}))
        _register_segments(con, runs)
        file_tables = _register_table_files(con, runs, compacted)
        con.register("_run_status", _status_table(con, runs, compacted))
        _create_views(con, compacted, file_tables)
        _note_rollup_gaps(con, runs, compacted)
        _note_partial_tables(con, runs)
        _lock_down(con, spill)
    except BaseException:
        con.close()
        raise
    leftovers = [p for r in runs if not any(map(layout.writer_alive, r.statuses.values())) for p in r.uncommitted]
    if leftovers:  # a live writer's uncommitted files are a flush in progress: nothing to say about them
        warnings.warn(f"moeviz: left out {len(leftovers)} segment file(s) that no commit names (a flush interrupted "
                      f"by a crash; `moeviz compact` removes them): " + ", ".join(map(str, leftovers[:5]))
                      + (" ..." if len(leftovers) > 5 else ""), StoreWarning, stacklevel=2)
    skipped = [(p, why) for r in runs for p, why in r.skipped.items()]
    if skipped:
        warnings.warn(f"moeviz: skipped {len(skipped)} damaged Parquet file(s); the rest of the store reads: "
                      + "; ".join(f"{p} ({why})" for p, why in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
                      + ". A file still being copied reads once complete; otherwise move it out of the run folder "
                      "(`moeviz check` lists the damage)", StoreWarning, stacklevel=2)
    for r in runs:
        _warn_if_left_uncompacted(r)
    return con


def _warn_if_left_uncompacted(run: _RunFiles) -> None:
    """A finished run whose segments were left for `moeviz compact` (past the close limit, compact_on_close="auto")
    reads whole but without its roll-ups and bucket tables: its pages over steps read every per-step row, minutes
    on a long run. Said where the user looks (the dashboard's sidebar shows open_store's warnings)."""
    if not run.statuses or not layout.all_ranks_closed(run.statuses):
        return
    try:
        limit = layout.compact_at_close_max()
    except StoreError:
        limit = layout.COMPACT_AT_CLOSE_MAX
    compacted_dir = run.run_dir / layout.COMPACTED_DIR  # published routes files sit among the routes "segments"
    size = sum(_file_size(p) for ps in run.segments.values() for p in ps if compacted_dir not in p.parents)
    if size > limit:
        warnings.warn(f"moeviz: run {run.run_id!r} is finished but {layout.size_text(size)} of its segments are not "
                      f"compacted: every row reads, but analyses over steps read each per-step row (slow on a long "
                      f"run) until `moeviz compact {run.run_dir}`", UncompactedRunWarning, stacklevel=3)


def _run_dirs(path) -> list:
    """The run folders of a path, or of a list of paths (each run once; one run id in two folders refused)."""
    if not isinstance(path, (list, tuple)):
        return layout.find_runs(path)
    dirs: list = []
    for p in path:
        dirs += [d for d in layout.find_runs(p) if d not in dirs]
    layout.check_unique_run_ids(dirs, "open them one at a time")
    return dirs


STALE_MESSAGE = ("the store changed on disk since this connection was opened (a compaction folded segments it was "
                 "reading): open it again with moeviz.store.open_store(path); the dashboard re-opens by itself")


def is_stale(e: BaseException) -> bool:
    """A query failed because a segment this connection had listed was deleted since (see the module docstring)."""
    text = str(e)
    return "Failed to open local file" in text and ("No such file" in text or "errno 2" in text)


def _read_only_connection(memory_limit: int | None = None, threads: int | None = None, spill: bool = False):
    """A connection to an empty database opened read-only (so CREATE TABLE and INSERT fail in it). `spill`: with
    a temp_directory that does not exist yet (DuckDB creates it on the first spill and removes it at close;
    `enable_external_access = false` still lets DuckDB, and only it, write there)."""
    import duckdb

    from moeviz.store import duckdb_compat

    fd, tmp = tempfile.mkstemp(prefix="moeviz-views-", suffix=".duckdb")
    os.close(fd)
    os.unlink(tmp)
    config = {"autoinstall_known_extensions": False, "allow_community_extensions": False,
              "allow_persistent_secrets": False, "temp_directory": _spill_folder() if spill else ""}
    if memory_limit is not None:
        config["memory_limit"] = f"{int(memory_limit) // 1024}KiB"
    if threads is not None:
        config["threads"] = int(threads)
    try:
        duckdb.connect(tmp).close()
        con = duckdb_compat.connect(tmp, read_only=True, config=config)
    finally:
        for leftover in (tmp, tmp + ".wal"):
            if os.path.exists(leftover):
                os.unlink(leftover)  # the open database keeps its inode; nothing is left behind in /tmp
    con.execute("LOAD json")  # config is JSON: load before the file system is disabled
    return con


def _spill_folder() -> str:
    """A new folder name in the system's temp folder, unique to this connection (not created here). The spill
    folders of processes that no longer run are removed first: DuckDB removes its folder when the connection
    closes, but a process killed mid-query (OOM, Ctrl-C twice, a job's time limit) leaves it, and one
    `moeviz agree` of two 80 M-route runs spills tens of GB (a 27 GB folder was found left this way)."""
    remove_dead_spill_folders()
    return os.path.join(tempfile.gettempdir(), f"{_SPILL_PREFIX}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


_SPILL_PREFIX = "moeviz-spill-"


def _host() -> str:
    """This machine's name as a folder-name part: pids are compared only with folders of the same host (a temp
    folder shared by containers holds other pid namespaces' folders, which must not look dead)."""
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def remove_dead_spill_folders(root: str | None = None) -> int:
    """Delete `moeviz-spill-<host>-<pid>-<id>` folders of this host under `root` (the temp folder) whose pid runs
    no process: how many. Folders of live processes (other open connections) and of other hosts are left alone."""
    n = 0
    for path in glob.glob(os.path.join(root or tempfile.gettempdir(), f"{_SPILL_PREFIX}{_host()}-*-*")):
        pid = os.path.basename(path)[len(_SPILL_PREFIX) + len(_host()) + 1:].split("-")[0]
        if not pid.isdigit() or layout.pid_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        n += 1
    return n


def _attach_compacted(con, runs: list[_RunFiles]) -> dict[int, dict]:
    """ATTACH each run.duckdb READ_ONLY as run<i>: {i: {"alias", "tables": {table: columns}, "folded": names}}."""
    from moeviz.store import duckdb_compat

    out = {}
    for i, run in enumerate(runs):
        if not run.compacted.exists():
            continue
        alias = f"run{i}"
        try:
            con.execute(f"ATTACH {duckdb_compat.sql_string(str(run.compacted))} AS {alias} (READ_ONLY)")
        except Exception as e:  # noqa: BLE001 - whatever DuckDB says, the file cannot be read
            run.damage = compacted_damage(run.compacted, e)
            warnings.warn(f"moeviz: {run.damage}", StoreWarning, stacklevel=3)
            continue
        cols: dict[str, list[str]] = {}
        for t, c in con.execute("SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = ? "
                                "ORDER BY column_index", [alias]).fetchall():
            cols.setdefault(t, []).append(c)
        folded = {r[0] for r in con.execute(f"SELECT file FROM {alias}.main._segments").fetchall()} \
            if "_segments" in cols else set()
        statuses = {}
        if "_rank_status" in cols:
            for rank, body in con.execute(f"SELECT rank, status_json FROM {alias}.main._rank_status").fetchall():
                statuses[int(rank)] = json.loads(body)
        routes_files = {r[0]: r[1] for r in con.execute(f"SELECT file, rows FROM {alias}.main._routes_files")
                        .fetchall()} if "_routes_files" in cols else {}
        table_files: dict[str, list[str]] = {}  # token_sets kept as Parquet files beside run.duckdb
        if "_table_files" in cols:
            for t, name in con.execute(f"SELECT table_name, file FROM {alias}.main._table_files ORDER BY file"
                                       ).fetchall():
                table_files.setdefault(t, []).append(name)
        out[i] = {"alias": alias, "tables": cols, "folded": folded, "statuses": statuses, "routes_files": routes_files,
                  "table_files": table_files}
    return out


def compacted_damage(path: Path, e: BaseException) -> str:
    """One line for a run.duckdb that cannot be opened: what failed, what is missing, what to do."""
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return (f"{path} cannot be opened ({first}): the data compacted into it is missing, only the run's remaining "
            f"segments are read. Restore it from a copy, or move it aside (mv {path} {path}.damaged) and run "
            f"`moeviz compact` to fold the remaining segments")


def _published_routes_files(run: _RunFiles, names) -> list[Path]:
    """The compacted routes Parquet files a run.duckdb names (read with the segments: same on-disk schema).
    A missing or damaged one (deleted by hand, a failed disk) is skipped with a StoreWarning, not fatal."""
    out = []
    for name in sorted(names):
        p = run.run_dir / name
        if layout.is_complete_parquet(p):
            out.append(p)
        else:
            run.skipped[p] = "a compacted routes file, missing or not a whole Parquet file"
    return out


def _register_segments(con, runs: list[_RunFiles]) -> None:
    """One pyarrow dataset per table over every run's not-yet-compacted segments, registered as _seg_<table>.

    run_id goes last in the dataset's schema: a query that needs no column (`count(*)`) or only filtered ones
    makes DuckDB's Arrow scan read the first column of the schema, and run_id (a dictionary column decoded to
    strings per batch) is the most expensive one: first, it made `SELECT count(*) FROM routes` over 20M live
    routes take ~1.9 s instead of ~0.13 s."""
    import pyarrow.dataset as ds

    for t in layout.SEGMENT_TABLES:
        files = [str(p) for r in runs for p in r.segments[t]]
        con.register(f"_seg_{t}", ds.dataset(files, schema=_scan_schema(t), format="parquet"))


def _register_table_files(con, runs: list[_RunFiles], compacted: dict[int, dict]) -> dict[str, list[tuple[str, str]]]:
    """A pyarrow dataset per run and table of layout.FILE_TABLES over the Parquet files its run.duckdb names,
    registered as _files_<table>_<i>: {table: [(dataset name, run id)]} (no entry: the view reads run.duckdb
    alone). The datasets leave run_id out and the view gives it as a constant, so `WHERE run_id = ?` prunes
    whole runs instead of decoding a string per row (routing agreement: 3x faster). A missing or damaged file is
    skipped with a StoreWarning, like a compacted routes file."""
    import pyarrow.dataset as ds

    registered: dict[str, list[tuple[str, str]]] = {}
    for t in layout.FILE_TABLES:
        schema = layout.DISK_SCHEMAS[t]
        schema = schema.remove(schema.get_field_index("run_id"))
        for i, run in enumerate(runs):
            files = []
            for name in compacted.get(i, {}).get("table_files", {}).get(t, []):
                p = run.run_dir / name
                if layout.is_complete_parquet(p):
                    files.append(str(p))
                else:
                    run.skipped[p] = f"a compacted {t} file, missing or not a whole Parquet file"
                    run.partial_tables.add(t)
            if files:
                con.register(f"_files_{t}_{i}", ds.dataset(files, schema=schema, format="parquet"))
                registered.setdefault(t, []).append((f"_files_{t}_{i}", run.run_id))
    return registered


def _scan_schema(table: str) -> pa.Schema:
    """The on-disk schema of a table with run_id moved to the end (see _register_segments)."""
    schema = layout.DISK_SCHEMAS[table]
    i = schema.get_field_index("run_id")
    return schema.remove(i).append(schema.field(i))


def _status_table(con, runs: list[_RunFiles], compacted: dict[int, dict]) -> pa.Table:
    """One row per run: its status derived from the ranks' status files (or the copy kept in run.duckdb)."""
    rows = []
    for i, run in enumerate(runs):
        statuses = run.statuses or compacted.get(i, {}).get("statuses", {})
        st = layout.run_status(statuses)
        if run.damage:  # what the run folded into run.duckdb is missing from every table: say so in `runs`
            st.update(status="damaged", error=run.damage)
        # what every rank lost while recording: a runs row holds one rank's count (the lowest rank's row is read)
        counted = [statuses[r] for r in sorted(statuses) if "recording_errors" in statuses[r]]
        errors = sum(int(s.get("recording_errors") or 0) for s in counted) if counted else None
        first = next((s.get("recording_error") for s in counted if s.get("recording_error")), None)
        rows.append({"run_id": run.run_id, "run_name": st["run_name"], "world_size": st["world_size"],
                     "started_at": st["started_at"], "ended_at": st["ended_at"], "status": st["status"],
                     "error": st["error"], "schema_version": int(run.manifest["written_schema_version"]),
                     "route_stats_complete": run.route_stats_complete, "recording_errors": errors,
                     "recording_error": first})
    schema = pa.schema([("run_id", pa.string()), ("run_name", pa.string()), ("world_size", pa.int32()),
                        ("started_at", pa.timestamp("us")), ("ended_at", pa.timestamp("us")),
                        ("status", pa.string()), ("error", pa.string()), ("schema_version", pa.int32()),
                        ("route_stats_complete", pa.bool_()), ("recording_errors", pa.int64()),
                        ("recording_error", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def _disk_select(table: str, source: str, have: list[str] | None) -> str:
    """SELECT of the on-disk columns from one source; columns an older file lacks read as NULL."""
    exprs = []
    for f in layout.DISK_SCHEMAS[table]:
        if have is None or f.name in have:
            exprs.append(f'"{f.name}"')
        else:
            exprs.append(f'CAST(NULL AS {layout.duckdb_type(f.type)}) AS "{f.name}"')
    return f"SELECT {', '.join(exprs)} FROM {source}"


def _file_select(table: str, dataset: str, run_id: str) -> str:
    """SELECT of the on-disk columns from one run's dataset of a FILE_TABLES table, run_id a constant."""
    from moeviz.store import duckdb_compat

    exprs = [f'CAST({duckdb_compat.sql_string(run_id)} AS VARCHAR) AS "run_id"' if f.name == "run_id" else f'"{f.name}"'
             for f in layout.DISK_SCHEMAS[table]]
    return f"SELECT {', '.join(exprs)} FROM {dataset}"


def _public_select(table: str, overrides: dict[str, str], source: str) -> str:
    """SELECT of the public columns, in the schema's order and types."""
    exprs = [f'{overrides.get(c.name, f"CAST({c.name} AS {c.sql_type})")} AS "{c.name}"' for c in TABLES[table].columns]
    return f"SELECT {', '.join(exprs)} FROM {source}"


def _create_views(con, compacted: dict[int, dict], file_tables: dict[str, list[tuple[str, str]]] | None = None
                  ) -> None:
    for t in layout.SEGMENT_TABLES:
        parts = [_disk_select(t, f"_seg_{t}", None)]
        for info in compacted.values():
            if t in info["tables"]:
                parts.append(_disk_select(t, f'{info["alias"]}.main."{t}"', info["tables"][t]))
        con.execute(f"CREATE TEMP VIEW _disk_{t} AS " + " UNION ALL ".join(parts))
    weight = f"CAST(weight_q AS DOUBLE) / {layout.WEIGHT_SCALE}"
    for t in layout.DATA_TABLES:
        con.execute(f"CREATE TEMP VIEW {t} AS " + _public_select(t, {"weight": weight}, f"_disk_{t}"))
    # only in run.duckdb (built by compaction); typed and empty elsewhere. The bucket tables are read where
    # `buckets_complete` says they cover every row
    for t in layout.COMPACTION_TABLES + layout.BUCKET_TABLES:
        parts = [_disk_select(t, f'{info["alias"]}.main."{t}"', info["tables"][t])
                 for info in compacted.values() if t in info["tables"]]
        for dataset, run_id in (file_tables or {}).get(t, []):  # token_sets: also the files beside run.duckdb
            parts.append(_file_select(t, dataset, run_id))
        source = " UNION ALL ".join(parts) if parts else _disk_select(t, "(SELECT 1 WHERE FALSE) AS none", [])
        con.execute(f"CREATE TEMP VIEW {t} AS " + _public_select(t, {}, f"({source})"))
    for t in layout.ROLLUP_TABLES:
        con.execute(f"CREATE TEMP VIEW {t} AS " + _public_select(t, {}, f"({_rollup_source(t, compacted)})"))
    con.execute("CREATE TEMP TABLE layers AS " + _public_select(  # small and read by most analyses: see runs
        "layers", {}, "_disk_layers QUALIFY row_number() OVER (PARTITION BY run_id, layer ORDER BY rank) = 1"))
    con.execute("CREATE TEMP VIEW vocab AS " + _public_select(
        "vocab", {}, "_disk_vocab QUALIFY row_number() OVER (PARTITION BY run_id, token_id ORDER BY rank) = 1"))
    runs_from = ("_run_status s LEFT JOIN (SELECT * FROM _disk_runs QUALIFY row_number() OVER "
                 "(PARTITION BY run_id ORDER BY rank, written_at DESC) = 1) m ON m.run_id = s.run_id")
    from_status = {"run_id", "world_size", "started_at", "ended_at", "status", "error", "schema_version",
                   "route_stats_complete"}
    overrides = {c: f"CAST(s.{c} AS {TABLES['runs'].columns[i].sql_type})"
                 for i, c in enumerate(TABLES["runs"].column_names) if c in from_status}
    overrides["run_name"] = "coalesce(m.run_name, s.run_name)"
    for c in ("recording_errors", "recording_error"):  # summed over the ranks' status files when they have it
        overrides[c] = f"coalesce(s.{c}, m.{c})"
    overrides.update({c.name: f"CAST(m.{c.name} AS {c.sql_type})" for c in TABLES["runs"].columns
                      if c.name not in overrides})
    # a table, not a view: every analysis asks `runs` first, and the view (status files joined with the runs
    # metadata of every segment and run.duckdb) cost 10-12 ms a query; it is a snapshot taken at open either way
    con.execute("CREATE TEMP TABLE runs AS " + _public_select("runs", overrides, runs_from))


def _rollup_source(table: str, compacted: dict[int, dict]) -> str:
    """Every row of a roll-up (moeviz.store.rollups): the blocks compaction built into each run.duckdb, plus the
    rows no compacted roll-up covers (the live segments, and the compacted rows of a run.duckdb built before the
    roll-ups existed) rolled up on the fly, so the view always sums every row of its source table."""
    source = rollups.SPEC[table][0]
    parts = [_disk_select(table, f'{info["alias"]}.main."{table}"', info["tables"][table])
             for info in compacted.values() if table in info["tables"]]
    uncovered = [_disk_select(source, f"_seg_{source}", None)] + [
        _disk_select(source, f'{info["alias"]}.main."{source}"', info["tables"][source])
        for info in compacted.values() if source in info["tables"] and table not in info["tables"]]
    parts.append(rollups.rollup_sql(table, "(" + " UNION ALL ".join(uncovered) + ")"))
    return " UNION ALL ".join(parts)


ROLLUP_GAPS = "_rollup_gaps"


def _note_rollup_gaps(con, runs: list[_RunFiles], compacted: dict[int, dict]) -> None:
    """How many sources of the roll-up views are not compacted roll-ups (live step_stats/layer_stats segments, a
    run.duckdb built before roll-ups): one number in a one-row table, for `rollups_complete`. Where it is not 0
    the views roll those rows up at each query, which is slower than reading them directly."""
    sources = {rollups.SPEC[t][0] for t in layout.ROLLUP_TABLES}
    n = sum(len(r.segments[t]) for r in runs for t in sources)
    n += sum(1 for info in compacted.values() for t in layout.ROLLUP_TABLES
             if t not in info["tables"] and rollups.SPEC[t][0] in info["tables"])
    con.execute(f"CREATE TEMP TABLE {ROLLUP_GAPS} AS SELECT CAST({int(n)} AS BIGINT) AS uncovered")
    # the bucket tables cannot be completed on the fly: any live step_stats segment, or a run.duckdb without them
    # (each of LATER_BUCKET_TABLES counted apart: a run.duckdb compacted before it existed lacks only that one)
    live = sum(len(r.segments["step_stats"]) for r in runs)
    core = set(layout.BUCKET_TABLES) - set(layout.LATER_BUCKET_TABLES)
    gaps = live + sum(1 for info in compacted.values() if "step_stats" in info["tables"]
                      and not core <= set(info["tables"]))
    con.execute(f"CREATE TEMP TABLE {BUCKET_GAPS} AS SELECT CAST({int(gaps)} AS BIGINT) AS uncovered")
    later = [(t, gaps + sum(1 for info in compacted.values() if "step_stats" in info["tables"]
                            and t not in info["tables"])) for t in layout.LATER_BUCKET_TABLES]
    con.execute(f"CREATE TEMP TABLE {LATER_BUCKET_GAPS} (table_name VARCHAR, uncovered BIGINT)")
    con.executemany(f"INSERT INTO {LATER_BUCKET_GAPS} VALUES (?, ?)", [list(x) for x in later])


BUCKET_GAPS = "_bucket_gaps"
LATER_BUCKET_GAPS = "_later_bucket_gaps"
PARTIAL_TABLES = "_partial_tables"


def _note_partial_tables(con, runs: list[_RunFiles]) -> None:
    """Which runs lack rows of a table kept as files (layout.FILE_TABLES: token_sets) because a file their
    run.duckdb names was skipped (missing, truncated): one row per run and table, for `route_stats_complete(con,
    table=...)`. The view still reads the other files: without this note an analysis would find rows and take
    them for all of the run's."""
    rows = [(r.run_id, t) for r in runs for t in sorted(r.partial_tables)]
    con.execute(f"CREATE TEMP TABLE {PARTIAL_TABLES} (run_id VARCHAR, table_name VARCHAR)")
    if rows:
        con.executemany(f"INSERT INTO {PARTIAL_TABLES} VALUES (?, ?)", [list(r) for r in rows])


def buckets_complete(con, table: str | None = None) -> bool:
    """Whether `con`'s bucket tables (layer_buckets, pooled_buckets, step_drops: moeviz.store.rollups) hold every
    step_stats row: every run compacted with them and nothing live (False without them; True for a connection
    that has them as tables and no note, as moeviz.testing builds). `table`: one of layout.LATER_BUCKET_TABLES
    (expert_drops) instead, which a run.duckdb compacted before it existed lacks."""
    have = table_names(con)
    if table is not None:
        if table not in layout.LATER_BUCKET_TABLES:
            raise ValueError(f"buckets_complete(table=) takes one of {layout.LATER_BUCKET_TABLES}; got {table!r}")
        if table not in have:
            return False
        if LATER_BUCKET_GAPS not in have:
            return True
        row = con.execute(f"SELECT uncovered FROM {LATER_BUCKET_GAPS} WHERE table_name = ?", [table]).fetchone()
        return row is not None and row[0] == 0
    core = set(layout.BUCKET_TABLES) - set(layout.LATER_BUCKET_TABLES)
    if not core <= have:
        return False
    if BUCKET_GAPS not in have:
        return True
    return con.execute(f"SELECT uncovered FROM {BUCKET_GAPS}").fetchone()[0] == 0


def rollups_complete(con) -> bool:
    """Whether `con`'s roll-up views (`step_rollups`, `layer_rollups`) are read straight from compacted roll-ups,
    so that reading them beats reading step_stats/layer_stats: a store opened by `open_store` whose runs are all
    compacted (a live run's segments are rolled up at every query: slower than the per-step rows); a
    connection that has the views and no such note (moeviz.testing stores: tables). False without the views."""
    have = table_names(con)
    if not set(layout.ROLLUP_TABLES) <= have:
        return False
    if ROLLUP_GAPS not in have:
        return True
    return con.execute(f"SELECT uncovered FROM {ROLLUP_GAPS}").fetchone()[0] == 0


def _lock_down(con, spill: bool = False) -> None:
    """No file access for SQL on `con`. With `spill`, the local file system stays enabled for DuckDB's own spill
    folder (disabling it makes every spill fail with a permission error); `enable_external_access = false` then
    refuses other local paths (read_csv('/etc/passwd'), ATTACH, COPY elsewhere) but not the spill folder and the
    attached run.duckdb files: see open_store."""
    con.execute("SET enable_external_access = false")
    if not spill:
        con.execute("SET disabled_filesystems = 'LocalFileSystem'")
    con.execute("SET lock_configuration = true")


def holds_one_run(con) -> bool:
    """Whether the store behind `con` holds a single run, so a query over `routes` may leave out its run_id
    predicate: every route belongs to a run of `runs`. Why bother: `routes.run_id` is a dictionary-encoded string
    column and filtering on it decodes a string per route, which costs as much as a simple aggregate itself
    (count over 100 M routes: 3.0 s with the predicate, 0.45 s without)."""
    return con.execute("SELECT count(DISTINCT run_id) FROM runs").fetchone()[0] == 1


def table_names(con) -> set[str]:
    """Tables and views `con` can query. A user's own connection may lack the aggregate tables (e.g. a private
    copy of a few tables), and the analyses then read `routes`."""
    return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}


def column_names(con, table: str) -> set[str]:
    """Columns of `table` (empty when there is none), from a zero-row SELECT: information_schema.columns lists the
    columns of every attached database and took 5-10 ms a call."""
    import duckdb

    if table not in table_names(con):
        return set()
    try:
        return {d[0] for d in con.execute(f'SELECT * FROM "{table}" LIMIT 0').description}
    except duckdb.Error:  # a view whose source is gone
        return set()


def route_stats_complete(con, runs=None, tables: set[str] | None = None, *, table: str | None = None
                         ) -> dict[str, bool]:
    """Per run id: whether `token_stats`, `position_stats` and `sequence_stats` count every route of the run
    (`runs.route_stats_complete`, on a connection that has those tables), so analyses may read them for `routes`.
    `runs` (the `runs` table as a DataFrame) and `tables` (`table_names(con)`): when the caller has them.
    `table` (a table kept as files, layout.FILE_TABLES: token_sets): also False for a run where a file of that
    table that its run.duckdb names was skipped (missing or damaged), so the table lacks some of its tokens."""
    have = table_names(con) if tables is None else tables
    if not set(layout.ROUTE_STATS_TABLES) <= have:
        return {}
    if runs is None:
        if "route_stats_complete" not in column_names(con, "runs"):
            return {}
        runs = con.execute("SELECT run_id, route_stats_complete FROM runs").df()
    if "route_stats_complete" not in runs.columns:
        return {}
    complete = {str(r): bool(c) for r, c in zip(runs["run_id"], runs["route_stats_complete"])}
    if table is not None and PARTIAL_TABLES in have:  # no note: a connection not opened by open_store
        for (run_id,) in con.execute(f"SELECT run_id FROM {PARTIAL_TABLES} WHERE table_name = ?", [table]).fetchall():
            complete[str(run_id)] = False
    return complete


def query(path, sql: str, params=None):
    """One query on the store at `path` as a DataFrame: opens it (open_store), runs `sql`, closes it. For a
    notebook cell or a test; keep an `open_store` connection for many queries (opening lists every segment)."""
    con = open_store(path)
    try:
        return con.execute(sql, params or []).df()
    finally:
        con.close()



# ---------------------------------------------------------------------------------------------------- store_info


def store_info(path) -> dict:
    """What a store holds, without opening views: runs, status, segment and row counts, bytes per route."""
    out = {"path": str(Path(path).expanduser().resolve()), "runs": []}
    for run_dir in layout.find_runs(path):
        run = _RunFiles.scan(run_dir)
        comp = _compacted_summary(run.compacted)
        st = layout.run_status(run.statuses or comp["statuses"])
        if comp.get("damaged"):
            st.update(status="damaged", error=comp["damaged"])
        tables = {}
        for t in layout.SEGMENT_TABLES + layout.COMPACTION_TABLES:  # the latter only ever in run.duckdb
            live = [p for p in run.segments.get(t, []) if layout.relative_name(run_dir, p) not in comp["folded"]]
            tables[t] = {"segments": len(live), "segment_rows": sum(_parquet_rows(p) for p in live),
                         "segment_bytes": sum(_file_size(p) for p in live),
                         "compacted_rows": comp["rows"].get(t, 0)}
        r = tables["routes"]
        routes = r["segment_rows"] + r["compacted_rows"]
        in_files = r["compacted_rows"] - comp.get("routes_in_duckdb", 0)  # compacted routes kept as Parquet files
        out["runs"].append({
            "run_id": run.run_id, "run_dir": str(run_dir), "status": st["status"], "error": st["error"],
            "world_size": st["world_size"], "started_at": st["started_at"], "ended_at": st["ended_at"],
            "schema_version": run.manifest["written_schema_version"], "compacted": run.compacted.exists(),
            "compacted_bytes": comp["bytes"], "routes_files": comp["routes_files"],
            "routes_files_bytes": comp["routes_files_bytes"], "tables": tables, "routes": routes,
            "skipped_files": [str(p) for p in run.skipped if layout.relative_name(run_dir, p) not in comp["folded"]]
            # the compacted routes and token_sets files run.duckdb names: readers skip a missing or cut one
            + [str(run_dir / n) for n in comp.get("named_files", []) if not layout.is_complete_parquet(run_dir / n)],
            "damaged": comp.get("damaged"),
            "recording_errors": sum(int(x.get("recording_errors") or 0)
                                    for x in (run.statuses or comp["statuses"]).values()),
            "uncommitted_files": [str(p) for p in run.uncommitted],
            "bytes_per_route_segments": (r["segment_bytes"] / r["segment_rows"]) if r["segment_rows"] else None,
            # the compacted routes files alone (routes compacted into run.duckdb share it with the other tables)
            "bytes_per_route_compacted": (comp["routes_files_bytes"] / in_files) if in_files > 0 else None,
            "run_duckdb_bytes": comp["bytes"] - comp["routes_files_bytes"] - comp.get("table_files_bytes", 0),
            "token_sets_files_bytes": comp.get("table_files_bytes", 0),
            "bytes_per_route": ((r["segment_bytes"] + comp["bytes"]) / routes) if routes else None,  # every file
        })
    return out


def _file_size(p: Path) -> int:
    """Size of a file, 0 if a concurrent compaction deleted it since it was listed."""
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _parquet_rows(p: Path) -> int:
    try:
        return pq.read_metadata(p).num_rows
    except (OSError, pa.ArrowException):
        return 0


def _compacted_summary(target: Path) -> dict:
    """Row counts, folded segment names and rank statuses kept in a run.duckdb (empty if there is none)."""
    out = {"rows": {}, "folded": set(), "statuses": {}, "bytes": 0, "routes_files": 0, "routes_files_bytes": 0}
    if not target.exists():
        return out
    from moeviz.store import duckdb_compat

    out["bytes"] = target.stat().st_size
    try:
        con = duckdb_compat.connect(str(target), read_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged run.duckdb is reported, not raised
        out["damaged"] = compacted_damage(target, e)
        return out
    try:
        have = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        out["rows"] = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
                       for t in layout.SEGMENT_TABLES + layout.COMPACTION_TABLES if t in have}
        out["routes_in_duckdb"] = out["rows"].get("routes", 0)
        if "_segments" in have:
            out["folded"] = {r[0] for r in con.execute("SELECT file FROM _segments").fetchall()}
        if "_routes_files" in have:  # compacted routes kept as Parquet files beside run.duckdb
            files = con.execute("SELECT count(*), coalesce(sum(rows), 0), coalesce(sum(bytes), 0) "
                                "FROM _routes_files").fetchone()
            out["routes_files"], out["routes_files_bytes"] = int(files[0]), int(files[2])
            out["named_files"] = [r[0] for r in con.execute("SELECT file FROM _routes_files").fetchall()]
            out["rows"]["routes"] = out["rows"].get("routes", 0) + int(files[1])
            out["bytes"] += int(files[2])
        if "_table_files" in have:  # token_sets kept as Parquet files beside run.duckdb
            for t, n, b in con.execute("SELECT table_name, coalesce(sum(rows), 0), coalesce(sum(bytes), 0) "
                                       "FROM _table_files GROUP BY table_name").fetchall():
                out["rows"][t] = out["rows"].get(t, 0) + int(n)
                out["bytes"] += int(b)
                out["table_files_bytes"] = out.get("table_files_bytes", 0) + int(b)
            out["named_files"] = out.get("named_files", []) + [
                r[0] for r in con.execute("SELECT file FROM _table_files").fetchall()]
        if "_rank_status" in have:
            out["statuses"] = {int(r): json.loads(b) for r, b in
                               con.execute("SELECT rank, status_json FROM _rank_status").fetchall()}
    finally:
        con.close()
    return out
