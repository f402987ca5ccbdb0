"""moeviz.store on real files: writer -> Parquet segments -> read-only views -> compaction, in one process.

The reference for every value read back is the arrays handed to the writer (weights within half a
quantisation step, 0.5/65535); multi-process cases live in test_store_live.py and test_store_kill.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from moeviz.store import layout
from moeviz.errors import SchemaVersionError, StoreError, StoreNotFoundError
from moeviz.store.schema import SCHEMA_VERSION, TABLES
from moeviz.store import RunWriter, StoreWarning, compact, open_store, store_info
from moeviz.selection import Selection
from moeviz.store.sandbox import SqlSandbox
from moeviz.store.sql import SqlError, run_sql

LAYERS, EXPERTS, K, SEQS, SEQ_LEN = 3, 4, 2, 2, 5
HALF_STEP = 0.5 / 65535 + 1e-12


def make_flush(rng: np.random.Generator, step: int, rank: int = 0) -> dict:
    """A flush with known values: routes layer-major (then token, then slot) and the three small tables."""
    tokens = SEQS * SEQ_LEN
    seq, pos = np.repeat(np.arange(SEQS), SEQ_LEN), np.tile(np.arange(SEQ_LEN), SEQS)  # [tokens]
    token_id = rng.integers(0, 50_000, tokens)  # [tokens] wider than int16 on purpose
    logits = rng.normal(size=(LAYERS, tokens, EXPERTS))  # [layers, tokens, experts]
    index = np.argsort(-logits, axis=-1)[..., :K]  # [layers, tokens, k]
    w = np.exp(np.take_along_axis(logits, index, -1))
    w /= w.sum(-1, keepdims=True)
    shape = (LAYERS, tokens, K)
    routes = {
        "step": np.full(LAYERS * tokens * K, step), "rank": np.full(LAYERS * tokens * K, rank),
        "seq": np.broadcast_to(seq[None, :, None], shape).ravel(), "pos": np.broadcast_to(pos[None, :, None], shape).ravel(),
        "token_id": np.broadcast_to(token_id[None, :, None], shape).ravel(),
        "layer": np.broadcast_to(np.arange(LAYERS)[:, None, None], shape).ravel(),
        "slot": np.broadcast_to(np.arange(K)[None, None, :], shape).ravel(), "expert": index.ravel(), "weight": w.ravel(),
        "dropped": np.where(rng.random(LAYERS * tokens * K) < 0.1, np.nan, rng.integers(0, 2, LAYERS * tokens * K)),  # NaN = NULL
        "margin": np.broadcast_to((np.take_along_axis(np.sort(logits, -1), np.array([[[EXPERTS - K]]]), -1)
                                   - np.sort(logits, -1)[..., EXPERTS - K - 1:EXPERTS - K]), shape).ravel()
                  .astype(np.float32),
    }
    le = np.array([(l, e) for l in range(LAYERS) for e in range(EXPERTS)])
    step_stats = {"step": np.full(len(le), step), "rank": np.full(len(le), rank), "layer": le[:, 0], "expert": le[:, 1],
                  "tokens": np.full(len(le), tokens), "assigned": rng.integers(0, 20, len(le)),
                  "first_choice": rng.integers(0, 10, len(le)), "prob_sum": rng.random(len(le)) * 3,
                  "dropped": rng.integers(0, 2, len(le))}
    layer_stats = {"step": np.full(LAYERS, step), "rank": np.full(LAYERS, rank), "layer": np.arange(LAYERS),
                   "tokens": np.full(LAYERS, tokens), "z_loss_sum": rng.random(LAYERS) * 10,
                   "entropy_sum": rng.random(LAYERS), "dropped": np.zeros(LAYERS, int),
                   "adjacent_pairs": np.full(LAYERS, 8.0), "same_first": np.array([1.0, np.nan, 3.0]),  # NaN = NULL
                   "first_in_topk": np.array([2, 3, 4]), "topk_overlap": np.array([5, 6, 7]),
                   "coactive_pairs": np.full(LAYERS, tokens), "nonfinite_tokens": np.array([0.0, 2.0, np.nan]),
                   "ranks_summed": np.array([np.nan, 1.0, np.nan])}  # 1: no other rank summed in
    pair_stats = {"step": np.full(2, step), "rank": np.full(2, rank), "layer": [0, 2], "expert_i": [0, 1],
                  "expert_j": [3, 2], "tokens": rng.integers(1, 10, 2)}
    flow_stats = {"step": np.full(3, step), "rank": np.full(3, rank), "layer_a": [0, 0, 1], "layer_b": [1, 1, 2],
                  "expert_a": [0, 3, 1], "expert_b": [2, 2, 0], "first_tokens": [4, 0, 2], "topk_pairs": [9, 1, 5]}
    sequences = {"step": np.full(SEQS, step), "rank": np.full(SEQS, rank), "seq": np.arange(SEQS),
                 "domain": np.array(["code", None], dtype=object), "tag": "train", "n_tokens": np.full(SEQS, SEQ_LEN),
                 "seq_key": np.array([2**64 - 1 - step, None], dtype=object),  # full 64 bits; None = NULL
                 "sample_id": np.array([f"req-{step}", None], dtype=object),
                 "pos_offset": np.array([3.0, np.nan]),  # NaN = NULL
                 "prompt_tokens": np.array([np.nan, 2.0])}
    bias = {"step": np.full(EXPERTS, step), "rank": np.full(EXPERTS, rank), "layer": np.full(EXPERTS, 1),
            "expert": np.arange(EXPERTS), "bias": rng.normal(size=EXPERTS) * 1e-3}
    balance = {"step": np.full(LAYERS, step), "rank": np.full(LAYERS, rank), "layer": np.arange(LAYERS),
               "sequences": np.full(LAYERS, SEQS), "switch_sum": rng.random(LAYERS) * SEQS,
               "switch_stack_sum": rng.random(LAYERS) * SEQS, "seq_aux_sum": rng.random(LAYERS) * SEQS}
    return {"routes": routes, "step_stats": step_stats, "layer_stats": layer_stats, "sequences": sequences,
            "pair_stats": pair_stats, "flow_stats": flow_stats, "expert_bias": bias, "balance_stats": balance}


META = {"model_class": "TinyMoE", "n_layers": LAYERS, "n_experts": EXPERTS, "top_k": K, "capacity_factor": 1.25,
        "config": {"hidden": 8, "name": "tiny"}, "sample_every": 2, "max_tokens_per_step": 128}
LAYER_ROWS = [{"layer": i, "module_name": f"model.layers.{i}.mlp.gate", "n_experts": EXPERTS, "top_k": K,
               "block_index": i, "stack": "decoder", "capacity_factor": [None, 1.25, None][i],
               "expert_capacity": [None, None, 3][i]} for i in range(LAYERS)]


def write_run(run_dir, *, steps=(0, 1), rank=0, world_size=1, run_id=None, close=True, compact_on_close=True,
              seed=0) -> tuple[RunWriter, dict[str, pd.DataFrame]]:
    """A whole run through the public writer API; returns the writer and the flushed tables as DataFrames."""
    rng = np.random.default_rng(seed)
    w = RunWriter(run_dir, run_id=run_id, run_name="exp", rank=rank, world_size=world_size,
                  compact_on_close=compact_on_close)
    w.write_run(META)
    w.write_layers(LAYER_ROWS)
    w.write_vocab([0, 1, 49_999], ["<s>", "hello", " wörld's"])
    flushed: dict[str, list] = {t: [] for t in layout.DATA_TABLES}
    for step in steps:
        tables = make_flush(rng, step, rank)
        w.write_flush(tables)
        for t, cols in tables.items():
            n = max(np.size(v) for v in cols.values())
            flushed[t].append(pd.DataFrame({c: (np.full(n, v, dtype=object) if np.ndim(v) == 0 else v)
                                            for c, v in cols.items()}))
    if close:
        w.close()
    return w, {t: pd.concat(v, ignore_index=True) for t, v in flushed.items()}


def sorted_frame(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return df.sort_values(keys).reset_index(drop=True)


def check_tables_equal(con, expected: dict[str, pd.DataFrame], run_id: str) -> None:
    keys = {"routes": ["step", "rank", "layer", "seq", "pos", "slot"], "step_stats": ["step", "rank", "layer", "expert"],
            "layer_stats": ["step", "rank", "layer"], "sequences": ["step", "rank", "seq"],
            "pair_stats": ["step", "rank", "layer", "expert_i"],
            "flow_stats": ["step", "rank", "layer_a", "expert_a"], "expert_bias": ["step", "rank", "layer", "expert"],
            "balance_stats": ["step", "rank", "layer"]}
    for t, exp in expected.items():
        got = con.execute(f"SELECT * FROM {t} WHERE run_id = ?", [run_id]).df()
        assert (got["run_id"] == run_id).all()
        got, exp = sorted_frame(got.drop(columns="run_id"), keys[t]), sorted_frame(exp, keys[t])
        assert list(got.columns) == [c for c in TABLES[t].column_names if c != "run_id"]
        assert len(got) == len(exp), t
        for c in got.columns:
            if t == "routes" and c == "weight":
                assert np.abs(got[c].to_numpy() - exp[c].to_numpy(dtype=float)).max() <= HALF_STEP
            elif got[c].dtype.kind in "iuf" or isinstance(got[c].dtype, pd.Int64Dtype):  # Int64: a NULL read
                np.testing.assert_array_equal(got[c].to_numpy(float, na_value=np.nan),
                                              exp[c].to_numpy(float), err_msg=f"{t}.{c}")
            else:
                assert [None if pd.isna(v) else v for v in got[c]] == [None if pd.isna(v) else v for v in exp[c]], f"{t}.{c}"


# ---------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("compacted", [False, True], ids=["segments", "compacted"])
def test_round_trip_every_table(tmp_path, compacted):
    run_dir = tmp_path / "exp1"
    _, expected = write_run(run_dir, compact_on_close=compacted)
    assert (run_dir / "run.duckdb").exists() == compacted
    con = open_store(run_dir)
    check_tables_equal(con, expected, "exp1")

    run = con.execute("SELECT * FROM runs").df()
    assert len(run) == 1
    r = run.iloc[0]
    assert (r.run_id, r.run_name, r.model_class, r.n_layers, r.n_experts, r.top_k) == ("exp1", "exp", "TinyMoE", 3, 4, 2)
    assert (r.capacity_factor, r.sample_every, r.max_tokens_per_step, r.world_size) == (1.25, 2, 128, 1)
    assert json.loads(r.config) == META["config"]
    assert (r.status, r.error, r.schema_version) == ("finished", None, SCHEMA_VERSION)
    assert r.started_at <= r.ended_at
    layers = con.execute("SELECT * EXCLUDE (run_id) FROM layers ORDER BY layer").df().to_dict("records")
    assert [{k: None if pd.isna(v) else v for k, v in r.items()} for r in layers] == LAYER_ROWS
    vocab = con.execute("SELECT token_id, text FROM vocab ORDER BY token_id").fetchall()
    assert vocab == [(0, "<s>"), (1, "hello"), (49_999, " wörld's")]


def test_views_have_the_schema_names_order_and_types(tmp_path):
    write_run(tmp_path / "r", close=False)
    con = open_store(tmp_path / "r")
    for t in TABLES.values():
        got = [(r[0], r[1]) for r in con.execute(f"DESCRIBE {t.name}").fetchall()]
        assert got == [(c.name, c.sql_type) for c in t.columns], t.name


def test_segments_are_hive_parquet_with_narrow_types_and_constant_run_id(tmp_path):
    run_dir = tmp_path / "exp"
    write_run(run_dir, close=False)
    files = sorted(run_dir.glob("*/rank=*/*.parquet"))
    assert files and all(re.fullmatch(r"[a-z_]+/rank=0/part-\d{8}-[0-9a-f]{8}\.parquet",
                                      f.relative_to(run_dir).as_posix()) for f in files)
    routes = ds.dataset(run_dir / "routes", format="parquet", partitioning="hive")  # as Spark/Polars would
    t = routes.to_table()
    assert t.schema.field("weight_q").type == "uint16" and t.schema.field("slot").type == "int8"
    assert t.schema.field("layer").type == "int16" and t.schema.field("expert").type == "int16"
    assert set(t.column("run_id").to_pylist()) == {"exp"}
    for f in files:
        assert set(pq.read_table(f, columns=["run_id"]).column("run_id").to_pylist()) == {"exp"}


def test_routes_are_stored_layer_major_keeping_token_and_slot_order(tmp_path):
    """Rows handed over token-major come back on disk layer-major, tokens and slots in their given order."""
    rng = np.random.default_rng(1)
    tables = make_flush(rng, 0)
    r = tables["routes"]
    order = np.lexsort((r["layer"], r["slot"], r["pos"], r["seq"]))  # by seq, pos, slot, then layer: token-major
    shuffled = {c: (v[order] if np.ndim(v) else v) for c, v in r.items()}
    assert not np.all(np.diff(shuffled["layer"]) >= 0)
    w = RunWriter(tmp_path / "r", compact_on_close=False)
    w.write_flush({"routes": shuffled})
    (f,) = (tmp_path / "r" / "routes" / "rank=0").glob("*.parquet")
    disk = pq.read_table(f).to_pandas()
    assert (np.diff(disk["layer"]) >= 0).all()
    for layer in range(LAYERS):
        d = disk[disk.layer == layer]
        keep = shuffled["layer"] == layer
        np.testing.assert_array_equal(d["pos"], shuffled["pos"][keep])
        np.testing.assert_array_equal(d["slot"], shuffled["slot"][keep])
        np.testing.assert_array_equal(d["expert"], shuffled["expert"][keep])


def test_weight_quantisation_is_round_to_nearest(tmp_path):
    w = RunWriter(tmp_path / "r", compact_on_close=False)
    weights = np.array([0.0, 1.0, 0.5, 1 / 65535, 0.49 / 65535, 0.51 / 65535, 0.123456789])
    n = len(weights)
    w.write_flush({"routes": {"step": 0, "seq": 0, "pos": np.arange(n), "token_id": 7, "layer": 0, "slot": 0,
                              "expert": 1, "weight": weights}})
    (f,) = (tmp_path / "r" / "routes" / "rank=0").glob("*.parquet")
    q = pq.read_table(f).column("weight_q").to_pylist()
    assert q == [0, 65535, 32768, 1, 0, 1, 8091]  # round(0.123456789 * 65535) = 8090.9 -> 8091
    got = open_store(tmp_path / "r").execute("SELECT weight FROM routes ORDER BY pos").fetchall()
    assert [g[0] for g in got] == pytest.approx([v / 65535 for v in q], abs=0)


def test_clipped_weights_warn_naming_the_layers_and_their_routers(tmp_path):
    w = RunWriter(tmp_path / "r", compact_on_close=False)
    w.write_layers([{"layer": 0, "module_name": "model.layers.0.mlp.gate"},
                    {"layer": 1, "module_name": "model.layers.1.mlp.gate"}])
    weights = np.array([0.5, 0.9, 2.5, 0.1])  # layer 1 holds a weight times a routed scaling factor
    with pytest.warns(StoreWarning, match=r"in layer\(s\) 1 \(model\.layers\.1\.mlp\.gate\), clipped"):
        w.write_flush({"routes": {"step": 0, "seq": 0, "pos": np.arange(4), "token_id": 7,
                                  "layer": np.array([0, 0, 1, 1]), "slot": 0, "expert": 1, "weight": weights}})
    w.close()


def test_large_flush_splits_into_layer_major_segments_without_losing_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "ROUTES_ROWS_PER_LAYER", 7)
    rng = np.random.default_rng(2)
    tables = make_flush(rng, 5)
    w = RunWriter(tmp_path / "r", compact_on_close=False)
    w.write_flush({"routes": tables["routes"]})
    files = sorted((tmp_path / "r" / "routes" / "rank=0").glob("*.parquet"))
    assert len(files) == 3  # 20 rows per layer, at most 7 per layer and segment
    for f in files:
        assert (np.diff(pq.read_table(f).column("layer").to_numpy()) >= 0).all()
    check_tables_equal(open_store(tmp_path / "r"), {"routes": pd.DataFrame(tables["routes"])}, "r")


def zipf_flush(rng, step, layers=8, experts=8, k=2, seqs=8, seq_len=512, vocab=32_000) -> dict:
    """A realistic flush: Zipf-distributed token ids, softmax top-2 weights, positions 0..511."""
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    token_id = rng.permutation(vocab)[rng.choice(vocab, seqs * seq_len, p=p / p.sum())]  # [tokens]
    logits = rng.normal(0, 1.5, (layers, seqs * seq_len, experts))  # [layers, tokens, experts]
    index = np.argsort(-logits, -1)[..., :k]
    w = np.exp(np.take_along_axis(logits, index, -1))
    w /= w.sum(-1, keepdims=True)
    shape = (layers, seqs * seq_len, k)
    b = lambda a: np.broadcast_to(a, shape).ravel()  # noqa: E731
    return {"routes": {"step": step, "seq": b(np.repeat(np.arange(seqs), seq_len)[None, :, None]),
                       "pos": b(np.tile(np.arange(seq_len), seqs)[None, :, None]), "token_id": b(token_id[None, :, None]),
                       "layer": b(np.arange(layers)[:, None, None]), "slot": b(np.arange(k)[None, None, :]),
                       "expert": index.ravel(), "weight": w.ravel()}}


def test_realistic_routes_cost_at_most_4_bytes_per_route_on_disk(tmp_path):
    rng = np.random.default_rng(3)
    w = RunWriter(tmp_path / "r", compact_on_close=False)
    for step in range(4):
        w.write_flush(zipf_flush(rng, step))
    info = store_info(tmp_path / "r")["runs"][0]
    assert info["tables"]["routes"]["segment_rows"] == 4 * 8 * 8 * 512 * 2
    assert info["bytes_per_route_segments"] <= 4.0, info["bytes_per_route_segments"]
    w.close()
    compact(tmp_path / "r")
    info = store_info(tmp_path / "r")["runs"][0]
    assert info["compacted"] and info["tables"]["routes"]["compacted_rows"] == 4 * 8 * 8 * 512 * 2
    # the compacted routes files alone: zstd Parquet, ~2 B/route
    assert info["bytes_per_route_compacted"] < 3
    assert info["run_duckdb_bytes"] == (tmp_path / "r" / "run.duckdb").stat().st_size
    assert set(info["tables"]) >= {"token_stats", "position_stats", "sequence_stats", "probe_sets", "weight_hist",
                                   "token_sets"}
    assert info["tables"]["weight_hist"]["compacted_rows"] > 0
    assert info["tables"]["token_sets"]["compacted_rows"] == 4 * 8 * 8 * 512  # one row per token and layer
    # every file of the run: run.duckdb adds ~2.5 MB of 256 KiB blocks whatever the size (a block or two per
    # table: weight_hist took this from 15.x to 16.2, the step roll-ups and expert_bias to 17.2; token_sets, one
    # row per token and layer for routing agreement, to 20.2); at scale the compacted run costs 2.8 B/route,
    # plus token_sets (docs/benchmarks.md)
    assert info["bytes_per_route"] < 21, info["bytes_per_route"]
    # routes are compacted into zstd Parquet files; run.duckdb (small tables, fixed ~MB of blocks) holds none
    files = sorted((tmp_path / "r" / "compacted" / "routes").glob("rank=0/*.parquet"))
    assert len(files) == 1 and info["routes_files"] == 1
    assert sum(pq.read_metadata(f).num_rows for f in files) == 4 * 8 * 8 * 512 * 2
    assert sum(f.stat().st_size for f in files) / (4 * 8 * 8 * 512 * 2) <= 4.0
    con = duckdb.connect(str(tmp_path / "r" / "run.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM routes").fetchone()[0] == 0
    con.close()


# ---------------------------------------------------------------------------------------------------- errors


def test_a_newer_schema_version_is_refused_with_both_versions(tmp_path):
    run_dir = tmp_path / "r"
    write_run(run_dir)
    manifest = json.loads((run_dir / "moeviz.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (run_dir / "moeviz.json").write_text(json.dumps(manifest))
    for action in (open_store, compact, store_info, lambda p: RunWriter(p)):
        with pytest.raises(SchemaVersionError, match=rf"version {SCHEMA_VERSION + 1}.*up to {SCHEMA_VERSION}.*upgrade"):
            action(run_dir)


def test_missing_store_says_what_was_looked_for(tmp_path):
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        open_store(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(StoreNotFoundError, match=r"moeviz\.json"):
        open_store(tmp_path / "empty")
    with pytest.raises(StoreNotFoundError):
        store_info(tmp_path / "empty")


def test_writer_refuses_bad_input_with_clear_errors(tmp_path):
    w = RunWriter(tmp_path / "r", compact_on_close=False)
    good = make_flush(np.random.default_rng(0), 0)["routes"]
    with pytest.raises(StoreError, match="unknown tables"):
        w.write_flush({"route": good})
    with pytest.raises(StoreError, match=r"lacks columns \['weight'\]"):
        w.write_flush({"routes": {k: v for k, v in good.items() if k != "weight"}})
    with pytest.raises(StoreError, match="differ in length"):
        w.write_flush({"routes": dict(good, pos=good["pos"][:-1])})
    with pytest.raises(StoreError, match=r"outside int16"):
        w.write_flush({"routes": dict(good, expert=good["expert"] + 40_000)})
    with pytest.raises(StoreError, match="NaN"):
        w.write_flush({"routes": dict(good, weight=np.full(len(good["weight"]), np.nan))})
    with pytest.raises(StoreError, match="must hold integers"):
        w.write_flush({"routes": dict(good, pos=good["pos"] + 0.5)})
    with pytest.raises(StoreError, match="1-D"):
        w.write_flush({"routes": dict(good, expert=good["expert"].reshape(-1, 2))})
    with pytest.raises(StoreError, match="unknown keys"):
        w.write_run({"n_layer": 3})
    assert not (tmp_path / "r" / "routes").exists()  # nothing half-written by the refused flushes
    with pytest.warns(StoreWarning, match="clipped"):
        w.write_flush({"routes": dict(good, weight=good["weight"] * 2.5)})
    w.close()
    with pytest.raises(StoreError, match="closed"):
        w.write_flush({"routes": good})
    with pytest.raises(StoreError, match="closed"):
        w.write_run(META)
    w.close()  # closing twice is harmless
    with pytest.raises(StoreError, match="rank must be"):
        RunWriter(tmp_path / "x", rank=2, world_size=2)
    with pytest.raises(StoreError, match="already holds run 'r'"):
        RunWriter(tmp_path / "r", run_id="other")


def test_files_no_commit_names_are_never_read_and_damaged_committed_files_are_skipped(tmp_path):
    """Readers read what commits name: a whole valid copy dropped into a segment folder (globbing would count it
    twice), garbage, an empty file and a writer's temp file are left out without a word while the writer lives;
    a committed segment truncated later (a failed disk, a bad copy) is skipped with a warning naming it; closing
    the writer compacts and removes the leftovers, saying how many."""
    run_dir = tmp_path / "r"
    w, expected = write_run(run_dir, close=False)
    folder = run_dir / "routes" / "rank=0"
    first, second = sorted(folder.glob("*.parquet"))[:2]
    data = first.read_bytes()
    (folder / "part-00000090-deadbeef.parquet").write_bytes(data)
    (folder / "part-00000091-deadbeef.parquet").write_bytes(b"PAR1 this is not parquet at all")
    (folder / "part-00000092-deadbeef.parquet").write_bytes(b"")
    (folder / ".part-00000093-cafecafe.parquet.tmp").write_bytes(data[:100])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        con = open_store(run_dir)
    check_tables_equal(con, expected, "r")
    assert len(store_info(run_dir)["runs"][0]["uncommitted_files"]) == 3

    lost = pq.read_table(second).num_rows
    second.write_bytes(second.read_bytes()[:-40])
    with pytest.warns(StoreWarning, match=rf"skipped 1 damaged Parquet file\(s\).*{second.name}"):
        con = open_store(run_dir)
    assert con.execute("SELECT count(*) FROM routes").fetchone()[0] == len(expected["routes"]) - lost
    check_tables_equal(con, {t: v for t, v in expected.items() if t != "routes"}, "r")
    assert store_info(run_dir)["runs"][0]["skipped_files"] == [str(second)]

    w.close()  # the last rank closes: compaction folds what commits name and removes the rest
    assert sorted(p.name for p in folder.iterdir()) == [second.name]  # the damaged one is kept for its owner
    result = compact(run_dir)["runs"][0]
    assert result["leftovers_removed"] == 0 and result["skipped_files"] == [str(second)]


# ---------------------------------------------------------------------------------------------------- status


def test_status_running_finished_failed_and_interrupted(tmp_path):
    def status(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return open_store(path).execute("SELECT status, error, ended_at IS NULL FROM runs").fetchall()[0]

    w, _ = write_run(tmp_path / "live", close=False)
    assert status(tmp_path / "live") == ("running", None, True)
    w.close()
    assert status(tmp_path / "live") == ("finished", None, False)

    with pytest.raises(ZeroDivisionError):
        with RunWriter(tmp_path / "bad") as w:
            w.write_flush(make_flush(np.random.default_rng(0), 0))
            1 / 0
    st = status(tmp_path / "bad")
    assert st[0] == "failed" and "ZeroDivisionError" in st[1] and st[2] is False

    # a writer that died: its status file says running, but its pid is gone
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_run(tmp_path / "dead", close=False)
    path = tmp_path / "dead" / "_status" / "rank=0.json"
    body = json.loads(path.read_text())
    path.write_text(json.dumps(dict(body, pid=int(proc.stdout), proc_start=None)))
    assert status(tmp_path / "dead") == ("interrupted", None, True)

    # another host: alive while its heartbeat is fresh, interrupted once it is stale
    path.write_text(json.dumps(dict(body, hostname=socket.gethostname() + "-elsewhere", heartbeat=layout.utc_iso())))
    assert status(tmp_path / "dead")[0] == "running"
    path.write_text(json.dumps(dict(body, hostname="elsewhere", heartbeat="2020-01-01T00:00:00")))
    assert status(tmp_path / "dead")[0] == "interrupted"


def test_world_size_counts_ranks_until_all_close(tmp_path):
    run_dir = tmp_path / "ddp"
    w0, e0 = write_run(run_dir, rank=0, world_size=2, run_id="ddp", close=False, seed=1)
    w1, e1 = write_run(run_dir, rank=1, world_size=2, run_id="ddp", close=False, seed=2)
    w0.close()
    assert not (run_dir / "run.duckdb").exists()  # rank 1 still writing: no compaction yet
    con = open_store(run_dir)
    assert con.execute("SELECT world_size, status FROM runs").fetchall() == [(2, "running")]
    w1.close()
    assert (run_dir / "run.duckdb").exists()  # the last rank to close compacted the run
    assert not list(run_dir.glob("routes/rank=*/*.parquet"))
    con = open_store(run_dir)
    assert con.execute("SELECT count(*), min(world_size), min(status) FROM runs").fetchall() == [(1, 2, "finished")]
    both = {t: pd.concat([e0[t], e1[t]], ignore_index=True) for t in e0}
    check_tables_equal(con, both, "ddp")
    assert con.execute("SELECT count(*) FROM layers").fetchone()[0] == LAYERS  # one row per layer, not per rank


def test_a_folder_of_runs_is_queried_together(tmp_path):
    _, ea = write_run(tmp_path / "a", seed=1)
    _, eb = write_run(tmp_path / "b", seed=2, close=False)
    (tmp_path / "not-a-run").mkdir()
    con = open_store(tmp_path)
    assert con.execute("SELECT run_id, status FROM runs ORDER BY run_id").fetchall() == [("a", "finished"), ("b", "running")]
    check_tables_equal(con, ea, "a")
    check_tables_equal(con, eb, "b")


# ---------------------------------------------------------------------------------------------------- compaction


def test_compaction_is_idempotent_and_never_double_counts(tmp_path):
    run_dir = tmp_path / "r"
    _, expected = write_run(run_dir, compact_on_close=False)
    segs = sorted(run_dir.glob("*/rank=0/*.parquet"))
    keep = {p: p.read_bytes() for p in segs}
    first = compact(run_dir)["runs"][0]
    assert first["segments_folded"] == len(segs) and first["segments_deleted"] == len(segs)
    assert first["rows"]["routes"] == len(expected["routes"])
    assert not list(run_dir.glob("*/rank=0/*.parquet"))
    again = compact(run_dir)["runs"][0]
    assert again["segments_folded"] == 0 and again["rows"] == first["rows"]
    # a crash between the rename and the deletion leaves folded segments behind: not counted twice, then removed
    for p, data in keep.items():
        p.write_bytes(data)
    check_tables_equal(open_store(run_dir), expected, "r")
    assert compact(run_dir)["runs"][0]["segments_deleted"] == len(segs)
    # more data later (a resumed rank 0) is folded on top of the compacted tables
    _, more = write_run(run_dir, run_id="r", steps=(7,), seed=5)
    both = {t: pd.concat([expected[t], more[t]], ignore_index=True) for t in expected}
    check_tables_equal(open_store(run_dir), both, "r")
    con = duckdb.connect(str(run_dir / "run.duckdb"), read_only=True)
    # 3 metadata segments + 8 tables of one flush written by the second writer
    assert con.execute("SELECT count(*), count(DISTINCT file) FROM _segments").fetchone() == (len(segs) + 11,) * 2
    con.close()
    check_route_stats(open_store(run_dir), both["routes"])


def check_route_stats(con, routes: pd.DataFrame) -> None:
    """token_stats, position_stats, sequence_stats and weight_hist (built by compaction) equal pandas counts of
    the routes."""
    assert con.execute("SELECT route_stats_complete FROM runs").fetchone()[0] is True
    for table, keys in (("token_stats", ["rank", "layer", "token_id", "expert"]),
                        ("position_stats", ["rank", "layer", "pos", "expert"]),
                        ("sequence_stats", ["step", "rank", "seq", "layer", "expert"])):
        r = routes.astype({k: "int64" for k in keys})
        exp = r.groupby(keys).agg(assigned=("slot", "size"), first_choice=("slot", lambda x: int((x == 0).sum())))
        got = con.execute(f"SELECT * EXCLUDE (run_id) FROM {table}").df().astype("int64").set_index(keys)
        pd.testing.assert_frame_equal(got.sort_index(), exp.sort_index(), check_dtype=False, check_names=False)
    got = con.execute("SELECT * EXCLUDE (run_id) FROM weight_hist").df().astype("int64")
    assert got.set_index(["step", "rank", "layer", "expert", "bin"]).sort_index().to_dict("index") == \
        expected_weight_hist(routes)


def expected_weight_hist(routes: pd.DataFrame) -> dict[tuple, dict]:
    """weight_hist by hand: {(step, rank, layer, expert, bin): counts} with bin = round(weight * 65535) // 256 and
    `above` = the routes of the same step, rank, layer and expert in higher bins."""
    cells: dict[tuple, dict] = {}
    for r in routes.itertuples():
        q = int(round(float(r.weight) * 65535))
        c = cells.setdefault((int(r.step), int(r.rank), int(r.layer), int(r.expert), q // 256),
                             {"assigned": 0, "first_choice": 0, "weight_q_sum": 0})
        c["assigned"] += 1
        c["first_choice"] += int(r.slot == 0)
        c["weight_q_sum"] += q
    for key, c in cells.items():
        c["above"] = sum(o["assigned"] for k, o in cells.items() if k[:4] == key[:4] and k[4] > key[4])
    # an expert with at most WEIGHT_HIST_MERGE_MAX routes in a step and rank: one row, bin -1, above 0 (version 5)
    experts: dict[tuple, dict] = {}
    for key, c in cells.items():
        e = experts.setdefault(key[:4], {"assigned": 0, "first_choice": 0, "weight_q_sum": 0, "above": 0})
        for f in ("assigned", "first_choice", "weight_q_sum"):
            e[f] += c[f]
    cells = {k: c for k, c in cells.items() if experts[k[:4]]["assigned"] > layout.WEIGHT_HIST_MERGE_MAX}
    cells.update({k + (-1,): e for k, e in experts.items() if e["assigned"] <= layout.WEIGHT_HIST_MERGE_MAX})
    return dict(sorted(cells.items()))


def test_route_stats_cover_a_run_only_once_every_route_is_compacted(tmp_path):
    run_dir = tmp_path / "r"
    live, first = write_run(run_dir, steps=(0, 1), close=False)
    con = open_store(run_dir)
    assert con.execute("SELECT route_stats_complete FROM runs").fetchone()[0] is False  # live segments only
    assert con.execute("SELECT count(*) FROM token_stats").fetchone()[0] == 0  # the view exists, empty
    live.close()  # compacts
    check_route_stats(open_store(run_dir), first["routes"])
    rank1, more = write_run(run_dir, run_id="r", rank=1, world_size=2, steps=(2,), seed=3, close=False)
    con = open_store(run_dir)
    assert con.execute("SELECT route_stats_complete FROM runs").fetchone()[0] is False  # rank 1's routes are live
    rank1.close()  # the second compaction adds rank 1's counts to rank 0's
    check_route_stats(open_store(run_dir), pd.concat([first["routes"], more["routes"]], ignore_index=True))


def expected_probe_sets(routes: pd.DataFrame, sequences: pd.DataFrame) -> dict[tuple, tuple]:
    """probe_sets by hand: {(step, rank, seq, pos, layer): (token_id, slot-0 expert, bitmask of the experts)} for
    the tokens of sequences tagged 'probe'."""
    probe = {(r.step, r.rank, r.seq) for r in sequences.itertuples() if r.tag == "probe"}
    out: dict[tuple, list] = {}
    for r in routes.itertuples():
        if (r.step, r.rank, r.seq) in probe:
            cell = out.setdefault((r.step, r.rank, r.seq, r.pos, r.layer), [r.token_id, None, 0])
            cell[1] = r.expert if r.slot == 0 else cell[1]
            cell[2] |= 1 << int(r.expert)
    return {k: tuple(int(x) for x in v) for k, v in out.items()}


def test_compaction_builds_probe_sets_and_rebuilds_them_for_an_older_run_duckdb(tmp_path):
    """probe_sets (router saturation) holds the probe sequences' tokens; a run.duckdb compacted before the table
    existed gets it built from every route at its next compaction, without counting the other tables twice."""
    run_dir = tmp_path / "r"
    rng = np.random.default_rng(2)
    w = RunWriter(run_dir, run_id="r", compact_on_close=False)
    w.write_run(META)
    written = {"routes": [], "sequences": []}
    for step in (0, 1, 2):
        tables = make_flush(rng, step)
        tables["sequences"]["tag"] = np.array(["probe", "train"] if step != 1 else ["train", "train"], dtype=object)
        w.write_flush(tables)
        for t in written:
            cols = tables[t]
            n = max(np.size(v) for v in cols.values())
            written[t].append(pd.DataFrame({c: (np.full(n, v) if np.ndim(v) == 0 else v) for c, v in cols.items()}))
    w.close()
    compact(run_dir)
    routes, seqs = (pd.concat(written[t], ignore_index=True).assign(rank=0) for t in ("routes", "sequences"))

    def got() -> dict:
        df = open_store(run_dir).execute("SELECT * EXCLUDE (run_id) FROM probe_sets").df()
        return {(r.step, r.rank, r.seq, r.pos, r.layer): (r.token_id, r.first_expert, r.experts)
                for r in df.itertuples()}

    want = expected_probe_sets(routes, seqs)
    assert len(want) == 2 * SEQ_LEN * LAYERS and got() == want  # seq 0 of steps 0 and 2
    # an older run.duckdb: no probe_sets table; a resumed writer adds step 3, and compaction rebuilds the table
    con = duckdb.connect(str(run_dir / "run.duckdb"))
    con.execute("DROP TABLE probe_sets")
    con.close()
    compact(run_dir)  # nothing new to fold, but the missing table is built
    assert got() == want
    con = duckdb.connect(str(run_dir / "run.duckdb"))
    con.execute("DROP TABLE probe_sets")
    con.close()
    with pytest.warns(StoreWarning, match="already closed"):
        w = RunWriter(run_dir, run_id="r", compact_on_close=False)
    tables = make_flush(rng, 3)
    tables["sequences"]["tag"] = np.array(["train", "probe"], dtype=object)
    w.write_flush(tables)
    w.close()
    compact(run_dir)
    more = {t: pd.DataFrame({c: (np.full(max(np.size(v) for v in tables[t].values()), v) if np.ndim(v) == 0 else v)
                             for c, v in tables[t].items()}).assign(rank=0) for t in ("routes", "sequences")}
    routes, seqs = pd.concat([routes, more["routes"]]), pd.concat([seqs, more["sequences"]])
    assert got() == expected_probe_sets(routes, seqs)
    check_route_stats(open_store(run_dir), routes)


def test_an_older_run_duckdb_gets_weight_hist_at_its_next_compaction(tmp_path):
    """weight_hist (the probability capacity policy) is built from every route when run.duckdb lacks it, and the
    probability policy reads the routes until then."""
    from moeviz.analyses.capacity import capacity_drops
    from moeviz.analyses.load import AnalysisError

    run_dir = tmp_path / "r"
    _, flushed = write_run(run_dir, steps=(0, 1, 2))
    con = duckdb.connect(str(run_dir / "run.duckdb"))
    con.execute("DROP TABLE weight_hist")
    con.close()
    older = open_store(run_dir)
    with pytest.raises(AnalysisError, match="weight_hist does not cover"):
        capacity_drops(older, Selection(), 1.0, policy="probability", by=("pos",), source="aggregates")
    by_routes = capacity_drops(older, Selection(), 1.0, policy="probability", by=("pos",))  # 'auto': the window
    compact(run_dir)  # nothing new to fold, but the missing table is built
    con = open_store(run_dir)
    check_route_stats(con, flushed["routes"].assign(rank=0))
    pd.testing.assert_frame_equal(
        capacity_drops(con, Selection(), 1.0, policy="probability", by=("pos",), source="aggregates"), by_routes)


def routes_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "compacted" / "routes").glob("rank=*/*.parquet"))


def test_compacted_routes_files_are_sorted_with_step_statistics_and_filter_by_step(tmp_path):
    run_dir = tmp_path / "r"
    _, expected = write_run(run_dir, steps=(3, 0, 2), compact_on_close=True)
    (f,) = routes_files(run_dir)
    got = pq.read_table(f).to_pandas()
    order = list(layout.COMPACTED_SORT)
    pd.testing.assert_frame_equal(got, got.sort_values(order, kind="stable").reset_index(drop=True))
    md = pq.read_metadata(f)
    stats = md.row_group(0).column(md.schema.names.index("step")).statistics
    assert (stats.min, stats.max) == (0, 3)
    con = open_store(run_dir)
    check_tables_equal(con, expected, "r")
    exp = expected["routes"][expected["routes"]["step"] == 2]
    assert con.execute("SELECT count(*), sum(token_id), sum(expert) FROM routes WHERE step = 2").fetchone() == (
        len(exp), int(exp["token_id"].sum()), int(exp["expert"].sum()))


def test_routes_format_duckdb_then_parquet_recompaction_folds_both(tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(StoreError, match="routes_format must be one of parquet, duckdb"):
        compact(tmp_path, routes_format="csv")
    _, first = write_run(run_dir, steps=(0, 1), compact_on_close=False)
    res = compact(run_dir, routes_format="duckdb")["runs"][0]
    assert res["routes_files"] == 0 and not routes_files(run_dir) and res["rows"]["routes"] == len(first["routes"])
    con = duckdb.connect(str(run_dir / "run.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM routes").fetchone()[0] == len(first["routes"])
    con.close()
    with pytest.warns(StoreWarning, match="appending"):
        _, more = write_run(run_dir, run_id="r", steps=(5,), seed=7, compact_on_close=False)
    res = compact(run_dir)["runs"][0]  # default parquet: the new routes go to a file, the old stay in run.duckdb
    assert len(routes_files(run_dir)) == 1 and res["rows"]["routes"] == len(first["routes"]) + len(more["routes"])
    both = {t: pd.concat([first[t], more[t]], ignore_index=True) for t in first}
    check_tables_equal(open_store(run_dir), both, "r")
    info = store_info(run_dir)["runs"][0]
    assert info["tables"]["routes"]["compacted_rows"] == len(both["routes"]) and info["routes_files"] == 1
    sets_files = sorted((run_dir / "compacted" / "token_sets").glob("rank=*/*.parquet"))  # the new routes' token_sets
    assert len(sets_files) == 1 and info["compacted_bytes"] == (run_dir / "run.duckdb").stat().st_size + sum(
        p.stat().st_size for p in routes_files(run_dir) + sets_files)


def test_recompaction_adds_a_routes_file_per_generation_and_never_rewrites_old_ones(tmp_path):
    run_dir = tmp_path / "r"
    _, first = write_run(run_dir, steps=(0,))
    (old,) = routes_files(run_dir)
    old_bytes = old.read_bytes()
    with pytest.warns(StoreWarning, match="appending"):
        _, more = write_run(run_dir, run_id="r", steps=(1, 2), seed=3)
    files = routes_files(run_dir)
    assert len(files) == 2 and files[0] == old and old.read_bytes() == old_bytes
    assert [f.name[:11] for f in files] == ["part-000000", "part-000001"]
    both = {t: pd.concat([first[t], more[t]], ignore_index=True) for t in first}
    check_tables_equal(open_store(run_dir), both, "r")
    assert compact(run_dir)["runs"][0]["segments_folded"] == 0 and routes_files(run_dir) == files  # twice: no-op


def test_crash_before_run_duckdb_is_replaced_leaves_no_visible_routes_file(tmp_path, monkeypatch):
    """Crash points of compaction, simulated: (1) an exception after the routes file was renamed into place but
    before run.duckdb was replaced; (2) a kill at that point (an unpublished file and a temp file are left)."""
    import moeviz.store.compaction as store

    run_dir = tmp_path / "r"
    _, expected = write_run(run_dir, compact_on_close=False)
    segs = sorted(run_dir.glob("*/rank=0/*.parquet"))

    def crash(*args, **kwargs):
        assert len(routes_files(run_dir)) == 1  # the routes file was written and renamed before this point
        raise OSError("disk full")

    monkeypatch.setattr(store, "_publish_compacted", crash)
    with pytest.raises(StoreError, match="disk full"):  # one line for the CLI, the store as it was
        compact(run_dir)
    monkeypatch.undo()
    assert not routes_files(run_dir) and not (run_dir / "run.duckdb").exists()
    assert sorted(run_dir.glob("*/rank=0/*.parquet")) == segs
    check_tables_equal(open_store(run_dir), expected, "r")
    # a kill at the same point: the routes file stays, unpublished; readers ignore it, the next compaction removes it
    compact(run_dir)
    (published,) = routes_files(run_dir)
    orphan = published.with_name("part-000001-deadbeef.parquet")
    orphan.write_bytes(published.read_bytes())
    tmp = published.with_name(".part-000002-cafecafe.parquet.tmp")
    tmp.write_bytes(b"PAR1 half written")
    check_tables_equal(open_store(run_dir), expected, "r")
    assert store_info(run_dir)["runs"][0]["routes"] == len(expected["routes"])
    assert compact(run_dir)["runs"][0]["segments_folded"] == 0
    assert routes_files(run_dir) == [published] and not tmp.exists()
    check_tables_equal(open_store(run_dir), expected, "r")


def test_a_missing_compacted_routes_file_is_skipped_with_a_warning(tmp_path):
    run_dir = tmp_path / "r"
    _, expected = write_run(run_dir)
    routes_files(run_dir)[0].unlink()
    with pytest.warns(StoreWarning, match="skipped 1 damaged Parquet"):
        con = open_store(run_dir)
    assert con.execute("SELECT count(*) FROM routes").fetchone()[0] == 0
    check_tables_equal(con, {t: v for t, v in expected.items() if t != "routes"}, "r")


def test_compaction_refuses_a_live_writer(tmp_path):
    w, _ = write_run(tmp_path / "r", close=False)
    with pytest.raises(StoreError, match=rf"still being written.*pid {os.getpid()}"):
        compact(tmp_path / "r")
    write_run(tmp_path / "done", compact_on_close=False)
    result = {r["run_id"]: r for r in compact(tmp_path)["runs"]}  # a folder: compact what can be, skip the live
    assert result["done"]["segments_folded"] == 19 and "still being written" in result["r"]["skipped"]
    w.close()
    assert compact(tmp_path / "r")["runs"][0]["segments_folded"] == 0  # close already compacted it


def test_compaction_failure_at_close_keeps_the_segments(tmp_path, monkeypatch):
    import moeviz.store.writer as store

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr(store, "compact", broken)
    w, expected = write_run(tmp_path / "r", close=False)
    with pytest.warns(StoreWarning, match="disk full.*segments are kept"):
        w.close()
    assert not (tmp_path / "r" / "run.duckdb").exists()
    check_tables_equal(open_store(tmp_path / "r"), expected, "r")


def test_compaction_while_a_reader_process_has_the_store_open(tmp_path):
    run_dir = tmp_path / "r"
    write_run(run_dir)  # compacted at close: the reader will hold run.duckdb open
    n0 = len(make_flush(np.random.default_rng(0), 0)["routes"]["step"]) * 2
    reader = subprocess.Popen(
        [sys.executable, "-c", READER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=_env(), cwd=str(tmp_path))
    try:
        reader.stdin.write(f"{run_dir}\n")
        reader.stdin.flush()
        assert int(reader.stdout.readline()) == n0
        write_run(run_dir, run_id="r", steps=(9,), seed=4)  # close compacts again: run.duckdb replaced
        reader.stdin.write("again\n")
        reader.stdin.flush()
        assert int(reader.stdout.readline()) == n0  # the old connection still reads its (old) file
        reader.stdin.write("reopen\n")
        reader.stdin.flush()
        assert int(reader.stdout.readline()) == n0 * 3 // 2
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)
    assert reader.returncode == 0


READER = """
import sys
from moeviz.store import open_store
path = sys.stdin.readline().strip()
con = open_store(path)
print(con.execute("SELECT count(*) FROM routes").fetchone()[0], flush=True)
sys.stdin.readline()
print(con.execute("SELECT count(*) FROM routes").fetchone()[0], flush=True)
sys.stdin.readline()
print(open_store(path).execute("SELECT count(*) FROM routes").fetchone()[0], flush=True)
"""


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))


# ---------------------------------------------------------------------------------------------------- lock-down


@pytest.mark.parametrize("compacted", [False, True], ids=["segments", "compacted"])
def test_user_sql_cannot_touch_files_or_write(tmp_path, compacted):
    run_dir = tmp_path / "r"
    write_run(run_dir, compact_on_close=compacted)
    seg = next(iter(run_dir.glob("routes/rank=0/*.parquet")), None)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "_status" not in p.parts}
    con = open_store(run_dir)
    attacks = {
        "COPY": f"COPY (SELECT 1) TO '{tmp_path / 'x.csv'}'",
        "COPY over a segment": f"COPY (SELECT 1 AS a) TO '{seg or run_dir / 'routes.parquet'}' (FORMAT parquet, USE_TMP_FILE false)",
        "COPY over run.duckdb": f"COPY (SELECT 1 AS a) TO '{run_dir / 'run.duckdb'}' (FORMAT csv, USE_TMP_FILE false)",
        "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
        "read_parquet": f"SELECT * FROM read_parquet('{run_dir}/**/*.parquet')",
        "ATTACH": f"ATTACH '{tmp_path / 'evil.duckdb'}' AS evil",
        "INSTALL": "INSTALL httpfs",
        "CREATE TABLE": "CREATE TABLE t AS SELECT 1",
        "SET": "SET enable_external_access = true",
    }
    for name, sql in attacks.items():
        with pytest.raises(duckdb.Error):
            con.execute(sql)
    with SqlSandbox(spare=0, max_workers=1) as sandbox:  # users' SQL: the same connection, in a worker process
        for name, sql in attacks.items():
            with pytest.raises(SqlError, match="read-only|not allowed|SELECT"):
                run_sql(sandbox, run_dir, sql)
        with pytest.raises(SqlError, match=r"not allowed: .*never files"):
            run_sql(sandbox, run_dir, "SELECT * FROM read_csv('/etc/passwd')")
        with pytest.raises(SqlError, match="only SELECT queries are allowed, not COPY"):
            run_sql(sandbox, run_dir, attacks["COPY"])
        res = run_sql(sandbox, run_dir, "SELECT count(*) AS n FROM routes", as_rows=True)
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "evil.duckdb").exists()
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "_status" not in p.parts}
    assert after == before
    assert res.columns == ["n"] and res.rows[0][0] > 0 and not res.truncated


def test_user_sql_limits_rows_and_reports_truncation(tmp_path):
    write_run(tmp_path / "r")
    con = open_store(tmp_path / "r")
    n = con.execute("SELECT count(*) FROM routes").fetchone()[0]
    with SqlSandbox(spare=0, max_workers=1) as sandbox:
        res = run_sql(sandbox, tmp_path / "r", "SELECT * FROM routes", max_rows=5, as_rows=True)
        assert len(res.rows) == 5 and res.truncated and res.columns == TABLES["routes"].column_names
        res = run_sql(sandbox, tmp_path / "r", "SELECT * FROM routes", max_rows=n, as_rows=True)
        assert len(res.rows) == n and not res.truncated
        assert sorted(res.rows, key=repr) == sorted(con.execute("SELECT * FROM routes").fetchall(), key=repr)
        with pytest.raises(SqlError, match="one statement"):
            run_sql(sandbox, tmp_path / "r", "SELECT 1; SELECT 2")
        with pytest.raises(SqlError, match="syntax error"):
            run_sql(sandbox, tmp_path / "r", "SELEC 1")
        with pytest.raises(SqlError, match="tables: runs, layers, routes"):
            run_sql(sandbox, tmp_path / "r", "SELECT * FROM rout")


# ---------------------------------------------------------------------------------------------------- review fixes


def test_a_refused_writer_leaves_the_existing_runs_status_alone(tmp_path):
    """A RunWriter refused for a wrong run_id must not rewrite the status of the run already in the folder."""
    write_run(tmp_path / "r")
    before = json.loads(layout.status_path(tmp_path / "r", 0).read_text())
    with pytest.raises(StoreError, match="already holds run 'r'"):
        RunWriter(tmp_path / "r", run_id="other")
    assert json.loads(layout.status_path(tmp_path / "r", 0).read_text()) == before
    assert open_store(tmp_path / "r").execute("SELECT status FROM runs").fetchall() == [("finished",)]


def test_writer_refuses_a_file_and_a_folder_of_runs_and_warns_when_appending_to_a_closed_run(tmp_path):
    (tmp_path / "f").write_text("not a folder")
    with pytest.raises(StoreError, match="is a file"):
        RunWriter(tmp_path / "f")
    with pytest.raises(StoreError, match="is a file"):
        RunWriter(tmp_path / "f" / "run")
    write_run(tmp_path / "runs" / "a")
    with pytest.raises(StoreError, match=r"folder of runs \(a\)"):
        RunWriter(tmp_path / "runs")
    assert not (tmp_path / "runs" / layout.MANIFEST).exists()  # the folder of runs still reads as one
    with pytest.warns(StoreWarning, match="already closed"):
        RunWriter(tmp_path / "runs" / "a", compact_on_close=False).close()


def test_count_star_over_live_segments_does_not_decode_run_id(tmp_path):
    """DuckDB's Arrow scan reads the schema's first column when a query needs none; run_id (decoded to strings
    per batch) made `count(*)` over 20M live routes ~15x slower, so it is the last column of the scan."""
    write_run(tmp_path / "r", close=False)
    con = open_store(tmp_path / "r")
    plan = con.execute("EXPLAIN SELECT count(*) FROM routes").fetchall()[0][1]
    scan = plan[plan.index("ARROW_SCAN"):]  # PYTHON_ARROW_SCAN in DuckDB 2, ARROW_SCAN (no projections shown) in 1.x
    assert "run_id" not in scan
    assert con.execute("SELECT count(*) FROM routes").fetchone()[0] == len(con.execute("SELECT * FROM routes").fetchall())


def test_write_flush_without_the_later_layer_stats_columns_reads_them_as_null(tmp_path):
    """Code written against the first schema (no adjacency or co-activation columns) keeps working."""
    w = RunWriter(tmp_path / "r")
    w.write_run(META)
    w.write_layers(LAYER_ROWS)
    tables = make_flush(np.random.default_rng(0), 0)
    for c in ("adjacent_pairs", "same_first", "first_in_topk", "topk_overlap", "coactive_pairs"):
        del tables["layer_stats"][c]
    del tables["pair_stats"]
    w.write_flush(tables)
    got = open_store(tmp_path / "r").execute(
        "SELECT count(*), count(adjacent_pairs), count(coactive_pairs) FROM layer_stats").fetchone()
    assert got == (LAYERS, 0, 0)
    with pytest.raises(StoreError, match="must hold integers"):
        w.write_flush({"layer_stats": dict(make_flush(np.random.default_rng(0), 1)["layer_stats"],
                                           same_first=np.array([0.5, 1.0, 2.0]))})


def test_seq_key_from_a_pandas_frame_keeps_its_64_bits(tmp_path):
    """A sequences frame read back from a store holds seq_key as pandas UInt64 with <NA>; its to_numpy() would be
    inexact floats (refused). The writer takes the pandas array itself, exactly."""
    keys = pd.array([2**64 - 1, None, 2**63 + 5], dtype="UInt64")
    w = RunWriter(tmp_path / "r", compact_on_close=False)
    seqs = {"seq": np.arange(3), "domain": None, "tag": "train", "n_tokens": 4}
    w.write_flush({"sequences": {"step": 0, **seqs, "seq_key": keys}})
    with pytest.raises(StoreError, match="seq_key must hold unsigned 64-bit integers"):
        w.write_flush({"sequences": {"step": 1, **seqs, "seq_key": keys.to_numpy()}})
    w.close()
    got = open_store(tmp_path / "r").execute("SELECT seq_key FROM sequences ORDER BY seq").fetchall()
    assert [g[0] for g in got] == [2**64 - 1, None, 2**63 + 5]


def test_unknown_weights_and_counts_are_stored_as_null_not_zero(tmp_path):
    """An engine log has no gate weights, probabilities, token counts or slot order: the store keeps them NULL."""
    with RunWriter(tmp_path / "imp", run_id="imp") as w:
        w.write_flush({
            "routes": {"step": 0, "seq": [0, 0, 1, 1], "pos": [0, 0, 0, 0], "token_id": -1, "layer": 0,
                       "slot": [0, 1, 0, 1], "expert": [3, 1, 2, 3], "weight": None, "dropped": None},
            "step_stats": {"step": 0, "layer": 0, "expert": [1, 2, 3], "tokens": None, "assigned": [1, 1, 2],
                           "first_choice": [np.nan, 1, np.nan], "prob_sum": None, "dropped": 0},
        })
    con = open_store(tmp_path / "imp")
    assert con.execute("SELECT count(*), count(weight), count(dropped), count(margin) FROM routes").fetchone() == \
        (4, 0, 0, 0)
    assert con.execute("SELECT count(tokens), count(first_choice), sum(first_choice), count(prob_sum), "
                       "sum(assigned) FROM step_stats").fetchone() == (0, 1, 1, 0, 4)
    assert con.execute("SELECT count(*) FROM weight_hist").fetchone()[0] == 0  # no weight, no bin
    assert con.execute("SELECT count(*) FROM token_stats").fetchone()[0] == 3  # counts need no weight


def test_nullable_columns_refuse_what_is_not_a_number(tmp_path):
    with RunWriter(tmp_path / "r", run_id="r") as w:
        with pytest.raises(StoreError, match="routes.margin must hold numbers"):
            w.write_flush({"routes": {"step": 0, "seq": 0, "pos": 0, "token_id": 1, "layer": 0, "slot": 0,
                                      "expert": 0, "weight": 1.0, "margin": np.array(["close"])}})
