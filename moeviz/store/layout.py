"""The on-disk layout of a moeviz run folder: Parquet segments, the commits that name them, status files, the
manifest.

A run folder looks like this (Hive-style folders; another engine reads the files the commit records name, or a
`moeviz export` copy):

    <run_dir>/moeviz.json                                   manifest: schema_version, run_id
    <run_dir>/_status/rank=<r>.json                         one per rank: pid, host, heartbeat, final status
    <run_dir>/<table>/rank=<r>/part-<seq:08d>-<uuid8>.parquet   immutable segments, one per flush per table
    <run_dir>/_commits/rank=<r>/commit-<seq:08d>.json       one per flush: the segments it made visible
    <run_dir>/run.duckdb                                    compacted segments (`moeviz compact`, last close)
    <run_dir>/compacted/routes/rank=<r>/part-<gen:06d>-<uuid8>.parquet   compacted routes, listed in run.duckdb
    <run_dir>/compacted/token_sets/rank=<r>/part-<gen:06d>-<uuid8>.parquet   their token_sets, listed in run.duckdb

Compacted routes are large zstd Parquet files (DuckDB's own storage costs ~3x more per route: it bit-packs but
does not entropy-code). They live outside `<run_dir>/routes/` so that segment listings never see them: a reader
reads exactly the ones run.duckdb's `_routes_files` (and `_table_files`) names, so a file written by a compaction that crashed before
publishing its run.duckdb is never read (the next compaction deletes it).

Why segments: DuckDB lets one process hold a database file read-write and then no other process may open it, so
a training process and a live dashboard cannot share one `.duckdb`. Segments are written under a hidden temporary
name and renamed into place (atomic on POSIX), so a reader sees whole files or nothing; a reader still checks
the Parquet footer, because a copy, a full disk or a crash on another filesystem can leave a truncated file.

A flush is a transaction (the way Delta Lake's `_delta_log` and Iceberg's manifests make one): its segment files
are written first, under names no reader reads yet, then one commit record naming them is renamed into place.
A reader reads the segments that commits name and never globs a folder for data, so a kill between two files of
a flush leaves either the whole flush or none of it visible; what no commit names is a dead writer's leftover,
which compaction removes. The commit records are plain JSON: any engine can read the list (`committed_files`).
Runs of schema version 1 have no commits; their complete segment files are read as before.

This module knows files only; `moeviz.store` builds the writer, the reader views and compaction on top of it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moeviz.errors import SchemaVersionError, StoreError, StoreNotFoundError
from moeviz.store.schema import SCHEMA_VERSION

MANIFEST = "moeviz.json"
STATUS_DIR = "_status"
COMPACTED = "run.duckdb"
LOCK_FILE = ".compact.lock"
COMPACTED_DIR = "compacted"  # <run_dir>/compacted/routes/rank=<r>/part-<gen>-<uuid8>.parquet
HEARTBEAT_TIMEOUT_S = 600.0  # a writer on another host counts as alive this long after its last flush
WEIGHT_SCALE = 65535  # routes.weight is stored as weight_q = round(weight * WEIGHT_SCALE), UINT16

# Tables written per flush (data) and once per run (metadata). Order = the order views are built in.
DATA_TABLES = ("routes", "step_stats", "layer_stats", "sequences", "pair_stats", "flow_stats", "expert_bias",
               "balance_stats")
# Tables that compaction builds from the routes it folds (in run.duckdb only; see store._fold_route_stats).
ROUTE_STATS_TABLES = ("token_stats", "position_stats", "sequence_stats")
# ... and the per-token expert sets of the probe steps (router saturation); not part of `route_stats_complete`, so
# that a run.duckdb compacted before it existed keeps its other tables in use.
PROBE_SETS = "probe_sets"
# ... and each expert's gate weights per step counted in bins (the probability capacity policy); like probe_sets.
WEIGHT_HIST = "weight_hist"
WEIGHT_BIN_SHIFT = 8  # weight_hist.bin = weight_q >> 8: 256 bins of 1/256 of the weight range each
# An expert's routes of one step and rank, when there are at most WEIGHT_HIST_MERGE_MAX of them, are one weight_hist
# row with bin WEIGHT_HIST_MERGED_BIN (above 0) instead of one row per bin (schema version 5): with a few routes per
# expert (sampled tokens of a 256-expert model) nearly every route had a bin of its own, so the table held ~1 row
# per route; ordering <= 64 routes at query time is cheap. Measured in docs/benchmarks.md ("weight_hist merged
# groups").
WEIGHT_HIST_MERGE_MAX = 64
WEIGHT_HIST_MERGED_BIN = -1
# ... and every token's expert set per layer (routing agreement joins one row per token and layer instead of k
# routes); like probe_sets, outside `route_stats_complete`.
TOKEN_SETS = "token_sets"
COMPACTION_TABLES = ROUTE_STATS_TABLES + (PROBE_SETS, WEIGHT_HIST, TOKEN_SETS)
# Step roll-ups compaction builds from step_stats and layer_stats (moeviz.store.rollups), in run.duckdb.
ROLLUP_TABLES = ("step_rollups", "layer_rollups")
# ... and what a curve of a wide model needs per bucket and layer that sums cannot give (the busiest expert's
# load, sum of squares, Switch's sum of products, capacity drops per step and per block and expert):
# moeviz.store.rollups.build_buckets. Only in run.duckdb; the analyses read them when every run of the store has
# them and nothing is live.
BUCKET_TABLES = ("layer_buckets", "pooled_buckets", "step_drops", "expert_drops")
# bucket tables added after the others: a run.duckdb compacted before lacks them until `moeviz compact`, and
# their absence must not send every bucket-backed analysis back to the per-step rows (only their own readers)
LATER_BUCKET_TABLES = ("expert_drops",)
META_TABLES = ("runs", "layers", "vocab")
SEGMENT_TABLES = META_TABLES + DATA_TABLES

# On-disk columns of each table. Public types where they are already narrow (so filters push down without a
# cast); routes.weight is quantised to weight_q. Metadata tables carry the writing `rank` (views deduplicate).
_S, _I64, _I32, _I16, _I8, _U16, _F64 = pa.string(), pa.int64(), pa.int32(), pa.int16(), pa.int8(), pa.uint16(), pa.float64()
_BOOL, _F32 = pa.bool_(), pa.float32()
DISK_SCHEMAS: dict[str, pa.Schema] = {
    "routes": pa.schema([("run_id", _S), ("step", _I64), ("rank", _I32), ("seq", _I32), ("pos", _I32),
                         ("token_id", _I32), ("layer", _I16), ("slot", _I8), ("expert", _I16), ("weight_q", _U16),
                         ("dropped", _BOOL), ("margin", _F32)]),
    "step_stats": pa.schema([("run_id", _S), ("step", _I64), ("rank", _I32), ("layer", _I16), ("expert", _I16),
                             ("tokens", _I64), ("assigned", _I64), ("first_choice", _I64), ("prob_sum", _F64),
                             ("dropped", _I64)]),
    "layer_stats": pa.schema([("run_id", _S), ("step", _I64), ("rank", _I32), ("layer", _I16), ("tokens", _I64),
                              ("z_loss_sum", _F64), ("entropy_sum", _F64), ("dropped", _I64),
                              ("adjacent_pairs", _I64), ("same_first", _I64), ("first_in_topk", _I64),
                              ("topk_overlap", _I64), ("coactive_pairs", _I64), ("nonfinite_tokens", _I64),
                              ("ranks_summed", _I32)]),
    "pair_stats": pa.schema([("run_id", _S), ("step", _I64), ("rank", _I32), ("layer", _I16), ("expert_i", _I16),
                             ("expert_j", _I16), ("tokens", _I64)]),
    "flow_stats": pa.schema([("run_id", _S), ("step", _I64), ("rank", _I32), ("layer_a", _I16), ("layer_b", _I16),
                             ("expert_a", _I16), ("expert_b", _I16), ("first_tokens", _I64), ("topk_pairs", _I64)]),
    "token_stats": pa.schema([("run_id", _S), ("rank", _I32), ("layer", _I16), ("token_id", _I32), ("expert", _I16),
                              ("assigned", _I64), ("first_choice", _I64)]),
    "position_stats": pa.schema([("run_id", _S), ("rank", _I32), ("layer", _I16), ("pos", _I32), ("expert", _I16),
                                 ("assigned", _I64), ("first_choice", _I64)]),
    "sequence_stats": pa.schema([("run_id", _S), ("step", _I64), ("rank", _I32), ("seq", _I32), ("layer", _I16),
                                 ("expert", _I16), ("assigned", _I64), ("first_choice", _I64)]),
    "probe_sets": pa.schema([("run_id", _S), ("step", _I64), ("rank", _I32), ("seq", _I32), ("pos", _I32),
                             ("layer", _I16), ("token_id", _I32), ("first_expert", _I16), ("experts", pa.uint64())]),
    "token_sets": pa.schema([("run_id", _S), ("step", _I64), ("rank", _I32), ("seq", _I32), ("pos", _I32),
                             ("layer", _I16), ("token_id", _I32), ("first_expert", _I16), ("experts", pa.uint64()),
                             ("k", _I8), ("margin", pa.float32())]),
    "weight_hist": pa.schema([("run_id", _S), ("step", _I64), ("rank", _I32), ("layer", _I16), ("expert", _I16),
                              ("bin", _I16), ("assigned", _I64), ("first_choice", _I64), ("weight_q_sum", _I64),
                              ("above", _I64)]),
    "step_rollups": pa.schema([("run_id", _S), ("resolution", _I32), ("step", _I64), ("layer", _I16),
                               ("expert", _I16), ("tokens", _I64), ("assigned", _I64), ("first_choice", _I64),
                               ("prob_sum", _F64), ("dropped", _I64)]),
    "layer_rollups": pa.schema([("run_id", _S), ("resolution", _I32), ("step", _I64), ("layer", _I16),
                                ("tokens", _I64), ("z_loss_sum", _F64), ("entropy_sum", _F64), ("dropped", _I64),
                                ("nonfinite_tokens", _I64)]),
    "layer_buckets": pa.schema([("run_id", _S), ("resolution", _I32), ("step", _I64), ("layer", _I16),
                                ("n_experts", _I32), ("top_k", _I32), ("experts_seen", _I32), ("tokens", _I64),
                                ("assigned", _I64), ("first_choice", _I64), ("assigned_max", _I64),
                                ("assigned_sq", _F64), ("assigned_xlogx", _F64), ("topk_sum", _I64),
                                ("dead_experts", _I32), ("prob_dot", _F64)]),
    "pooled_buckets": pa.schema([("run_id", _S), ("resolution", _I32), ("step", _I64), ("prob_dot", _F64)]),
    "step_drops": pa.schema([("run_id", _S), ("step", _I64), ("layer", _I16), ("capacity_factor", _F64),
                             ("assigned", _I64), ("dropped", _I64)]),
    "expert_drops": pa.schema([("run_id", _S), ("resolution", _I32), ("step", _I64), ("layer", _I16),
                               ("expert", _I16), ("capacity_factor", _F64), ("assigned", _I64), ("dropped", _I64)]),
    "sequences": pa.schema([("run_id", _S), ("step", _I64), ("rank", _I32), ("seq", _I32), ("domain", _S),
                            ("tag", _S), ("n_tokens", _I32), ("seq_key", pa.uint64()), ("sample_id", _S),
                            ("pos_offset", _I32), ("prompt_tokens", _I32)]),
    "expert_bias": pa.schema([("run_id", _S), ("step", _I64), ("rank", _I32), ("layer", _I16), ("expert", _I16),
                              ("bias", _F64)]),
    "balance_stats": pa.schema([("run_id", _S), ("step", _I64), ("rank", _I32), ("layer", _I16),
                                ("sequences", _I64), ("switch_sum", _F64), ("switch_stack_sum", _F64),
                                ("seq_aux_sum", _F64)]),
    "runs": pa.schema([("run_id", _S), ("rank", _I32), ("written_at", pa.timestamp("us")), ("run_name", _S),
                       ("model_class", _S), ("n_layers", _I32), ("n_experts", _I32), ("top_k", _I32),
                       ("capacity_factor", _F64), ("config", _S), ("sample_every", _I32),
                       ("max_tokens_per_step", _I32), ("schema_version", _I32), ("recording_errors", _I64),
                       ("recording_error", _S)]),
    "layers": pa.schema([("run_id", _S), ("rank", _I32), ("layer", _I32), ("module_name", _S), ("n_experts", _I32),
                         ("top_k", _I32), ("block_index", _I32), ("stack", _S), ("capacity_factor", _F64),
                         ("expert_capacity", _I32)]),
    "vocab": pa.schema([("run_id", _S), ("rank", _I32), ("token_id", _I32), ("text", _S)]),
}

# DuckDB types of the on-disk columns (for the compacted run.duckdb tables).
_DUCK = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.int16(): "SMALLINT",
         pa.int8(): "TINYINT", pa.uint16(): "USMALLINT", pa.uint64(): "UBIGINT", pa.float64(): "DOUBLE",
         pa.timestamp("us"): "TIMESTAMP", pa.bool_(): "BOOLEAN", pa.float32(): "FLOAT"}


def duckdb_type(arrow_type: pa.DataType) -> str:
    return _DUCK[arrow_type]


# Parquet settings, chosen by measurement (bench/bench_store.py): the per-token columns repeat across layers
# (layer-major order), so one large page per column chunk lets zstd find those repeats (pyarrow's default of
# 20k rows per page hides them); dictionary+RLE for the low-cardinality columns; delta for positions; plain
# pages for token_id/weight_q, which beat dictionary pages under zstd. Only encodings every Parquet reader
# knows (no BYTE_STREAM_SPLIT on integers, which Spark < 4 cannot read).
_LOW_CARDINALITY = ["run_id", "step", "rank", "seq", "layer", "slot", "expert", "expert_i", "expert_j", "domain", "tag", "module_name",
                    "stack", "run_name", "model_class"]
ROW_GROUP_ROWS = 1 << 22  # a segment is one row group (and one page per column)
# A routes segment holds at most this many rows per layer, so that one layer of token_id (4 bytes a row) fits
# in zstd's window and the next layer's identical token sequence compresses to almost nothing. Larger flushes
# are split into several segments along the token axis (each layer-major).
ROUTES_ROWS_PER_LAYER = 1 << 17


# Compacted routes files: rows sorted by (step, layer, seq, pos, slot) within row groups of about this many rows
# (bench_store.py: 2.2 bytes/route at 20M routes with zstd level 3; level 9 saves ~10 % at 3x the time; row
# groups of 1/4 the size cost +2 % and were not measurably faster to filter). Statistics on step,
# rank and layer let `WHERE step = ...` skip row groups.
COMPACTED_ROW_GROUP_ROWS = 1 << 20
COMPACTED_SORT = ("step", "layer", "seq", "pos", "slot")


def compacted_routes_dir(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / COMPACTED_DIR / "routes" / f"rank={int(rank)}"


# Tables derived at compaction that are kept as zstd Parquet files beside run.duckdb (named in its `_table_files`)
# rather than inside it: token_sets (one row per token and layer) cost 4.8 bytes/route in DuckDB's own storage at
# 20M routes (a random 64-bit mask and a float per row compress poorly there) against ~1 as Parquet.
FILE_TABLES = (TOKEN_SETS,)
# token_sets files: rows sorted by (step, layer, seq, pos) like the routes they come from
TOKEN_SETS_SORT = ("step", "layer", "seq", "pos")


def compacted_table_dir(run_dir: Path, table: str, rank: int) -> Path:
    return Path(run_dir) / COMPACTED_DIR / table / f"rank={int(rank)}"


def compacted_table_options(table: str) -> dict:
    """pyarrow.parquet.ParquetWriter keyword arguments for a derived table's compacted files (FILE_TABLES).
    token_sets: margin (float32 in steps of 2^-16) as BYTE_STREAM_SPLIT, which zstd compresses to ~2 bytes a
    value against ~2.5 plain; the experts mask as a dictionary (few distinct sets per layer)."""
    names = DISK_SCHEMAS[table].names
    enc = {"pos": "DELTA_BINARY_PACKED", "token_id": "PLAIN", "margin": "BYTE_STREAM_SPLIT"}
    enc = {c: e for c, e in enc.items() if c in names}
    return dict(compression="zstd", compression_level=3,
                use_dictionary=[c for c in names if c not in enc],
                column_encoding=enc, max_rows_per_page=2 * COMPACTED_ROW_GROUP_ROWS, data_page_size=1 << 30,
                write_statistics=[c for c in ("step", "rank", "layer", "seq") if c in names], store_schema=False)


def compacted_routes_options() -> dict:
    """pyarrow.parquet.ParquetWriter keyword arguments for compacted routes files."""
    opts = parquet_options("routes")
    opts.pop("row_group_size")
    opts.update(compression_level=3, max_rows_per_page=2 * COMPACTED_ROW_GROUP_ROWS,
                write_statistics=["step", "rank", "layer", "seq"])
    return opts


def parquet_options(table: str) -> dict:
    """pyarrow.parquet.write_table keyword arguments for one table's segments."""
    names = DISK_SCHEMAS[table].names
    enc = {}
    if table == "routes":
        enc = {"pos": "DELTA_BINARY_PACKED", "token_id": "PLAIN", "weight_q": "PLAIN"}
    return dict(
        compression="zstd",
        compression_level=2,  # level 2: 1 MiB window (sees the layer repeats of a segment), ~2x faster than 3
        use_dictionary=[c for c in names if c in _LOW_CARDINALITY and c not in enc],
        column_encoding=enc or None,
        max_rows_per_page=ROW_GROUP_ROWS,
        data_page_size=1 << 30,
        row_group_size=ROW_GROUP_ROWS,
        write_statistics=[c for c in ("step", "rank", "layer") if c in names],
        store_schema=False,
    )


