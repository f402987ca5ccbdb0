"""Untrusted SQL (issue 14): through run_sql and the sandbox, every attack fails or stays in its own query, a
runaway query is killed at its limit without holding anyone else, memory is capped, and the SQL people write works.

The store is a real run folder written by RunWriter; "unchanged" is checked against what the same queries
answered before any attack, and the guarantees are checked with the statement check bypassed
(`SqlSandbox.run`), because the check is only a message.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from moeviz.errors import MoevizError, StoreNotFoundError
from moeviz.store import RunWriter, open_store
from moeviz.store.sandbox import GiB, MiB, SqlLimits, SqlSandbox, parse_size
from moeviz.store.sql import (EXAMPLE_QUERIES, SqlError, SqlMemoryError, SqlTimeoutError, check_statement,
                              run_sql)
from moeviz.testing import store_from_routing, synthetic_routing

ROUTING = dict(n_steps=3, n_layers=2, n_experts=4, top_k=2, seqs_per_step=3, seq_len=5, seed=1)

# what other users see; each must answer the same after any attack
PROBES = {
    "runs": "SELECT run_id, n_experts, status FROM runs",
    "layers": "SELECT count(*) AS n FROM layers",
    "routes": "SELECT count(*) AS n, sum(expert) AS e FROM routes",
    "step_stats": "SELECT sum(assigned) AS a FROM step_stats",
    "views": "SELECT table_name FROM information_schema.tables ORDER BY ALL",
}


def write_store(run_dir, routing: dict) -> None:
    """The routing arrays as a real run folder, one flush per step (as the collectors would write it)."""
    mem = store_from_routing(**routing, run_id="r")
    w = RunWriter(run_dir, run_id="r", run_name="r", compact_on_close=False)
    w.write_run({"model_class": "Tiny", "n_layers": 2, "n_experts": 4, "top_k": 2})
    w.write_layers(mem.execute("SELECT * EXCLUDE (run_id) FROM layers").df().to_dict("records"))
    w.write_vocab(list(range(100)), [f"t{i}" for i in range(100)])
    for step in sorted(set(routing["steps"].tolist())):
        tables = {}
        for t in ("routes", "step_stats", "layer_stats", "sequences"):
            df = mem.execute(f"SELECT * EXCLUDE (run_id) FROM {t} WHERE step = ?", [step]).df()
            tables[t] = {c: df[c].to_numpy() for c in df.columns}
        w.write_flush(tables)
    w.close()


@pytest.fixture(scope="module")
def routing():
    return synthetic_routing(**ROUTING)


@pytest.fixture(scope="module")
def store(tmp_path_factory, routing):
    path = tmp_path_factory.mktemp("sandbox") / "run"
    write_store(path, routing)
    return path


@pytest.fixture(scope="module")
def sandbox():
    with SqlSandbox(SqlLimits(timeout_s=30, memory_bytes=1 * GiB), max_workers=3) as box:
        yield box


def probe(box, store) -> dict:
    return {name: box.run(store, sql, timeout_s=20)[0].to_dict("list") for name, sql in PROBES.items()}


def attacks(tmp) -> dict[str, str]:
    """What an attacker would type: writes hidden in EXPLAIN ANALYZE, files, ATTACH, INSTALL, SET, PRAGMA."""
    return {
        "EXPLAIN ANALYZE DROP VIEW": "EXPLAIN ANALYZE DROP VIEW routes",
        "EXPLAIN ANALYZE UPDATE": "EXPLAIN ANALYZE UPDATE runs SET n_experts = 999, status = 'failed'",
        "EXPLAIN ANALYZE DELETE": "EXPLAIN ANALYZE DELETE FROM layers",
        "EXPLAIN ANALYZE INSERT": "EXPLAIN ANALYZE INSERT INTO runs (run_id, n_experts) VALUES ('evil', 1)",
        "EXPLAIN ANALYZE CREATE OR REPLACE TEMP VIEW":
            "EXPLAIN ANALYZE CREATE OR REPLACE TEMP VIEW step_stats AS SELECT * FROM step_stats WHERE false",
        "EXPLAIN ANALYZE CREATE TEMP TABLE": "EXPLAIN ANALYZE CREATE TEMP TABLE big AS SELECT * FROM range(10)",
        "DROP VIEW": "DROP VIEW routes",
        "UPDATE": "UPDATE runs SET n_experts = 999",
        "CREATE TEMP VIEW": "CREATE TEMP VIEW evil AS SELECT 1",
        "COPY TO": f"COPY (SELECT 1) TO '{tmp / 'x.csv'}'",
        "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
        "ATTACH": f"ATTACH '{tmp / 'evil.duckdb'}' AS evil",
        "INSTALL": "INSTALL httpfs",
        "SET": "SET enable_external_access = true",
        "SET memory": "SET memory_limit = '100GB'",
        "PRAGMA": "PRAGMA threads = 64",
        "multi-statement": "DROP VIEW routes; SELECT 1",
        "multi-statement hidden": "SELECT 1; EXPLAIN ANALYZE UPDATE runs SET status = 'failed'",
    }


def test_the_statement_check_refuses_each_attack_with_a_plain_message(tmp_path):
    for name, sql in attacks(tmp_path).items():
        if name == "read_csv":  # a SELECT: the engine refuses it (below), not the check
            continue
        with pytest.raises(SqlError, match="read-only|one statement") as info:
            check_statement(sql)
        assert isinstance(info.value, MoevizError) and "\n" not in str(info.value), name


def test_no_attack_changes_what_the_next_query_sees_even_past_the_check(sandbox, store, tmp_path):
    """Each attack goes straight to the sandbox (no statement check): whether DuckDB refuses it or runs it on
    the query's own connection, the next query sees the store as before, and no file is written."""
    before = probe(sandbox, store)
    files = {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and "_status" not in p.parts}
    ran = []
    for name, sql in attacks(tmp_path).items():
        try:
            sandbox.run(store, sql, timeout_s=20)
            ran.append(name)
        except SqlError:
            pass
        assert probe(sandbox, store) == before, name
    # the EXPLAIN ANALYZE writes do run (on TEMP tables of the query's own connection): the reason for fresh ones
    assert "EXPLAIN ANALYZE UPDATE" in ran
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "evil.duckdb").exists()
    assert {p: p.read_bytes() for p in files} == files
    assert before["runs"]["n_experts"] == [4] and before["layers"]["n"] == [2]
    # what the test guards against: on one shared connection, the same UPDATE is seen by the next query
    shared = open_store(store)
    try:
        shared.execute(attacks(tmp_path)["EXPLAIN ANALYZE UPDATE"])
        assert shared.execute(PROBES["runs"]).df().to_dict("list") != before["runs"]
    finally:
        shared.close()


