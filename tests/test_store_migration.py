"""Stores written by an older moeviz read and compact under the current schema.

tests/data/store_v2.tar.gz was written by moeviz at commit 4b6c42b (store schema version 2) with that version's
tests/test_store.py `write_run`: run `v2seg` left as segments, run `v2comp` compacted into run.duckdb. Its
expected.json holds the row counts and sums the old version read back, so these tests compare the current reader
against the old one's answers, not against itself.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from moeviz.store import compact, open_store
from moeviz.store.schema import SCHEMA_VERSION

FIXTURE = Path(__file__).parent / "data" / "store_v2.tar.gz"


@pytest.fixture
def v2_store(tmp_path) -> Path:
    """A fresh copy of the version-2 store (tests may compact it; the tracked archive is never touched)."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path / "store", filter="data")
    return tmp_path / "store"


def _check_as_written(con, expected: dict) -> None:
    for t in ("routes", "step_stats", "layer_stats", "sequences", "pair_stats", "flow_stats"):
        got = {r[0]: [r[1]] for r in con.execute(f"SELECT run_id, count(*) FROM {t} GROUP BY run_id").fetchall()}
        assert got == expected[t], t
    sums = {r[0]: [int(r[1]), int(r[2]), round(float(r[3]), 6)] for r in con.execute(
        "SELECT run_id, sum(expert), sum(token_id), sum(weight) FROM routes GROUP BY run_id").fetchall()}
    assert sums == expected["routes_sums"]
    stats = {r[0]: [int(r[1]), int(r[2]), int(r[3]), round(float(r[4]), 6)] for r in con.execute(
        "SELECT run_id, sum(tokens), sum(assigned), sum(first_choice), sum(prob_sum) FROM step_stats "
        "GROUP BY run_id").fetchall()}
    assert stats == expected["step_stats_sums"]
    # what version 3 added reads as unknown, and nothing the old version knew reads as unknown
    assert con.execute("SELECT count(*) FROM routes WHERE dropped IS NOT NULL OR margin IS NOT NULL "
                       "OR weight IS NULL").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM sequences WHERE prompt_tokens IS NOT NULL").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM step_stats WHERE tokens IS NULL OR first_choice IS NULL "
                       "OR prob_sum IS NULL").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM expert_bias").fetchone()[0] == 0


def test_a_version_2_store_reads_with_the_new_columns_null(v2_store):
    assert SCHEMA_VERSION == 5
    expected = json.loads((v2_store / "expected.json").read_text())
    con = open_store(v2_store)
    assert sorted(con.execute("SELECT run_id, schema_version FROM runs").fetchall()) == [("v2comp", 2), ("v2seg", 2)]
    _check_as_written(con, expected)
    tokens = {r[0]: [r[1]] for r in con.execute("SELECT run_id, count(*) FROM token_stats GROUP BY run_id").fetchall()}
    assert tokens == expected["token_stats"]


def test_a_version_2_store_compacts_under_the_current_version(v2_store):
    expected = json.loads((v2_store / "expected.json").read_text())
    result = {r["run_id"]: r for r in compact(v2_store)["runs"]}
    assert result["v2seg"]["segments_folded"] > 0
    con = open_store(v2_store)
    _check_as_written(con, expected)
    # the segments compacted now get the tables compaction derives, from routes whose new columns are NULL
    assert con.execute("SELECT count(*) FROM token_stats WHERE run_id = 'v2seg'").fetchone()[0] > 0
    assert con.execute("SELECT sum(assigned) FROM weight_hist WHERE run_id = 'v2seg'").fetchone()[0] == \
        expected["routes"]["v2seg"][0]
    # v2seg's token_sets went into files and its weight_hist holds merged rows (its experts have a few routes
    # each): its manifest says version 5, so a version-3 or 4 moeviz refuses it; its data still reads as written
    # under version 2
    assert con.execute("SELECT count(*) FROM weight_hist WHERE run_id = 'v2seg' AND bin = -1").fetchone()[0] > 0
    manifest = json.loads((v2_store / "v2seg" / "moeviz.json").read_text())
    assert (manifest["schema_version"], manifest["data_schema_version"]) == (5, 2)
    assert sorted(con.execute("SELECT run_id, schema_version FROM runs").fetchall()) == [("v2comp", 2), ("v2seg", 2)]
    # v2comp's run.duckdb predates token_sets: compaction built them into it by SQL, no files; its weight_hist
    # rows are all bins (as an older compaction built them) and stay so: manifest untouched
    assert json.loads((v2_store / "v2comp" / "moeviz.json").read_text())["schema_version"] == 2
    assert con.execute("SELECT min(bin) FROM weight_hist WHERE run_id = 'v2comp'").fetchone()[0] >= 0
    assert not (v2_store / "v2comp" / "compacted" / "token_sets").exists()