# ---------------------------------------------------------------------------------------------------- time, ids


def utc_now() -> _dt.datetime:
    """Naive UTC datetime (DuckDB TIMESTAMP has no zone; the schema documents UTC)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


def utc_iso(t: _dt.datetime | None = None) -> str:
    return (t or utc_now()).isoformat(timespec="microseconds")


def parse_iso(s: str | None) -> _dt.datetime | None:
    return _dt.datetime.fromisoformat(s) if s else None


# ---------------------------------------------------------------------------------------------------- segments


def segment_dir(run_dir: Path, table: str, rank: int) -> Path:
    return Path(run_dir) / table / f"rank={int(rank)}"


def next_segment_seq(folder: Path) -> int:
    """1 + the largest part number in a rank folder (0 if empty): numbers keep growing across writer restarts."""
    best = -1
    if folder.is_dir():
        for e in os.scandir(folder):
            if e.name.startswith("part-") and e.name.endswith(".parquet"):
                try:
                    best = max(best, int(e.name[5:13]))
                except ValueError:
                    pass
    return best + 1


def write_segment(run_dir: Path, table: str, rank: int, seq: int, data: pa.Table) -> Path:
    """Write one immutable segment atomically: hidden temp file in the same folder, then os.replace.

    No fsync: a segment lost to a power cut is skipped by readers (footer check); a kill -9 loses nothing that
    was renamed, because the page cache outlives the process.
    """
    folder = segment_dir(run_dir, table, rank)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{seq:08d}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = folder / f".{name}.tmp"
    try:
        pq.write_table(data, tmp, **parquet_options(table))
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return folder / name


def is_complete_parquet(path: Path) -> bool:
    """True when the file starts and ends with the Parquet magic and its footer length fits in the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size < 12 or head != b"PAR1":
                return False
            f.seek(size - 8)
            tail = f.read(8)
    except OSError:
        return False
    footer_len = int.from_bytes(tail[:4], "little")
    return tail[4:] == b"PAR1" and 0 < footer_len <= size - 12


