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
from moeviz.analyses.balancing import max_vio_summary
from moeviz.analyses.load import expert_load, imbalance
from moeviz.analyses.step_rows import pieces, step_rows_sql
from moeviz.selection import Selection
from moeviz.store import RunWriter, open_store, rollups
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


def _write(run_dir, rank: int, steps: np.ndarray, rng, frames: list, run_id: str = "r") -> None:
    import warnings

    from moeviz.store.reader import StoreWarning

    with warnings.catch_warnings():  # "appending to run ...": on purpose, new steps of a closed rank
        warnings.simplefilter("ignore", StoreWarning)
        w = RunWriter(run_dir, run_id=run_id, rank=rank, world_size=2, compact_on_close=False)
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


# ---- bucket tables (layer_buckets, pooled_buckets, step_drops): each against a brute force over the raw rows ----

from moeviz.analyses.aux_loss import pooled_switch_loss  # noqa: E402
from moeviz.analyses.capacity import capacity_drops  # noqa: E402
from moeviz.analyses.health import _window_max_vio  # noqa: E402
from moeviz.analyses.step_rows import buckets_available, expert_drops_available, layer_buckets_sql  # noqa: E402
from moeviz.analyses.top_experts import top_expert_load  # noqa: E402


def _cells(ss: pd.DataFrame, b: int) -> pd.DataFrame:
    """Per bucket, layer and expert: the summed counts of the raw rows (every expert has rows here)."""
    return _bucketed(ss, b).groupby(["step", "layer", "expert"], as_index=False)[
        ["tokens", "assigned", "first_choice", "prob_sum"]].sum()


def test_bucket_tables_are_read_only_where_they_hold_every_row(store):
    con, state = store[0], store[3]
    assert buckets_available(con) is (state == "compacted")
    assert (layer_buckets_sql(con, Selection(), 20) is not None) is (state == "compacted")
    assert layer_buckets_sql(con, Selection(ranks=(0,)), 20) is None  # summed over ranks: a rank reads the rows
    assert layer_buckets_sql(con, Selection(), 7) is None  # no stored resolution of 7 steps


@pytest.mark.parametrize("r", [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000])
def test_layer_buckets_equal_the_raw_rows_per_block(store, r):
    con, ss, _, state = store
    if state != "compacted":
        pytest.skip("the tables are only read from a compacted store")
    got = con.execute("SELECT * FROM layer_buckets WHERE resolution = ? ORDER BY step, layer", [r]).df()
    c = _cells(ss, r)
    a = c["assigned"].to_numpy().reshape(-1, E)  # [blocks x layers, E]
    assert got["step"].tolist() == c["step"].to_numpy()[::E].tolist()
    assert got["assigned"].tolist() == a.sum(1).tolist()
    assert got["assigned_max"].tolist() == a.max(1).tolist()
    assert got["tokens"].tolist() == c["tokens"].to_numpy().reshape(-1, E).max(1).tolist()
    assert got["first_choice"].tolist() == c["first_choice"].to_numpy().reshape(-1, E).sum(1).tolist()
    assert got["topk_sum"].tolist() == np.sort(a, 1)[:, ::-1][:, :K].sum(1).tolist()
    share = a / a.sum(1, keepdims=True)
    assert got["dead_experts"].tolist() == (share < 0.1 / E).sum(1).tolist()
    np.testing.assert_allclose(got["assigned_sq"], (a.astype(float) ** 2).sum(1), rtol=1e-12)
    np.testing.assert_allclose(got["assigned_xlogx"], np.where(a > 0, a * np.log(np.maximum(a, 1)), 0).sum(1),
                               rtol=1e-12)
    p = c["prob_sum"].to_numpy().reshape(-1, E)
    np.testing.assert_allclose(got["prob_dot"], (a * p).sum(1), rtol=1e-12)
    pooled = con.execute("SELECT prob_dot FROM pooled_buckets WHERE resolution = ? ORDER BY step", [r]).df()
    a3, p3 = a.reshape(-1, L, E), p.reshape(-1, L, E)  # [blocks, L, E]
    np.testing.assert_allclose(pooled["prob_dot"], (a3.sum(1) * p3.sum(1)).sum(1), rtol=1e-12)


