"""Compaction's own DuckDB memory limit (moeviz.store.memory): the size it reads, the limit DuckDB really runs
under, a compaction under a tight limit equal to a pandas brute force, and spill folders of a killed compaction
removed by the next."""

from __future__ import annotations

import os

import pytest

from moeviz.errors import StoreError
from moeviz.store import compact, duckdb_compat, memory, open_store
from tests.test_store_derived import check, write


@pytest.mark.parametrize("text, expected", [
    ("8GB", 8_000_000_000), ("512 MB", 512_000_000), ("2GiB", 2 * 1024 ** 3), ("1073741824", 1024 ** 3),
    ("1.5gb", 1_500_000_000),
])
def test_sizes_are_read_as_duckdb_spells_them(text, expected):
    assert memory.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "8 GBs", "-1GB", "0", ""])
def test_a_bad_size_says_what_to_write(text):
    with pytest.raises(StoreError, match="memory limit .*MOEVIZ_COMPACT_MEMORY.* is not a size.*for example 8GB"):
        memory.parse_bytes(text)


def test_default_is_a_quarter_of_usable_memory_with_a_floor(monkeypatch):
    monkeypatch.delenv(memory.ENV, raising=False)
    monkeypatch.setattr(memory, "usable_memory", lambda: 24 * 1024 ** 3)
    assert memory.compaction_memory_limit() == 6 * 1024 ** 3
    monkeypatch.setattr(memory, "usable_memory", lambda: 2 * 1024 ** 3)
    assert memory.compaction_memory_limit() == 1024 ** 3  # a quarter would be 512 MiB: the floor
    monkeypatch.setenv(memory.ENV, "3GB")
    assert memory.compaction_memory_limit() == 3_000_000_000


def test_a_container_limit_below_the_ram_is_what_counts(tmp_path, monkeypatch):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    f = tmp_path / "memory.max"
    monkeypatch.setattr(memory, "CGROUP_FILES", (f,))
    f.write_text("max\n")  # cgroup v2 without a limit
    assert memory.usable_memory() == ram
    f.write_text(f"{ram // 4}\n")
    assert memory.usable_memory() == ram // 4
    f.write_text(f"{ram * 4}\n")  # a limit above the RAM: the RAM
    assert memory.usable_memory() == ram


def test_compaction_runs_under_the_limit_and_equals_pandas(tmp_path, monkeypatch):
    """Every connection compaction opens reports DuckDB's memory_limit = the configured one (read back from
    DuckDB, not from moeviz's config), and the derived tables built under a tight limit equal the brute force."""
    seen = []
    real = duckdb_compat.connect

    def spy(database=":memory:", *, read_only=False, config=None):
        con = real(database, read_only=read_only, config=config)
        if not read_only and database != ":memory:":
            seen.append(con.execute("SELECT current_setting('memory_limit')").fetchone()[0])
        return con

    monkeypatch.setattr(duckdb_compat, "connect", spy)
    monkeypatch.setenv(memory.ENV, "96MiB")
    run_dir = tmp_path / "r"
    routes = write(run_dir, steps=range(6))
    compact(run_dir)
    assert seen and set(seen) == {"96.0 MiB"}, seen  # the run.duckdb being built and the scratch counts file
    check(open_store(run_dir), routes)


def test_a_bad_limit_fails_compaction_with_one_line_and_loses_nothing(tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    routes = write(run_dir, steps=range(3))
    monkeypatch.setenv(memory.ENV, "plenty")
    with pytest.raises(StoreError, match="not a size"):
        compact(run_dir)
    monkeypatch.delenv(memory.ENV)
    compact(run_dir)
    check(open_store(run_dir), routes)


def test_spill_folders_of_a_killed_compaction_are_removed_by_the_next(tmp_path):
    run_dir = tmp_path / "r"
    routes = write(run_dir, steps=range(3))
    left = [run_dir / "run.duckdb.tmp.tmp", run_dir / ".compact-counts.duckdb.tmp"]
    for d in left:
        d.mkdir()
        (d / "duckdb_temp_storage-0.tmp").write_bytes(b"x" * 4096)
    compact(run_dir)
    assert not any(d.exists() for d in left)
    check(open_store(run_dir), routes)


def test_the_cli_flag_sets_the_limit_and_a_bad_one_is_one_line(tmp_path, capsys, monkeypatch):
    from moeviz.cli import main

    monkeypatch.setenv(memory.ENV, "")  # empty = unset; recorded, so that what main() sets is undone after the test
    run_dir = tmp_path / "r"
    routes = write(run_dir, steps=range(3))
    assert main(["compact", str(run_dir), "--memory-limit", "lots"]) != 0
    err = capsys.readouterr().err
    assert "'lots'" in err and "is not a size" in err and "Traceback" not in err
    assert main(["compact", str(run_dir), "--memory-limit", "200MB"]) == 0
    assert os.environ[memory.ENV] == "200MB"
    check(open_store(run_dir), routes)