def footer_checksum(path: Path) -> tuple[int, int | None]:
    """(file size, CRC-32 of the Parquet footer and its length field), or None for the CRC when the file does not
    end like a Parquet file. Two small reads: the last 8 bytes, then the footer."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < 12:
            return size, None
        f.seek(size - 8)
        tail = f.read(8)
        footer_len = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or not 0 < footer_len <= size - 12:
            return size, None
        f.seek(size - 8 - footer_len)
        return size, zlib.crc32(f.read(footer_len) + tail)


def committed_problem(path: Path, entry: dict) -> str | None:
    """Why a file a commit names cannot be read (None when it can): gone, another size than when committed
    (truncated, or replaced), or a footer whose checksum changed (scrambled). Commits without sizes and checksums
    fall back to parsing the footer."""
    if "footer_crc32" not in entry or "bytes" not in entry:
        return segment_problem(path, entry["table"])
    try:
        size, crc = footer_checksum(path)
    except OSError:
        return "missing"
    if size != entry["bytes"]:
        return f"{size:,} bytes, not the {entry['bytes']:,} committed (truncated, or replaced)"
    if crc != entry["footer_crc32"]:
        return "its Parquet footer is damaged (checksum differs from the commit)"
    return None


_CHECKED: dict[tuple[str, int, int], str | None] = {}  # (path, size, mtime_ns) -> segment_problem's answer


def segment_problem(path: Path, table: str) -> str | None:
    """Why a segment file cannot be read as `table` (None when it can): missing, truncated, a footer that does not
    parse (a scrambled file), or the columns of another table (a foreign file). Reads the footer only.

    Segments are immutable, so the answer is kept per (path, size, mtime) for the life of the process: a
    dashboard that re-opens the store on every refresh checks each file once."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _CHECKED:
        _CHECKED[key] = _footer_problem(path, table)
    return _CHECKED[key]