@pytest.mark.parametrize("steps", STEP_RANGES)
@pytest.mark.parametrize("b", [1, 10, 20, 50, 7, 5000])
def test_imbalance_and_pooled_loss_equal_brute_force(store, steps, b):
    """Every imbalance column and the pooled Switch loss, from the tables (whole buckets) and the rows (edges)."""
    con, ss, _, _ = store
    sel = Selection(steps=steps)
    c = _cells(_in(ss, steps), b)
    a = c["assigned"].to_numpy().reshape(-1, E).astype(float)  # [buckets x layers, E]
    imb = imbalance(con, sel, by_step=True, step_bucket=b)
    mean = a.mean(1)
    np.testing.assert_allclose(imb["max_vio"], (a.max(1) - mean) / mean, rtol=1e-9)
    np.testing.assert_allclose(imb["cv"], a.std(1) / mean, rtol=1e-9)
    share = a / a.sum(1, keepdims=True)
    ent = -np.where(share > 0, share * np.log(np.where(share > 0, share, 1)), 0).sum(1) / np.log(E)
    np.testing.assert_allclose(imb["norm_entropy"], ent, rtol=1e-9)
    assert imb["dead_experts"].tolist() == (share < 0.1 / E).sum(1).tolist()
    np.testing.assert_allclose(imb["top_n_coverage"], np.sort(a, 1)[:, ::-1][:, :K].sum(1) / a.sum(1), rtol=1e-12)
    assert imb["tokens"].tolist() == c["tokens"].to_numpy()[::E].tolist()

    pooled = pooled_switch_loss(con, sel, by_step=True, step_bucket=b)
    a3 = a.reshape(-1, L, E)
    p3 = c["prob_sum"].to_numpy().reshape(-1, L, E)
    n = c["tokens"].to_numpy()[::E].reshape(-1, L).sum(1).astype(float)  # pooled rows: every layer's tokens
    np.testing.assert_allclose(pooled["aux_loss"], E * (a3.sum(1) * p3.sum(1)).sum(1) / (n * n), rtol=1e-9)
    per_layer = E * (a3 * p3).sum(2) / (a3.sum(2) * c["tokens"].to_numpy()[::E].reshape(-1, L))
    np.testing.assert_allclose(pooled["max_layer_loss"], per_layer.max(1), rtol=1e-9)
    np.testing.assert_allclose(pooled["mean_layer_loss"], per_layer.mean(1), rtol=1e-9)


@pytest.mark.parametrize("steps", [None, (13, 2291), (995, 1004)])
@pytest.mark.parametrize("b", [1, 20, 100, 5000])
def test_top_expert_load_equals_brute_force(store, steps, b):
    """The busiest experts over the selection (from the totals) and the others summed, per bucket."""
    con, ss, _, _ = store
    sel = Selection(steps=steps)
    got = top_expert_load(con, sel, n=2, always=(4,), step_bucket=b)
    c = _cells(_in(ss, steps), b)
    totals = _in(ss, steps).groupby(["layer", "expert"])["assigned"].sum()
    for layer in range(L):
        t = totals.loc[layer]
        order = sorted(t.index, key=lambda e: (-t[e], e))
        shown = set(order[:2]) | {4}
        cl = c[c["layer"] == layer]
        g = got[got["layer"] == layer]
        for e in shown:
            want = cl[cl["expert"] == e]["assigned"].tolist()
            assert g[g["expert"] == e]["assigned"].tolist() == want, (layer, e)
            assert set(g[g["expert"] == e]["busy_rank"]) == {order.index(e) + 1}
        others = cl[~cl["expert"].isin(shown)].groupby("step")["assigned"].sum()
        assert g[g["expert"] == -1]["assigned"].tolist() == others.tolist()
        assert set(g[g["expert"] == -1]["experts"]) == {E - len(shown)}


@pytest.mark.parametrize("cf", [0.75, 1.0, 1.25, 1.1])
@pytest.mark.parametrize("steps", [None, (13, 2291)])
def test_capacity_drops_per_layer_equal_brute_force(store, cf, steps):
    """max(0, n - C) per raw row (one rank's step, layer and expert), C = ceil(CF x tokens x k / E); 1.1 is no
    stored factor (read from the rows)."""
    import math

    con, ss, _, _ = store
    raw = _in(ss, steps)
    cap = math.ceil(round(cf * T * K / E, 9))
    want = raw.assign(d=np.maximum(0, raw["assigned"] - cap)).groupby("layer")[["assigned", "d"]].sum()
    got = capacity_drops(con, Selection(steps=steps), cf, by=("layer",))
    assert got["dropped"].tolist() == want["d"].tolist()
    assert got["assigned"].tolist() == want["assigned"].tolist()


