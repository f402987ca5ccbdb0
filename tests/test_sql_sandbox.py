"""Untrusted SQL (issue 14): through run_sql and the sandbox, every attack fails or stays in its own query, a
runaway query is killed at its limit without holding anyone else, memory is capped, and the SQL people write works.

The store is a real run folder written by RunWriter; "unchanged" is checked against what the same queries
answered before any attack, and the guarantees are checked with the statement check bypassed
(`SqlSandbox.run`), because the check is only a message.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time

import numpy as np
import pytest

from moeviz.errors import MoevizError, StoreNotFoundError
from moeviz.store import RunWriter, compact, open_store
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


def _runaway(passes: int = 30) -> str:
    """One row, one scalar expression: DuckDB checks for an interrupt between vectors, never inside a function,
    so nothing but a kill stops it. ~2 s a pass over the 20 MB string here (~60 s in all; a machine 10x faster
    still needs 6 s), and ~0.2 GB at most (each pass replaces the string by one of the same length):
    `repeat('x', 3e9)` of the issue, without its 3 GB."""
    sql = "repeat('ab', 10000000)"
    for _ in range(passes):
        sql = f"regexp_replace({sql}, '(a|b)', 'c', 'g')"
    return f"SELECT length({sql}) AS n"


RUNAWAY = _runaway()


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


# the PROBES in one query (one round trip to a worker), for checks repeated after each attack
SNAPSHOT = "SELECT " + ", ".join(f"(SELECT list(p) FROM ({sql}) AS p) AS {name}" for name, sql in PROBES.items())


def probe(box, store, timeout_s: float = 20) -> dict:
    return box.run(store, SNAPSHOT, timeout_s=timeout_s)[0].iloc[0].map(str).to_dict()


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
    assert "'n_experts': 4" in before["runs"] and before["layers"] == "[{'n': 2}]"
    # what the test guards against: on one shared connection, the same UPDATE is seen by the next query
    shared = open_store(store)
    try:
        shared.execute(attacks(tmp_path)["EXPLAIN ANALYZE UPDATE"])
        assert shared.execute(PROBES["runs"]).fetchall() == [("r", 999, "failed")]
    finally:
        shared.close()


def test_every_example_query_runs(sandbox, store):
    for name, sql in EXAMPLE_QUERIES.items():
        assert not run_sql(sandbox, store, sql).frame.empty, name


def test_load_example_reads_the_rollups_and_equals_the_routing(sandbox, store, routing, tmp_path):
    """The load examples (step_stats, and step_rollups' blocks of 1,000 steps: ~1/1000 of the rows on a long
    compacted run) must give the routing's own counts, counted here from the index arrays, live and compacted."""
    index = routing["index"]  # [tokens, layers, k]
    n_layers, n_experts = index.shape[1], 4
    want = np.stack([np.bincount(index[:, layer].ravel(), minlength=n_experts) for layer in range(n_layers)])
    compacted = tmp_path / "run"
    shutil.copytree(store, compacted)
    compact(compacted)
    names = ("Load per layer and expert", "Load per layer and expert, long compacted runs")
    assert "FROM step_rollups WHERE resolution = 1000" in EXAMPLE_QUERIES[names[1]]
    for path, name in itertools.product((store, compacted), names):
        frame = run_sql(sandbox, path, EXAMPLE_QUERIES[name]).frame
        got = np.zeros_like(want)
        got[frame["layer"].to_numpy(), frame["expert"].to_numpy()] = frame["assigned"].to_numpy()
        assert (got == want).all(), (path, name)
        layer, expert = frame["layer"].to_numpy(), frame["expert"].to_numpy()
        assert np.allclose(frame["load_fraction"], want[layer, expert] / want.sum(axis=1)[layer])


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
    """DuckDB cannot interrupt RUNAWAY: the worker is killed, a new one serves the next query."""
    t0 = time.monotonic()
    with pytest.raises(SqlTimeoutError, match="longer than 0.5 s"):
        run_sql(sandbox, store, RUNAWAY, timeout_s=0.5)
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
            sandbox.run(store, RUNAWAY, timeout_s=4.0)
        except SqlTimeoutError:
            stopped["at"] = time.monotonic()

    runaway = threading.Thread(target=session_1)
    runaway.start()
    started.wait()
    time.sleep(0.3)  # session 1's worker is inside the query now
    t0 = time.monotonic()
    seen = probe(sandbox, store, timeout_s=2.0)  # session 2's own limit
    answered = time.monotonic()
    assert answered - t0 < 2.0 and runaway.is_alive()  # answered while session 1's query still runs
    assert seen == before
    runaway.join(10)
    assert stopped["at"] > answered