def _footer_problem(path: Path, table: str) -> str | None:
    if not is_complete_parquet(path):
        return "not a whole Parquet file (truncated, or still being copied)"
    try:
        names = pq.read_schema(path).names
    except Exception as e:  # noqa: BLE001 - any failure to parse the footer means the file is damaged
        return f"its Parquet footer cannot be read ({str(e).splitlines()[0][:120]})"
    expected = DISK_SCHEMAS[table].names
    if not set(names) <= set(expected) or table not in META_TABLES and "step" not in names:
        return f"its columns are not those of {table} (a file of another table?)"
    return None


COMPACT_AT_CLOSE_ENV = "MOEVIZ_COMPACT_AT_CLOSE_MAX"
# segment bytes that compact_on_close="auto" folds at close: compaction ran at ~4-8 MB of segments a second on this
# project's 2-core machine (docs/benchmarks.md: 1.7 GB in 446 s for 10,000 steps of 58 x 256 experts, 17 GB in 31.9
# min for 100,000), so 1 GiB keeps the last rank's exit within a few minutes
COMPACT_AT_CLOSE_MAX = 1 << 30


def compact_at_close_max() -> int:
    """Bytes of uncompacted segments up to which compact_on_close="auto" compacts (MOEVIZ_COMPACT_AT_CLOSE_MAX, a
    size such as 4GB or a number of bytes; default 1 GiB)."""
    from moeviz.store.memory import parse_bytes  # (memory imports nothing of the store)

    text = os.environ.get(COMPACT_AT_CLOSE_ENV, "").strip()
    if not text:
        return COMPACT_AT_CLOSE_MAX
    try:
        return parse_bytes(text)
    except StoreError:
        raise StoreError(f"{COMPACT_AT_CLOSE_ENV}={text!r} is not a size: write a number of bytes or one with a "
                         f"unit, for example 4GB or 512MB") from None


