"""A user's SQL over a store: the statement check, the messages, and `run_sql` (the SQL page and `moeviz sql`).

What keeps a user's SQL from harming anything is not this module: `run_sql` hands the query to a
`moeviz.store.sandbox.SqlSandbox`, which runs it in a worker process on a fresh, locked-down store connection
(`open_store`: read-only, no file access, configuration locked), kills it at its time limit and caps its memory.
`check_statement` only gives a plain first answer to what would fail or be pointless anyway (DDL, DML, SET,
ATTACH, COPY, EXPLAIN ANALYZE of a write, several statements): it is a message, not the guard.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moeviz.errors import MoevizError
from moeviz.store.reader import STALE_MESSAGE, is_stale
from moeviz.store.schema import TABLES

if TYPE_CHECKING:
    import pandas as pd

    from moeviz.store.sandbox import SqlSandbox


class SqlError(MoevizError):
    """A user query was refused or failed; the message says why."""


class SqlTimeoutError(SqlError):
    """A user query ran past its time limit and was stopped."""


class SqlMemoryError(SqlError):
    """A user query needed more memory than its cap and was stopped."""



# Statement kinds a user query may be: reads. CALL runs a table function (duckdb_settings(), pragma_...); EXPLAIN
# shows a plan (EXPLAIN ANALYZE runs the statement, so it is checked further below).
_READ_KINDS = ("SELECT", "EXPLAIN", "CALL")
_EXPLAIN_ANALYZE = re.compile(r"\s*EXPLAIN\s+(?:ANALY[SZ]E\b|\((?:[^)]*\bANALY[SZ]E\b[^)]*)\))(.*)", re.I | re.S)


def check_statement(sql: str) -> None:
    """Refuse, with a plain SqlError, what is not one read: an empty query, several statements, DDL, DML, SET,
    PRAGMA, ATTACH, COPY, INSTALL, EXPLAIN ANALYZE of anything but a read. Allows SELECT in every form DuckDB
    reads as one (WITH, QUALIFY, window functions, PIVOT/UNPIVOT, DESCRIBE, SUMMARIZE, SHOW, VALUES, FROM-first),
    plain EXPLAIN and CALL. The message only: the sandbox guards the store whatever the statement."""
    import duckdb

    if not sql or not sql.strip():
        raise SqlError("the query is empty: write a SELECT over runs, layers, routes, step_stats, ...")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise SqlError(f"the query does not parse: {sql_error_message(e)}") from None
    # PIVOT without an IN list comes back as two statements with no text of their own (a CREATE TYPE of the
    # pivoted values, then the SELECT): one statement the user wrote
    written = [s for s in statements if s.query.strip()]
    if len(written) > 1:
        raise SqlError(f"one statement at a time, please (got {len(written)})")
    if not statements:
        raise SqlError("the query is empty: write a SELECT over runs, layers, routes, step_stats, ...")
    for s in written or statements[-1:]:
        kind = s.type.name
        if kind not in _READ_KINDS:
            raise SqlError(f"the store is read-only: only SELECT queries are allowed, not {kind}")
        analyzed = _EXPLAIN_ANALYZE.match(s.query) if kind == "EXPLAIN" else None
        if analyzed:
            try:
                inner = [t.type.name for t in duckdb.extract_statements(analyzed.group(1))]
            except duckdb.Error:
                inner = []
            if any(k != "SELECT" for k in inner):
                raise SqlError(f"the store is read-only: EXPLAIN ANALYZE runs the statement, so only "
                               f"EXPLAIN ANALYZE SELECT is allowed, not {inner[0]}")


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


@dataclass
class SqlResult:
    """A user query's answer: a DataFrame (the SQL page), or columns and rows as tuples (`moeviz sql`)."""

    frame: pd.DataFrame | None  # at most max_rows rows; None with as_rows
    columns: list[str]
    rows: list[tuple] | None  # with as_rows
    truncated: bool  # the query had more than max_rows rows
    elapsed_s: float
    warnings: list[str]  # what open_store skipped or repaired (truncated segments, ...)


def run_sql(sandbox: "SqlSandbox", path, sql: str, *, max_rows: int | None = None, timeout_s: float | None = None,
            memory_bytes: int | None = None, as_rows: bool = False) -> SqlResult:
    """Check `sql` (check_statement), then run it in `sandbox` on the store at `path`.

    Limits left out are the sandbox's; those given may lower them, never raise them. The worker fetches
    max_rows + 1 rows (a LIMIT on the lazy relation, so a huge result is never materialised) to know whether
    the result was cut. Raises SqlError (SqlTimeoutError, SqlMemoryError) with a one-line message.
    """
    check_statement(sql)
    t0 = time.perf_counter()
    data, truncated, warnings = sandbox.run(path, sql, max_rows=max_rows, timeout_s=timeout_s,
                                            memory_bytes=memory_bytes, as_rows=as_rows)
    elapsed = time.perf_counter() - t0
    if as_rows:
        columns, rows = data
        return SqlResult(None, columns, rows, truncated, elapsed, warnings)
    return SqlResult(data, list(data.columns), None, truncated, elapsed, warnings)


# --- the SQL page's examples ------------------------------------------------------------------------------

EXAMPLE_QUERIES: dict[str, str] = {
    "Load per layer and expert": (
        "SELECT layer, expert, sum(assigned) AS assigned,\n"
        "       sum(assigned) / sum(sum(assigned)) OVER (PARTITION BY layer) AS load_fraction\n"
        "FROM step_stats GROUP BY layer, expert ORDER BY layer, expert"
    ),
    # the same numbers from ~1/1000 of the rows on a compacted run (a 100,000-step run of 58 x 256 experts: 1.5 M
    # rows instead of 1.5 B); on a live run the view sums the segments on the fly, slower than step_stats
    "Load per layer and expert, long compacted runs": (
        "-- step_rollups: step_stats summed over ranks in blocks of 10/100/1000 steps. On a compacted run the same\n"
        "-- totals from ~1/1000 of the rows; on a run still being written it sums the new segments first (slower)\n"
        "SELECT layer, expert, sum(assigned) AS assigned,\n"
        "       sum(assigned) / sum(sum(assigned)) OVER (PARTITION BY layer) AS load_fraction\n"
        "FROM step_rollups WHERE resolution = 1000 GROUP BY layer, expert ORDER BY layer, expert"
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
