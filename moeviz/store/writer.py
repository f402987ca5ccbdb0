"""Writing one rank of one run: `RunWriter` appends immutable Parquet segments, one per table per flush.

    with RunWriter("runs/exp1", run_name="exp1") as w:          # one writer per rank, used by one thread
        w.write_run({"model_class": "MixtralForCausalLM", "n_layers": 8, "n_experts": 8, "top_k": 2})
        w.write_flush({"routes": {...numpy columns...}, "step_stats": {...}})

DuckDB lets one process hold a database file read-write and blocks every other process meanwhile, so the
writer never opens a DuckDB file while it records: each `write_flush` writes one immutable Parquet segment per
table (file layout in `moeviz.store.layout`), and readers (`moeviz.store.reader`) query the segments through
views. The last rank's `close` folds them (`moeviz.store.compaction`).
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from moeviz.errors import StoreError
from moeviz.store import layout
from moeviz.store.compaction import compact
from moeviz.store.reader import StoreWarning
from moeviz.store.schema import NULLABLE_COLUMNS, OPTIONAL_COLUMNS, SCHEMA_VERSION, TABLES

RUN_META_KEYS = ("run_name", "model_class", "n_layers", "n_experts", "top_k", "capacity_factor", "config",
                 "sample_every", "max_tokens_per_step")
LAYER_KEYS = ("layer", "module_name", "n_experts", "top_k", "block_index", "stack", "capacity_factor",
              "expert_capacity")


class RunWriter:
    """Writes one rank of one run. Not thread-safe: call it from one (writer) thread.

    Several ranks may write the same run folder without coordinating: each has its own `rank=<r>` folders and
    status file. The last rank to close compacts the run (best effort: on failure the segments stay readable):
    compact_on_close=True always, False never, "auto" (the Recorder's default) while the segments not yet
    compacted hold at most `layout.compact_at_close_max()` bytes; past it close() warns with the `moeviz compact`
    command instead of holding the training process for as long as the compaction takes (readers see the
    segments meanwhile).
    """

    def __init__(self, run_dir, *, run_id: str | None = None, run_name: str | None = None, rank: int = 0,
                 world_size: int = 1, compact_on_close: bool | str = True):
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.run_id = str(run_id) if run_id is not None else self.run_dir.name
        self.rank, self.world_size = int(rank), int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise StoreError(f"rank must be in [0, world_size): got rank={rank}, world_size={world_size}")
        if not self.run_id:
            raise StoreError("run_id must be a non-empty string")
        if not (compact_on_close is True or compact_on_close is False or compact_on_close == "auto"):
            raise StoreError(f"compact_on_close must be True, False or 'auto'; got {compact_on_close!r}")
        self.compact_on_close = compact_on_close
        # a bad MOEVIZ_COMPACT_AT_CLOSE_MAX is an error here, at start, not at the end of training
        self._compact_max = layout.compact_at_close_max() if compact_on_close == "auto" else \
            layout.COMPACT_AT_CLOSE_MAX
        self._closed = False
        self._seq: dict[str, int] = {}
        self._commit_seq: int | None = None
        self._clipped_warned = False
        self._recording_errors, self._recording_error = 0, None  # see record_error
        self._run_meta: dict | None = None  # the last write_run's metadata, to rewrite the row with the errors
        self._run_row_stale = False  # a record_error whose runs row could not be written yet (tried again at close)
        self._module_names: dict[int, str] = {}  # layer -> router module name (write_layers), for warnings
        _check_run_dir(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise StoreError(f"cannot write into {self.run_dir}: {e.strerror or e}; record into a folder on a "
                             f"writable file system") from None
        if layout.is_run_dir(self.run_dir):  # refuse a mismatched run before touching its status files
            layout.ensure_manifest(self.run_dir, self.run_id)
        previous = layout.read_statuses(self.run_dir).get(self.rank)
        if previous and layout.writer_alive(previous):
            raise StoreError(f"rank {self.rank} of {self.run_dir} is being written by pid {previous.get('pid')} on "
                             f"{previous.get('hostname')}: use another rank or run folder")
        if previous and previous.get("status") in ("finished", "failed"):
            warnings.warn(f"moeviz: appending to run {self.run_id!r} at {self.run_dir}, whose rank {self.rank} was "
                          f"already closed ({previous.get('status')} at {previous.get('ended_at')}); steps recorded "
                          f"again are counted twice: record a new run into a new folder", StoreWarning, stacklevel=2)
        now = layout.utc_iso()
        self._status = {
            "run_id": self.run_id, "rank": self.rank, "world_size": self.world_size, "run_name": run_name,
            "pid": os.getpid(), "hostname": socket.gethostname(), "proc_start": layout.process_start_ticks(os.getpid()),
            "started_at": (previous or {}).get("started_at") or now, "heartbeat": now, "status": "running",
            "error": None, "ended_at": None, "schema_version": SCHEMA_VERSION,
            "recording_errors": 0, "recording_error": None,
        }
        # status before manifest: a reader that finds the run (by its manifest) always finds a status too
        layout.write_json_atomic(layout.status_path(self.run_dir, self.rank), self._status)
        layout.ensure_manifest(self.run_dir, self.run_id)

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
        self._run_meta = dict(meta)
        row = {
            "recording_errors": self._recording_errors, "recording_error": self._recording_error,
            "run_id": self.run_id, "rank": self.rank, "written_at": layout.utc_now(),
            "run_name": meta.get("run_name", self._status["run_name"]), "model_class": meta.get("model_class"),
            "n_layers": meta.get("n_layers"), "n_experts": meta.get("n_experts"), "top_k": meta.get("top_k"),
            "capacity_factor": meta.get("capacity_factor"), "config": config,
            "sample_every": meta.get("sample_every"), "max_tokens_per_step": meta.get("max_tokens_per_step"),
            "schema_version": SCHEMA_VERSION,
        }
        self._commit([self._write("runs", _rows_to_table("runs", [row]))])

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
            if r.get("module_name") is not None:
                self._module_names[int(r["layer"])] = str(r["module_name"])
        if out:
            self._commit([self._write("layers", _rows_to_table("layers", out))])

    def write_vocab(self, token_ids, texts) -> None:
        """Token texts (decoded by the caller's tokenizer), for the vocab table."""
        self._check_open()
        ids = _int_column("vocab", "token_id", np.asarray(token_ids), np.int32)
        texts = [None if t is None else str(t) for t in texts]
        if len(texts) != len(ids):
            raise StoreError(f"write_vocab: {len(ids)} token_ids but {len(texts)} texts")
        if len(ids):
            self._commit([self._write("vocab", pa.table({
                "run_id": layout.run_id_column(self.run_id, len(ids)),
                "rank": pa.array(np.full(len(ids), self.rank, np.int32)),
                "token_id": pa.array(ids), "text": pa.array(texts, pa.string())}))])

    def write_flush(self, tables: Mapping[str, Mapping[str, Any]]) -> None:
        """Append one flush: {table: {column: numpy array or scalar}} for any of layout.DATA_TABLES (routes,
        step_stats, layer_stats, sequences, pair_stats, flow_stats, expert_bias, balance_stats). Columns as in moeviz.store.schema
        without run_id (`rank` defaults to this writer's rank); routes take `weight` as float in [0, 1] (quantised
        to 1/65535 on disk), or None where the source has no gate weights, and are stored layer-major: rows are
        stably sorted by layer if they are not already (keep token-then-slot order within a layer). Columns of
        schema.NULLABLE_COLUMNS take None (unknown for every row) or NaN rows; never write 0 for unknown."""
        self._check_open()
        unknown = set(tables) - set(layout.DATA_TABLES)
        if unknown:
            raise StoreError(f"write_flush got unknown tables {sorted(unknown)}; allowed: {', '.join(layout.DATA_TABLES)}")
        built = {name: self._data_table(name, cols) for name, cols in tables.items()}  # validate all, then write
        written = []
        for name, data in built.items():
            for part in (_routes_segments(data) if name == "routes" else [data]) if data is not None else []:
                written.append(self._write(name, part))
        self._commit(written)  # the flush becomes visible here, in every table at once
        self._heartbeat()

    def record_error(self, message: str) -> None:
        """Count a recording failure of this rank: data its caller could not record (a flush that failed to
        write, steps whose aggregates could not be computed). `message` says what was lost.

        Why here: training goes on after such a failure (see collectors.Recorder), so the run would otherwise look
        complete. The count and the first message go to this rank's status file and to its `runs` row
        (`runs.recording_errors`, `runs.recording_error`). Best effort: on a full disk these writes fail too
        and raise; close() tries the runs row again.
        """
        self._check_open()
        self._recording_errors += 1
        if self._recording_error is None:
            self._recording_error = str(message)
        self._status.update(recording_errors=self._recording_errors, recording_error=self._recording_error)
        self._run_row_stale = self._run_meta is not None
        layout.write_json_atomic(layout.status_path(self.run_dir, self.rank), self._status)
        if self._run_meta is not None:
            self.write_run(self._run_meta)
            self._run_row_stale = False

    @property
    def recording_errors(self) -> int:
        return self._recording_errors

    # ------------------------------------------------------------------------------------------------ close

    def close(self, status: str = "finished", error: BaseException | str | None = None) -> None:
        """Mark this rank finished (or failed, with the error); the last rank to close compacts the run."""
        if self._closed:
            return
        if status not in ("finished", "failed"):
            raise StoreError(f"close(status=...) must be 'finished' or 'failed', got {status!r}")
        if self._run_row_stale:  # a recording error's runs row failed to write (a full disk): try once more
            try:
                self.write_run(self._run_meta)
                self._run_row_stale = False
            except Exception:  # noqa: BLE001 - the status file written below still holds the count
                pass
        self._closed = True
        now = layout.utc_iso()
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        self._status.update(status=status, error=error, ended_at=now, heartbeat=now)
        layout.write_json_atomic(layout.status_path(self.run_dir, self.rank), self._status)
        if self.compact_on_close and layout.all_ranks_closed(layout.read_statuses(self.run_dir)):
            size = layout.segment_bytes(self.run_dir) if self.compact_on_close == "auto" else 0
            if size > self._compact_max:
                warnings.warn(
                    f"moeviz: {self.run_dir} not compacted at close: its {layout.size_text(size)} of segments are "
                    f"past the close limit of {layout.size_text(self._compact_max)} ({layout.COMPACT_AT_CLOSE_ENV}), "
                    f"and compacting them would hold this process for minutes. Every "
                    f"row reads meanwhile; a long run's analyses over steps read each per-step row until you run "
                    f"`moeviz compact {self.run_dir}`", StoreWarning, stacklevel=2)
                return
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

    def _write(self, table: str, data: pa.Table) -> tuple[str, Path, int]:
        """Write one segment, not yet visible to readers: (table, file, rows) for the commit that will name it."""
        if table not in self._seq:
            self._seq[table] = layout.next_segment_seq(layout.segment_dir(self.run_dir, table, self.rank))
        path = layout.write_segment(self.run_dir, table, self.rank, self._seq[table], data)
        self._seq[table] += 1
        return table, path, data.num_rows

    def _commit(self, written: list[tuple[str, Path, int]]) -> None:
        """Name the segments just written in one commit record: readers see them from now on, all together."""
        if not written:
            return
        if self._commit_seq is None:
            self._commit_seq = layout.next_commit_seq(self.run_dir, self.rank)
        layout.write_commit(self.run_dir, self.rank, self._commit_seq, written)
        self._commit_seq += 1

    def _heartbeat(self) -> None:
        self._status["heartbeat"] = layout.utc_iso()
        try:  # advisory (liveness seen from another host): a full disk must not fail a flush already written
            layout.write_json_atomic(layout.status_path(self.run_dir, self.rank), self._status)
        except OSError:
            pass

    def _data_table(self, table: str, cols: Mapping[str, Any]) -> pa.Table | None:
        """Validate and convert one table of a flush to its on-disk Arrow form (None if it has no rows)."""
        schema = layout.DISK_SCHEMAS[table]
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
        nullable = OPTIONAL_COLUMNS.get(table, frozenset()) | NULLABLE_COLUMNS.get(table, frozenset())
        for c in expected:
            v = cols[c]
            if table == "routes" and c == "weight":
                arrays["weight_q"] = pa.nulls(n, pa.uint16()) if v is None else \
                    self._quantised_weights(_broadcast(v, n), _broadcast(cols["layer"], n))
                continue
            t = schema.field(c).type
            if c in nullable and t in (pa.float64(), pa.float32(), pa.bool_()):
                arrays[c] = _nullable_column(table, c, v, n, t)
            elif t == pa.string():
                try:
                    arrays[c] = pa.array([v] * n if np.ndim(v) == 0 and not isinstance(v, (list, tuple)) else list(v),
                                         pa.string())
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise StoreError(f"{table}.{c} must hold strings or None: {e}") from None
            elif t == pa.float64():
                arrays[c] = np.asarray(_broadcast(v, n), dtype=np.float64)
            elif t == pa.uint64():  # sequences.seq_key: full 64-bit hashes (no float NaN for NULL), None = NULL
                arrays[c] = _uint64_column(table, c, v, n)
            elif c in nullable:
                arrays[c] = _nullable_int_column(table, c, v, n, t)
            else:
                arrays[c] = _int_column(table, c, _broadcast(v, n), t.to_pandas_dtype())
        if table == "routes":
            layer = arrays["layer"]
            if n > 1 and not np.all(layer[1:] >= layer[:-1]):
                order = np.argsort(layer, kind="stable")  # layer-major; token and slot order kept within a layer
                arrays = {k: v.take(pa.array(order)) if isinstance(v, pa.Array) else v[order]
                          for k, v in arrays.items()}
        out = {"run_id": layout.run_id_column(self.run_id, n)}
        out.update({f.name: pa.array(arrays[f.name], f.type) if not isinstance(arrays[f.name], pa.Array)
                    else arrays[f.name] for f in schema if f.name != "run_id"})
        return pa.table(out)

    def _quantised_weights(self, w, layer) -> np.ndarray:
        """weight_q: w clipped to [0, 1] and quantised; a warning names the layers (and routers) outside."""
        w = np.asarray(w, dtype=np.float64 if np.asarray(w).dtype == np.float64 else np.float32)
        if not np.isfinite(w).all():
            raise StoreError("write_flush: routes.weight holds NaN or infinite values; the router produced "
                             "non-finite gate weights")
        lo, hi = float(w.min()), float(w.max())
        if (lo < -1e-6 or hi > 1 + 1e-6) and not self._clipped_warned:
            self._clipped_warned = True
            outside = np.unique(np.asarray(layer)[(w < -1e-6) | (w > 1 + 1e-6)])
            where = ", ".join(f"{int(x)}" + (f" ({self._module_names[int(x)]})" if int(x) in self._module_names else "")
                              for x in outside[:8]) + (", ..." if len(outside) > 8 else "")
            warnings.warn(f"moeviz: routes.weight outside [0, 1] (min {lo:.4g}, max {hi:.4g}) in layer(s) {where}, "
                          f"clipped to [0, 1]; record gate weights before any routed scaling factor (a router "
                          f"adapter's weight_scale)", StoreWarning, stacklevel=3)
        return np.rint(np.clip(w, 0.0, 1.0) * layout.WEIGHT_SCALE).astype(np.uint16)


def _check_run_dir(run_dir: Path) -> None:
    """Refuse a run folder that is a file, or a folder that holds other runs (the new run would hide them:
    a folder that is itself a run is read as that run only)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise StoreError(f"{run_dir} is a file, not a folder: give a folder path for the run (it is created)")
    if run_dir.is_dir() and not layout.is_run_dir(run_dir):
        inner = sorted(c.name for c in run_dir.iterdir() if c.is_dir() and layout.is_run_dir(c))
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
    parts = max(-(-int(lengths.max()) // layout.ROUTES_ROWS_PER_LAYER), -(-len(layer) // layout.ROW_GROUP_ROWS))
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


def _uint64_column(table: str, name: str, v, n: int) -> pa.Array:
    """An optional UBIGINT column (a hash): None (all NULL), a uint64 array, or Python ints / None per row."""
    if v is None:
        return pa.nulls(n, pa.uint64())
    v = getattr(v, "array", v)  # a pandas Series: its values
    if hasattr(v, "__arrow_array__"):  # a pandas UInt64 array with <NA> (to_numpy() would give inexact floats)
        try:
            out = pa.array(v, pa.uint64())
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
            raise StoreError(f"{table}.{name} must hold unsigned 64-bit integers (or None): {e}") from None
        if len(out) != n:
            raise StoreError(f"{table}.{name} has {len(out)} values for {n} rows")
        return out
    a = np.asarray(_broadcast(v, n))
    try:
        if a.dtype == object:  # Python ints and None, or a pandas UInt64 column's values with <NA>
            return pa.array(list(a), pa.uint64(), from_pandas=True)
        if a.dtype.kind not in "ui" or (a.dtype.kind == "i" and np.any(a < 0)):
            raise StoreError(f"{table}.{name} must hold unsigned 64-bit integers (or None)")
        return pa.array(a.astype(np.uint64), pa.uint64())
    except (OverflowError, ValueError, TypeError, pa.ArrowInvalid) as e:
        raise StoreError(f"{table}.{name} must hold unsigned 64-bit integers (or None): {e}") from None


def _nullable_column(table: str, name: str, v, n: int, arrow_type: pa.DataType) -> pa.Array:
    """A nullable float or boolean column: None (all NULL), or values where NaN (floats) or None (objects) marks a
    NULL, so that what a source does not know is stored as unknown rather than as 0 or False."""
    if v is None:
        return pa.nulls(n, arrow_type)
    a = np.asarray(_broadcast(v, n))
    if arrow_type == pa.bool_():
        if a.dtype == object:
            return pa.array(list(a), pa.bool_(), from_pandas=True)
        if a.dtype.kind == "f":  # NaN = unknown, 0/1 = false/true
            missing = np.isnan(a)
            return pa.array(np.where(missing, 0, a).astype(bool), pa.bool_(), mask=missing)
        if a.dtype.kind not in "biu":
            raise StoreError(f"{table}.{name} must hold booleans (or None for unknown), got dtype {a.dtype}")
        return pa.array(a.astype(bool), pa.bool_())
    if a.dtype == object:
        a = np.array([np.nan if x is None else x for x in a], dtype=np.float64)
    if a.dtype.kind not in "fiub":
        raise StoreError(f"{table}.{name} must hold numbers (or NaN / None for unknown), got dtype {a.dtype}")
    a = a.astype(arrow_type.to_pandas_dtype(), copy=False)
    missing = np.isnan(a)
    return pa.array(a, arrow_type, mask=missing) if missing.any() else pa.array(a, arrow_type)


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
    schema = layout.DISK_SCHEMAS[table]
    rows = [{k: _plain_value(v) for k, v in r.items()} for r in rows]
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
        raise StoreError(f"bad value for table {table!r}: {e}") from e