def test_health_growth_windows_equal_brute_force(store):
    """Each step's MaxVio (ranks summed) in the two windows the growth check compares."""
    con, ss, _, _ = store
    windows = [(0, 585), (1759, 2344)]
    got = _window_max_vio(con, Selection(), windows)
    raw = ss[ss["step"].between(*windows[0]) | ss["step"].between(*windows[1])]
    a = raw.groupby(["layer", "step", "expert"])["assigned"].sum().to_numpy().reshape(-1, E).astype(float)
    np.testing.assert_allclose(got["max_vio"], (a.max(1) - a.mean(1)) / a.mean(1), rtol=1e-12)


def test_a_store_compacted_before_the_bucket_tables_reads_the_rows_and_compact_adds_them(tmp_path):
    import duckdb

    run_dir = tmp_path / "old"
    rng = np.random.default_rng(4)
    frames: list = []
    _write(run_dir, 0, np.arange(0, 1234), rng, frames)
    compact(run_dir)
    db = duckdb.connect(str(run_dir / "run.duckdb"))  # as a moeviz from before the bucket tables left it
    for t in ("layer_buckets", "pooled_buckets", "step_drops"):
        db.execute(f"DROP TABLE {t}")
    db.close()
    ss = pd.concat([f[0] for f in frames], ignore_index=True)
    a = _cells(ss, 10)["assigned"].to_numpy().reshape(-1, E).astype(float)
    for expect in (False, True):
        con = open_store(run_dir)
        try:
            assert buckets_available(con) is expect
            imb = imbalance(con, Selection(), by_step=True, step_bucket=10)
            np.testing.assert_allclose(imb["max_vio"], (a.max(1) - a.mean(1)) / a.mean(1), rtol=1e-9)
        finally:
            con.close()
        compact(run_dir)  # a newer moeviz's `compact` builds the missing tables


def test_a_bucket_longer_than_a_short_run_reads_its_rows_beside_a_long_run(tmp_path):
    """Compare picks one bucket for two runs: 5,000 steps is stored for the run of 6,001 steps (steps 0-399 and
    5,601-6,000) and not for the run of 1,000 (compaction stops at the last step + 1); both get their curve."""
    rng = np.random.default_rng(11)
    frames: dict[str, list] = {"long": [], "short": []}
    _write(tmp_path / "long", 0, np.r_[np.arange(0, 400), np.arange(5601, 6001)], rng, frames["long"], "long")
    _write(tmp_path / "short", 0, np.arange(0, 1000), rng, frames["short"], "short")
    for run in frames:
        compact(tmp_path / run)
    con = open_store(tmp_path)
    try:
        assert buckets_available(con)
        stored = con.execute("SELECT DISTINCT run_id FROM layer_buckets WHERE resolution = 5000").fetchall()
        assert stored == [("long",)]  # the case under test: one run stores the bucket, the other does not
        for steps in (None, (0, 5999)):
            imb = imbalance(con, Selection(steps=steps), by_step=True, step_bucket=5000)
            pooled = pooled_switch_loss(con, Selection(steps=steps), by_step=True, step_bucket=5000)
            top = top_expert_load(con, Selection(steps=steps), n=2, step_bucket=5000)
            for run, fr in frames.items():
                ss = _in(pd.concat([f[0] for f in fr], ignore_index=True), steps)
                c = _cells(ss, 5000)
                a = c["assigned"].to_numpy().reshape(-1, E).astype(float)  # [buckets x layers, E]
                got = imb[imb["run_id"] == run]
                assert got["step"].tolist() == c["step"].to_numpy()[::E].tolist(), (run, steps)
                np.testing.assert_allclose(got["max_vio"], (a.max(1) - a.mean(1)) / a.mean(1), rtol=1e-9)
                assert got["tokens"].tolist() == c["tokens"].to_numpy()[::E].tolist()
                a3 = a.reshape(-1, L, E)
                p3 = c["prob_sum"].to_numpy().reshape(-1, L, E)
                n = c["tokens"].to_numpy()[::E].reshape(-1, L).sum(1).astype(float)
                np.testing.assert_allclose(pooled[pooled["run_id"] == run]["aux_loss"],
                                           E * (a3.sum(1) * p3.sum(1)).sum(1) / (n * n), rtol=1e-9)
                t = top[top["run_id"] == run]
                assert t.groupby(["step", "layer"])["assigned"].sum().tolist() == a.sum(1).tolist()
    finally:
        con.close()