def size_text(n: int) -> str:
    """Bytes as people read them, in the binary units the limits are given in: 3.2 GiB, 41.0 MiB, 12.3 KiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def segment_bytes(run_dir: Path) -> int:
    """Bytes of the segment files in a run folder: what the next compaction folds (folded ones are deleted)."""
    total = 0
    for t in SEGMENT_TABLES:
        try:
            files = segment_files(run_dir, t)
        except OSError:  # an unreadable folder: counted as empty (the caller decides about compacting, no more)
            continue
        for p in files:
            try:
                total += p.stat().st_size
            except OSError:  # removed by a compaction meanwhile
                pass
    return total


def segment_files(run_dir: Path, table: str) -> list[Path]:
    """Every segment file in a table's rank folders (hidden temp files excluded), by rank then part number."""
    root = Path(run_dir) / table
    if not root.is_dir():
        return []
    rank_dirs = []
    for e in os.scandir(root):
        if e.is_dir() and e.name.startswith("rank="):
            try:
                rank_dirs.append((int(e.name[5:]), Path(e.path)))
            except ValueError:
                continue
    return [folder / name for _, folder in sorted(rank_dirs)
            for name in sorted(n for n in os.listdir(folder) if n.endswith(".parquet") and not n.startswith("."))]


def list_segments(run_dir: Path, table: str) -> tuple[list[Path], dict[Path, str]]:
    """(readable segments, {damaged file: why}) of one table, for runs without commit records (schema version 1)."""
    good: list[Path] = []
    bad: dict[Path, str] = {}
    for p in segment_files(run_dir, table):
        problem = segment_problem(p, table)
        if problem is None:
            good.append(p)
        else:
            bad[p] = problem
    return good, bad


# ---------------------------------------------------------------------------------------------------- commits


COMMITS_DIR = "_commits"


