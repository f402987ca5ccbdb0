"""The tables compaction derives from routes (token_stats, position_stats, sequence_stats, weight_hist, probe_sets,
token_sets) against a pandas brute force over the routes as they were written, not against compaction's own SQL.

Covers the paths that build them: token_sets written as Parquet files from the sorted routes batches, the SQL
fallback when a step spans two batches, two compactions of one run (counts summed, token_sets files appended),
two ranks, and routes compacted into run.duckdb (routes_format="duckdb")."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeviz.store import RunWriter, compact, open_store, store_info
from moeviz.store import compaction, layout

LAYERS, EXPERTS, K, SEQS, SEQ_LEN = 3, 70, 3, 3, 7  # 70 experts: some token sets fall outside the 64-bit mask


def flush(rng: np.random.Generator, step: int) -> dict:
    """One step of routes (layer-major, then token, then slot), the margin equal on a token's k slot rows; the
    second sequence tagged 'probe'."""
    tokens = SEQS * SEQ_LEN
    shape = (LAYERS, tokens, K)
    seq, pos = np.repeat(np.arange(SEQS), SEQ_LEN), np.tile(np.arange(SEQ_LEN), SEQS)  # [tokens]
    # experts mostly below 64, a few above (their token's mask is NULL); distinct within a token
    index = np.argsort(rng.random((LAYERS, tokens, EXPERTS)) * np.r_[np.ones(64), np.full(6, 8.0)], -1)[..., :K]
    w = rng.dirichlet(np.ones(K), size=(LAYERS, tokens))  # [layers, tokens, k]
    margin = np.round(rng.random((LAYERS, tokens)) * 65536) / 65536  # [layers, tokens]
    margin[0, :2] = np.nan  # unknown for two tokens of layer 0: NULL in routes and token_sets
    routes = {
        "step": np.full(np.prod(shape), step),
        "seq": np.broadcast_to(seq[None, :, None], shape).ravel(),
        "pos": np.broadcast_to(pos[None, :, None], shape).ravel(),
        "token_id": np.broadcast_to(rng.integers(0, 50, tokens)[None, :, None], shape).ravel(),
        "layer": np.broadcast_to(np.arange(LAYERS)[:, None, None], shape).ravel(),
        "slot": np.broadcast_to(np.arange(K)[None, None, :], shape).ravel(),
        "expert": index.ravel(), "weight": w.ravel(),
        "margin": np.broadcast_to(margin[..., None], shape).ravel().astype(np.float32),
    }
    sequences = {"step": np.full(SEQS, step), "seq": np.arange(SEQS), "domain": "d", "tag": np.array(["train", "probe", "train"]),
                 "n_tokens": np.full(SEQS, SEQ_LEN)}
    return {"routes": routes, "sequences": sequences}


def write(run_dir, steps, rank=0, world_size=1, seed=0, run_id="r") -> pd.DataFrame:
    """Write `steps` (one flush each) as one rank of run `run_id`; the routes written, weight quantised as stored."""
    rng = np.random.default_rng(seed)
    w = RunWriter(run_dir, run_id=run_id, rank=rank, world_size=world_size, compact_on_close=False)
    w.write_run({"model_class": "T", "n_layers": LAYERS, "n_experts": EXPERTS, "top_k": K})
    frames = []
    for step in steps:
        f = flush(rng, step)
        w.write_flush(f)
        frames.append(pd.DataFrame(f["routes"]).assign(rank=rank))
    w.close()
    out = pd.concat(frames, ignore_index=True)
    out["weight_q"] = np.rint(out.pop("weight") * layout.WEIGHT_SCALE).astype(np.int64)
    return out


def expected(routes: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every derived table by pandas group-bys over the written routes."""
    r = routes.assign(first=(routes["slot"] == 0).astype(np.int64), bin=routes["weight_q"] // (1 << layout.WEIGHT_BIN_SHIFT))
    out = {}
    for table, keys in (("token_stats", ["rank", "layer", "token_id", "expert"]),
                        ("position_stats", ["rank", "layer", "pos", "expert"]),
                        ("sequence_stats", ["step", "rank", "seq", "layer", "expert"])):
        out[table] = r.groupby(keys).agg(assigned=("slot", "size"), first_choice=("first", "sum")).reset_index()
    hist = r.groupby(["step", "rank", "layer", "expert", "bin"]).agg(
        assigned=("slot", "size"), first_choice=("first", "sum"), weight_q_sum=("weight_q", "sum")).reset_index()
    hist = hist.sort_values(["step", "rank", "layer", "expert", "bin"], ascending=[True] * 4 + [False])
    run_total = hist.groupby(["step", "rank", "layer", "expert"])["assigned"].cumsum()
    out["weight_hist"] = merged_small(hist.assign(above=run_total - hist["assigned"]))
    rows = []
    for (step, rank, seq, pos, layer), g in r.groupby(["step", "rank", "seq", "pos", "layer"]):
        e = g["expert"].to_numpy()
        mask = sum({1 << int(x) for x in e}) if e.max() < 64 and e.min() >= 0 else None  # experts distinct
        m = g["margin"].dropna()
        rows.append({"step": step, "rank": rank, "seq": seq, "pos": pos, "layer": layer,
                     "token_id": g["token_id"].min(), "first_expert": g.loc[g["slot"].idxmin(), "expert"],
                     "experts": mask, "k": len(g), "margin": float(m.iloc[0]) if len(m) else None})
    out["token_sets"] = pd.DataFrame(rows, dtype=object)  # objects: exact 64-bit masks
    probe = out["token_sets"][out["token_sets"]["seq"] == 1]
    out["probe_sets"] = probe.drop(columns=["k", "margin"])
    return out


def merged_small(hist: pd.DataFrame) -> pd.DataFrame:
    """weight_hist per bin with each (step, rank, layer, expert) of at most WEIGHT_HIST_MERGE_MAX routes as one row:
    bin -1, above 0, the counts summed (schema version 5)."""
    keys = ["step", "rank", "layer", "expert"]
    n = hist.groupby(keys)["assigned"].transform("sum")
    small = hist[n <= layout.WEIGHT_HIST_MERGE_MAX]
    merged = small.groupby(keys)[["assigned", "first_choice", "weight_q_sum"]].sum().reset_index().assign(
        bin=-1, above=0)
    return pd.concat([hist[n > layout.WEIGHT_HIST_MERGE_MAX], merged[hist.columns]], ignore_index=True)


def check(con, routes: pd.DataFrame) -> None:
    for table, exp in expected(routes).items():
        got = pd.DataFrame(con.execute(f"SELECT * EXCLUDE (run_id) FROM {table}").to_arrow_table().to_pylist(),
                           dtype=object)  # objects: a 64-bit mask read as float64 would lose its low bits
        keys = [c for c in exp.columns if c not in ("assigned", "first_choice", "weight_q_sum", "above", "token_id",
                                                    "first_expert", "experts", "k", "margin")]
        got = got[list(exp.columns)].sort_values(keys).reset_index(drop=True)
        exp = exp.sort_values(keys).reset_index(drop=True)
        assert len(got) == len(exp), table
        for c in exp.columns:
            kind = float if c == "margin" else int  # int: the 64-bit masks compare exactly
            g, e = got[c].astype(object).where(got[c].notna(), None), exp[c].astype(object).where(exp[c].notna(), None)
            assert [None if v is None else kind(v) for v in g] == [None if v is None else kind(v) for v in e], \
                (table, c)


@pytest.mark.parametrize("routes_format", ["parquet", "duckdb"])
def test_derived_tables_equal_a_pandas_brute_force(tmp_path, routes_format):
    run_dir = tmp_path / "r"
    routes = write(run_dir, steps=range(6))
    compact(run_dir, routes_format=routes_format)
    sets_files = list((run_dir / "compacted" / "token_sets").glob("rank=*/*.parquet"))
    assert len(sets_files) == (1 if routes_format == "parquet" else 0)  # token_sets beside the routes files
    check(open_store(run_dir), routes)


def test_token_sets_built_by_sql_when_a_step_spans_two_batches(tmp_path, monkeypatch):
    """Batches smaller than a step: a step's rows would be written in pieces, so the batches cannot give exact
    token_sets; compaction builds them by SQL instead, and the result is the same."""
    run_dir = tmp_path / "r"
    monkeypatch.setattr(layout, "ROUTES_ROWS_PER_LAYER", 7 * K)  # a step (189 routes) in 3 segments of 63
    routes = write(run_dir, steps=range(4))
    monkeypatch.setattr(layout, "COMPACTED_ROW_GROUP_ROWS", 2)  # a batch past 16 x 2 rows is written as it is
    compact(run_dir)
    assert not list((run_dir / "compacted" / "token_sets").glob("rank=*/*.parquet"))
    check(open_store(run_dir), routes)


def test_batches_end_at_step_boundaries(tmp_path, monkeypatch):
    """A batch that ends inside a step hands that step's rows to the next one: every row group holds whole
    steps, and the token_sets come from the batches."""
    import pyarrow.parquet as pq

    run_dir = tmp_path / "r"
    monkeypatch.setattr(layout, "ROUTES_ROWS_PER_LAYER", 7 * K)  # a step (189 routes) in 3 segments of 63
    routes = write(run_dir, steps=range(5))
    monkeypatch.setattr(layout, "COMPACTED_ROW_GROUP_ROWS", 200)  # a batch closes at 4 segments, in step 2
    compact(run_dir)
    assert len(list((run_dir / "compacted" / "token_sets").glob("rank=*/*.parquet"))) == 1

    files = list((run_dir / "compacted" / "routes").glob("rank=*/*.parquet"))
    meta = pq.read_metadata(files[0])
    assert meta.num_row_groups > 1 and all(meta.row_group(i).num_rows % (LAYERS * SEQS * SEQ_LEN * K) == 0
                                           for i in range(meta.num_row_groups))
    check(open_store(run_dir), routes)


def test_two_compactions_and_two_ranks_sum_and_append(tmp_path):
    run_dir = tmp_path / "r"
    a = write(run_dir, steps=range(3), rank=0, world_size=2, seed=1)
    b = write(run_dir, steps=range(3), rank=1, world_size=2, seed=2)
    compact(run_dir)
    with pytest.warns(Warning, match="appending"):
        c = write(run_dir, steps=range(3, 6), rank=0, world_size=2, seed=3)
    compact(run_dir)
    assert len(list((run_dir / "compacted" / "token_sets").glob("rank=*/*.parquet"))) == 3
    all_routes = pd.concat([a, b, c], ignore_index=True)
    check(open_store(run_dir), all_routes)
    info = store_info(run_dir)["runs"][0]
    assert info["tables"]["token_sets"]["compacted_rows"] == len(all_routes) // K
    assert info["token_sets_files_bytes"] > 0


def test_token_sets_of_sorted_matches_token_sets_sql_on_odd_groups():
    """The numpy grouping against compaction's SQL on groups of uneven size (k 1 to 3), an expert twice, a
    negative expert index and a NULL margin."""
    import duckdb
    import pyarrow as pa

    rows = [  # step, seq, pos, layer, slot, expert, margin
        (0, 0, 0, 0, 0, 5, 0.5), (0, 0, 0, 0, 1, 5, 0.5), (0, 0, 0, 0, 2, 63, 0.5),
        (0, 0, 1, 0, 0, -1, None), (0, 0, 1, 0, 1, 2, None),
        (0, 1, 0, 0, 0, 64, 0.25),
        (1, 0, 0, 1, 0, 7, 0.125), (1, 0, 0, 1, 1, 0, 0.125),
    ]
    cols = list(zip(*rows))
    batch = pa.table({"run_id": ["x"] * len(rows), "step": pa.array(cols[0], pa.int64()),
                      "rank": pa.array([3] * len(rows), pa.int32()), "seq": pa.array(cols[1], pa.int32()),
                      "pos": pa.array(cols[2], pa.int32()), "token_id": pa.array([9, 8, 7, 1, 2, 3, 4, 5], pa.int32()),
                      "layer": pa.array(cols[3], pa.int16()), "slot": pa.array(cols[4], pa.int8()),
                      "expert": pa.array(cols[5], pa.int16()), "weight_q": pa.array([0] * len(rows), pa.uint16()),
                      "dropped": pa.nulls(len(rows), pa.bool_()), "margin": pa.array(cols[6], pa.float32())})
    got = compaction.token_sets_of_sorted(batch).to_pylist()
    con = duckdb.connect()
    con.register("b", batch)
    want = con.execute(compaction.token_sets_sql("SELECT * FROM b", True)).to_arrow_table().to_pylist()
    assert got == want
    assert [r["experts"] for r in got] == [(1 << 5) | (1 << 63), None, None, (1 << 7) | 1]


def test_token_sets_in_run_duckdb_and_in_files_read_as_one_table(tmp_path):
    """A store whose token_sets rows are in run.duckdb (compacted with routes_format="duckdb", or by a moeviz
    before the files) and that later gets token_sets files: the view reads both, each row once."""
    run_dir = tmp_path / "r"
    a = write(run_dir, steps=range(3), seed=4)
    compact(run_dir, routes_format="duckdb")
    with pytest.warns(Warning, match="appending"):
        b = write(run_dir, steps=range(3, 5), seed=5)
    compact(run_dir)
    assert len(list((run_dir / "compacted" / "token_sets").glob("rank=*/*.parquet"))) == 1
    check(open_store(run_dir), pd.concat([a, b], ignore_index=True))


def test_token_sets_files_of_two_runs_keep_their_run_ids(tmp_path):
    """The view gives each run's files its run id as a constant (the files are read without it): a folder of two
    runs reads each run's token sets under its own id, and a filter on run_id reads one run."""
    a = write(tmp_path / "a", steps=range(2), seed=6, run_id="run-a")
    b = write(tmp_path / "b", steps=range(3), seed=7, run_id="run-b")
    compact(tmp_path)
    con = open_store(tmp_path)
    counts = dict(con.execute("SELECT run_id, count(*) FROM token_sets GROUP BY run_id").fetchall())
    assert counts == {"run-a": len(a) // K, "run-b": len(b) // K}
    got = con.execute("SELECT step, seq, pos, layer, token_id FROM token_sets WHERE run_id = 'run-b' "
                      "ORDER BY step, layer, seq, pos").fetchall()
    exp = expected(b.assign(rank=0))["token_sets"].sort_values(["step", "layer", "seq", "pos"])
    assert got == [tuple(int(v) for v in r) for r in exp[["step", "seq", "pos", "layer", "token_id"]].to_numpy()]


def test_token_sets_kept_in_run_duckdb_when_not_a_file_table(tmp_path, monkeypatch):
    """layout.FILE_TABLES = (): token_sets go into run.duckdb (by SQL), the layout before the files."""
    monkeypatch.setattr(layout, "FILE_TABLES", ())
    run_dir = tmp_path / "r"
    routes = write(run_dir, steps=range(3))
    compact(run_dir)
    assert not (run_dir / "compacted" / "token_sets").exists()
    check(open_store(run_dir), routes)