def _write_with_an_unknown_rank(run_dir, steps0: np.ndarray, steps1: np.ndarray, rng, frames: list) -> pd.DataFrame:
    """Rank 0 records `steps0`, rank 1 `steps1` without tokens, first_choice and prob_sum (NULL: a source that
    cannot say), then the run is compacted. Rank 1's step_stats rows as drawn (with their counts)."""
    import warnings

    from moeviz.store.reader import StoreWarning

    _write(run_dir, 0, steps0, rng, frames)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        w = RunWriter(run_dir, run_id="r", rank=1, world_size=2, compact_on_close=False)
    tables, ss1, _ = _flush(rng, steps1)
    for t in tables.values():
        t["rank"] = 1
    for c in ("tokens", "first_choice", "prob_sum"):
        tables["step_stats"][c] = None
    w.write_flush(tables)
    w.close()
    compact(run_dir)
    return ss1


def test_a_rank_with_unknown_counts_makes_the_step_sums_null_not_partial(tmp_path):
    """Rank 1 records steps 20-39 without tokens, first_choice and prob_sum (NULL): each sum over those steps'
    rows (step_drops.dropped, layer_buckets.first_choice and prob_dot, pooled prob_dot, the step roll-ups and the
    per-step load) is unknown there, not rank 0's part; the other steps keep their numbers."""
    rng = np.random.default_rng(5)
    frames: list = []
    ss1 = _write_with_an_unknown_rank(tmp_path / "r", np.arange(0, 60), np.arange(20, 40), rng, frames)
    con = open_store(tmp_path / "r")
    try:
        unknown = set(range(20, 40))
        drops = con.execute("SELECT step, dropped FROM step_drops WHERE capacity_factor = 1.0").df()
        assert drops["step"].isin(unknown).any()  # the unknown steps have rows (assigned > 0)
        assert (drops["dropped"].isna() == drops["step"].isin(unknown)).all()
        for r in (1, 10, 20):
            lb = con.execute("SELECT step, first_choice, prob_dot FROM layer_buckets WHERE resolution = ?", [r]).df()
            hit = lb["step"].apply(lambda s: bool(unknown & set(range(s, s + r))))
            assert (lb["first_choice"].isna() == hit).all() and (lb["prob_dot"].isna() == hit).all(), r
            pb = con.execute("SELECT step, prob_dot FROM pooled_buckets WHERE resolution = ?", [r]).df()
            assert (pb["prob_dot"].isna() == pb["step"].apply(lambda s: bool(unknown & set(range(s, s + r))))).all()
        roll = con.execute("SELECT step, first_choice FROM step_rollups WHERE resolution = 10").df()
        assert (roll["first_choice"].isna() == roll["step"].isin([20, 30])).all()
        load = expert_load(con, Selection(steps=(15, 44)), by_step=True, step_bucket=1)  # edges and blocks
        assert (load["first_choice"].isna() == load["step"].isin(unknown)).all()
        assert (load["tokens"].isna() == load["step"].isin(unknown)).all()
    finally:
        con.close()