def commit_dir(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / COMMITS_DIR / f"rank={int(rank)}"


def write_commit(run_dir: Path, rank: int, seq: int, files: list[tuple[str, Path, int]]) -> Path:
    """Make one flush's segments visible at once: a JSON record naming each (table, file, rows, bytes, CRC-32 of
    the Parquet footer), written under a hidden temporary name, fsynced, and renamed into place. Rename is atomic:
    a reader sees all of it or none. The size and footer checksum let a reader tell a damaged file from a whole
    one with a small read, without parsing the footer (`committed_problem`)."""
    folder = commit_dir(run_dir, rank)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for t, f, n in files:
        size, crc = footer_checksum(f)
        entries.append({"table": t, "path": relative_name(run_dir, f), "rows": int(n), "bytes": size,
                        "footer_crc32": crc})
    body = {"rank": int(rank), "seq": int(seq), "committed_at": utc_iso(), "files": entries}
    path = folder / f"commit-{int(seq):08d}.json"
    tmp = folder / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def next_commit_seq(run_dir: Path, rank: int) -> int:
    """1 + the largest commit number of a rank (0 if none): a restarted writer goes on after its last commit."""
    best = -1
    folder = commit_dir(run_dir, rank)
    if folder.is_dir():
        for name in os.listdir(folder):
            if name.startswith("commit-") and name.endswith(".json"):
                try:
                    best = max(best, int(name[7:15]))
                except ValueError:
                    pass
    return best + 1


def commit_records(run_dir: Path) -> tuple[list[tuple[Path, dict]], list[Path]]:
    """(every readable commit record with its path, sorted by rank and number; records that cannot be read)."""
    root = Path(run_dir) / COMMITS_DIR
    records, bad = [], []
    if not root.is_dir():
        return records, bad
    for rank_name in sorted(os.listdir(root)):
        folder = root / rank_name
        if not rank_name.startswith("rank=") or not folder.is_dir():
            continue
        for name in sorted(n for n in os.listdir(folder) if n.startswith("commit-") and n.endswith(".json")):
            try:
                body = json.loads((folder / name).read_text())
                files = body["files"]
                if not isinstance(files, list) or not all({"table", "path"} <= set(e) for e in files):
                    raise ValueError("no list of files")
            except (OSError, ValueError, KeyError, TypeError):
                bad.append(folder / name)
                continue
            records.append((folder / name, body))
    return records, bad


@dataclass
class Segments:
    """The data files of a run a reader may read, and what it must leave out."""

    tables: dict[str, list[Path]]  # table -> committed, complete segments, by rank then part number
    damaged: dict[Path, str]  # named by a commit (or, without commits, found) but unreadable -> why
    uncommitted: list[Path]  # segment files no commit names: a flush in progress, or a dead writer's leftovers
    commits: list[Path]  # the commit records read


def committed_files(run_dir: Path, manifest: dict) -> Segments:
    """The segments of every table that commits name (schema version 1 runs: every complete segment file)."""
    if not manifest.get("commits"):
        found = {t: list_segments(run_dir, t) for t in SEGMENT_TABLES}
        return Segments({t: good for t, (good, _) in found.items()},
                        {p: why for _, bad in found.values() for p, why in bad.items()}, [], [])
    records, bad_records = commit_records(run_dir)
    named: set[str] = set()
    tables: dict[str, list[Path]] = {t: [] for t in SEGMENT_TABLES}
    damaged = {p: "a commit record that cannot be read: the segments of its flush are left out" for p in bad_records}
    for _, body in records:
        for e in body["files"]:
            named.add(e["path"])
            p = Path(run_dir) / e["path"]
            problem = committed_problem(p, e) if e["table"] in tables else f"unknown table {e['table']!r}"
            if problem is None:
                tables[e["table"]].append(p)
            else:
                damaged[p] = problem
    for t in tables:
        tables[t].sort(key=lambda p: (int(p.parent.name[5:]) if p.parent.name[5:].isdigit() else -1, p.name))
    uncommitted = [p for t in SEGMENT_TABLES for p in segment_files(run_dir, t)
                   if relative_name(run_dir, p) not in named]
    return Segments(tables, damaged, uncommitted, [p for p, _ in records])


def relative_name(run_dir: Path, path: Path) -> str:
    """The name a segment is recorded under in run.duckdb's `_segments` (POSIX path relative to the run)."""
    return Path(path).relative_to(run_dir).as_posix()


# ---------------------------------------------------------------------------------------------------- manifest


def migrate_manifest(manifest: dict, where: Path) -> dict:
    """Bring a run's manifest up to SCHEMA_VERSION, one version at a time (dlt-style ladder), or refuse.

    Readers never write, so a step describes how to read the older layout rather than rewriting files:
    columns added at the end of a table need no step (missing Parquet columns read as NULL, and the reader
    fills columns a compacted run.duckdb lacks with NULL). A step is needed for renames or changed meanings.

    Version 2 added commit records (`_commits/`); a version 1 run has none, and its complete segment files are read
    as they are (`commits: False`). Version 3 added `routes.dropped`, `routes.margin`, `sequences.prompt_tokens` and
    the `expert_bias` and `balance_stats` tables, and let `routes.weight` and `step_stats.tokens/first_choice/prob_sum` be NULL (unknown,
    for imported engine logs): an older run reads with the new columns NULL and no NULL in the old ones.
    Version 4 marks a run whose run.duckdb names `token_sets` Parquet files (`_table_files`, beside the routes
    files): a moeviz of version 3 would read only run.duckdb's own token_sets rows (part of the tokens), and its
    compaction would drop `_table_files`, after which ours deletes the files as unpublished. Nothing to do for
    readers (a version 3 run has no such files); compaction raises a run's manifest to 4 when it writes them,
    keeping the version its data was written with in `data_schema_version`. Also arrived under version 3
    without a bump (added columns and tables, NULL or absent in older runs, so no step either):
    `layer_stats.ranks_summed`, and the bucket tables `layer_buckets`, `pooled_buckets`, `step_drops` and
    `expert_drops` (a run.duckdb without one reads every step_stats row until `moeviz compact` builds it; without
    expert_drops alone, only the per-expert capacity drops do).
    Version 5 lets weight_hist hold merged rows (bin -1: every route of a step, rank, layer and expert with at most
    WEIGHT_HIST_MERGE_MAX of them), which a version 4 moeviz would read as a bin; a version 4 run's rows are all
    bins, valid as they are; compaction raises a run's manifest to 5 before it publishes merged rows.
    """
    version = int(manifest.get("schema_version", 0))
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} was written with moeviz store schema version {version}, but this moeviz reads versions up to "
            f"{SCHEMA_VERSION}: upgrade moeviz (pip install -U moeviz) to read it"
        )
    if version < 1:
        raise SchemaVersionError(f"{where} has no valid schema_version ({manifest.get('schema_version')!r}): "
                                 f"it was not written by moeviz, or the file is damaged")
    if version == 1:  # no commit records: every complete segment file is data
        manifest = dict(manifest, commits=False)
        version = 2
    if version == 2:  # v3 added columns (NULL in older files) and made weights and counts nullable: nothing to do
        version = 3
    if version == 3:  # v4 added the token_sets files, named in run.duckdb's `_table_files`: nothing to do
        version = 4
    if version == 4:  # v5 added merged weight_hist rows (bin -1); a v4 run's rows are all bins: nothing to do
        version = 5
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(f"{where}: no migration from schema version {version} to {SCHEMA_VERSION}")
    written = int(manifest.get("data_schema_version", manifest["schema_version"]))  # see compaction
    return dict(manifest, schema_version=version, written_schema_version=written)