def test_a_run_with_token_sets_files_is_refused_by_a_version_3_reader(v2_store, monkeypatch):
    """What a version-3 moeviz does with a newer manifest: its ladder (layout.migrate_manifest at 310c4ae) refuses
    any version above its SCHEMA_VERSION first, as this one does with SCHEMA_VERSION set to 3."""
    from moeviz.errors import SchemaVersionError
    from moeviz.store import layout

    compact(v2_store)
    monkeypatch.setattr(layout, "SCHEMA_VERSION", 3)
    with pytest.raises(SchemaVersionError, match="schema version 5.*up to 3"):
        layout.read_manifest(v2_store / "v2seg")


def test_a_run_with_merged_weight_hist_rows_is_refused_by_a_version_4_reader(v2_store, monkeypatch):
    """A version-4 moeviz would read a merged weight_hist row (bin -1) as a bin; its ladder refuses the raised
    manifest, as this one does with SCHEMA_VERSION set to 4."""
    from moeviz.errors import SchemaVersionError
    from moeviz.store import layout

    compact(v2_store)
    monkeypatch.setattr(layout, "SCHEMA_VERSION", 4)
    with pytest.raises(SchemaVersionError, match="schema version 5.*up to 4"):
        layout.read_manifest(v2_store / "v2seg")


def test_a_version_3_run_reads_and_its_compaction_raises_it_to_5(tmp_path):
    from moeviz.errors import StoreError
    from moeviz.store import RunWriter

    from test_store import write_run

    run_dir = tmp_path / "v3"
    write_run(run_dir, compact_on_close=False)
    path = run_dir / "moeviz.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), schema_version=3)))
    con = open_store(run_dir)
    assert con.execute("SELECT schema_version FROM runs").fetchall() == [(3,)]
    n = con.execute("SELECT count(*) FROM routes").fetchone()[0]
    con.close()
    compact(run_dir)
    manifest = json.loads(path.read_text())
    assert (manifest["schema_version"], manifest["data_schema_version"]) == (5, 3)  # merged weight_hist rows
    con = open_store(run_dir)
    assert con.execute("SELECT schema_version FROM runs").fetchall() == [(3,)]
    assert con.execute("SELECT count(*) FROM routes").fetchone()[0] == n
    assert con.execute("SELECT count(*) FROM token_sets").fetchone()[0] > 0
    with pytest.raises(StoreError, match="schema version 3.*new run folder"):
        RunWriter(run_dir, run_id=manifest["run_id"])


def test_a_version_2_run_refuses_new_writes(v2_store):
    from moeviz.errors import StoreError
    from moeviz.store import RunWriter

    with pytest.raises(StoreError, match="schema version 2.*new run folder"):
        RunWriter(v2_store / "v2seg", run_id="v2seg")
    compact(v2_store)  # its manifest now says 4 (token_sets files), its data is still version 2's
    with pytest.raises(StoreError, match="schema version 2.*new run folder"):
        RunWriter(v2_store / "v2seg", run_id="v2seg")
