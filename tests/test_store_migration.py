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
    assert SCHEMA_VERSION == 3
    expected = json.loads((v2_store / "expected.json").read_text())
    con = open_store(v2_store)
    assert sorted(con.execute("SELECT run_id, schema_version FROM runs").fetchall()) == [("v2comp", 2), ("v2seg", 2)]
    _check_as_written(con, expected)
    tokens = {r[0]: [r[1]] for r in con.execute("SELECT run_id, count(*) FROM token_stats GROUP BY run_id").fetchall()}
    assert tokens == expected["token_stats"]


def test_a_version_2_store_compacts_under_version_3(v2_store):
    expected = json.loads((v2_store / "expected.json").read_text())
    result = {r["run_id"]: r for r in compact(v2_store)["runs"]}
    assert result["v2seg"]["segments_folded"] > 0
    con = open_store(v2_store)
    _check_as_written(con, expected)
    # the segments compacted now get the tables compaction derives, from routes whose new columns are NULL
    assert con.execute("SELECT count(*) FROM token_stats WHERE run_id = 'v2seg'").fetchone()[0] > 0
    assert con.execute("SELECT sum(assigned) FROM weight_hist WHERE run_id = 'v2seg'").fetchone()[0] == \
        expected["routes"]["v2seg"][0]


def test_a_version_2_run_refuses_new_writes(v2_store):
    from moeviz.errors import StoreError
    from moeviz.store import RunWriter

    with pytest.raises(StoreError, match="schema version 2.*new run folder"):
        RunWriter(v2_store / "v2seg", run_id="v2seg")