def read_manifest(run_dir: Path) -> dict:
    """The run's manifest, migrated to the current schema version (raises SchemaVersionError if too new)."""
    path = Path(run_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {path}: {e}; is this a moeviz run folder?") from e
    if not isinstance(manifest, dict):
        raise StoreError(f"{path} is not a moeviz manifest (expected a JSON object)")
    return migrate_manifest(manifest, path)


def ensure_manifest(run_dir: Path, run_id: str) -> dict:
    """Create moeviz.json (first rank wins, atomically) or check that an existing one matches this writer."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        body = {"format": "moeviz-run", "schema_version": SCHEMA_VERSION, "run_id": run_id, "created_at": utc_iso(),
                "commits": True}
        tmp = path.with_name(f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(body, indent=1))
        try:
            os.link(tmp, path)  # fails if another rank created it first: then we check theirs below
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    manifest = read_manifest(run_dir)
    if manifest["written_schema_version"] != SCHEMA_VERSION:
        raise StoreError(f"{run_dir} holds a run written with store schema version "
                         f"{manifest['written_schema_version']}; write new data into a new run folder")
    if manifest.get("run_id") != run_id:
        raise StoreError(f"{run_dir} already holds run {manifest.get('run_id')!r}, not {run_id!r}: "
                         f"give the same run_id on every rank, or use another folder")
    return manifest


def is_run_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def find_runs(path) -> list[Path]:
    """The run folders at `path`: the folder itself if it is a run, else the runs among its subfolders and their
    subfolders (`runs/` after `moeviz demo --out runs/demo` holds runs/demo/aux and runs/demo/noaux).

    Two folders holding the same run id would merge in every table, so that is refused."""
    p = Path(path).expanduser()
    if p.is_file() and p.name in (COMPACTED, MANIFEST):
        p = p.parent
    if not p.exists():
        raise StoreNotFoundError(f"no moeviz store at {p}: the path does not exist "
                                 f"(expected a run folder holding {MANIFEST}, or a folder of such run folders)")
    if is_run_dir(p):
        return [p.resolve()]
    runs = []
    # hidden folders are left out: a run being imported is built in one and renamed into place (moeviz.importers)
    for child in sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".")) if p.is_dir() else []:
        if is_run_dir(child):
            runs.append(child.resolve())
        else:
            runs += sorted(g.resolve() for g in child.iterdir()
                           if g.is_dir() and not g.name.startswith(".") and is_run_dir(g))
    if not runs:
        raise StoreNotFoundError(f"no moeviz run in {p}: looked for {p / MANIFEST}, */{MANIFEST} and */*/{MANIFEST}; "
                                 f"record a run first (Recorder or `moeviz demo`)")
    check_unique_run_ids(runs, f"open one of the folders that hold them, not {p}")
    return runs


def check_unique_run_ids(run_dirs, what_to_do: str) -> None:
    """Refuse run folders of which two hold the same run id: their rows would merge in every table."""
    seen: dict[str, Path] = {}
    for r in run_dirs:
        run_id = run_id_of(r)
        if run_id in seen:
            raise StoreError(f"{seen[run_id]} and {r} both hold run {run_id!r}; their rows would merge: {what_to_do}")
        seen[run_id] = r


def run_id_of(run_dir: Path) -> str:
    """The run id a run folder's manifest names (the folder's name if it names none or cannot be read)."""
    try:
        return str(json.loads((run_dir / MANIFEST).read_text()).get("run_id") or run_dir.name)
    except (OSError, ValueError, AttributeError):
        return run_dir.name


# ---------------------------------------------------------------------------------------------------- status


def status_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / STATUS_DIR / f"rank={int(rank)}.json"


def write_json_atomic(path: Path, body: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(body, indent=1, default=str))
    os.replace(tmp, path)


def process_start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a live writer from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[19])  # field 22 of stat(5), 0-based 19 after dropping pid and comm


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid runs on this machine (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] in "ZX":  # zombie: dead, only waiting to be reaped
            return False
    except OSError:
        pass
    return True


def writer_alive(status: dict, now: _dt.datetime | None = None) -> bool:
    """Whether the writer that wrote this status file may still be writing.

    Same host: its pid exists, is not a zombie, and started when the writer did. Another host: its heartbeat
    (refreshed at every flush) is younger than HEARTBEAT_TIMEOUT_S.
    """
    if status.get("status") != "running":
        return False
    if status.get("hostname") == socket.gethostname() and status.get("pid"):
        pid = int(status["pid"])
        if not pid_alive(pid):
            return False
        started = status.get("proc_start")
        return started is None or process_start_ticks(pid) in (None, started)
    beat = parse_iso(status.get("heartbeat"))
    return beat is not None and ((now or utc_now()) - beat).total_seconds() < HEARTBEAT_TIMEOUT_S


def read_statuses(run_dir: Path) -> dict[int, dict]:
    """rank -> its status file's content (unreadable files are skipped: a rank being rewritten is atomic)."""
    out: dict[int, dict] = {}
    folder = Path(run_dir) / STATUS_DIR
    if not folder.is_dir():
        return out
    for e in os.scandir(folder):
        if e.name.startswith("rank=") and e.name.endswith(".json"):
            try:
                body = json.loads(Path(e.path).read_text())
                out[int(body["rank"])] = body
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return out