def test_a_tag_that_covers_every_selected_step_reads_the_bucket_tables(tmp_path, monkeypatch):
    """Steps 0-99, each with a 'train' sequence except 40-49 (an 'eval' pass only): switch_loss(step_tag='train')
    over 0-39 holds every step, so it reads the tables (the per-step path is made to fail here) and equals the
    brute force; over every step it keeps the per-step path and leaves steps 40-49 out."""
    import moeviz.analyses.aux_loss as aux

    rng = np.random.default_rng(3)
    w = RunWriter(tmp_path / "r", run_id="r", rank=0, world_size=1, compact_on_close=False)
    w.write_run({"model_class": "M", "n_layers": L, "n_experts": E, "top_k": K})
    w.write_layers([{"layer": i, "n_experts": E, "top_k": K} for i in range(L)])
    steps = np.arange(100)
    tables, ss, _ = _flush(rng, steps)
    tables["sequences"] = {"step": steps, "rank": 0, "seq": np.zeros(100, dtype=np.int64), "domain": None,
                           "tag": np.where((steps >= 40) & (steps < 50), "eval", "train").astype(object),
                           "n_tokens": T}
    w.write_flush(tables)
    w.close()
    compact(tmp_path / "r")
    con = open_store(tmp_path / "r")

    def brute(keep) -> np.ndarray:
        c = _cells(ss[ss["step"].isin(keep)], 10)
        a, p = c["assigned"].to_numpy().reshape(-1, E), c["prob_sum"].to_numpy().reshape(-1, E)  # [buckets x L, E]
        return E * (a * p).sum(1) / (a.sum(1) * c["tokens"].to_numpy()[::E])

    try:
        per_step = aux.expert_counts_sql
        monkeypatch.setattr(aux, "expert_counts_sql", lambda *a, **k: pytest.fail("read the per-step rows"))
        got = switch_loss(con, Selection(steps=(0, 39)), by_step=True, step_bucket=10, step_tag="train")
        np.testing.assert_allclose(got["aux_loss"], brute(range(40)), rtol=1e-9)
        monkeypatch.setattr(aux, "expert_counts_sql", per_step)
        got = switch_loss(con, Selection(), by_step=True, step_bucket=10, step_tag="train")
        keep = [s for s in range(100) if not 40 <= s < 50]
        assert sorted(set(got["step"])) == [0, 10, 20, 30, 50, 60, 70, 80, 90]
        np.testing.assert_allclose(got["aux_loss"], brute(keep), rtol=1e-9)
    finally:
        con.close()


# ---- expert_drops (per block, layer and expert) and drop_curve from step_drops: against the raw rows ----------

import math  # noqa: E402

from moeviz.analyses import capacity as capacity_mod  # noqa: E402
from moeviz.analyses.capacity import drop_curve  # noqa: E402


def _raw_drops(ss: pd.DataFrame, cf: float) -> pd.DataFrame:
    """Each raw row's drops max(0, n - C), C = ceil(CF x tokens x k / E) from its own tokens (NaN where unknown),
    on the rows with an assignment (as every capacity path reads them)."""
    raw = ss[ss["assigned"] > 0]
    cap = np.ceil(np.round(cf * raw["tokens"].astype(float) * K / E, 9))  # NaN tokens -> NaN
    return raw.assign(d=np.maximum(0, raw["assigned"] - cap))


