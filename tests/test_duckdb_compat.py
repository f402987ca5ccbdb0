"""moeviz.store.duckdb_compat: DuckDB version differences (ATTACH without parameters, the broken 2.0.0 release)."""

from __future__ import annotations

import warnings

import duckdb
import pytest

from moeviz.store import duckdb_compat


def test_sql_string_round_trips_quotes_and_attaches_such_a_path(tmp_path):
    path = tmp_path / "it's a \"run\"" / "run.duckdb"
    path.parent.mkdir()
    duckdb.connect(str(path)).execute("CREATE TABLE t AS SELECT 42 AS x").close()
    con = duckdb_compat.connect()
    assert con.execute(f"SELECT {duckdb_compat.sql_string(str(path))}").fetchone()[0] == str(path)
    con.execute(f"ATTACH {duckdb_compat.sql_string(str(path))} AS old (READ_ONLY)")
    assert con.execute("SELECT x FROM old.t").fetchone()[0] == 42


def test_the_broken_release_warns_with_the_fix_and_supported_ones_do_not():
    with pytest.warns(duckdb_compat.DuckDBVersionWarning, match=r"dict-surviving join.*pip install 'duckdb>=1.4,<2'"):
        duckdb_compat.check_version("2.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        duckdb_compat.check_version("1.5.6")
        duckdb_compat.check_version("1.4.4")


def test_the_installed_duckdb_is_a_supported_one():
    """requirements.txt pins duckdb<2; an environment that drifted to the broken release fails here, by name."""
    assert duckdb.__version__ not in duckdb_compat.BROKEN_VERSIONS, (
        f"DuckDB {duckdb.__version__} is installed; run pip install -r requirements.txt")