def run_status(statuses: dict[int, dict], now: _dt.datetime | None = None) -> dict:
    """A run's status from its ranks' status files: the `runs` columns world_size..error.

    failed if any rank failed; finished if all world_size ranks closed finished; running if some writer is
    alive; else interrupted (a writer died without closing, or a rank never started).
    """
    world_size = max([int(s.get("world_size") or 1) for s in statuses.values()] or [1])
    states = {r: s.get("status") for r, s in statuses.items()}
    failed = [statuses[r] for r in sorted(states) if states[r] == "failed"]
    closed = [r for r, s in states.items() if s in ("finished", "failed")]
    if failed:
        status, error = "failed", failed[0].get("error") or "failed"
    elif len(closed) >= world_size and all(states[r] == "finished" for r in closed):
        status, error = "finished", None
    elif any(writer_alive(s, now) for s in statuses.values()):
        status, error = "running", None
    else:
        status, error = "interrupted", None
    starts = [parse_iso(s.get("started_at")) for s in statuses.values() if s.get("started_at")]
    ends = [parse_iso(s.get("ended_at")) for s in statuses.values() if s.get("ended_at")]
    names = [statuses[r].get("run_name") for r in sorted(statuses) if statuses[r].get("run_name")]
    return {
        "world_size": world_size,
        "started_at": min(starts) if starts else None,
        "ended_at": max(ends) if ends and status in ("finished", "failed") else None,
        "status": status,
        "error": error,
        "run_name": names[0] if names else None,
        "ranks_closed": len(closed),
    }


def all_ranks_closed(statuses: dict[int, dict]) -> bool:
    world_size = max([int(s.get("world_size") or 1) for s in statuses.values()] or [1])
    closed = [r for r, s in statuses.items() if s.get("status") in ("finished", "failed")]
    return len(closed) >= world_size


def run_id_column(run_id: str, n: int) -> pa.Array:
    """A constant run_id column that costs 4 bytes per row in memory and a few bytes in Parquet."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([run_id], pa.string()))


def sequence_key(token_ids) -> int:
    """`sequences.seq_key` of a sequence: its token ids inside the attention mask, in position order, as
    little-endian int64, hashed with BLAKE2b (8-byte digest) and read as a little-endian unsigned 64-bit integer.

    Anyone can recompute it (an importer from an engine's token ids, a test, another language), and the same
    tokens give the same key in every run, whatever their batch row, step, rank or padding. A 64-bit hash: two
    different sequences collide with probability ~n^2 / 2^65 (one in ~10^7 at a million distinct sequences).
    """
    import hashlib

    data = np.ascontiguousarray(np.asarray(token_ids, dtype="<i8").reshape(-1)).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
