"""open_store(spill=True) spills past its memory limit (issue 22: agreement from the routes of two 80 M-route runs
was killed at 17.9 GB: the connection had no temp_directory, and a disabled local file system refuses spills too);
SQL on it still reaches no file outside the store; the default connection (spill=False) reaches none."""

from __future__ import annotations

import os

import duckdb
import pytest

from moeviz.store import RunWriter, open_store

# 12 M groups of a hash aggregate: ~400 MB of hash table, over a 100 MB limit
BIG = """SELECT count(*) AS groups, sum(c) AS rows FROM (
    SELECT i % 12000000 AS g, count(*) AS c FROM range(16000000) r(i) GROUP BY g)"""


@pytest.fixture()
def run_dir(tmp_path):
    w = RunWriter(tmp_path / "r", run_id="r", run_name="r")
    w.write_run({"model_class": "T", "n_layers": 1, "n_experts": 2, "top_k": 1})
    w.write_layers([{"layer": 0, "module_name": "l0", "n_experts": 2, "top_k": 1}])
    w.close()
    return tmp_path / "r"


def _spill_folders() -> set[str]:
    import tempfile

    from moeviz.store.reader import _SPILL_PREFIX, _host

    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"{_SPILL_PREFIX}{_host()}-{os.getpid()}-")}


def test_a_query_over_the_memory_limit_spills_and_the_folder_goes_at_close(run_dir):
    before = _spill_folders()
    con = open_store(run_dir, memory_limit=100 << 20, threads=2, spill=True)
    assert con.execute(BIG).fetchone() == (12_000_000, 16_000_000)  # numbers of range(), known without DuckDB
    con.close()
    assert _spill_folders() == before


def test_without_spill_the_same_query_fails_cleanly(run_dir):
    con = open_store(run_dir, memory_limit=100 << 20, threads=2)
    with pytest.raises(duckdb.OutOfMemoryException):
        con.execute(BIG).fetchone()
    con.close()


@pytest.mark.parametrize("spill", [True, False])
def test_sql_still_reaches_no_file(run_dir, tmp_path, spill):
    con = open_store(run_dir, spill=spill)
    attacks = ["SELECT * FROM read_csv('/etc/passwd')", f"ATTACH '{tmp_path / 'x.duckdb'}'",
               f"COPY (SELECT 1) TO '{tmp_path / 'x.csv'}'", "SET temp_directory = '/tmp'"]
    if not spill:  # with spill, DuckDB allows writing over the attached run.duckdb: open_store says so
        attacks.append(f"COPY (SELECT 1 AS a) TO '{run_dir / 'run.duckdb'}' (FORMAT csv, USE_TMP_FILE false)")
    for sql in attacks:
        with pytest.raises(duckdb.Error):
            con.execute(sql)
    assert not (tmp_path / "x.csv").exists()
    con.close()



def test_spill_folders_of_dead_processes_are_removed_at_the_next_open(run_dir, tmp_path, monkeypatch):
    """A process killed mid-query leaves its spill folder (DuckDB removes it only at close): the next
    open_store(spill=True) on this host removes those whose process is gone, and nothing else."""
    import subprocess
    import sys
    import tempfile

    from moeviz.store.reader import _SPILL_PREFIX, _host

    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # that process has exited
    folders = {"dead": f"{_SPILL_PREFIX}{_host()}-{dead_pid}-0123456789ab",
               "live": f"{_SPILL_PREFIX}{_host()}-{os.getpid()}-0123456789ab",
               "other host": f"{_SPILL_PREFIX}otherhost-{dead_pid}-0123456789ab"}
    for name in folders.values():
        (root / name).mkdir()
        (root / name / "duckdb_temp_storage-0.tmp").write_bytes(b"x" * 1024)
    con = open_store(run_dir, spill=True)
    con.close()
    assert not (root / folders["dead"]).exists()
    assert (root / folders["live"]).exists() and (root / folders["other host"]).exists()