def test_every_example_query_runs(sandbox, store):
    for name, sql in EXAMPLE_QUERIES.items():
        assert not run_sql(sandbox, store, sql).frame.empty, name


def test_run_sql_refuses_or_reports_bad_queries(sandbox, store):
    for sql, message in [("DELETE FROM runs", "read-only: only SELECT queries are allowed, not DELETE"),
                         ("CREATE TABLE x AS SELECT 1", "not CREATE"), ("SELECT 1; SELECT 2", "one statement"),
                         ("   ", "empty"), ("SELEC 1", "does not parse: .*syntax error"),
                         ("SELECT no_such_column FROM runs", "no_such_column"),
                         ("SELECT * FROM rout", "tables: runs, layers, routes"),
                         ("SELECT * FROM read_csv('/etc/passwd')", "not allowed: .*never files"),
                         ("EXPLAIN ANALYZE UPDATE runs SET n_experts = 1", "only EXPLAIN ANALYZE SELECT")]:
        with pytest.raises(SqlError, match=message):
            run_sql(sandbox, store, sql)


def test_the_sql_people_write_works(sandbox, store, routing):
    n_routes = len(routing["steps"]) * 2 * 2  # tokens x layers x k
    cases = {
        "WITH x AS (SELECT layer FROM routes) SELECT count(*) AS n FROM x": [n_routes],
        "SELECT layer, expert FROM routes QUALIFY row_number() OVER (PARTITION BY layer ORDER BY expert) = 1 "
        "ORDER BY layer": None,
        "SELECT sum(n) AS n FROM (SELECT count(*) OVER (PARTITION BY layer) AS n FROM routes)": None,
        "SELECT * FROM (PIVOT (SELECT layer, expert FROM routes) ON layer USING count(*)) ORDER BY expert": None,
        "UNPIVOT (SELECT 1 AS a, 2 AS b) ON a, b INTO NAME k VALUE v": None,
        "DESCRIBE routes": None, "SUMMARIZE layers": None, "EXPLAIN SELECT * FROM routes": None,
        "EXPLAIN ANALYZE SELECT count(*) FROM routes": None, "FROM runs": None, "SHOW TABLES": None,
    }
    for sql, first_column in cases.items():
        frame = run_sql(sandbox, store, sql).frame
        assert not frame.empty, sql
        if first_column is not None:
            assert frame.iloc[:, 0].tolist() == first_column, sql
    pivot = run_sql(sandbox, store, "PIVOT (SELECT layer, expert FROM routes) ON layer USING count(*)").frame
    assert pivot[["0", "1"]].to_numpy().sum() == n_routes  # every route counted once, in its layer's column


