"""The moeviz store: a writer that appends Parquet segments, read-only DuckDB views over them, compaction.

    with RunWriter("runs/exp1", run_name="exp1") as w:          # one writer per rank, used by one thread
        w.write_run({"model_class": "MixtralForCausalLM", "n_layers": 8, "n_experts": 8, "top_k": 2})
        w.write_flush({"routes": {...numpy columns...}, "step_stats": {...}})
    con = open_store("runs/")        # any process, any time, also while the writer is running
    con.sql("SELECT layer, expert, count(*) FROM routes GROUP BY ALL")

DuckDB lets one process hold a database file read-write and blocks every other process meanwhile, so the
writer never opens a DuckDB file while it records: each `write_flush` writes one immutable Parquet segment per
table (layout in `moeviz.segments`), and readers query the segments through views. `compact` (run by the last
rank's `close`, or `moeviz compact`) folds the small tables into `<run>/run.duckdb`, written under a new name
and renamed over the old one, so a reader that has the old file open keeps reading it, and `routes` into large
zstd Parquet files named in run.duckdb (~2 bytes/route; see `compact`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from moeviz import segments as sg
from moeviz.errors import StoreError
from moeviz.schema import OPTIONAL_COLUMNS, SCHEMA_VERSION, TABLES
from moeviz.store_reader import StoreWarning, open_store, query, store_info  # noqa: F401  (public API of moeviz.store)

__all__ = ["RunWriter", "open_store", "compact", "store_info", "StoreWarning"]

RUN_META_KEYS = ("run_name", "model_class", "n_layers", "n_experts", "top_k", "capacity_factor", "config",
                 "sample_every", "max_tokens_per_step")
LAYER_KEYS = ("layer", "module_name", "n_experts", "top_k", "block_index", "stack")


class RunWriter:
    """Writes one rank of one run. Not thread-safe: call it from one (writer) thread.

    Several ranks may write the same run folder without coordinating: each has its own `rank=<r>` folders and
    status file. The last rank to close compacts the run (best effort: on failure the segments stay readable).
    """

    def __init__(self, run_dir, *, run_id: str | None = None, run_name: str | None = None, rank: int = 0,
                 world_size: int = 1, compact_on_close: bool = True):
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.run_id = str(run_id) if run_id is not None else self.run_dir.name
        self.rank, self.world_size = int(rank), int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise StoreError(f"rank must be in [0, world_size): got rank={rank}, world_size={world_size}")
        if not self.run_id:
            raise StoreError("run_id must be a non-empty string")
        self.compact_on_close = compact_on_close
        self._closed = False
        self._seq: dict[str, int] = {}
        self._clipped_warned = False
        _check_run_dir(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if sg.is_run_dir(self.run_dir):  # refuse a mismatched run before touching its status files
            sg.ensure_manifest(self.run_dir, self.run_id)
        previous = sg.read_statuses(self.run_dir).get(self.rank)
        if previous and sg.writer_alive(previous):
            raise StoreError(f"rank {self.rank} of {self.run_dir} is being written by pid {previous.get('pid')} on "
                             f"{previous.get('hostname')}: use another rank or run folder")
        if previous and previous.get("status") in ("finished", "failed"):
            warnings.warn(f"moeviz: appending to run {self.run_id!r} at {self.run_dir}, whose rank {self.rank} was "
                          f"already closed ({previous.get('status')} at {previous.get('ended_at')}); steps recorded "
                          f"again are counted twice: record a new run into a new folder", StoreWarning, stacklevel=2)
        now = sg.utc_iso()
        self._status = {
            "run_id": self.run_id, "rank": self.rank, "world_size": self.world_size, "run_name": run_name,
            "pid": os.getpid(), "hostname": socket.gethostname(), "proc_start": sg.process_start_ticks(os.getpid()),
            "started_at": (previous or {}).get("started_at") or now, "heartbeat": now, "status": "running",
            "error": None, "ended_at": None, "schema_version": SCHEMA_VERSION,
        }
        # status before manifest: a reader that finds the run (by its manifest) always finds a status too
        sg.write_json_atomic(sg.status_path(self.run_dir, self.rank), self._status)
        sg.ensure_manifest(self.run_dir, self.run_id)

    # ------------------------------------------------------------------------------------------------ writes

    def write_run(self, meta: Mapping[str, Any]) -> None:
        """The run's `runs` row: model_class, n_layers, n_experts, top_k, capacity_factor, config (dict or JSON
        text), sample_every, max_tokens_per_step (run_name optional). Call again to replace it."""
        self._check_open()
        unknown = set(meta) - set(RUN_META_KEYS)
        if unknown:
            raise StoreError(f"write_run got unknown keys {sorted(unknown)}; allowed: {', '.join(RUN_META_KEYS)}")
        config = meta.get("config")
        if config is not None and not isinstance(config, str):
            config = json.dumps(config, default=str)
        elif isinstance(config, str):
            try:
                json.loads(config)
            except ValueError as e:
                raise StoreError(f"write_run: config is a string but not valid JSON ({e})") from e
        row = {
            "run_id": self.run_id, "rank": self.rank, "written_at": sg.utc_now(),
            "run_name": meta.get("run_name", self._status["run_name"]), "model_class": meta.get("model_class"),
            "n_layers": meta.get("n_layers"), "n_experts": meta.get("n_experts"), "top_k": meta.get("top_k"),
            "capacity_factor": meta.get("capacity_factor"), "config": config,
            "sample_every": meta.get("sample_every"), "max_tokens_per_step": meta.get("max_tokens_per_step"),
            "schema_version": SCHEMA_VERSION,
        }
        self._write("runs", _rows_to_table("runs", [row]))

    def write_layers(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """One dict per MoE layer: layer, module_name, n_experts, top_k, block_index, stack."""
        self._check_open()
        out = []
        for i, r in enumerate(rows):
            unknown = set(r) - set(LAYER_KEYS)
            if unknown or "layer" not in r:
                raise StoreError(f"write_layers row {i}: needs 'layer', allows {', '.join(LAYER_KEYS)}; "
                                 f"got {sorted(r)}")
            out.append({"run_id": self.run_id, "rank": self.rank, **{k: r.get(k) for k in LAYER_KEYS}})
        if out:
            self._write("layers", _rows_to_table("layers", out))

    def write_vocab(self, token_ids, texts) -> None:
        """Token texts (decoded by the caller's tokenizer), for the vocab table."""
        self._check_open()
        ids = _int_column("vocab", "token_id", np.asarray(token_ids), np.int32)
        texts = [None if t is None else str(t) for t in texts]
        if len(texts) != len(ids):
            raise StoreError(f"write_vocab: {len(ids)} token_ids but {len(texts)} texts")
        if len(ids):
            self._write("vocab", pa.table({
                "run_id": sg.run_id_column(self.run_id, len(ids)),
                "rank": pa.array(np.full(len(ids), self.rank, np.int32)),
                "token_id": pa.array(ids), "text": pa.array(texts, pa.string())}))

    def write_flush(self, tables: Mapping[str, Mapping[str, Any]]) -> None:
        """Append one flush: {table: {column: numpy array or scalar}} for routes, step_stats, layer_stats,
        sequences. Columns as in moeviz.schema without run_id (`rank` defaults to this writer's rank);
        routes take `weight` as float in [0, 1] (quantised to 1/65535 on disk) and are stored layer-major:
        rows are stably sorted by layer if they are not already (keep token-then-slot order within a layer)."""
        self._check_open()
        unknown = set(tables) - set(sg.DATA_TABLES)
        if unknown:
            raise StoreError(f"write_flush got unknown tables {sorted(unknown)}; allowed: {', '.join(sg.DATA_TABLES)}")
        built = {name: self._data_table(name, cols) for name, cols in tables.items()}  # validate all, then write
        for name, data in built.items():
            for part in (_routes_segments(data) if name == "routes" else [data]) if data is not None else []:
                self._write(name, part)
        self._heartbeat()

    # ------------------------------------------------------------------------------------------------ close

    def close(self, status: str = "finished", error: BaseException | str | None = None) -> None:
        """Mark this rank finished (or failed, with the error); the last rank to close compacts the run."""
        if self._closed:
            return
        if status not in ("finished", "failed"):
            raise StoreError(f"close(status=...) must be 'finished' or 'failed', got {status!r}")
        self._closed = True
        now = sg.utc_iso()
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        self._status.update(status=status, error=error, ended_at=now, heartbeat=now)
        sg.write_json_atomic(sg.status_path(self.run_dir, self.rank), self._status)
        if self.compact_on_close and sg.all_ranks_closed(sg.read_statuses(self.run_dir)):
            try:
                compact(self.run_dir)
            except Exception as e:  # never lose data: the segments stay and every reader still sees them
                warnings.warn(f"moeviz: compaction of {self.run_dir} at close failed ({e}); the segments are kept "
                              f"and readable; run `moeviz compact {self.run_dir}` to retry", StoreWarning, stacklevel=2)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("finished" if exc is None else "failed", error=exc)

    # ------------------------------------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"RunWriter for {self.run_dir} (rank {self.rank}) is closed: open a new RunWriter "
                             f"to write more")

    def _write(self, table: str, data: pa.Table) -> None:
        if table not in self._seq:
            self._seq[table] = sg.next_segment_seq(sg.segment_dir(self.run_dir, table, self.rank))
        sg.write_segment(self.run_dir, table, self.rank, self._seq[table], data)
        self._seq[table] += 1

    def _heartbeat(self) -> None:
        self._status["heartbeat"] = sg.utc_iso()
        sg.write_json_atomic(sg.status_path(self.run_dir, self.rank), self._status)

    def _data_table(self, table: str, cols: Mapping[str, Any]) -> pa.Table | None:
        """Validate and convert one table of a flush to its on-disk Arrow form (None if it has no rows)."""
        schema = sg.DISK_SCHEMAS[table]
        expected = [c for c in TABLES[table].column_names if c != "run_id"]
        cols = dict(cols)
        cols.setdefault("rank", self.rank)
        for c in OPTIONAL_COLUMNS.get(table, ()):
            cols.setdefault(c, None)
        missing, extra = set(expected) - set(cols), set(cols) - set(expected)
        if missing or extra:
            raise StoreError(f"write_flush: table {table!r} " + (f"lacks columns {sorted(missing)} " if missing else "")
                             + (f"has unknown columns {sorted(extra)} " if extra else "")
                             + f"(expected {', '.join(expected)})")
        if any(np.ndim(v) > 1 for v in cols.values()):
            raise StoreError(f"write_flush: columns of {table!r} must be 1-D (flatten [tokens, k] arrays "
                             f"layer-major, then token, then slot)")
        lengths = {c: len(v) for c, v in cols.items() if np.ndim(v) == 1 or isinstance(v, (list, tuple))}
        if len(set(lengths.values())) > 1:
            raise StoreError(f"write_flush: columns of {table!r} differ in length: {lengths}")
        n = next(iter(lengths.values()), 1)
        if n == 0:
            return None
        arrays: dict[str, Any] = {}
        for c in expected:
            v = cols[c]
            if table == "routes" and c == "weight":
                arrays["weight_q"] = self._quantised_weights(_broadcast(v, n))
                continue
            t = schema.field(c).type
            if t == pa.string():
                try:
                    arrays[c] = pa.array([v] * n if np.ndim(v) == 0 and not isinstance(v, (list, tuple)) else list(v),
                                         pa.string())
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise StoreError(f"{table}.{c} must hold strings or None: {e}") from None
            elif t == pa.float64():
                arrays[c] = np.asarray(_broadcast(v, n), dtype=np.float64)
            elif c in OPTIONAL_COLUMNS.get(table, ()):
                arrays[c] = _nullable_int_column(table, c, v, n, t)
            else:
                arrays[c] = _int_column(table, c, _broadcast(v, n), t.to_pandas_dtype())
        if table == "routes":
            layer = arrays["layer"]
            if n > 1 and not np.all(layer[1:] >= layer[:-1]):
                order = np.argsort(layer, kind="stable")  # layer-major; token and slot order kept within a layer
                arrays = {k: v[order] for k, v in arrays.items()}
        out = {"run_id": sg.run_id_column(self.run_id, n)}
        out.update({f.name: pa.array(arrays[f.name], f.type) if not isinstance(arrays[f.name], pa.Array)
                    else arrays[f.name] for f in schema if f.name != "run_id"})
        return pa.table(out)

    def _quantised_weights(self, w) -> np.ndarray:
        w = np.asarray(w, dtype=np.float64 if np.asarray(w).dtype == np.float64 else np.float32)
        if not np.isfinite(w).all():
            raise StoreError("write_flush: routes.weight holds NaN or infinite values; the router produced "
                             "non-finite gate weights")
        lo, hi = float(w.min()), float(w.max())
        if (lo < -1e-6 or hi > 1 + 1e-6) and not self._clipped_warned:
            self._clipped_warned = True
            warnings.warn(f"moeviz: routes.weight outside [0, 1] (min {lo:.4g}, max {hi:.4g}) clipped to [0, 1]; "
                          f"record gate weights before any routed scaling factor", StoreWarning, stacklevel=3)
        return np.rint(np.clip(w, 0.0, 1.0) * sg.WEIGHT_SCALE).astype(np.uint16)