# --- the SQL page (AppTest): the same attacks, two sessions, the server's limits ----------------------------------


def _page(store, monkeypatch=None, **env):
    """The SQL page on `store`, as a new browser session would open it."""
    st = pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from app.state import sql_sandbox

    if env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        sql_sandbox.clear()  # the server's sandbox is made once, from the environment
    app = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "app" / "main.py")
    at = AppTest.from_file(app, default_timeout=60)
    at.session_state["store_path"] = str(store)
    at.session_state["run_id"] = "r"
    at.switch_page("views/sql.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert st is not None
    return at


def _ask(at, sql: str):
    at.text_area(key="sql_text").set_value(sql).run()
    assert not at.exception, [e.value for e in at.exception]
    errors = " | ".join(str(e.value) for e in at.error)
    frame = at.dataframe[0].value if not errors and at.dataframe else None
    return frame, errors


def test_the_sql_page_refuses_each_attack_and_another_session_sees_the_same_store(store, tmp_path):
    other = _page(store)
    before = {name: _ask(other, sql)[0].to_dict("list") for name, sql in PROBES.items()}
    attacker = _page(store)
    for name, sql in attacks(tmp_path).items():
        frame, errors = _ask(attacker, sql)
        assert frame is None and ("read-only" in errors or "one statement" in errors or "not allowed" in errors), name
        assert "Traceback" not in errors
    after = {name: _ask(other, sql)[0].to_dict("list") for name, sql in PROBES.items()}
    assert after == before and before["runs"]["n_experts"] == [4]
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "evil.duckdb").exists()


def test_the_sql_page_widgets_stop_at_the_servers_limits(store, monkeypatch):
    at = _page(store, monkeypatch, MOEVIZ_SQL_TIMEOUT="3", MOEVIZ_SQL_MEMORY="1GiB")
    try:
        assert at.number_input(key="sql_timeout").proto.max == 3 and at.number_input(key="sql_timeout").value == 3
        assert at.number_input(key="sql_memory").proto.max == 1024
        t0 = time.monotonic()
        frame, errors = _ask(at, RUNAWAY)
        assert "longer than 3 s and was stopped" in errors and time.monotonic() - t0 < 8
        at.number_input(key="sql_memory").set_value(128).run()
        frame, errors = _ask(at, "SELECT length(list(range(100000000)))")
        assert "more memory than its cap (128 MiB)" in errors
        frame, errors = _ask(at, "SELECT current_setting('memory_limit') AS m")
        assert frame["m"][0] in ("128.0 MiB", "128 MiB")
    finally:
        from app.state import sql_sandbox

        sql_sandbox.clear()


def test_a_runaway_query_in_one_page_session_does_not_hold_another(store):
    """Two browser sessions: session 1's query cannot be interrupted by DuckDB; session 2's query, asked while
    session 1's runs, answers well within session 2's own time limit."""
    s1, s2 = _page(store), _page(store)
    s1.number_input(key="sql_timeout").set_value(4).run()
    s2.number_input(key="sql_timeout").set_value(2).run()
    _ask(s2, "SELECT 1")  # the pool has a spare worker started
    runaway = threading.Thread(target=_ask, args=(s1, RUNAWAY))
    runaway.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    frame, errors = _ask(s2, PROBES["routes"])
    assert not errors and frame["n"].tolist() == [len(synthetic_routing(**ROUTING)["steps"]) * 2 * 2]
    assert time.monotonic() - t0 < 2.0 and runaway.is_alive()
    runaway.join(15)
    assert "longer than 4 s" in " | ".join(str(e.value) for e in s1.error)


