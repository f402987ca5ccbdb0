"""Every DuckDB connection moeviz opens comes from `connect`, so that DuckDB version differences live in one place.

moeviz supports DuckDB 1.4 and 1.5 (requirements.txt pins `duckdb>=1.4,<2`). DuckDB 2.0.0 is refused with a
warning, not silently used: its hash join keeps dictionary-encoded columns through a multi-threaded build ("dict-
surviving join") and fails at random with `INTERNAL Error: dict-surviving join: narrowed column ... build pipeline
is not single-source`, after which DuckDB invalidates the whole database. The specialization queries (routes counted
per sequence, joined with `sequences`) hit it in about half of the runs on 4 threads; disabling optimizers did not
avoid it reliably (compressed_materialization: 0 of 20 failures on 2 threads, 11 of 20 on 4).
"""

from __future__ import annotations

import warnings

import duckdb

BROKEN_VERSIONS = ("2.0.0",)  # DuckDB releases with the dict-surviving join error


class DuckDBVersionWarning(UserWarning):
    """The installed DuckDB has a bug that moeviz's queries hit."""


def check_version(version: str | None = None) -> None:
    """Warn when `version` (default: the installed DuckDB) is known to break moeviz queries."""
    version = version or duckdb.__version__
    if version in BROKEN_VERSIONS:
        warnings.warn(
            f"moeviz: DuckDB {version} fails hash joins at random ('INTERNAL Error: dict-surviving join') and then "
            "invalidates the database; install a supported one: pip install 'duckdb>=1.4,<2'",
            DuckDBVersionWarning, stacklevel=3)


def sql_string(text: str) -> str:
    """`text` as a SQL string literal, for statements that take no `?` parameters in DuckDB 1.x (ATTACH)."""
    return "'" + text.replace("'", "''") + "'"


def connect(database: str = ":memory:", *, read_only: bool = False, config: dict | None = None):
    """duckdb.connect(database, read_only=..., config=...), after checking the DuckDB version."""
    check_version()
    return duckdb.connect(database, read_only=read_only, config=config or {})


def arrow_table(result):
    """A query result as a pyarrow Table (`to_arrow_table` in DuckDB 1.5, `fetch_arrow_table` before)."""
    fetch = getattr(result, "to_arrow_table", None) or result.fetch_arrow_table
    return fetch()


def arrow_reader(result):
    """A query result as a streaming pyarrow RecordBatchReader (`to_arrow_reader` in DuckDB 1.5,
    `fetch_record_batch` before)."""
    fetch = getattr(result, "to_arrow_reader", None) or result.fetch_record_batch
    return fetch()
