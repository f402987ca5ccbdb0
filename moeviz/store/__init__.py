"""The moeviz store: Parquet segments appended by the recorder, folded into DuckDB, read through read-only views.

Persistence ends here: file names, the SQL schema, DuckDB connections and the safety of users' SQL live in this
package, and nothing in it imports an analysis.

    schema         the public SQL tables and columns, and their version
    layout         a run folder on disk: manifest, rank statuses, segment files
    writer         RunWriter: one rank of one run, one Parquet segment per table per flush
    compaction     compact: fold segments into run.duckdb and large sorted routes files
    reader         open_store, query, store_info: read-only views over a run or a folder of runs
    catalog        what a store holds, as DataFrames (runs, steps, layers, sequences): the dashboard's lists
    sql            a user's SQL: one read-only statement, row-limited and time-limited
    export         a store as plain Parquet, one folder per table, for Spark, Polars, pandas and pyarrow
    duckdb_compat  the one place that opens DuckDB connections and knows its releases
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["RunWriter", "compact", "export", "open_store", "query", "store_info", "StoreWarning", "ROUTES_FORMATS",
           "sequence_key"]

# Loaded on first use, so that `import moeviz` (which reads moeviz.store.schema) does not load pyarrow.
_WHERE = {
    "RunWriter": "moeviz.store.writer",
    "compact": "moeviz.store.compaction",
    "export": "moeviz.store.export",
    "ROUTES_FORMATS": "moeviz.store.compaction",
    "open_store": "moeviz.store.reader",
    "query": "moeviz.store.reader",
    "store_info": "moeviz.store.reader",
    "StoreWarning": "moeviz.store.reader",
    "sequence_key": "moeviz.store.layout",
}

if TYPE_CHECKING:  # pragma: no cover
    from moeviz.store.compaction import ROUTES_FORMATS, compact
    from moeviz.store.export import export
    from moeviz.store.reader import StoreWarning, open_store, query, store_info
    from moeviz.store.writer import RunWriter


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'moeviz.store' has no attribute {name!r}")
