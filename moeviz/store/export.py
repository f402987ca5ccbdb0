"""A store as plain Parquet that any engine reads: one folder per table, no partition keys, no moeviz needed.

Why a copy: a live store is segments plus the commit records that say which of them count, and after compaction
the small tables live in run.duckdb, which Spark, Polars and pandas cannot open. Globbing a run's folders from
another engine can therefore read half a flush, or count a folded segment twice. `export` writes what moeviz's
own views show at one moment (the committed segments and the compacted data, merged), with the public column
names and types (`routes.weight` as a float, not the on-disk `weight_q`):

    <out>/<table>/part-00000.parquet ...     every table of moeviz.store.schema, `run_id` a plain column

so `pyarrow.dataset.dataset("<out>/routes")`, `pandas.read_parquet("<out>/routes")`,
`polars.scan_parquet("<out>/routes/*.parquet")` and `spark.read.parquet("<out>/routes")` read it as it is. The
folder is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from moeviz.errors import StoreError
from moeviz.store import layout
from moeviz.store.reader import open_store
from moeviz.store.schema import TABLES

ROWS_PER_FILE = 1 << 24  # a new file every ~16 M rows, so that engines can read files in parallel
BATCH_ROWS = 1 << 20


def export(path, out, *, tables: list[str] | None = None) -> dict[str, int]:
    """Write every table of the store at `path` (a run or a folder of runs) under `out`: {table: rows}."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"{out} exists and is not empty: export into a new folder")
    names = list(tables) if tables else [t for t in TABLES if t in set(layout.SEGMENT_TABLES)
                                         | set(layout.COMPACTION_TABLES)]
    unknown = [t for t in names if t not in TABLES]
    if unknown:
        raise StoreError(f"unknown table(s) {', '.join(unknown)}; tables: {', '.join(TABLES)}")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    con = open_store(path)
    try:
        rows = {t: _write_table(con, t, tmp / t) for t in names}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        con.close()
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return rows


def _write_table(con, table: str, folder: Path) -> int:
    """Stream one table's rows into files of at most ROWS_PER_FILE rows (an empty table still gets one file, so
    that its schema can be read)."""
    folder.mkdir(parents=True)
    reader = con.execute(f'SELECT * FROM "{table}"').fetch_record_batch(BATCH_ROWS)
    total, part, writer, in_file = 0, 0, None, 0
    try:
        for batch in reader:
            if writer is None or in_file >= ROWS_PER_FILE:
                if writer is not None:
                    writer.close()
                writer = pq.ParquetWriter(folder / f"part-{part:05d}.parquet", reader.schema, compression="zstd")
                part, in_file = part + 1, 0
            writer.write_batch(batch)
            in_file += batch.num_rows
            total += batch.num_rows
        if writer is None:
            pq.write_table(pa.Table.from_batches([], schema=reader.schema), folder / "part-00000.parquet")
    finally:
        if writer is not None:
            writer.close()
    return total
