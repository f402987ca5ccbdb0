"""Store integrity around compaction's token_sets files and its scratch counts (review findings): a skipped
token_sets file makes agreement read the routes instead of fewer tokens; compaction removes a scratch counts file
a killed compaction left; a failure after run.duckdb was renamed into place keeps the files it names."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_agreement import A, B, two_runs  # noqa: E402

from moeviz.analyses import agreement as ag  # noqa: E402
from moeviz.errors import StoreError  # noqa: E402
from moeviz.store import RunWriter, compact, open_store  # noqa: E402
from moeviz.store import compaction  # noqa: E402
from moeviz.store.reader import StoreWarning  # noqa: E402


def flush_of(mem, run_id: str, where: str = "TRUE") -> dict:
    """The routes, step aggregates and sequences of run `run_id` of the in-memory store `mem` (rows `where`) as
    RunWriter.write_flush takes them (the writer gives the rank)."""
    tables = {}
    for t in ("routes", "step_stats", "layer_stats", "sequences"):
        tbl = mem.execute(f"SELECT * EXCLUDE (run_id, rank) FROM {t} WHERE run_id = ? AND {where}",
                          [run_id]).to_arrow_table()
        tables[t] = {c: (np.array(tbl.column(c).to_pylist(), dtype=object)
                         if c in ("seq_key", "sample_id", "domain", "tag") else tbl.column(c).to_numpy())
                     for c in tbl.column_names}
    return tables


def write_run(run_dir: Path, mem, run_id: str, world_size: int = 2, compact_on_close: bool = True) -> dict:
    """Run `run_id` of `mem` as a real run folder of `world_size` ranks (rank r holds the steps s with s % world_size
    == r), compacted by the last close unless told not to: one routes file and one token_sets file per rank. The
    flushes written."""
    flushes = {}
    for rank in range(world_size):
        w = RunWriter(run_dir, run_id=run_id, run_name=run_id, rank=rank, world_size=world_size,
                      compact_on_close=compact_on_close)
        w.write_run({"model_class": "Synthetic", "n_layers": 3, "n_experts": 8, "top_k": 2})
        w.write_layers(mem.execute("SELECT * EXCLUDE (run_id) FROM layers WHERE run_id = ?", [run_id]).df()
                       .to_dict("records"))
        flushes[rank] = flush_of(mem, run_id, f"step % {world_size} = {rank}")
        w.write_flush(flushes[rank])
        w.close()
    return flushes


@pytest.fixture
def two_rank_runs(tmp_path) -> Path:
    mem, _, _ = two_runs(seed=5)
    for run_id in ("A", "B"):
        write_run(tmp_path / run_id, mem, run_id)
    return tmp_path


def sets_file(root: Path, run_id: str, rank: int) -> Path:
    (path,) = (root / run_id / "compacted" / "token_sets" / f"rank={rank}").glob("*.parquet")
    return path


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_skipped_token_sets_file_makes_agreement_read_the_routes(two_rank_runs, damage):
    con = open_store(two_rank_runs)
    by_routes = ag.layer_agreement(con, A, B, source="routes")
    assert ag._sets_cover(con, (A, B), "auto")  # whole: 'auto' reads token_sets, and it agrees with the routes
    pd.testing.assert_frame_equal(ag.layer_agreement(con, A, B), by_routes)
    con.close()
    lost = sets_file(two_rank_runs, "A", 1)
    if damage == "deleted":
        lost.unlink()
    else:
        lost.write_bytes(lost.read_bytes()[: lost.stat().st_size // 2])
    with pytest.warns(StoreWarning, match="token_sets file"):
        con = open_store(two_rank_runs)
    # the other rank's file still reads: token_sets has rows of A, but not all of them
    assert 0 < con.execute("SELECT count(*) FROM token_sets WHERE run_id = 'A'").fetchone()[0] < \
        con.execute("SELECT count(*) FROM (SELECT DISTINCT step, rank, seq, pos, layer FROM routes "
                    "WHERE run_id = 'A')").fetchone()[0]
    assert not ag._sets_cover(con, (A, B), "auto")
    assert ag._sets_cover(con, (B,), "auto")  # the undamaged run still reads its token_sets
    pd.testing.assert_frame_equal(ag.layer_agreement(con, A, B), by_routes)  # every token, from the routes
    with pytest.raises(ag.AgreementError, match="token_sets does not cover"):
        ag.layer_agreement(con, A, B, source="token_sets")


def test_info_and_check_name_a_missing_compacted_file(two_rank_runs, capsys):
    """`moeviz info` (store_info, which opens no views) names a token_sets or routes file run.duckdb names but
    the disk lacks or holds cut; `moeviz check` lists it as a store finding."""
    from moeviz.cli import main
    from moeviz.store import store_info

    assert all(not r["skipped_files"] for r in store_info(two_rank_runs)["runs"])
    lost = sets_file(two_rank_runs, "A", 1)
    lost.unlink()
    (routes,) = (two_rank_runs / "B" / "compacted" / "routes" / "rank=0").glob("*.parquet")
    routes.write_bytes(routes.read_bytes()[:100])
    info = {r["run_id"]: r["skipped_files"] for r in store_info(two_rank_runs)["runs"]}
    assert info == {"A": [str(lost)], "B": [str(routes)]}
    assert main(["info", str(two_rank_runs)]) == 0
    out = capsys.readouterr().out
    assert out.count("damaged Parquet file(s)") == 2 and lost.name in out and routes.name in out
    assert main(["check", str(two_rank_runs)]) == 1
    out = capsys.readouterr().out
    assert lost.name in out and routes.name in out


def test_compaction_removes_a_scratch_counts_file_left_by_a_killed_compaction(two_rank_runs):
    run_dir = two_rank_runs / "A"
    scratch = run_dir / compaction._RouteCounts.FILE
    scratch.write_bytes(b"left by a compaction killed after it published run.duckdb")
    Path(str(scratch) + ".wal").write_bytes(b"wal")
    (result,) = compact(run_dir)["runs"]
    assert result["segments_folded"] == 0  # nothing new: the scratch file is removed anyway
    assert not scratch.exists() and not Path(str(scratch) + ".wal").exists()
    assert result["leftovers_removed"] == 2


def test_a_failure_after_run_duckdb_is_renamed_keeps_the_files_it_names(tmp_path, monkeypatch):
    mem, _, _ = two_runs(seed=5)
    run_dir = tmp_path / "A"
    flushes = write_run(run_dir, mem, "A", world_size=1, compact_on_close=False)
    n_routes = len(flushes[0]["routes"]["step"])
    real_fsync = compaction._fsync

    def fsync(path):
        if Path(path) == run_dir:  # only after run.duckdb.tmp was renamed over run.duckdb
            assert (run_dir / "run.duckdb").exists() and not (run_dir / "run.duckdb.tmp").exists()
            raise OSError(5, "Input/output error")
        real_fsync(path)

    monkeypatch.setattr(compaction, "_fsync", fsync)
    with pytest.raises(StoreError, match="Input/output error"):
        compact(run_dir)
    monkeypatch.undo()
    # run.duckdb is published and names its routes and token_sets files: they must all still be there
    import duckdb

    db = duckdb.connect(str(run_dir / "run.duckdb"), read_only=True)
    named = [r[0] for r in db.execute("SELECT file FROM _routes_files UNION ALL SELECT file FROM _table_files")
             .fetchall()]
    db.close()
    assert len(named) == 2 and all((run_dir / n).is_file() for n in named)
    compact(run_dir)  # deletes the folded segments: the routes now live in the files alone
    assert not list(run_dir.glob("routes/rank=*/*.parquet"))
    con = open_store(run_dir)
    assert con.execute("SELECT count(*) FROM routes").fetchone()[0] == n_routes
    assert con.execute("SELECT count(*) FROM token_sets").fetchone()[0] > 0


def test_a_batch_with_a_null_key_or_two_ranks_is_left_to_sql():
    """_groupable, checked once per batch for token_sets and the counts: a NULL in a grouping column or a batch
    mixing ranks or runs cannot be grouped by numpy; compaction's SQL then builds those tables."""
    import pyarrow as pa

    clean = {c: [0, 0] for c in compaction._GROUPING_COLUMNS} | {"run_id": ["r", "r"]}
    assert compaction._groupable(pa.table(clean))
    for column in compaction._GROUPING_COLUMNS:
        assert not compaction._groupable(pa.table(clean | {column: [0 if column != "run_id" else "r", None]})), column
    assert not compaction._groupable(pa.table(clean | {"rank": [0, 1]}))
    assert not compaction._groupable(pa.table(clean | {"run_id": ["r", "s"]}))
