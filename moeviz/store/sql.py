"""A user's SQL over a store: one read statement, a bounded number of rows, a time limit, a plain message.

Two entry points: `read_only_query` (the `moeviz sql` command) and `run_sql` (the dashboard's SQL page, run in a
worker thread with a time limit). The store's connection itself refuses writes and file access
(`moeviz.store.reader`); the statement checks here keep SET, temp tables and transactions out and make the message
plain.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pandas as pd

from moeviz.errors import MoevizError, StoreError
from moeviz.store.reader import STALE_MESSAGE, is_stale
from moeviz.store.schema import TABLES


class SqlError(MoevizError):
    """A console query was refused or failed; the message says why."""


class SqlTimeoutError(SqlError):
    """A console query ran past its time limit and was interrupted."""


# --- `moeviz sql` ------------------------------------------------------------------------------------------


def check_select_only(con, sql: str) -> None:
    """Refuse anything but one SELECT (also DESCRIBE/SHOW/SUMMARIZE/VALUES), with a clear StoreError.

    The connection itself cannot touch files or its databases (see the module docstring); this check also keeps
    temp tables, SET and transactions out of user SQL and makes the message plain.
    """
    import duckdb

    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise StoreError(sql_error_message(e)) from None
    if len(statements) != 1:
        raise StoreError(f"give exactly one SQL statement (got {len(statements)})")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise StoreError(f"the store is read-only: only SELECT queries are allowed, not {kind.name}")


def read_only_query(con, sql: str, params=None, max_rows: int | None = 1000) -> tuple[list[str], list[tuple], bool]:
    """Run one user SELECT: (column names, at most max_rows rows, truncated?). Fetches max_rows + 1 rows to know
    whether more exist, never the whole result. DuckDB errors become a StoreError with a one-line message."""
    import duckdb

    check_select_only(con, sql)
    try:
        rel = con.execute(sql, params or [])
        columns = [d[0] for d in rel.description]
        rows = rel.fetchall() if max_rows is None else rel.fetchmany(max_rows + 1)
    except duckdb.Error as e:
        raise StoreError(sql_error_message(e)) from None
    truncated = max_rows is not None and len(rows) > max_rows
    return columns, rows[:max_rows] if truncated else rows, truncated


def sql_error_message(e: Exception) -> str:
    """One line that says what went wrong with a user's SQL and what the store allows."""
    import duckdb

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if is_stale(e):
        return STALE_MESSAGE
    if isinstance(e, duckdb.PermissionException):
        return f"not allowed: {first} (store SQL can read only the store's tables, never files)"
    if "read-only mode" in first or "read_only" in first.lower():
        return f"the store is read-only: only SELECT queries are allowed ({first})"
    if isinstance(e, duckdb.CatalogException):
        return f"{first} (tables: {', '.join(TABLES)})"
    return first


# --- the dashboard's SQL page --------------------------------------------------------------------------------------------

EXAMPLE_QUERIES: dict[str, str] = {
    "Load per layer and expert": (
        "SELECT layer, expert, sum(assigned) AS assigned,\n"
        "       sum(assigned) / sum(sum(assigned)) OVER (PARTITION BY layer) AS load_fraction\n"
        "FROM step_stats GROUP BY layer, expert ORDER BY layer, expert"
    ),
    "Router z-loss per step": (
        "SELECT step, layer, sum(z_loss_sum) / sum(tokens) AS z_loss\n"
        "FROM layer_stats GROUP BY step, layer ORDER BY step, layer"
    ),
    "Top experts of a token": (
        "SELECT v.text, r.layer, r.expert, count(*) AS n\n"
        "FROM routes r JOIN vocab v USING (run_id, token_id)\n"
        "WHERE r.slot = 0 GROUP BY ALL ORDER BY n DESC LIMIT 50"
    ),
    "Sequences per domain": "SELECT domain, tag, count(*) AS sequences, sum(n_tokens) AS tokens\nFROM sequences GROUP BY ALL ORDER BY tokens DESC",
    "Runs": "SELECT run_id, model_class, n_layers, n_experts, top_k, status FROM runs",
}

# Statement kinds a console query may be: reading only. EXPLAIN is allowed because it shows plans without running.
_READ_ONLY_KINDS = ("SELECT", "EXPLAIN")


@dataclass
class SqlResult:
    frame: pd.DataFrame  # at most max_rows rows
    truncated: bool  # the query had more than max_rows rows
    elapsed_s: float


def _single_read_statement(sql: str) -> str:
    import duckdb

    if not sql or not sql.strip():
        raise SqlError("the query is empty: write a SELECT over runs, layers, routes, step_stats, ...")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise SqlError(f"the query does not parse: {e}") from None
    if len(statements) != 1:
        raise SqlError(f"one statement at a time, please (got {len(statements)})")
    kind = statements[0].type.name
    if kind not in _READ_ONLY_KINDS:
        raise SqlError(f"the console is read-only: {kind} statements are refused; write a SELECT")
    return statements[0].query.strip().rstrip(";")


def _one_line(e: Exception) -> str:
    """The first line of a DuckDB error, with what the console allows when it is a permission error."""
    import duckdb

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, duckdb.PermissionException):
        return f"not allowed: {first} (the console reads only the store's tables, never files)"
    return first


def run_sql(con, sql: str, *, max_rows: int = 1000, timeout_s: float = 10.0) -> SqlResult:
    """Run one read-only SELECT, returning at most `max_rows` rows and whether more existed.

    Asks DuckDB for max_rows + 1 rows (a LIMIT pushed onto the lazy relation, so a huge result is never
    materialised) to know whether the result was cut. A worker thread runs the query; past
    `timeout_s` the main thread interrupts it and raises SqlTimeoutError. Refuses anything but one SELECT (or
    EXPLAIN); the store's read-only connection refuses writes and file access as a second line.
    """
    import duckdb

    if max_rows < 1:
        raise SqlError(f"max_rows must be at least 1, got {max_rows}")
    query = _single_read_statement(sql)
    box: dict = {}

    def work() -> None:
        try:
            rel = con.sql(query)
            box["frame"] = rel.limit(max_rows + 1).df() if rel is not None else pd.DataFrame()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    # The query runs on `con` itself, not a cursor: a store's views are TEMP views and registered Arrow
    # datasets, which only the connection that made them can see. The caller must not share `con` meanwhile.
    t0 = time.perf_counter()
    worker = threading.Thread(target=work, name="moeviz-sql", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        con.interrupt()
        worker.join(5.0)
        raise SqlTimeoutError(
            f"the query ran longer than {timeout_s:g} s and was stopped; aggregate with GROUP BY, filter with "
            "WHERE, or query step_stats/layer_stats instead of routes"
        )
    if "error" in box:
        e = box["error"]
        if isinstance(e, duckdb.Error):
            raise SqlError(_one_line(e)) from None
        raise e
    frame = box["frame"]
    truncated = len(frame) > max_rows
    return SqlResult(frame.head(max_rows).reset_index(drop=True), truncated, time.perf_counter() - t0)
