"""Step roll-ups (moeviz.store.rollups, moeviz.analyses.step_rows): the analyses over steps give the same answers
whether they read the roll-ups or every per-step row.

The reference is a brute-force pandas sum over the rows the test itself wrote (numpy arrays, never read back
through moeviz), for step buckets that are and are not multiples of a roll-up resolution, step ranges that
start and end mid-block, two ranks, a run compacted twice (a block spanning the two compactions) and a rank
still in segments (the views' on-the-fly part).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeviz.analyses.aux_loss import switch_loss, z_loss
from moeviz.analyses.load import expert_load, imbalance
from moeviz.analyses.step_rows import pieces, step_rows_sql
from moeviz.selection import Selection
from moeviz.store import RunWriter, open_store
from moeviz.store.compaction import compact

L, E, K, T = 3, 5, 2, 40  # layers, experts, top-k, tokens per step, rank and layer
N_STEPS = 2345


def _flush(rng, steps: np.ndarray) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    n = len(steps)
    assigned = rng.multinomial(T * K, np.full(E, 1 / E), size=(n, L))  # [n, L, E]
    first = rng.binomial(assigned, 0.5)
    prob = rng.random((n, L, E)) * T / E
    dropped = rng.integers(0, 3, (n, L, E))
    step = np.repeat(steps, L * E)
    layer = np.tile(np.repeat(np.arange(L), E), n)
    expert = np.tile(np.arange(E), n * L)
    ss = pd.DataFrame({"step": step, "layer": layer, "expert": expert, "tokens": T,
                       "assigned": assigned.ravel(), "first_choice": first.ravel(), "prob_sum": prob.ravel(),
                       "dropped": dropped.ravel()})
    z = rng.random((n, L)) * T
    ent = rng.random((n, L)) * T
    ls = pd.DataFrame({"step": np.repeat(steps, L), "layer": np.tile(np.arange(L), n), "tokens": T,
                       "z_loss_sum": z.ravel(), "entropy_sum": ent.ravel(),
                       "dropped": dropped.sum(axis=2).ravel(), "nonfinite_tokens": 0})
    tables = {"step_stats": {c: ss[c].to_numpy() for c in ss.columns} | {"rank": 0},
              "layer_stats": {c: ls[c].to_numpy() for c in ls.columns} | {"rank": 0}}
    return tables, ss, ls


def _write(run_dir, rank: int, steps: np.ndarray, rng, frames: list) -> None:
    import warnings

    from moeviz.store.reader import StoreWarning

    with warnings.catch_warnings():  # "appending to run ...": on purpose, new steps of a closed rank
        warnings.simplefilter("ignore", StoreWarning)
        w = RunWriter(run_dir, run_id="r", rank=rank, world_size=2, compact_on_close=False)
    w.write_run({"model_class": "M", "n_layers": L, "n_experts": E, "top_k": K})
    w.write_layers([{"layer": i, "n_experts": E, "top_k": K} for i in range(L)])
    for lo in range(0, len(steps), 400):
        tables, ss, ls = _flush(rng, steps[lo:lo + 400])
        for t in tables.values():
            t["rank"] = rank
        w.write_flush(tables)
        frames.append((ss.assign(rank=rank), ls.assign(rank=rank)))
    w.close()


@pytest.fixture(scope="module", params=["compacted", "live"])
def store(request, tmp_path_factory):
    """Steps 0-1499 of both ranks compacted, then 1500-2344 of rank 0 compacted again (the incremental fold),
    then 1500-2344 of rank 1, compacted too ("compacted": the analyses read the roll-ups) or left as segments
    ("live": the views roll them up on the fly, the analyses read the per-step rows); and the raw rows as pandas
    frames."""
    run_dir = tmp_path_factory.mktemp("rollups") / "r"
    rng = np.random.default_rng(7)
    frames: list = []
    _write(run_dir, 0, np.arange(0, 1500), rng, frames)
    _write(run_dir, 1, np.arange(0, 1500), rng, frames)
    compact(run_dir)
    _write(run_dir, 0, np.arange(1500, N_STEPS), rng, frames)
    compact(run_dir)
    _write(run_dir, 1, np.arange(1500, N_STEPS), rng, frames)
    if request.param == "compacted":
        compact(run_dir)
    ss = pd.concat([f[0] for f in frames], ignore_index=True)
    ls = pd.concat([f[1] for f in frames], ignore_index=True)
    con = open_store(run_dir)
    yield con, ss, ls, request.param
    con.close()


def _in(df: pd.DataFrame, steps, ranks=None) -> pd.DataFrame:
    if steps is not None:
        df = df[df["step"].between(*steps)]
    if ranks is not None:
        df = df[df["rank"].isin(ranks)]
    return df


def _bucketed(df: pd.DataFrame, b: int | None) -> pd.DataFrame:
    return df.assign(step=(df["step"] // b) * b) if b else df


def test_pieces_cover_each_step_once_on_block_boundaries():
    for lo, hi in [(0, 2344), (13, 2291), (995, 1004), (7, 9), (1000, 1999), (0, 0), (10, 19)]:
        got = pieces(lo, hi, (10, 100, 1000))
        covered = [s for r, a, z in got for s in range(a, z + 1)]
        assert covered == list(range(lo, hi + 1)), (lo, hi)
        assert all(a % r == 0 and (z + 1) % r == 0 for r, a, z in got if r > 1)
    assert pieces(None, None, (10, 100)) == [(100, None, None)]
    assert pieces(5, 7, ()) == [(1, 5, 7)]


def test_rollup_views_sum_every_row_per_block(store):
    con, ss, ls, _ = store
    for r in (10, 100, 1000):
        # a block of compacted and live rows has a row from each: the view's rows add up per block
        got = con.execute("SELECT step, layer, expert, sum(tokens) AS tokens, sum(assigned) AS assigned, "
                          "sum(first_choice) AS first_choice, sum(prob_sum) AS prob_sum, sum(dropped) AS dropped "
                          "FROM step_rollups WHERE resolution = ? GROUP BY ALL ORDER BY step, layer, expert",
                          [r]).df()
        want = (_bucketed(ss, r).groupby(["step", "layer", "expert"], as_index=False)
                [["tokens", "assigned", "first_choice", "prob_sum", "dropped"]].sum())
        assert len(got) == len(want) == -(-N_STEPS // r) * L * E
        for c in ("step", "layer", "expert", "tokens", "assigned", "first_choice", "dropped"):
            assert got[c].astype("int64").tolist() == want[c].astype("int64").tolist(), (r, c)
        np.testing.assert_allclose(got["prob_sum"], want["prob_sum"], rtol=1e-12)
        lgot = con.execute("SELECT step, layer, sum(tokens) AS tokens, sum(z_loss_sum) AS z_loss_sum, "
                           "sum(dropped) AS dropped FROM layer_rollups WHERE resolution = ? GROUP BY ALL "
                           "ORDER BY step, layer", [r]).df()
        lwant = _bucketed(ls, r).groupby(["step", "layer"], as_index=False)[["tokens", "z_loss_sum", "dropped"]].sum()
        assert lgot["tokens"].tolist() == lwant["tokens"].tolist()
        assert lgot["dropped"].tolist() == lwant["dropped"].tolist()
        np.testing.assert_allclose(lgot["z_loss_sum"], lwant["z_loss_sum"], rtol=1e-12)


def test_the_queries_read_rollups_where_they_are_exact(store):
    con, state = store[0], store[3]
    cols = ("run_id", "step", "layer", "assigned")
    if state == "live":  # rolling segments up at every query is slower than reading them
        assert "step_rollups" not in step_rows_sql(con, "step_stats", Selection(), cols, step_bucket=100)[0]
        return
    assert "step_rollups" in step_rows_sql(con, "step_stats", Selection(), cols, step_bucket=100)[0]
    assert "step_rollups" in step_rows_sql(con, "step_stats", Selection(), cols, by_step=False)[0]
    assert "step_rollups" not in step_rows_sql(con, "step_stats", Selection(), cols, step_bucket=7)[0]
    assert "step_rollups" not in step_rows_sql(con, "step_stats", Selection(ranks=(1,)), cols, step_bucket=100)[0]


STEP_RANGES = [None, (13, 2291), (1000, 1999), (995, 1004), (1500, 2344)]
BUCKETS = [7, 10, 20, 50, 100, 300, 1000, 2000]


@pytest.mark.parametrize("steps", STEP_RANGES)
@pytest.mark.parametrize("b", BUCKETS)
def test_bucketed_load_and_losses_equal_brute_force(store, steps, b):
    con, ss, ls, _ = store
    sel = Selection(steps=steps)
    raw = _bucketed(_in(ss, steps), b)
    cells = raw.groupby(["step", "layer", "expert"], as_index=False)[["tokens", "assigned", "prob_sum"]].sum()
    got = expert_load(con, sel, by_step=True, step_bucket=b)
    assert got[["step", "layer", "expert"]].astype("int64").values.tolist() == \
        cells[["step", "layer", "expert"]].values.tolist()
    assert got["assigned"].tolist() == cells["assigned"].tolist()
    assert got["tokens"].tolist() == cells["tokens"].tolist()  # each expert row holds the layer's tokens
    np.testing.assert_allclose(got["prob_sum"], cells["prob_sum"], rtol=1e-12)
    layer_sum = cells.groupby(["step", "layer"])["assigned"].transform("sum")
    np.testing.assert_allclose(got["load_fraction"], cells["assigned"] / layer_sum, rtol=1e-12)

    # Switch loss of each bucket's pooled counts: E * sum_i f_i P_i, f_i = a_i / sum a, P_i = p_i / tokens
    per = cells.assign(fp=cells["assigned"] * cells["prob_sum"]).groupby(["step", "layer"], as_index=False).agg(
        fp=("fp", "sum"), a=("assigned", "sum"), t=("tokens", "first"))
    sw = switch_loss(con, sel, by_step=True, step_bucket=b)
    np.testing.assert_allclose(sw["aux_loss"], E * per["fp"] / (per["a"] * per["t"]), rtol=1e-10)

    lraw = _bucketed(_in(ls, steps), b).groupby(["step", "layer"], as_index=False)[["tokens", "z_loss_sum"]].sum()
    z = z_loss(con, sel, by_step=True, step_bucket=b)
    assert z["tokens"].tolist() == lraw["tokens"].tolist()
    np.testing.assert_allclose(z["z_loss"], lraw["z_loss_sum"] / lraw["tokens"], rtol=1e-12)

    imb = imbalance(con, sel, by_step=True, step_bucket=b)
    g = cells.groupby(["step", "layer"])["assigned"]
    np.testing.assert_allclose(imb["max_vio"], ((g.max() - g.mean()) / g.mean()).to_numpy(), rtol=1e-12)


@pytest.mark.parametrize("steps", STEP_RANGES)
def test_totals_over_a_step_range_equal_brute_force(store, steps):
    con, ss, _, _ = store
    got = expert_load(con, Selection(steps=steps), by_step=False)
    want = _in(ss, steps).groupby(["layer", "expert"], as_index=False)[["tokens", "assigned", "first_choice"]].sum()
    assert got["assigned"].tolist() == want["assigned"].tolist()
    assert got["first_choice"].tolist() == want["first_choice"].tolist()
    assert got["tokens"].tolist() == want["tokens"].tolist()


def test_a_rank_selection_reads_the_per_step_rows(store):
    con, ss, _, _ = store
    got = expert_load(con, Selection(steps=(13, 2291), ranks=(1,)), by_step=True, step_bucket=100)
    want = (_bucketed(_in(ss, (13, 2291), ranks=(1,)), 100)
            .groupby(["step", "layer", "expert"], as_index=False)["assigned"].sum())
    assert got["assigned"].tolist() == want["assigned"].tolist()


def test_a_store_compacted_before_rollups_reads_them_on_the_fly_and_compact_adds_them(tmp_path):
    import duckdb

    from moeviz.store.reader import rollups_complete

    run_dir = tmp_path / "old"
    rng = np.random.default_rng(3)
    frames: list = []
    _write(run_dir, 0, np.arange(0, 1234), rng, frames)
    compact(run_dir)
    db = duckdb.connect(str(run_dir / "run.duckdb"))  # as a moeviz from before the roll-ups left it
    db.execute("DROP TABLE step_rollups")
    db.execute("DROP TABLE layer_rollups")
    db.close()
    ss = pd.concat([f[0] for f in frames], ignore_index=True)
    want = _bucketed(ss, 100).groupby(["step", "layer", "expert"], as_index=False)["assigned"].sum()
    for expect_complete in (False, True):
        con = open_store(run_dir)
        try:
            assert rollups_complete(con) is expect_complete
            got = con.execute("SELECT step, layer, expert, sum(assigned) AS assigned FROM step_rollups "
                              "WHERE resolution = 100 GROUP BY ALL ORDER BY ALL").df()
            assert got["assigned"].tolist() == want["assigned"].tolist()
            load = expert_load(con, Selection(steps=(13, 1200)), by_step=True, step_bucket=100)
            ref = (_bucketed(_in(ss, (13, 1200)), 100).groupby(["step", "layer", "expert"], as_index=False)
                   ["assigned"].sum())
            assert load["assigned"].tolist() == ref["assigned"].tolist()
        finally:
            con.close()
        compact(run_dir)  # a newer moeviz's `compact` builds the missing roll-ups