def _check_run_dir(run_dir: Path) -> None:
    """Refuse a run folder that is a file, or a folder that holds other runs (the new run would hide them:
    a folder that is itself a run is read as that run only)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise StoreError(f"{run_dir} is a file, not a folder: give a folder path for the run (it is created)")
    if run_dir.is_dir() and not sg.is_run_dir(run_dir):
        inner = sorted(c.name for c in run_dir.iterdir() if c.is_dir() and sg.is_run_dir(c))
        if inner:
            raise StoreError(f"{run_dir} is a folder of runs ({', '.join(inner[:5])}{', ...' if len(inner) > 5 else ''}"
                             f"), not a run: record into a new subfolder, e.g. {run_dir / 'my-run'}")
    for parent in run_dir.parents:
        if parent.is_file():
            raise StoreError(f"cannot create run folder {run_dir}: {parent} is a file")


def _routes_segments(routes: pa.Table) -> list[pa.Table]:
    """A layer-major routes table cut along the token axis into segments of at most ROUTES_ROWS_PER_LAYER rows
    per layer (and ROW_GROUP_ROWS in all), each still layer-major: see segments.ROUTES_ROWS_PER_LAYER."""
    layer = routes.column("layer").to_numpy()
    starts = np.concatenate([[0], np.flatnonzero(layer[1:] != layer[:-1]) + 1, [len(layer)]])  # [n_layers + 1]
    lengths = np.diff(starts)
    parts = max(-(-int(lengths.max()) // sg.ROUTES_ROWS_PER_LAYER), -(-len(layer) // sg.ROW_GROUP_ROWS))
    if parts <= 1:
        return [routes]
    out = []
    for j in range(parts):
        pieces = [routes.slice(int(a + n * j // parts), int(n * (j + 1) // parts - n * j // parts))
                  for a, n in zip(starts[:-1], lengths)]
        out.append(pa.concat_tables(pieces))
    return out


def _broadcast(v, n: int) -> np.ndarray:
    a = np.asarray(v)
    return np.full(n, a) if a.ndim == 0 else a


def _int_column(table: str, name: str, a: np.ndarray, dtype) -> np.ndarray:
    """An integer column cast to its on-disk type, refusing values that do not fit (instead of wrapping)."""
    a = np.asarray(a)
    if a.dtype == dtype:
        return a
    if a.dtype.kind not in "iub":
        raise StoreError(f"{table}.{name} must hold integers, got dtype {a.dtype}")
    if a.size and a.dtype.kind != "b":
        info = np.iinfo(dtype)
        lo, hi = a.min(), a.max()
        if lo < info.min or hi > info.max:
            raise StoreError(f"{table}.{name} holds values in [{lo}, {hi}], outside {np.dtype(dtype).name} "
                             f"[{info.min}, {info.max}]")
    return a.astype(dtype)


def _nullable_int_column(table: str, name: str, v, n: int, arrow_type: pa.DataType) -> pa.Array:
    """An optional integer column: None (all NULL) or numbers where NaN marks a NULL (the recorder packs its
    aggregates as float64 and writes NaN where a count is unknown)."""
    if v is None:
        return pa.nulls(n, arrow_type)
    a = np.asarray(_broadcast(v, n))
    if a.dtype.kind == "f":
        missing = np.isnan(a)
        if np.any(a[~missing] != np.rint(a[~missing])):
            raise StoreError(f"{table}.{name} must hold integers (or NaN for unknown)")
        return pa.array(np.where(missing, 0, a).astype(np.int64), pa.int64(), mask=missing).cast(arrow_type)
    return pa.array(_int_column(table, name, a, arrow_type.to_pandas_dtype()), arrow_type)


def _plain_value(v):
    """numpy scalars to Python; NaN (pandas' missing value) to None, i.e. SQL NULL."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


def _rows_to_table(table: str, rows: list[dict]) -> pa.Table:
    """A small metadata table from Python dicts, typed as on disk (with clear errors for bad values)."""
    schema = sg.DISK_SCHEMAS[table]
    rows = [{k: _plain_value(v) for k, v in r.items()} for r in rows]
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
        raise StoreError(f"bad value for table {table!r}: {e}") from e


# ---------------------------------------------------------------------------------------------------- compaction


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
    run_dirs = sg.find_runs(path)
    if len(run_dirs) == 1 and sg.is_run_dir(Path(path).expanduser()):
        return {"runs": [_compact_run(run_dirs[0], routes_format)]}
    out = []
    for run_dir in run_dirs:  # a folder of runs: compact what can be, say why the others were left alone
        try:
            out.append(_compact_run(run_dir, routes_format))
        except _LiveRun as e:
            out.append({"run_id": sg.read_manifest(run_dir).get("run_id"), "run_dir": str(run_dir), "skipped": str(e)})
    return {"runs": out}


class _LiveRun(StoreError):
    """The run still has a live writer."""


class _CompactionLock:
    """An exclusive flock on `<run>/.compact.lock`, so two compactions of one run never interleave."""

    def __init__(self, run_dir: Path, timeout_s: float = 120.0):
        self.path, self.timeout_s = run_dir / sg.LOCK_FILE, timeout_s

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
    manifest = sg.read_manifest(run_dir)
    statuses = sg.read_statuses(run_dir)
    live = [s for s in statuses.values() if sg.writer_alive(s)]
    if live:
        s = live[0]
        raise _LiveRun(f"run {manifest.get('run_id')!r} at {run_dir} is still being written (rank {s.get('rank')}, "
                         f"pid {s.get('pid')} on {s.get('hostname')}): compaction waits until every writer closed; "
                         f"readers see the segments meanwhile")
    target = run_dir / sg.COMPACTED
    with _CompactionLock(run_dir):
        found: dict[str, list[Path]] = {}
        skipped: list[Path] = []
        for t in sg.SEGMENT_TABLES:
            found[t], bad = sg.list_segments(run_dir, t)
            skipped += bad
        folded, published = _compacted_state(target)
        _remove_unpublished_routes_files(run_dir, published)  # left by a compaction that crashed before step 2
        new = {t: [p for p in ps if sg.relative_name(run_dir, p) not in folded] for t, ps in found.items()}
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
        deleted = 0
        for ps in found.values():  # also removes segments a crashed earlier compaction folded but did not delete
            for p in ps:
                if sg.relative_name(run_dir, p) in folded:
                    p.unlink(missing_ok=True)
                    deleted += 1
    if not rows:
        rows = _compacted_row_counts(target)
    size = target.stat().st_size + sum(b for _, b in published.values())
    return {
        "run_id": manifest.get("run_id"), "run_dir": str(run_dir), "segments_folded": n_new,
        "segment_bytes_folded": bytes_new, "segments_deleted": deleted, "skipped_files": [str(p) for p in skipped],
        "rows": rows, "compacted_bytes": size, "routes_files": len(published),
        "bytes_per_route": (size / rows["routes"]) if rows.get("routes") else None,
    }


def _publish_compacted(run_dir: Path, target: Path, manifest: dict, statuses: dict, new: dict[str, list[Path]],
                       written: list[tuple[str, int, int, int]], routes_in_duckdb: bool) -> dict[str, int]:
    """Build run.duckdb.tmp (old tables + new segments), fsync it and rename it over run.duckdb: row counts."""
    from moeviz import duckdb_compat

    tmp = run_dir / (sg.COMPACTED + ".tmp")
    for leftover in (tmp, Path(str(tmp) + ".wal")):
        leftover.unlink(missing_ok=True)
    con = duckdb_compat.connect(str(tmp))
    try:
        _create_compacted_tables(con)
        old_tables: set[str] = set()
        if target.exists():
            con.execute(f"ATTACH {duckdb_compat.sql_string(str(target))} AS old (READ_ONLY)")
            old_tables = {r[0] for r in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = 'old'").fetchall()}
            for t in sg.SEGMENT_TABLES + sg.COMPACTION_TABLES + ("_segments", "_routes_files"):
                if t in old_tables:
                    con.execute(f'INSERT INTO main."{t}" BY NAME SELECT * FROM old.main."{t}"')
            con.execute("DETACH old")
        for t, paths in new.items():
            if paths:
                if t != "routes" or routes_in_duckdb:
                    con.execute(f'INSERT INTO main."{t}" BY NAME SELECT * FROM read_parquet(?)',
                                [[str(p) for p in paths]])
                con.executemany("INSERT INTO _segments VALUES (?, ?, ?)",
                                [[t, sg.relative_name(run_dir, p), p.stat().st_size] for p in paths])
        if written:
            con.executemany("INSERT INTO _routes_files VALUES (?, ?, ?, ?)", [list(w) for w in written])
        _fold_route_stats(con, run_dir, new["routes"], rebuild=set(sg.COMPACTION_TABLES) - old_tables)
        con.executemany("INSERT INTO _rank_status VALUES (?, ?)",
                        [[r, json.dumps(s)] for r, s in sorted(statuses.items())])
        con.executemany("INSERT INTO _meta VALUES (?, ?)",
                        [["schema_version", str(SCHEMA_VERSION)], ["compacted_at", sg.utc_iso()],
                         ["run_id", str(manifest.get("run_id"))]])
        rows = {t: con.execute(f'SELECT count(*) FROM main."{t}"').fetchone()[0] for t in sg.SEGMENT_TABLES}
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
    """Add the routes of this compaction to the tables compaction derives from them (`sg.COMPACTION_TABLES`) in
    the run.duckdb being built.

    Counts are additive, so the new segments' counts are summed with the rows copied from the old run.duckdb;
    probe_sets rows are per token, so the new ones are appended. `rebuild`: the tables the old run.duckdb lacks
    (it predates them, or there is none): those are built from every route of the run (its `routes` table and
    every Parquet file `_routes_files` names, this compaction's included) instead."""
    # explicit casts: without them DuckDB 1.5 fails an internal statistics assertion ("SetMin or SetMax called
    # with Value that does not match") when segment files are aggregated in a UNION with the typed tables
    cols = ", ".join(f'CAST("{f.name}" AS {sg.duckdb_type(f.type)}) AS "{f.name}"' for f in sg.DISK_SCHEMAS["routes"]
                     if f.name in ("run_id", "step", "rank", "seq", "pos", "token_id", "layer", "slot", "expert",
                                   "weight_q"))
    files = [str(run_dir / r[0]) for r in con.execute("SELECT file FROM _routes_files ORDER BY file").fetchall()]
    every = (f"SELECT {cols} FROM main.routes" + (f" UNION ALL SELECT {cols} FROM read_parquet(?)" if files else ""),
             [files] if files else [])  # routes_format="duckdb" compactions keep routes in main.routes
    fresh = (f"SELECT {cols} FROM read_parquet(?)", [[str(p) for p in new_routes]]) if new_routes else None
    for table in sg.COMPACTION_TABLES:
        source, params = every if table in rebuild else (fresh or (None, None))
        if source is None:
            continue
        if table == sg.PROBE_SETS:
            con.execute(f'INSERT INTO main."{table}" {_PROBE_SETS_SQL.format(source=source)}', params)
            continue
        if table == sg.WEIGHT_HIST:
            _fold_weight_hist(con, source, params)
            continue
        k = ", ".join(_ROUTE_STATS_KEYS[table])
        typed = ", ".join(f'CAST("{f.name}" AS {sg.duckdb_type(f.type)}) AS "{f.name}"'
                          for f in sg.DISK_SCHEMAS[table])
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


def _fold_weight_hist(con, source: str, params: list) -> None:
    """weight_hist = the old table's counts plus the new routes', with `above` recomputed over the sums (a step
    whose routes span two compactions gets one set of bins)."""
    k = "run_id, step, rank, layer, expert, bin"
    typed = ", ".join(f'CAST("{f.name}" AS {sg.duckdb_type(f.type)}) AS "{f.name}"'
                      for f in sg.DISK_SCHEMAS[sg.WEIGHT_HIST])
    con.execute(f'ALTER TABLE main."{sg.WEIGHT_HIST}" RENAME TO "_old_{sg.WEIGHT_HIST}"')
    counts = f"""
        SELECT {k}, sum(assigned) AS assigned, sum(first_choice) AS first_choice, sum(weight_q_sum) AS weight_q_sum
        FROM (SELECT {k}, assigned, first_choice, weight_q_sum FROM main."_old_{sg.WEIGHT_HIST}"
              UNION ALL {_WEIGHT_HIST_SQL.format(source=source)})
        GROUP BY ALL"""
    con.execute(f"""
        CREATE TABLE main."{sg.WEIGHT_HIST}" AS SELECT {typed} FROM ({_WEIGHT_HIST_ABOVE_SQL.format(counts=counts)})
        ORDER BY run_id, step, rank, layer, expert, bin DESC""", params)
    con.execute(f'DROP TABLE main."_old_{sg.WEIGHT_HIST}"')


# Each expert's routes per step counted by weight bin (the counts weight_hist sums; `above` is added over the sums).
_WEIGHT_HIST_SQL = f"""
    SELECT run_id, step, rank, layer, expert, CAST(weight_q >> {sg.WEIGHT_BIN_SHIFT} AS SMALLINT) AS bin,
           count(*) AS assigned, count(*) FILTER (WHERE slot = 0) AS first_choice,
           sum(weight_q) AS weight_q_sum
    FROM ({{source}}) GROUP BY ALL"""
# weight_hist's rows from such counts: `above`, the routes of the same step and expert in higher bins, which the
# probability policy's cut-off bin is found by (moeviz.probability_drops)
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


def _write_compacted_routes(run_dir: Path, rank: int, paths: list[Path]) -> tuple[str, int, int, int]:
    """One compacted routes file from one rank's segments: (name relative to the run, rank, rows, bytes).

    Streams the segments in batches of about COMPACTED_ROW_GROUP_ROWS rows, each sorted by COMPACTED_SORT and
    written as one row group, so memory stays bounded whatever the run's size. Written under a hidden name,
    fsynced, then renamed: the file is whole or absent."""
    import uuid

    import pyarrow.parquet as pq

    folder = sg.compacted_routes_dir(run_dir, rank)
    folder.mkdir(parents=True, exist_ok=True)
    gen = 1 + max([int(p.name[5:11]) for p in folder.glob("part-*.parquet") if p.name[5:11].isdigit()] or [-1])
    name = f"part-{gen:06d}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = folder / f".{name}.tmp"
    schema = sg.DISK_SCHEMAS["routes"]
    n_rows = 0
    try:
        with pq.ParquetWriter(tmp, schema, **sg.compacted_routes_options()) as w:
            pending: list[pa.Table] = []
            pending_rows = 0
            for p in paths:
                part = pq.read_table(p).select(schema.names).cast(schema)
                pending.append(part)
                pending_rows += part.num_rows
                if pending_rows >= sg.COMPACTED_ROW_GROUP_ROWS:
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
    return sg.relative_name(run_dir, folder / name), rank, n_rows, (folder / name).stat().st_size


def _write_sorted_row_group(writer, parts: list[pa.Table]) -> int:
    batch = pa.concat_tables(parts).sort_by([(c, "ascending") for c in sg.COMPACTED_SORT])
    writer.write_table(batch, row_group_size=max(1, batch.num_rows))
    return batch.num_rows


def _remove_unpublished_routes_files(run_dir: Path, published: dict[str, tuple[int, int]]) -> None:
    """Delete routes files (and hidden temp files) no published run.duckdb names: a crashed compaction's."""
    root = run_dir / sg.COMPACTED_DIR / "routes"
    if not root.is_dir():
        return
    for p in root.glob("rank=*/*"):
        if p.is_file() and sg.relative_name(run_dir, p) not in published and (
                p.name.endswith(".parquet") or p.name.endswith(".tmp")):
            p.unlink(missing_ok=True)


def _create_compacted_tables(con) -> None:
    for t in sg.SEGMENT_TABLES + sg.COMPACTION_TABLES:
        cols = ", ".join(f'"{f.name}" {sg.duckdb_type(f.type)}' for f in sg.DISK_SCHEMAS[t])
        con.execute(f'CREATE TABLE "{t}" ({cols})')
    con.execute("CREATE TABLE _segments (table_name VARCHAR, file VARCHAR PRIMARY KEY, bytes BIGINT)")
    con.execute("CREATE TABLE _routes_files (file VARCHAR PRIMARY KEY, rank INTEGER, rows BIGINT, bytes BIGINT)")
    con.execute("CREATE TABLE _rank_status (rank INTEGER, status_json VARCHAR)")
    con.execute("CREATE TABLE _meta (key VARCHAR, value VARCHAR)")


def _compacted_state(target: Path) -> tuple[set[str], dict[str, tuple[int, int]]]:
    """(names of the segments already folded into run.duckdb, {routes file name: (rows, bytes)} it names)."""
    if not target.exists():
        return set(), {}
    from moeviz import duckdb_compat

    con = duckdb_compat.connect(str(target), read_only=True)
    try:
        folded = {r[0] for r in con.execute("SELECT file FROM _segments").fetchall()}
        have = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        files = {r[0]: (int(r[1]), int(r[2])) for r in con.execute(
            "SELECT file, rows, bytes FROM _routes_files").fetchall()} if "_routes_files" in have else {}
        return folded, files
    finally:
        con.close()


def _missing_compaction_tables(target: Path) -> set[str]:
    """The tables compaction derives from routes (sg.COMPACTION_TABLES) that run.duckdb lacks."""
    from moeviz import duckdb_compat

    con = duckdb_compat.connect(str(target), read_only=True)
    try:
        have = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        return set(sg.COMPACTION_TABLES) - have
    finally:
        con.close()


def _compacted_row_counts(target: Path) -> dict[str, int]:
    from moeviz import duckdb_compat

    con = duckdb_compat.connect(str(target), read_only=True)
    try:
        have = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        rows = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] if t in have else 0
                for t in sg.SEGMENT_TABLES}
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