def test_rows_are_cut_at_the_limit_and_truncation_is_said(sandbox, store, routing):
    res = run_sql(sandbox, store, "SELECT * FROM range(50)", max_rows=10)
    assert len(res.frame) == 10 and res.truncated
    res = run_sql(sandbox, store, "SELECT * FROM range(10);", max_rows=10)
    assert len(res.frame) == 10 and not res.truncated
    res = run_sql(sandbox, store, "SELECT layer, expert FROM routes ORDER BY ALL", max_rows=3, as_rows=True)
    assert res.columns == ["layer", "expert"] and len(res.rows) == 3 and res.truncated
    assert isinstance(res.rows[0], tuple)
    res = run_sql(sandbox, store, EXAMPLE_QUERIES["Load per layer and expert"])
    assert np.allclose(res.frame.groupby("layer")["load_fraction"].sum(), 1.0)
    with pytest.raises(SqlError, match="row limit must be at least 1"):
        run_sql(sandbox, store, "SELECT 1", max_rows=0)


def test_limits_can_be_lowered_never_raised(sandbox, store):
    top = SqlLimits(max_rows=100, timeout_s=5, memory_bytes=512 * MiB)
    assert top.lowered(1000, 60, 8 * GiB) == top
    assert top.lowered(10, 1, 128 * MiB) == SqlLimits(10, 1, 128 * MiB)
    with SqlSandbox(top, spare=0, max_workers=1) as box:
        res = run_sql(box, store, "SELECT * FROM range(1000)", max_rows=100_000)
        assert len(res.frame) == 100 and res.truncated
        res = run_sql(box, store, "SELECT current_setting('memory_limit') AS m", memory_bytes=64 * GiB)
        assert res.frame["m"][0] in ("512.0 MiB", "512 MiB")  # DuckDB's own limit: the server's cap, not 64 GiB
    assert SqlLimits.from_env({"MOEVIZ_SQL_TIMEOUT": "7.5", "MOEVIZ_SQL_MEMORY": "2GB"}) == \
        SqlLimits(timeout_s=7.5, memory_bytes=2_000_000_000)
    assert parse_size("512MiB") == 512 * MiB and parse_size("1.5g") == 1_500_000_000
    with pytest.raises(SqlError, match="not a size"):
        SqlLimits.from_env({"MOEVIZ_SQL_MEMORY": "lots"})


def test_a_store_that_is_not_there_is_the_usual_error(sandbox, tmp_path):
    with pytest.raises(StoreNotFoundError, match="no moeviz store at"):
        run_sql(sandbox, tmp_path / "nope", "SELECT 1")


def test_memory_growth_ends_with_a_clear_error_and_the_worker_serves_on(store):
    with SqlSandbox(SqlLimits(timeout_s=30, memory_bytes=256 * MiB), spare=0, max_workers=1) as box:
        for sql in ("SELECT length(list(range(300000000)))", "SELECT length(repeat('x', 3000000000))",
                    "SELECT length(list(i)) FROM range(100000000) t(i)"):
            t0 = time.monotonic()
            with pytest.raises(SqlMemoryError, match=r"more memory than its cap \(256 MiB\)"):
                run_sql(box, store, sql)
            assert time.monotonic() - t0 < 15, sql
        worker = box._idle[0].proc.pid
        assert run_sql(box, store, "SELECT 42 AS x").frame["x"].tolist() == [42]
        assert box._idle[0].proc.pid == worker  # an allocation that fails does not cost a worker


def test_a_runaway_query_is_killed_at_its_limit_and_the_next_one_answers(sandbox, store):
    """`repeat` cannot be interrupted by DuckDB: the worker is killed, a new one serves the next query."""
    t0 = time.monotonic()
    with pytest.raises(SqlTimeoutError, match="longer than 0.5 s"):
        run_sql(sandbox, store, "SELECT length(repeat('x', 900000000))", timeout_s=0.5)
    assert time.monotonic() - t0 < 2.0
    assert run_sql(sandbox, store, "SELECT 42 AS x", timeout_s=10).frame["x"].tolist() == [42]


def test_two_sessions_one_attacks_the_other_is_unaffected_and_not_held(sandbox, store, tmp_path):
    """Session 1 runs every attack and then a query DuckDB cannot interrupt; while that is being stopped,
    session 2's query answers within its own (short) limit and sees the store as before."""
    before = probe(sandbox, store)
    for sql in attacks(tmp_path).values():
        try:
            sandbox.run(store, sql, timeout_s=20)
        except SqlError:
            pass
    run_sql(sandbox, store, "SELECT 1")  # both workers started and ready
    started, stopped = threading.Event(), {}

    def session_1():
        started.set()
        try:
            sandbox.run(store, "SELECT length(repeat('x', 900000000))", timeout_s=3.0)
        except SqlTimeoutError:
            stopped["at"] = time.monotonic()

    runaway = threading.Thread(target=session_1)
    runaway.start()
    started.wait()
    time.sleep(0.3)  # session 1's worker is inside repeat() now
    t0 = time.monotonic()
    seen = {name: run_sql(sandbox, store, sql, timeout_s=2.0).frame.to_dict("list") for name, sql in PROBES.items()}
    answered = time.monotonic()
    assert seen == before
    assert answered - t0 < 2.0 and runaway.is_alive()  # answered while session 1's query still runs
    runaway.join(10)
    assert stopped["at"] > answered