# --- `moeviz sql` in a real process: the same attacks, the time limit, Ctrl-C ------------------------------------


def _cli(*args, **popen):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "moeviz.cli", "sql", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_moeviz_sql_refuses_each_attack_in_one_line(store, tmp_path):
    for name, sql in attacks(tmp_path).items():
        out, err = _cli(store, sql).communicate(timeout=60)
        assert out == "" and err.startswith("moeviz sql: error: ") and err.count("\n") == 1, (name, err)
    out, err = _cli(store, PROBES["runs"], "--format", "csv").communicate(timeout=60)
    assert out.splitlines() == ["run_id,n_experts,status", "r,4,finished"], err
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "evil.duckdb").exists()


def test_moeviz_sql_stops_at_its_timeout_with_exit_2_and_one_line(store):
    t0 = time.monotonic()
    p = _cli(store, RUNAWAY, "--timeout", "1")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2 and out == ""
    assert err.startswith("moeviz sql: error: the query ran longer than 1 s and was stopped") and err.count("\n") == 1
    assert "step_rollups/layer_rollups" in err  # where a long run's totals are read fast
    assert time.monotonic() - t0 < 8  # interpreter start (~1-2 s on 2 busy cores) + 1 s
    p = _cli(store, "SELECT length(list(range(300000000)))", "--memory", "256MiB")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "more memory than its cap (256 MiB)" in err and err.count("\n") == 1


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/task"), reason="reads /proc (Linux)")
def test_ctrl_c_stops_moeviz_sql_at_once_with_exit_130_and_one_line(store):
    import os
    import signal

    p = _cli(store, RUNAWAY, start_new_session=True)
    deadline, worker = time.monotonic() + 30, None
    # until the worker is in the query: past ~1.5 s of CPU (its imports and open_store take ~0.8 s)
    while time.monotonic() < deadline and p.poll() is None:
        try:
            kids = _children(p.pid)
            worker = kids[0] if kids else None
            if worker and _cpu_ticks(worker) >= 1.5 * os.sysconf("SC_CLK_TCK"):
                break
        except FileNotFoundError:  # the process left meanwhile: p.poll() says so
            pass
        time.sleep(0.1)
    assert p.poll() is None, p.communicate()
    assert worker is not None
    t0 = time.monotonic()
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: SIGINT to the whole foreground group
    out, err = p.communicate(timeout=10)
    assert time.monotonic() - t0 < 2.0
    assert p.returncode == 130 and out == "" and err == "moeviz sql: interrupted; the query was stopped\n"
    time.sleep(0.5)
    assert not os.path.exists(f"/proc/{worker}") or "State:\tZ" in open(f"/proc/{worker}/status").read()


def test_moeviz_dashboard_hands_its_sql_limits_to_the_app(store, monkeypatch, capsys):
    """--sql-timeout/--sql-memory reach the Streamlit process as the environment SqlLimits.from_env reads; a bad
    size is refused before any server starts."""
    from moeviz.cli import dashboard, main

    started = {}

    class FakeServer:
        def __init__(self, cmd, env):
            started["env"] = env

        def wait(self):
            return 0

    monkeypatch.setattr(dashboard.subprocess, "Popen", FakeServer)
    assert main(["dashboard", str(store), "--sql-timeout", "5", "--sql-memory", "1GiB"]) == 0
    assert SqlLimits.from_env(started.pop("env")) == SqlLimits(timeout_s=5, memory_bytes=GiB)
    assert main(["dashboard", str(store), "--sql-memory", "lots"]) == 2 and "env" not in started
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("moeviz dashboard: error: bad SQL limit") and "not a size" in err


def test_a_worker_still_starting_at_the_deadline_is_kept_for_the_next_query(store):
    with SqlSandbox(SqlLimits(timeout_s=30), spare=0, max_workers=1) as box:
        with pytest.raises(SqlTimeoutError, match="longer than 0.01 s"):
            run_sql(box, store, "SELECT 1", timeout_s=0.01)  # the interpreter takes longer than that to start
        (worker,) = box._idle
        assert run_sql(box, store, "SELECT 42 AS x").frame["x"].tolist() == [42]
        assert box._idle == [worker] and worker.proc.poll() is None
