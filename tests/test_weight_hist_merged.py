"""weight_hist's merged rows (schema version 5): an expert with at most WEIGHT_HIST_MERGE_MAX routes in a step and
rank is one row (bin -1) instead of one row per bin, and the probability capacity policy reads such a row as one
bin holding every route of the expert.

Every answer is checked against a pandas brute force of the policy over the routes as written (highest weight
kept, ties by slot, seq, pos), never against moeviz. The routing puts experts on both sides of the limit in every
step (exactly 64 and 65 routes, a few, the rest), with gate weights on a grid of sixteenths: ties everywhere,
also across the capacity.
"""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pandas as pd
import pytest

from moeviz.analyses.capacity import capacity_drops
from moeviz.selection import Selection
from moeviz.store import compact, layout, open_store
from moeviz.testing import store_from_routing

T = layout.WEIGHT_HIST_MERGE_MAX
SEQS, SEQ_LEN, LAYERS, EXPERTS = 4, 20, 2, 4  # 80 tokens x top-2 = 160 routes per step, rank and layer
SIZES = (T, T + 1, 10, 160 - 2 * T - 11)  # routes per expert in a step, rank and layer: both sides of the limit


def routing(n_steps: int = 3, n_ranks: int = 2, seed: int = 0) -> dict:
    """Routing arrays (moeviz.testing.store_from_routing's keywords) with SIZES routes per expert, the sizes dealt
    to other experts in each step, rank and layer, and tokens shuffled so ties break on varied seq and pos."""
    assert T == 64  # SIZES and the expert pairs below are laid out for it
    rng = np.random.default_rng(seed)
    n = SEQS * SEQ_LEN
    labels = np.repeat(np.arange(4), SIZES)  # [160]; slot 0 = labels[:80], slot 1 = labels[80:]: distinct per token
    pairs = np.stack([labels[:n], labels[n:]], axis=1)  # [80, 2]
    assert (pairs[:, 0] != pairs[:, 1]).all()
    index, steps, ranks = [], [], []
    for step in range(n_steps):
        for rank in range(n_ranks):
            per_layer = [rng.permutation(EXPERTS)[pairs[rng.permutation(n)]] for _ in range(LAYERS)]  # [80, 2] each
            index.append(np.stack(per_layer, axis=1))  # [80, L, 2]
            steps.append(np.full(n, step))
            ranks.append(np.full(n, rank))
    index = np.concatenate(index)  # [T, L, 2]
    weights = rng.integers(1, 16, size=index.shape) / 16  # [T, L, 2] ties within and across experts
    n_tok = len(index)
    return {"index": index, "weights": weights, "steps": np.concatenate(steps), "ranks": np.concatenate(ranks),
            "seqs": np.tile(np.repeat(np.arange(SEQS), SEQ_LEN), n_tok // n),
            "pos": np.tile(np.arange(SEQ_LEN), n_tok // SEQ_LEN),
            "domains": np.array(["code", "prose"])[np.tile(np.repeat(np.arange(SEQS), SEQ_LEN), n_tok // n) % 2],
            "token_ids": rng.integers(0, 100, n_tok), "n_experts": EXPERTS}


def routes_frame(r: dict) -> pd.DataFrame:
    """One row per route, weight quantised as the store keeps it."""
    n_tok, n_layers, k = r["index"].shape
    t, layer, slot = (a.ravel() for a in np.meshgrid(np.arange(n_tok), np.arange(n_layers), np.arange(k),
                                                      indexing="ij"))
    return pd.DataFrame({"step": r["steps"][t], "rank": r["ranks"][t], "seq": r["seqs"][t], "pos": r["pos"][t],
                         "domain": r["domains"][t], "layer": layer, "slot": slot, "expert": r["index"][t, layer, slot],
                         "weight_q": np.rint(r["weights"][t, layer, slot] * layout.WEIGHT_SCALE).astype(np.int64)})


def brute_force(routes: pd.DataFrame, cap: int, by: tuple[str, ...], domains=None) -> pd.DataFrame:
    """The probability policy by sorting every route: per step, rank, layer and expert the first `cap` routes by
    (weight descending, slot, seq, pos) are kept; then assigned, dropped and dropped_weight per `by`."""
    r = routes.sort_values(["step", "rank", "layer", "expert", "weight_q", "slot", "seq", "pos"],
                           ascending=[True] * 4 + [False, True, True, True], kind="mergesort")
    r = r.assign(dropped=r.groupby(["step", "rank", "layer", "expert"]).cumcount() >= cap)
    if domains is not None:  # filtered after the ranking
        r = r[r["domain"].isin(domains)]
    r = r.assign(dw=np.where(r["dropped"], r["weight_q"], 0) / layout.WEIGHT_SCALE, one=1)
    keys = list(by) or ["one"]
    out = r.groupby(keys).agg(assigned=("one", "size"), dropped=("dropped", "sum"), dropped_weight=("dw", "sum"))
    return out.reset_index()


def check_policy(con, routes: pd.DataFrame) -> None:
    """capacity_drops from weight_hist equals the brute force at capacities on both sides of every group size."""
    shapes = [(("layer", "expert"), True), (("step", "rank"), True), ((), True), (("domain",), False),
              (("domain", "layer"), True), (("seq",), False), (("pos",), False), (("slot",), True),
              (("slot", "expert"), False), (("pos", "layer"), True)]
    for cap in (0, 5, 10, T - 1, T, T + 1, 90):
        for by, with_weight in shapes:
            for domains in (None, ("code",)):
                got = capacity_drops(con, Selection(domains=domains), capacity=cap, policy="probability", by=by,
                                     with_weight=with_weight, source="aggregates")
                want = brute_force(routes, cap, by, domains)
                keys = list(by)
                got = got.sort_values(keys).reset_index(drop=True) if keys else got
                want = want.sort_values(keys).reset_index(drop=True) if keys else want
                assert len(got) == len(want), (cap, by, domains)
                for c in keys + ["assigned", "dropped"]:
                    assert [str(v) for v in got[c]] == [str(v) for v in want[c]], (c, cap, by, domains)
                if with_weight:
                    np.testing.assert_allclose(got["dropped_weight"].fillna(0), want["dropped_weight"], atol=1e-9,
                                               err_msg=str((cap, by, domains)))


def hist_by_hand(routes: pd.DataFrame) -> dict[tuple, tuple]:
    """weight_hist rows by pandas, {(step, rank, layer, expert, bin): (assigned, first_choice, weight_q_sum,
    above)}: per bin (weight_q >> 8, `above` the routes in higher bins) when an expert has more than T routes in the
    step and rank, else one row with bin -1 and above 0."""
    r = routes.assign(bin=routes["weight_q"] // (1 << layout.WEIGHT_BIN_SHIFT), first=(routes["slot"] == 0).astype(int))
    keys = ["step", "rank", "layer", "expert"]
    n = r.groupby(keys)["slot"].transform("size")
    r.loc[n <= T, "bin"] = -1
    h = r.groupby(keys + ["bin"]).agg(a=("slot", "size"), f=("first", "sum"), w=("weight_q", "sum")).reset_index()
    h = h.sort_values(keys + ["bin"], ascending=[True] * 4 + [False])
    h["above"] = h.groupby(keys)["a"].cumsum() - h["a"]
    return {tuple(int(x) for x in row[:5]): tuple(int(x) for x in row[5:]) for row in h.itertuples(index=False)}


def hist_in(con, run_id: str | None = None) -> dict[tuple, tuple]:
    where = "" if run_id is None else f"WHERE run_id = '{run_id}'"
    return {tuple(row[:5]): tuple(row[5:]) for row in con.execute(
        "SELECT step, rank, layer, expert, bin, assigned, first_choice, weight_q_sum, above FROM weight_hist "
        + where).fetchall()}


@pytest.fixture(scope="module")
def both_sides():
    r = routing()
    return r, routes_frame(r)


def test_the_routing_has_groups_on_both_sides_of_the_limit(both_sides):
    _, routes = both_sides
    sizes = routes.groupby(["step", "rank", "layer", "expert"]).size()
    assert {T, T + 1, 10} <= set(sizes) and (sizes > T).any() and (sizes <= T).any()


def test_a_store_built_as_compaction_does_merges_the_small_experts(both_sides):
    r, routes = both_sides
    con = store_from_routing(**r)
    assert hist_in(con) == hist_by_hand(routes)
    check_policy(con, routes)


def test_compacted_run_rows_and_answers(tmp_path, both_sides):
    """A real run folder compacted in one pass (the per-batch merge, _RouteCounts)."""
    from test_app import write_run_dir

    r, routes = both_sides
    write_run_dir(tmp_path / "a", r, run_id="a")
    con = open_store(tmp_path / "a")
    assert hist_in(con) == hist_by_hand(routes)
    assert json.loads((tmp_path / "a" / "moeviz.json").read_text())["schema_version"] == 5
    check_policy(con, routes)


def test_a_compacted_run_whose_experts_all_pass_the_limit_keeps_every_bin(tmp_path):
    """Two experts, top-1, 320 tokens a step: every expert past T, so each batch is binned whole (no merged row)."""
    from moeviz.testing import synthetic_routing

    from test_app import write_run_dir

    r = synthetic_routing(n_steps=2, n_layers=2, n_experts=2, top_k=1, seqs_per_step=8, seq_len=40, skew=0.0,
                          domains=("code", "prose"), seed=2)
    r["weights"] = np.round(r["weights"] * 16) / 16  # ties
    routes = routes_frame(r)
    assert (routes.groupby(["step", "rank", "layer", "expert"]).size() > T).all()
    write_run_dir(tmp_path / "a", r, run_id="a")
    con = open_store(tmp_path / "a")
    got = hist_in(con)
    assert got == hist_by_hand(routes) and min(k[4] for k in got) >= 0
    check_policy(con, routes)


def test_a_step_split_over_two_batches_is_merged_again(tmp_path, monkeypatch, both_sides):
    """Batches smaller than a step (segments of half a step, COMPACTED_ROW_GROUP_ROWS 2: each is written as it is,
    a step in two batches): each batch merges its
    own small experts, and the fold merges an expert again whenever one of its pieces was merged, also when its
    routes together pass the limit (then its row holds more than T routes: exact, only slower to order)."""
    from test_app import write_run_dir

    r, routes = both_sides
    monkeypatch.setattr(layout, "ROUTES_ROWS_PER_LAYER", SEQS * SEQ_LEN // 2 * 2)  # half a step's routes a segment
    monkeypatch.setattr(layout, "COMPACTED_ROW_GROUP_ROWS", 2)
    write_run_dir(tmp_path / "a", r, run_id="a")
    con = open_store(tmp_path / "a")
    got = hist_in(con)
    sums = routes.groupby(["step", "rank", "layer", "expert"]).agg(n=("slot", "size"), w=("weight_q", "sum"))
    merged = {k[:4]: v for k, v in got.items() if k[4] == -1}
    assert any(v[0] > T for v in merged.values())  # grown past the limit by the fold
    for key, (n, w) in sums.iterrows():
        rows = {k: v for k, v in got.items() if k[:4] == key}
        assert sum(v[0] for v in rows.values()) == n and sum(v[2] for v in rows.values()) == w, key
        assert key in merged if n <= T else (len(rows) == 1 or -1 not in {k[4] for k in rows}), key
        if key in merged:
            assert len(rows) == 1 and merged[key][3] == 0, key
    check_policy(con, routes)


def test_new_routes_of_a_compacted_step_in_a_second_compaction(tmp_path, both_sides):
    """Rank 0's step 1 gets more routes after its first compaction (sequences 0-1 recorded again: the appended
    routes count twice, as the writer warns): merged rows meet new routes of the same expert (n grows past T),
    and bins of an expert past T meet a merged piece; the fold merges every such expert again, and the answers
    stay exact against the brute force over all the routes written."""
    from moeviz.store import RunWriter

    from test_app import write_run_dir

    r, routes = both_sides
    run_dir = tmp_path / "a"
    write_run_dir(run_dir, r, run_id="a")  # compacted on close
    first = hist_in(open_store(run_dir))
    mem = store_from_routing(**r, run_id="a")
    cols = ["step", "seq", "pos", "token_id", "layer", "slot", "expert", "weight"]
    again = mem.execute(f"SELECT {', '.join(cols)} FROM routes WHERE rank = 0 AND step = 1 AND seq < 2 "
                        "ORDER BY layer, seq, pos, slot").df()
    with pytest.warns(Warning, match="appending"):
        w = RunWriter(run_dir, run_id="a", rank=0, world_size=2)
    w.write_flush({"routes": {c: again[c].to_numpy() for c in cols}})
    w.close()  # compacts
    con = open_store(run_dir)
    got = hist_in(con)
    extra = routes[(routes["rank"] == 0) & (routes["step"] == 1) & (routes["seq"] < 2)]
    both = pd.concat([routes, extra], ignore_index=True)
    touched = {tuple(int(x) for x in k) for k in extra.groupby(["step", "rank", "layer", "expert"]).size().index}
    binned_before = {k[:4] for k in first if k[4] >= 0}
    assert touched & binned_before  # an expert of more than T routes gets a merged piece
    assert any(v[0] > T for k, v in got.items() if k[4] == -1)  # ... and is merged again past T
    for key in touched:  # one merged row each, the sums of every route written
        rows = {k: v for k, v in got.items() if k[:4] == key}
        g = both[(both["step"] == key[0]) & (both["rank"] == key[1]) & (both["layer"] == key[2])
                 & (both["expert"] == key[3])]
        assert list(rows) == [key + (-1,)] and rows[key + (-1,)] == (
            len(g), int((g["slot"] == 0).sum()), int(g["weight_q"].sum()), 0), key
    assert {k: v for k, v in got.items() if k[:4] not in touched} == \
        {k: v for k, v in first.items() if k[:4] not in touched}
    check_policy(con, both)


def test_a_version_4_run_keeps_its_bins_and_is_raised_to_5_when_merged_rows_join_them(tmp_path, both_sides):
    """A run compacted by version 4 (per-bin rows only: rebuilt here by pandas into run.duckdb, manifest set to 4)
    reads as it is; new segments compacted by this version add merged rows beside the old bins, and the manifest
    says 5 (data version kept) before that run.duckdb is published."""
    from moeviz.store import RunWriter

    r, routes = both_sides
    mem = store_from_routing(**r, run_id="a")
    run_dir = tmp_path / "a"
    cols = ["step", "seq", "pos", "token_id", "layer", "slot", "expert", "weight"]
    stored = mem.execute(f"SELECT rank, {', '.join(cols)} FROM routes ORDER BY step, rank, seq, pos, layer, slot").df()
    seqs = mem.execute("SELECT step, rank, seq, domain, tag, n_tokens FROM sequences").df()

    def write(steps):
        for rank in (0, 1):
            w = RunWriter(run_dir, run_id="a", rank=rank, world_size=2, compact_on_close=False)
            w.write_run({"model_class": "T", "n_layers": LAYERS, "n_experts": EXPERTS, "top_k": 2})
            for step in steps:
                g = stored[(stored["rank"] == rank) & (stored["step"] == step)]
                s = seqs[(seqs["step"] == step) & (seqs["rank"] == rank)]
                w.write_flush({"routes": {c: g[c].to_numpy() for c in cols},
                               "sequences": {c: s[c].to_numpy() for c in ("step", "seq", "domain", "tag",
                                                                          "n_tokens")}})
            w.close()

    write([0, 1])
    compact(run_dir)
    old = routes[routes["step"] < 2]
    per_bin = old.assign(bin=old["weight_q"] // (1 << layout.WEIGHT_BIN_SHIFT), first=(old["slot"] == 0).astype(int)) \
        .groupby(["step", "rank", "layer", "expert", "bin"]).agg(assigned=("slot", "size"), first_choice=("first", "sum"),
                                                                 weight_q_sum=("weight_q", "sum")).reset_index() \
        .sort_values(["step", "rank", "layer", "expert", "bin"], ascending=[True] * 4 + [False])
    per_bin["above"] = per_bin.groupby(["step", "rank", "layer", "expert"])["assigned"].cumsum() - per_bin["assigned"]
    db = duckdb.connect(str(run_dir / layout.COMPACTED))
    db.execute("DELETE FROM weight_hist")
    db.execute("INSERT INTO weight_hist SELECT 'a', step, rank, layer, expert, bin, assigned, first_choice, "
               "weight_q_sum, above FROM per_bin")
    db.close()
    path = run_dir / "moeviz.json"
    v5 = path.read_text()
    path.write_text(json.dumps(dict(json.loads(v5), schema_version=4)))
    con = open_store(run_dir)
    assert con.execute("SELECT count(*) FROM weight_hist WHERE bin < 0").fetchone()[0] == 0
    check_policy(con, old)  # version 4's rows read as they are
    con.close()
    path.write_text(v5)  # step 2's segments, as a version-4 writer would have left them (this one refuses a v4 run)
    with pytest.warns(Warning, match="appending"):
        write([2])
    path.write_text(json.dumps(dict(json.loads(v5), schema_version=4)))
    compact(run_dir)
    manifest = json.loads(path.read_text())
    assert (manifest["schema_version"], manifest["data_schema_version"]) == (5, 4)
    con = open_store(run_dir)
    got = hist_in(con)
    assert {k: v for k, v in got.items() if k[0] < 2} == {  # the old bins kept
        tuple(int(x) for x in row[:5]): tuple(int(x) for x in row[5:]) for row in per_bin.itertuples(index=False)}
    assert {k: v for k, v in got.items() if k[0] == 2} == hist_by_hand(routes[routes["step"] == 2])
    check_policy(con, routes)