def _known_sums(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per group: assignments and drops, drops NaN when any row's are (unknown, never partial)."""
    g = df.groupby(by)
    return pd.DataFrame({"assigned": g["assigned"].sum(), "d": g["d"].sum(min_count=1).where(~g["d"].apply(
        lambda x: x.isna().any()))}).reset_index()


def _spy(monkeypatch, name: str) -> list:
    """Calls of capacity_mod.<name> (which path answered), the function still doing its work."""
    calls: list = []
    real = getattr(capacity_mod, name)
    monkeypatch.setattr(capacity_mod, name, lambda *a, **kw: calls.append(a) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("r", [100, 1000])
def test_expert_drops_equal_the_raw_rows_per_block(store, r):
    con, ss, _, state = store
    if state != "compacted":
        pytest.skip("the tables are only read from a compacted store")
    for cf in (0.75, 1.25, 1.5):
        got = con.execute("SELECT step, layer, expert, assigned, dropped FROM expert_drops "
                          "WHERE resolution = ? AND capacity_factor = ? ORDER BY step, layer, expert", [r, cf]).df()
        want = _known_sums(_bucketed(_raw_drops(ss, cf), r), ["step", "layer", "expert"])
        assert got["step"].tolist() == want["step"].tolist()  # 2,345 steps: the last block is partial
        assert got["assigned"].tolist() == want["assigned"].tolist()
        assert got["dropped"].tolist() == want["d"].astype(int).tolist()
        assert want["d"].sum() > 0, cf  # the factor drops something: not a comparison of zeros


@pytest.mark.parametrize("cf", [0.75, 1.25, 1.1])
@pytest.mark.parametrize("steps", [None, (13, 2291), (150, 1250), (995, 1004), (1499, 1500)])
@pytest.mark.parametrize("by", [("layer", "expert"), ("expert",)])
def test_capacity_drops_per_expert_equal_brute_force(store, cf, steps, by, monkeypatch):
    """Whole blocks from expert_drops (a compacted store, stored factor), the edges of the range from step_stats;
    1.1 (no stored factor) and the live store replay every row. Steps 1,500-2,344 were compacted after 0-1,499:
    blocks 1,000-1,999 and 1,500-1,599 span the two compactions."""
    con, ss, _, state = store
    calls = _spy(monkeypatch, "_from_expert_drops")
    got = capacity_drops(con, Selection(steps=steps), cf, by=by)
    assert len(calls) == (state == "compacted" and cf != 1.1)  # the path under test answered
    _check_expert_drops(got, _raw_drops(_in(ss, steps), cf), by)
    # a run and layers picked: their parameters and the steps' in one query (the edges join the shape)
    got = capacity_drops(con, Selection(run_ids=("r",), layers=(0, 2), steps=steps), cf, by=by)
    _check_expert_drops(got, _raw_drops(_in(ss, steps), cf).query("layer in (0, 2)"), by)


def _check_expert_drops(got: pd.DataFrame, raw: pd.DataFrame, by: tuple[str, ...]) -> None:
    want = _known_sums(raw, list(by))
    assert got[list(by)].values.tolist() == want[list(by)].values.tolist()
    assert got["assigned"].tolist() == want["assigned"].tolist()
    assert got["dropped"].tolist() == want["d"].astype(int).tolist()
    np.testing.assert_allclose(got["drop_rate"], want["d"] / want["assigned"], rtol=1e-12)
    assert want["d"].sum() > 0


@pytest.mark.parametrize("steps", [None, (13, 2291), (995, 1004)])
@pytest.mark.parametrize("by", [(), ("layer",), ("step",)])
def test_drop_curve_at_stored_factors_equals_brute_force(store, steps, by, monkeypatch):
    con, ss, _, state = store
    calls = _spy(monkeypatch, "_curve_from_step_drops")
    factors = (0.5, 1.0, 1.25, 2.0)
    got = drop_curve(con, Selection(steps=steps), factors, by=by)
    assert len(calls) == (state == "compacted")
    raw = _in(ss, steps)
    for cf in factors:
        g = got[got["capacity_factor"] == cf]
        d = _raw_drops(raw, cf)
        want = _known_sums(d, list(by)) if by else pd.DataFrame(
            {"assigned": [d["assigned"].sum()], "d": [d["d"].sum()]})
        assert g["assigned"].tolist() == want["assigned"].tolist(), cf
        assert g["dropped"].tolist() == want["d"].astype(int).tolist(), cf
        np.testing.assert_allclose(g["drop_rate"], want["d"] / want["assigned"], rtol=1e-12)
    # a factor that is not stored: the whole curve replays, with the same numbers at the stored ones
    mixed = drop_curve(con, Selection(steps=steps), factors + (1.1,), by=by)
    assert len(calls) == (state == "compacted")
    assert mixed[mixed["capacity_factor"] != 1.1]["dropped"].tolist() == got["dropped"].tolist()


def test_unknown_tokens_make_expert_drops_and_the_curve_null_not_partial(tmp_path, monkeypatch):
    """Rank 1 records steps 120-139 without tokens: the drops of block 100-199 (every expert; and of the
    1,000-step block) are unknown, from the table, from the edges, in the curve and on replay; a range that
    leaves those steps out is known and exact."""
    rng = np.random.default_rng(9)
    frames: list = []
    ss1 = _write_with_an_unknown_rank(tmp_path / "r", np.arange(0, 360), np.arange(120, 140), rng, frames)
    ss = pd.concat([frames[i][0] for i in range(len(frames))] + [ss1.assign(rank=1, tokens=np.nan)],
                   ignore_index=True)
    con = open_store(tmp_path / "r")
    try:
        assert buckets_available(con)
        table = con.execute("SELECT resolution, step, dropped FROM expert_drops WHERE capacity_factor = 1.0").df()
        unknown_block = (table["step"] == 100) & (table["resolution"] == 100) | (table["resolution"] == 1000)
        assert (table["dropped"].isna() == unknown_block).all()
        for steps, cf in [((5, 300), 1.0), ((125, 130), 1.0), ((5, 300), 1.1), ((200, 359), 1.0), ((3, 99), 1.25)]:
            got = capacity_drops(con, Selection(steps=steps), cf, by=("layer", "expert"))
            want = _known_sums(_raw_drops(_in(ss, steps), cf), ["layer", "expert"])
            assert got["assigned"].tolist() == want["assigned"].tolist()
            assert got["dropped"].isna().tolist() == want["d"].isna().tolist(), (steps, cf)
            known = want["d"].notna()
            assert got["dropped"][known].tolist() == want["d"][known].tolist()
            assert known.all() == (steps[1] < 120 or steps[0] > 139)
            curve = drop_curve(con, Selection(steps=steps), (cf,), by=("layer",))
            wl = _known_sums(_raw_drops(_in(ss, steps), cf), ["layer"])
            assert curve["dropped"].isna().tolist() == wl["d"].isna().tolist(), (steps, cf)
    finally:
        con.close()


def test_a_store_compacted_before_expert_drops_replays_and_compact_adds_it(tmp_path, monkeypatch):
    import duckdb

    run_dir = tmp_path / "old"
    rng = np.random.default_rng(12)
    frames: list = []
    _write(run_dir, 0, np.arange(0, 1234), rng, frames)
    compact(run_dir)
    db = duckdb.connect(str(run_dir / "run.duckdb"))  # as a moeviz from before expert_drops left it
    db.execute("DROP TABLE expert_drops")
    db.close()
    ss = pd.concat([f[0] for f in frames], ignore_index=True)
    want = _known_sums(_raw_drops(_in(ss, (50, 1200)), 1.25), ["layer", "expert"])
    calls = _spy(monkeypatch, "_from_expert_drops")
    for expect in (False, True):
        con = open_store(run_dir)
        try:
            # the other bucket tables still answer: only expert_drops' readers replay
            assert buckets_available(con) and expert_drops_available(con) is expect
            got = capacity_drops(con, Selection(steps=(50, 1200)), 1.25, by=("layer", "expert"))
            assert got["dropped"].tolist() == want["d"].astype(int).tolist()
            assert len(calls) == int(expect)
        finally:
            con.close()
        compact(run_dir)  # builds the missing table (and the other bucket tables again)


def test_negative_steps_fall_in_floor_blocks_through_two_compactions(tmp_path, monkeypatch):
    """Steps -150..149 compacted, then 150..299 compacted again: every block is [floor(s / r) * r, + r), as the
    readers split ranges. With DuckDB's `//` (toward zero) steps -99..-1 were in the block of 0..99: a range
    from 0 read their drops, and the second compaction, rebuilding from step 0, deleted them."""
    run_dir = tmp_path / "neg"
    rng = np.random.default_rng(21)
    frames: list = []
    calls = _spy(monkeypatch, "_from_expert_drops")
    for steps_written in (np.arange(-150, 150), np.arange(150, 300)):
        _write(run_dir, 0, steps_written, rng, frames)
        compact(run_dir)
        ss = pd.concat([f[0] for f in frames], ignore_index=True)
        con = open_store(run_dir)
        try:
            for steps in ((0, 99), (0, 149), (-150, -1), (-120, 130), None):
                sel = Selection(steps=steps)
                got = capacity_drops(con, sel, 1.25, by=("expert",))
                want = _known_sums(_raw_drops(_in(ss, steps), 1.25), ["expert"])
                np.testing.assert_array_equal(got["dropped"].astype(float), want["d"].astype(float), str(steps))
                cells = _bucketed(_in(ss, steps), 100).groupby(["step", "layer", "expert"], as_index=False)[
                    "assigned"].sum()  # pandas' // is floor
                load = expert_load(con, sel, by_step=True, step_bucket=100)
                assert load[["step", "layer", "expert", "assigned"]].astype("int64").values.tolist() == \
                    cells[["step", "layer", "expert", "assigned"]].values.tolist(), steps
        finally:
            con.close()
    assert calls  # the whole-run and from-0 ranges were read from expert_drops


@pytest.mark.parametrize("chunk_rows", [1, 37])
def test_rollups_built_a_chunk_at_a_time_sum_every_row_through_three_compactions(tmp_path, monkeypatch, chunk_rows):
    """Compaction sums the roll-ups a chunk of blocks at a time (bounded memory on long runs); with chunks of one
    block (_CHUNK_ROWS = 1) or of a few (37 rows: blocks packed together), sparse and negative steps, and steps
    added inside blocks already compacted by a later compaction, every block of every resolution must equal
    pandas' floor-block sums of the raw rows."""
    monkeypatch.setattr(rollups, "_CHUNK_ROWS", chunk_rows)
    run_dir = tmp_path / "chunked"
    rng = np.random.default_rng(5)
    frames: list = []
    writes = [(0, np.r_[np.arange(-1234, -1180), np.arange(-7, 40), np.arange(3990, 4012)]),
              (1, np.r_[np.arange(0, 25), np.arange(4005, 4020)]),  # inside blocks compacted already
              (0, np.r_[np.arange(40, 60), 2 ** 33 + np.arange(3)])]  # after 4,011 and far past it
    for rank, steps_written in writes:
        _write(run_dir, rank, steps_written, rng, frames)
        compact(run_dir)
        ss = pd.concat([f[0] for f in frames], ignore_index=True)
        ls = pd.concat([f[1] for f in frames], ignore_index=True)
        con = open_store(run_dir)
        try:
            for r in (10, 100, 1000):
                got = con.execute("SELECT step, layer, expert, assigned, prob_sum, dropped FROM step_rollups "
                                  "WHERE resolution = ? ORDER BY step, layer, expert", [r]).df()
                want = _bucketed(ss, r).groupby(["step", "layer", "expert"], as_index=False)[
                    ["assigned", "prob_sum", "dropped"]].sum()  # pandas' // is floor
                assert got[["step", "layer", "expert", "assigned", "dropped"]].astype("int64").values.tolist() == \
                    want[["step", "layer", "expert", "assigned", "dropped"]].values.tolist(), (rank, r)
                np.testing.assert_allclose(got["prob_sum"], want["prob_sum"], rtol=1e-12)
                lgot = con.execute("SELECT step, layer, tokens, z_loss_sum FROM layer_rollups WHERE resolution = ? "
                                   "ORDER BY step, layer", [r]).df()
                lwant = _bucketed(ls, r).groupby(["step", "layer"], as_index=False)[["tokens", "z_loss_sum"]].sum()
                assert lgot[["step", "layer", "tokens"]].astype("int64").values.tolist() == \
                    lwant[["step", "layer", "tokens"]].values.tolist(), (rank, r)
                np.testing.assert_allclose(lgot["z_loss_sum"], lwant["z_loss_sum"], rtol=1e-12)
        finally:
            con.close()


@pytest.mark.parametrize("steps", [None, (13, 2291), (995, 1004)])
def test_max_vio_summary_equals_brute_force(store, steps):
    """The per-step MaxVio summary (count, mean and worst over steps) is summarised in DuckDB from layer_buckets
    on a compacted store, in pandas from the per-step rows on a live one: both equal numpy over the raw rows."""
    con, ss, _, _ = store
    got = max_vio_summary(con, Selection(steps=steps)).set_index("layer")
    rows = _in(ss, steps)
    load = rows.groupby(["step", "layer", "expert"])["assigned"].sum().unstack("expert").fillna(0)  # [S*L, E]
    per_step = (load.max(axis=1) / load.mean(axis=1) - 1).unstack("layer")  # [S, L]
    whole = rows.groupby(["layer", "expert"])["assigned"].sum().unstack("expert")
    for layer in range(L):
        row = got.loc[layer]
        assert row.steps == per_step[layer].count()
        assert row.step_mean_max_vio == pytest.approx(per_step[layer].mean(), rel=1e-12)
        assert row.step_max_max_vio == pytest.approx(per_step[layer].max(), rel=1e-12)
        assert row.global_max_vio == pytest.approx(whole.loc[layer].max() / whole.loc[layer].mean() - 1, rel=1e-12)
