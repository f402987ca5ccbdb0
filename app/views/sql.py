"""SQL console: read-only, row-limited, time-limited queries over the public schema, with CSV download."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.components import error_message, run_page, show_table
from app.state import Ctx, sql_sandbox
from moeviz.store.sandbox import MIN_MEMORY, MiB
from moeviz.store.schema import TABLES
from moeviz.store.sql import EXAMPLE_QUERIES, run_sql


def _schema_help() -> None:
    st.subheader("Schema")
    for table in TABLES.values():
        with st.expander(f"`{table.name}` ({len(table.columns)} columns)"):
            st.caption(table.doc)
            st.dataframe(
                pd.DataFrame([(c.name, c.sql_type, c.doc) for c in table.columns], columns=["column", "type", "meaning"]),
                hide_index=True, width="stretch",
            )


def render(ctx: Ctx) -> None:
    sandbox = sql_sandbox()
    top = sandbox.limits  # the server's maxima: the widgets cannot go past them
    st.caption("Read-only: one query at a time, at most the chosen number of rows, stopped after the time limit "
               "or past the memory cap. Each query runs on its own copy of the store's views, in a worker process.")
    example = st.selectbox("Example queries", ["(write your own)", *EXAMPLE_QUERIES], key="sql_example")
    if example != "(write your own)" and st.session_state.get("_sql_example_loaded") != example:
        st.session_state["sql_text"] = EXAMPLE_QUERIES[example]
        st.session_state["_sql_example_loaded"] = example
    st.session_state.setdefault("sql_text", EXAMPLE_QUERIES["Runs"])
    sql = st.text_area("Query", key="sql_text", height=160)
    c1, c2, c3, c4 = st.columns([1, 1, 1, 1])
    max_rows = c1.number_input("Row limit", min_value=1, max_value=top.max_rows, value=min(1000, top.max_rows),
                               step=100, key="sql_rows")
    timeout = c2.number_input("Time limit (s)", min_value=1, max_value=max(1, int(top.timeout_s)),
                              value=min(10, max(1, int(top.timeout_s))), step=1, key="sql_timeout")
    memory = c3.number_input("Memory cap (MiB)", min_value=MIN_MEMORY // MiB, max_value=top.memory_bytes // MiB,
                             value=top.memory_bytes // MiB, step=256, key="sql_memory")
    c4.button("Run query", type="primary", key="sql_run", help="Ctrl+Enter in the box runs it too.")
    if sql.strip():
        try:
            result = run_sql(sandbox, ctx.path, sql, max_rows=int(max_rows), timeout_s=float(timeout),
                             memory_bytes=int(memory) * MiB)
        except Exception as e:  # noqa: BLE001
            error_message("Query refused", e)
        else:
            more = f" (cut at {int(max_rows)}: more rows exist)" if result.truncated else ""
            st.success(f"{len(result.frame)} rows{more} in {result.elapsed_s:.2f} s")
            show_table(result.frame, "sql-result")
    _schema_help()


if __name__ == "__main__":
    run_page("SQL console", render)
