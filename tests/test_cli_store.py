"""`moeviz sql | info | compact | schema` on a real store, through moeviz.cli.main (and one real subprocess)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moeviz.cli import main
from moeviz.store.schema import TABLES, schema_markdown
from moeviz.store import RunWriter

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture()
def store(tmp_path) -> Path:
    """A run of 2 layers x 3 tokens x top-2 (12 routes) with known experts and weights, left uncompacted."""
    w = RunWriter(tmp_path / "exp", run_name="exp", compact_on_close=False)
    w.write_run({"model_class": "Tiny", "n_layers": 2, "n_experts": 4, "top_k": 2})
    w.write_flush({"routes": {"step": 0, "seq": 0, "pos": np.tile(np.repeat(np.arange(3), 2), 2),
                              "token_id": np.tile(np.repeat([5, 6, 7], 2), 2), "layer": np.repeat([0, 1], 6),
                              "slot": np.tile([0, 1], 6), "expert": np.array([0, 1, 0, 2, 3, 0, 1, 0, 1, 2, 1, 3]),
                              "weight": np.tile([0.75, 0.25], 6)}})
    w.close()
    return tmp_path / "exp"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sql_table_csv_and_json(store, capsys):
    q = "SELECT layer, expert, count(*) AS n, sum(weight) AS w FROM routes GROUP BY ALL ORDER BY layer, expert"
    code, out, _ = run(capsys, "sql", str(store), q)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "expert", "n", "w"]
    # layer 0 experts [0,1,0,2,3,0]: expert 0 three times (0.75 + 0.75 + 0.25)
    assert lines[2].split() == ["0", "0", "3", "1.75"]  # 6 significant digits in the text table
    code, out, _ = run(capsys, "sql", str(store), q, "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["layer", "expert", "n", "w"] and rows[1][:3] == ["0", "0", "3"] and len(rows) == 1 + 8
    assert float(rows[1][3]) == (2 * round(0.75 * 65535) + round(0.25 * 65535)) / 65535  # weights as quantised
    code, out, _ = run(capsys, "sql", str(store), "SELECT run_id, status, started_at FROM runs", "--format", "json")
    (row,) = json.loads(out)
    assert row["run_id"] == "exp" and row["status"] == "finished" and row["started_at"].startswith("20")


def test_sql_row_limit_reports_truncation(store, capsys):
    code, out, err = run(capsys, "sql", str(store), "SELECT * FROM routes", "--max-rows", "5", "--format", "csv")
    assert code == 0 and len(out.splitlines()) == 6  # header + 5
    assert "first 5 rows; there are more" in err
    code, out, err = run(capsys, "sql", str(store), "SELECT * FROM routes", "--max-rows", "12", "--format", "csv")
    assert len(out.splitlines()) == 13 and err == ""


@pytest.mark.parametrize("sql, message", [
    ("COPY routes TO '/tmp/moeviz-should-not-exist.csv'", "only SELECT queries are allowed, not COPY"),
    ("CREATE TABLE t AS SELECT 1", "only SELECT queries are allowed, not CREATE"),
    ("SELECT * FROM read_csv('/etc/passwd')", "not allowed"),
    ("SELEC 1", "syntax error"),
    ("SELECT * FROM nope", "tables: runs, layers, routes"),
])
def test_sql_errors_are_one_clear_line_and_exit_2(store, capsys, sql, message):
    code, out, err = run(capsys, "sql", str(store), sql)
    assert code == 2 and out == ""
    assert err.startswith("moeviz sql: error: ") and message in err and err.count("\n") == 1
    assert not os.path.exists("/tmp/moeviz-should-not-exist.csv")


def test_info_and_compact(store, capsys):
    code, out, _ = run(capsys, "info", str(store))
    assert code == 0 and "run exp  [finished]" in out
    routes_line = next(line for line in out.splitlines() if line.strip().startswith("routes "))
    assert routes_line.split()[1:4] == ["1", "12", str(next(store.glob("routes/rank=0/*.parquet")).stat().st_size)]
    code, out, _ = run(capsys, "compact", str(store))
    assert code == 0 and "run exp: folded 2 segment(s)" in out and "12 routes" in out
    code, out, _ = run(capsys, "info", str(store), "--json")
    info = json.loads(out)
    assert info["runs"][0]["tables"]["routes"] == {"segments": 0, "segment_rows": 0, "segment_bytes": 0,
                                                   "compacted_rows": 12}
    code, out, _ = run(capsys, "compact", str(store))
    assert "folded 0 segment(s)" in out
    assert json.loads(run(capsys, "info", str(store), "--json")[1])["runs"][0]["routes_files"] == 1


def test_compact_routes_format_duckdb_keeps_routes_in_run_duckdb(store, capsys):
    code, out, _ = run(capsys, "compact", str(store), "--routes-format", "duckdb")
    assert code == 0 and "folded 2 segment(s)" in out and "(0 routes file(s) + run.duckdb)" in out
    assert not (store / "compacted").exists()
    code, out, _ = run(capsys, "sql", str(store), "SELECT count(*) AS n, sum(expert) AS e FROM routes", "--format", "csv")
    assert out.splitlines()[1] == "12,14"


def test_schema(capsys):
    code, out, _ = run(capsys, "schema", "--markdown")
    assert code == 0 and out == schema_markdown() + "\n"
    code, out, _ = run(capsys, "schema")
    for t in TABLES.values():
        assert f"{t.name}: " in out
    assert any(line.split()[:2] == ["weight", "DOUBLE"] for line in out.splitlines() if line.strip())


def test_nonexistent_path_in_a_real_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for cmd in (["sql", str(tmp_path / "nope"), "SELECT 1"], ["info", str(tmp_path / "nope")],
                ["compact", str(tmp_path / "nope")]):
        p = subprocess.run([sys.executable, "-m", "moeviz.cli", *cmd], capture_output=True, text=True, env=env, timeout=60)
        assert p.returncode == 2, p.stderr
        assert p.stderr == f"moeviz {cmd[0]}: error: no moeviz store at {tmp_path / 'nope'}: the path does not exist " \
                           "(expected a run folder holding moeviz.json, or a folder of such run folders)\n"


def test_info_lists_the_compaction_tables_and_compact_says_when_a_format_cannot_apply(store, capsys):
    run(capsys, "compact", str(store))
    code, out, _ = run(capsys, "info", str(store))
    listed = {line.split()[0] for line in out.splitlines()[3:] if line.startswith("  ") and line.split()}
    assert {"token_stats", "position_stats", "sequence_stats", "probe_sets", "weight_hist"} <= listed
    assert "compacted routes files" in out and "every file of the run" in out
    code, out, _ = run(capsys, "compact", str(store), "--routes-format", "duckdb")
    assert code == 0 and "compacted earlier into 1 Parquet file(s), which stay there" in out


def test_sql_table_keeps_a_whitespace_token_on_its_row(store, capsys):
    code, out, _ = run(capsys, "sql", str(store), "SELECT 'a' || chr(10) || 'b' AS text, chr(9) AS tab, 1 AS n")
    assert code == 0 and out.splitlines()[2].split() == ["a\\nb", "\\t", "1"]


def test_a_folder_of_folders_of_runs_is_one_store_and_a_run_id_twice_is_refused(store, tmp_path, capsys):
    """`moeviz demo --out runs/demo` writes runs/demo/aux and runs/demo/noaux: `runs/` must open."""
    import shutil

    nested = tmp_path / "runs" / "demo"
    nested.mkdir(parents=True)
    shutil.copytree(store, nested / "exp")
    code, out, err = run(capsys, "sql", str(tmp_path / "runs"), "SELECT run_id, count(*) AS n FROM routes GROUP BY ALL",
                         "--format", "csv")
    assert code == 0 and out.splitlines()[1:] == ["exp,12"], err
    shutil.copytree(store, tmp_path / "runs" / "again")
    code, out, err = run(capsys, "sql", str(tmp_path / "runs"), "SELECT 1")
    assert code == 2 and "both hold run 'exp'" in err and len(err.strip().splitlines()) == 1
