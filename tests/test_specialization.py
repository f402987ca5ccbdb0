"""moeviz.analyses.specialization, each metric against an independent reference: plain-Python loops over the routing arrays
the store was built from (no SQL), hand-computed tiny cases, and properties (relabelling experts relabels the
results, balanced routing gives k/E, perfectly specialised routing gives 1, shuffled routing gives ~0)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeviz.analyses import specialization as sp
from moeviz.errors import MoevizError
from moeviz.selection import Selection
from moeviz.testing import store_from_routing, synthetic_routing

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -------------------------------------------------------------------------------------------------------------------
# fixtures: two runs (a bitmask-sized one, E=6, and a list-sized one, E=70), some tokens not kept (gaps)
# -------------------------------------------------------------------------------------------------------------------


def _routing(seed, **kw):
    r = synthetic_routing(seed=seed, **kw)
    rng = np.random.default_rng(seed + 100)
    r["token_ids"] = rng.integers(0, 12, len(r["steps"]))  # a small vocabulary, so tokens repeat
    r["tags"] = np.where(r["steps"] % 2 == 0, "train", "eval").astype(object)
    keep = rng.random(len(r["steps"])) < 0.85  # gaps inside sequences: not every (pos, pos+1) is a pair
    return r, keep


@pytest.fixture(scope="module")
def runs():
    ra, ka = _routing(3, n_steps=3, n_layers=2, n_experts=6, top_k=2, seqs_per_step=3, seq_len=12, n_ranks=2,
                      domains=("code", "prose", "math"), skew=1.5)
    rb, kb = _routing(4, n_steps=2, n_layers=2, n_experts=70, top_k=3, seqs_per_step=2, seq_len=20,
                      domains=("code", "prose"), skew=2.0)
    con = store_from_routing(**ra, keep=ka, run_id="a")
    store_from_routing(**rb, keep=kb, run_id="b", con=con)
    con.execute("INSERT INTO vocab SELECT 'a', i, 'tok' || i FROM range(12) t(i)")
    return con, {"a": (ra, ka), "b": (rb, kb)}


def tokens_of(routing, keep, sel: Selection = Selection()):
    """The kept tokens of the selection as plain dicts (the reference side never touches SQL)."""
    out = []
    for t in np.flatnonzero(keep):
        step, rank = int(routing["steps"][t]), int(routing["ranks"][t])
        dom = routing["domains"][t] if "domains" in routing else None
        tag = routing["tags"][t] if "tags" in routing else None
        if sel.steps is not None and not sel.steps[0] <= step <= sel.steps[1]:
            continue
        if sel.ranks is not None and rank not in sel.ranks:
            continue
        if sel.domains is not None and dom not in sel.domains:
            continue
        if sel.tags is not None and tag not in sel.tags:
            continue
        out.append({
            "step": step, "rank": rank, "seq": int(routing["seqs"][t]), "pos": int(routing["pos"][t]),
            "token": int(routing["token_ids"][t]), "domain": dom, "index": routing["index"][t],  # [L, k]
        })
    return out


def layers_of(routing, sel: Selection = Selection()):
    n_layers = routing["index"].shape[1]
    return [l for l in range(n_layers) if sel.layers is None or l in sel.layers]


# -------------------------------------------------------------------------------------------------------------------
# domain share
# -------------------------------------------------------------------------------------------------------------------


def ref_domain_share(routing, keep, sel, slot0_only=False):
    E, k = routing["logits"].shape[2], routing["index"].shape[2]
    toks = tokens_of(routing, keep, sel)
    rows = {}
    for layer in layers_of(routing, sel):
        for dom in sorted({t["domain"] for t in toks}):
            dt = [t for t in toks if t["domain"] == dom]
            for e in range(E):
                chosen = [t["index"][layer][:1] if slot0_only else t["index"][layer] for t in dt]
                assigned = sum(int(e in c) for c in chosen)
                rows[(layer, dom, e)] = (len(dt), assigned, assigned / len(dt), (1 if slot0_only else k) / E)
    return rows


@pytest.mark.parametrize("slot0_only", [False, True])
@pytest.mark.parametrize("sel", [
    Selection(), Selection(layers=(1,), steps=(1, 2)), Selection(domains=("code", "math"), ranks=(1,)),
    Selection(tags=("eval",)),
])
def test_domain_share_matches_loops(runs, sel, slot0_only):
    con, data = runs
    got = sp.domain_share(con, sel, slot0_only=slot0_only)
    assert list(got.columns) == [
        "run_id", "layer", "domain", "expert", "tokens", "assigned", "share", "uniform", "ratio"]
    for run_id, (routing, keep) in data.items():
        ref = ref_domain_share(routing, keep, sel, slot0_only)
        g = got[got.run_id == run_id]
        assert len(g) == len(ref)
        for row in g.itertuples():
            tokens, assigned, share, uniform = ref[(row.layer, row.domain, row.expert)]
            assert (row.tokens, row.assigned) == (tokens, assigned)
            assert row.share == pytest.approx(share) and row.uniform == pytest.approx(uniform)
            assert row.ratio == pytest.approx(share / uniform)


def test_domain_share_sums_to_k_and_first_choice_to_one(runs):
    con, _ = runs
    for fn, total in ((sp.domain_share, {"a": 2, "b": 3}), (sp.domain_share_first_choice, {"a": 1, "b": 1})):
        sums = fn(con, Selection()).groupby(["run_id", "layer", "domain"])["share"].sum()
        for (run_id, _, _), s in sums.items():
            assert s == pytest.approx(total[run_id])


def test_domain_share_hand_computed():
    # 4 tokens, 1 layer, E=3, k=2: code tokens choose {0,1}, {0,2}; prose tokens {1,2}, {1,0}
    index = np.array([[[0, 1]], [[0, 2]], [[1, 2]], [[1, 0]]])
    con = store_from_routing(index=index, n_experts=3, seqs=[0, 0, 1, 1],
                             domains=np.array(["code", "code", "prose", "prose"], dtype=object))
    got = sp.domain_share(con, Selection()).set_index(["domain", "expert"])
    assert got.loc[("code", 0), "share"] == 1.0 and got.loc[("code", 1), "share"] == 0.5
    assert got.loc[("code", 2), "share"] == 0.5 and got.loc[("prose", 0), "share"] == 0.5
    assert got.loc[("prose", 1), "ratio"] == pytest.approx(1.0 / (2 / 3))
    first = sp.domain_share_first_choice(con, Selection()).set_index(["domain", "expert"])
    assert first.loc[("code", 0), "share"] == 1.0 and first.loc[("prose", 0), "share"] == 0.0
    assert first.loc[("prose", 1), "uniform"] == pytest.approx(1 / 3)


@SETTINGS
@given(E=st.integers(2, 9), k=st.integers(1, 4), reps=st.integers(1, 4), L=st.integers(1, 3))
def test_balanced_routing_gives_share_k_over_E(E, k, reps, L):
    k = min(k, E)
    T = E * reps * 2
    t = np.arange(T)
    # token t takes experts t, t+1, ..., t+k-1 (mod E) in every layer: each expert exactly k*T/E times per domain
    index = np.stack([(t[:, None] + np.arange(k)[None, :] + l) % E for l in range(L)], axis=1)  # [T, L, k]
    domains = np.where(t < T // 2, "x", "y").astype(object)
    con = store_from_routing(index=index, n_experts=E, seqs=(t >= T // 2).astype(int), domains=domains)
    got = sp.domain_share(con, Selection())
    assert len(got) == L * 2 * E
    np.testing.assert_allclose(got["share"], k / E)
    np.testing.assert_allclose(got["ratio"], 1.0)


def _permuted(routing, perm):
    r = dict(routing)
    r["index"] = perm[routing["index"]]
    r["logits"] = routing["logits"][..., np.argsort(perm)]  # expert e's logit moves to perm[e]
    return r


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_relabelling_experts_relabels_domain_share_and_coactivation(seed):
    routing = synthetic_routing(n_steps=1, n_layers=2, n_experts=5, top_k=2, seqs_per_step=4, seq_len=6, seed=seed)
    perm = np.random.default_rng(seed).permutation(5)
    c1 = store_from_routing(**routing)
    c2 = store_from_routing(**_permuted(routing, perm))
    a, b = sp.domain_share(c1, Selection()), sp.domain_share(c2, Selection())
    a["expert"] = perm[a["expert"]]
    key = ["layer", "domain", "expert"]
    pd.testing.assert_frame_equal(a.sort_values(key, ignore_index=True), b.sort_values(key, ignore_index=True))
    a, b = sp.coactivation(c1, Selection()), sp.coactivation(c2, Selection())
    a["expert_i"], a["expert_j"] = perm[a["expert_i"]], perm[a["expert_j"]]
    key = ["layer", "expert_i", "expert_j"]
    pd.testing.assert_frame_equal(a.sort_values(key, ignore_index=True), b.sort_values(key, ignore_index=True))


# -------------------------------------------------------------------------------------------------------------------
# vocabulary specialization and top tokens
# -------------------------------------------------------------------------------------------------------------------


def ref_vocab(routing, keep, sel, min_count, slot0_only):
    E, k = routing["logits"].shape[2], routing["index"].shape[2]
    out = {}
    for layer in layers_of(routing, sel):
        occ, per_expert = Counter(), defaultdict(Counter)
        for t in tokens_of(routing, keep, sel):
            occ[t["token"]] += 1
            for e in (t["index"][layer][:1] if slot0_only else t["index"][layer]):
                per_expert[t["token"]][int(e)] += 1
        for tok, n in occ.items():
            if n >= min_count:
                best = max(per_expert[tok].items(), key=lambda kv: (kv[1], -kv[0]))
                out[(layer, tok)] = (n, best[0], best[1], best[1] / n, (1 if slot0_only else k) / E)
    return out


@pytest.mark.parametrize("slot0_only", [False, True])
@pytest.mark.parametrize("sel,min_count", [(Selection(), 5), (Selection(steps=(0, 1), domains=("code",)), 2)])
def test_vocab_specialization_matches_loops(runs, sel, min_count, slot0_only):
    con, data = runs
    got = sp.vocab_specialization(con, sel, min_count=min_count, slot0_only=slot0_only)
    for run_id, (routing, keep) in data.items():
        ref = ref_vocab(routing, keep, sel, min_count, slot0_only)
        g = got[got.run_id == run_id]
        assert len(g) == len(ref) > 0
        for row in g.itertuples():
            n, expert, routed, spec, uniform = ref[(row.layer, row.token_id)]
            assert (row.count, row.expert, row.routed) == (n, expert, routed)
            assert row.specialization == pytest.approx(spec) and row.uniform == pytest.approx(uniform)
            assert row.text == (f"tok{row.token_id}" if run_id == "a" else None)
    summary = sp.vocab_specialization_summary(con, sel, min_count=min_count, slot0_only=slot0_only)
    for row in summary.itertuples():
        ref_all = ref_vocab(*data[row.run_id], sel, min_count, slot0_only)
        ref = [v for (layer, _), v in ref_all.items() if layer == row.layer]
        assert row.token_ids == len(ref) and row.occurrences == sum(v[0] for v in ref)
        assert row.specialization == pytest.approx(sum(v[0] * v[3] for v in ref) / sum(v[0] for v in ref))


def test_vocab_specialization_is_one_for_a_perfect_specialist_and_k_over_E_when_spread():
    # token 7 always goes to expert 2 (first) with a rotating second; token 9 cycles over all E=4 experts evenly
    T = 16
    tok = np.where(np.arange(T) < 8, 7, 9)
    first = np.where(tok == 7, 2, np.arange(T) % 4)
    second = np.where(tok == 7, (np.arange(T) % 3 + 3) % 4, (np.arange(T) + 1) % 4)
    index = np.stack([first, second], axis=1)[:, None, :]  # [T, 1, 2]
    con = store_from_routing(index=index, n_experts=4, token_ids=tok)
    got = sp.vocab_specialization(con, Selection(), min_count=1).set_index("token_id")
    assert got.loc[7, "specialization"] == 1.0 and got.loc[7, "expert"] == 2
    assert got.loc[9, "specialization"] == pytest.approx(2 / 4)  # = k/E: no specialization at all
    first_only = sp.vocab_specialization(con, Selection(), min_count=1, slot0_only=True).set_index("token_id")
    assert first_only.loc[7, "specialization"] == 1.0 and first_only.loc[9, "specialization"] == 0.25
    assert first_only.loc[9, "expert"] == 0  # a four-way tie goes to the lowest expert


def ref_top_tokens(routing, keep, sel, n, min_count):
    out = {}
    for layer in layers_of(routing, sel):
        toks = tokens_of(routing, keep, sel)
        token_count = Counter(t["token"] for t in toks)
        by_expert = defaultdict(Counter)
        for t in toks:
            for e in t["index"][layer]:
                by_expert[int(e)][t["token"]] += 1
        for e, counts in by_expert.items():
            total = sum(counts.values())
            lift = {x: Fraction(c, total) / Fraction(token_count[x], len(toks)) for x, c in counts.items()}
            by_count = sorted(counts, key=lambda x: (-counts[x], x))[:n]
            by_lift = sorted((x for x in counts if token_count[x] >= min_count),
                             key=lambda x: (-lift[x], -counts[x], x))[:n]
            out[(layer, e, "count")] = [(x, counts[x], token_count[x], float(lift[x])) for x in by_count]
            out[(layer, e, "lift")] = [(x, counts[x], token_count[x], float(lift[x])) for x in by_lift]
    return out


@pytest.mark.parametrize("sel", [Selection(), Selection(ranks=(0,), layers=(0,))])
def test_top_tokens_match_loops(runs, sel):
    con, data = runs
    got = sp.top_tokens(con, sel, n=3, min_count=4)
    for run_id, (routing, keep) in data.items():
        ref = ref_top_tokens(routing, keep, sel, 3, 4)
        g = got[got.run_id == run_id]
        assert set(g.groupby(["layer", "expert", "by"]).groups) == {key for key, v in ref.items() if v}
        for (layer, expert, by), grp in g.groupby(["layer", "expert", "by"]):
            grp = grp.sort_values("rank")
            assert grp["rank"].tolist() == list(range(1, len(grp) + 1))
            exp = ref[(layer, expert, by)]
            assert grp["token_id"].tolist() == [x[0] for x in exp]
            assert grp["count"].tolist() == [x[1] for x in exp]
            assert grp["token_count"].tolist() == [x[2] for x in exp]
            np.testing.assert_allclose(grp["lift"], [x[3] for x in exp])


# -------------------------------------------------------------------------------------------------------------------
# position
# -------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slot0_only", [False, True])
def test_position_share_matches_loops(runs, slot0_only):
    con, data = runs
    bins = (2, 5, 9)
    got = sp.position_share(con, Selection(), bins=bins, slot0_only=slot0_only)
    for run_id, (routing, keep) in data.items():
        E, k = routing["logits"].shape[2], routing["index"].shape[2]
        toks = tokens_of(routing, keep)
        g = got[got.run_id == run_id]
        assert len(g) == 2 * 3 * E
        for row in g.itertuples():
            lo, hi = bins[row.bucket], (bins[row.bucket + 1] if row.bucket + 1 < len(bins) else None)
            assert row.pos_lo == lo and (pd.isna(row.pos_hi) if hi is None else row.pos_hi == hi)
            inb = [t for t in toks if t["pos"] >= lo and (hi is None or t["pos"] < hi)]
            chosen = [t["index"][row.layer][:1] if slot0_only else t["index"][row.layer] for t in inb]
            assigned = sum(int(row.expert in c) for c in chosen)
            assert (row.tokens, row.assigned) == (len(inb), assigned)
            assert row.share == pytest.approx(assigned / len(inb))
            assert row.uniform == pytest.approx((1 if slot0_only else k) / E)


def test_position_share_default_bins_cover_every_position(runs):
    con, data = runs
    got = sp.position_share(con, Selection(run_ids=("a",), layers=(0,)))
    routing, keep = data["a"]
    per_bucket = got.groupby("bucket")["tokens"].first()
    assert per_bucket.sum() == keep.sum()
    assert got["pos_lo"].tolist()[:6 * 4:6] == [0, 1, 2, 4]  # buckets 0, 1, 2-3, 4-7


# -------------------------------------------------------------------------------------------------------------------
# co-activation
# -------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["routes", "aggregates"])
@pytest.mark.parametrize("sel", [
    Selection(), Selection(steps=(1, 1), domains=("prose",)), Selection(tags=("train",), layers=(1,)),
    Selection(steps=(1, 2), ranks=(0,), layers=(0,))])
def test_coactivation_matches_explicit_loops(runs, sel, source):
    """From the routes: over the kept tokens. From the aggregates (pair_stats): over every token."""
    con, data = runs
    if source == "aggregates" and sel.needs_sequences:
        with pytest.raises(sp.SpecializationError, match="domains or tags"):
            sp.coactivation(con, sel, source=source)
        return
    got = sp.coactivation(con, sel, source=source)
    for run_id, (routing, keep) in data.items():
        E, k = routing["logits"].shape[2], routing["index"].shape[2]
        toks = tokens_of(routing, keep if source == "routes" else np.ones_like(keep), sel)
        g = got[got.run_id == run_id]
        assert len(g) == len(layers_of(routing, sel)) * E * (E - 1)
        for layer in layers_of(routing, sel):
            single, pair = Counter(), Counter()
            for t in toks:
                chosen = [int(e) for e in t["index"][layer]]
                for i in chosen:
                    single[i] += 1
                    for j in chosen:
                        if i != j:
                            pair[(i, j)] += 1
            gl = g[g.layer == layer]
            nz = gl[gl.tokens_ij > 0]
            assert {(r.expert_i, r.expert_j): r.tokens_ij for r in nz.itertuples()} == dict(pair)
            for r in gl.itertuples():
                assert r.tokens_i == single[r.expert_i]
                if single[r.expert_i]:
                    assert r.p_j_given_i == pytest.approx(pair[(r.expert_i, r.expert_j)] / single[r.expert_i])
                else:
                    assert np.isnan(r.p_j_given_i)
            assert gl["baseline"].iloc[0] == pytest.approx((k - 1) / (E - 1))


def test_coactivation_hand_computed():
    # E=3, k=2: tokens {0,1}, {0,1}, {0,2}: P(1|0) = 2/3, P(0|1) = 1, P(2|1) = 0, P(1|2) = 0
    index = np.array([[[0, 1]], [[1, 0]], [[2, 0]]])
    got = sp.coactivation(store_from_routing(index=index, n_experts=3), Selection())
    p = got.set_index(["expert_i", "expert_j"])["p_j_given_i"]
    assert p[(0, 1)] == pytest.approx(2 / 3) and p[(0, 2)] == pytest.approx(1 / 3)
    assert p[(1, 0)] == 1.0 and p[(1, 2)] == 0.0 and p[(2, 0)] == 1.0 and p[(2, 1)] == 0.0


# -------------------------------------------------------------------------------------------------------------------
# consecutive tokens
# -------------------------------------------------------------------------------------------------------------------


def ref_consecutive(routing, keep, sel):
    E, k = routing["logits"].shape[2], routing["index"].shape[2]
    toks = tokens_of(routing, keep, sel)
    by_pos = {(t["step"], t["rank"], t["seq"], t["pos"]): t for t in toks}
    out = {}
    for layer in layers_of(routing, sel):
        pairs = same = first_in = overlap = 0
        for (step, rank, seq, pos), t in by_pos.items():
            prev = by_pos.get((step, rank, seq, pos - 1))
            if prev is None:
                continue
            a, b = [int(e) for e in prev["index"][layer]], [int(e) for e in t["index"][layer]]
            pairs += 1
            same += a[0] == b[0]
            first_in += b[0] in a
            overlap += bool(set(a) & set(b))
        p = Counter(int(t["index"][layer][0]) for t in toks)
        q = Counter(int(e) for t in toks for e in t["index"][layer])
        n = len(toks)
        out[layer] = dict(
            pairs=pairs, same_first=same, first_in_topk=first_in, topk_overlap=overlap,
            baseline_first=sum((c / n) ** 2 for c in p.values()),
            baseline_first_in_topk=sum((p[i] / n) * (q[i] / n) for i in range(E)),
            uniform_first=1 / E, uniform_first_in_topk=k / E,
            uniform_topk_overlap=1 - math.comb(E - k, k) / math.comb(E, k),
        )
    return out


@pytest.mark.parametrize("source", ["routes", "aggregates", "auto"])
@pytest.mark.parametrize("sel", [Selection(), Selection(steps=(1, 2), ranks=(0,), layers=(1,)),
                                 Selection(domains=("code",))])
def test_consecutive_agreement_matches_loops(runs, sel, source):
    """From the routes: pairs of kept tokens. From the aggregates (layer_stats): pairs of all tokens. `auto` takes
    the aggregates unless the selection has domains or tags, which only the routes can apply."""
    con, data = runs
    if source == "aggregates" and sel.needs_sequences:
        with pytest.raises(sp.SpecializationError, match="domains or tags"):
            sp.consecutive_agreement(con, sel, source=source)
        return
    got = sp.consecutive_agreement(con, sel, source=source)
    from_routes = source == "routes" or (source == "auto" and sel.needs_sequences)
    for run_id, (routing, keep) in data.items():
        ref = ref_consecutive(routing, keep if from_routes else np.ones_like(keep), sel)
        g = got[got.run_id == run_id].set_index("layer")
        assert sorted(g.index) == sorted(ref)
        for layer, exp in ref.items():
            row = g.loc[layer]
            for col in ("pairs", "same_first", "first_in_topk", "topk_overlap"):
                assert row[col] == exp[col], col
            assert row["rate_first"] == pytest.approx(exp["same_first"] / exp["pairs"])
            assert row["rate_first_in_topk"] == pytest.approx(exp["first_in_topk"] / exp["pairs"])
            assert row["rate_topk_overlap"] == pytest.approx(exp["topk_overlap"] / exp["pairs"])
            for col in ("baseline_first", "baseline_first_in_topk", "uniform_first", "uniform_first_in_topk",
                        "uniform_topk_overlap"):
                assert row[col] == pytest.approx(exp[col]), col


def test_consecutive_agreement_uniform_overlap_is_mixtrals_46_percent():
    index = np.array([[[0, 1]], [[0, 2]], [[3, 4]], [[5, 6]], [[7, 0]]])
    got = sp.consecutive_agreement(store_from_routing(index=index, n_experts=8), Selection()).iloc[0]
    assert got["uniform_topk_overlap"] == pytest.approx(1 - 6 / 8 * 5 / 7)
    # pairs: (0,1)->(0,2) same first; (0,2)->(3,4) nothing; (3,4)->(5,6) nothing; (5,6)->(7,0) nothing
    assert (got["pairs"], got["same_first"], got["first_in_topk"], got["topk_overlap"]) == (4, 1, 1, 1)


# -------------------------------------------------------------------------------------------------------------------
# layer flow
# -------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["routes", "aggregates"])
@pytest.mark.parametrize("slot0_only", [True, False])
def test_layer_flow_matches_loops(runs, slot0_only, source):
    """From the routes: over the kept tokens. From the aggregates (flow_stats): over every token."""
    con, data = runs
    sel = Selection(steps=(0, 1), layers=(1,))  # the selection's layers are replaced by the two asked for
    got = sp.layer_flow(con, sel, 0, 1, slot0_only=slot0_only, source=source)
    for run_id, (routing, keep) in data.items():
        links = Counter()
        for t in tokens_of(routing, keep if source == "routes" else np.ones_like(keep), sel):
            a = t["index"][0][:1] if slot0_only else t["index"][0]
            b = t["index"][1][:1] if slot0_only else t["index"][1]
            for i in a:
                for j in b:
                    links[(int(i), int(j))] += 1
        g = got[got.run_id == run_id]
        assert {(r.expert_a, r.expert_b): r.tokens for r in g.itertuples()} == dict(links)
        out_of = Counter()
        for (i, _), c in links.items():
            out_of[i] += c
        for r in g.itertuples():
            assert r.share_of_a == pytest.approx(links[(r.expert_a, r.expert_b)] / out_of[r.expert_a])
        assert (g.layer_a == 0).all() and (g.layer_b == 1).all()


# -------------------------------------------------------------------------------------------------------------------
# router saturation
# -------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe():
    """A fixed probe batch (2 seqs x 10 tokens, tag 'probe') at steps 0, 3 and 6, with train steps between that hold
    other tokens; the router drifts: each probe step changes the routing of some tokens."""
    rng = np.random.default_rng(7)
    n_seq, n_pos, L, E, k = 2, 10, 2, 6, 3
    probe_tokens = rng.integers(0, 50, n_seq * n_pos)
    idx0 = np.stack([np.stack([rng.permutation(E)[:k] for _ in range(L)]) for _ in range(n_seq * n_pos)])  # [T, L, k]
    steps, index, token_ids, tags, seqs, pos = [], [], [], [], [], []
    by_step = {}
    cur = idx0
    for step in range(7):
        if step % 3 == 0:
            if step:
                cur = cur.copy()
                for t in rng.choice(len(cur), 8, replace=False):  # re-route some tokens in a random layer
                    cur[t, rng.integers(L)] = rng.permutation(E)[:k]
            by_step[step] = cur
            toks, tag, idx = probe_tokens, "probe", cur
        else:
            toks, tag = rng.integers(0, 50, n_seq * n_pos), "train"
            idx = np.stack([np.stack([rng.permutation(E)[:k] for _ in range(L)]) for _ in range(n_seq * n_pos)])
        steps += [step] * len(toks)
        index.append(idx)
        token_ids.append(toks)
        tags += [tag] * len(toks)
        seqs.append(np.repeat(np.arange(n_seq), n_pos))
        pos.append(np.tile(np.arange(n_pos), n_seq))
    con = store_from_routing(index=np.concatenate(index), n_experts=E, steps=np.array(steps),
                             token_ids=np.concatenate(token_ids), tags=np.array(tags, dtype=object),
                             seqs=np.concatenate(seqs), pos=np.concatenate(pos), run_id="p")
    return con, by_step, k


@pytest.mark.parametrize("source", ["routes", "aggregates"])
def test_router_saturation_matches_set_overlap(probe, source):
    con, by_step, k = probe
    got = sp.router_saturation(con, Selection(tags=("probe",)), 3, 6, source=source)
    assert list(got.columns) == [
        "run_id", "step", "ref_step", "layer", "tokens", "overlap", "saturation", "top1_agreement"]
    a, b = by_step[3], by_step[6]
    for row in got.itertuples():
        inter = [len(set(a[t, row.layer]) & set(b[t, row.layer])) for t in range(len(a))]
        assert (row.step, row.ref_step, row.tokens, row.overlap) == (3, 6, len(a), sum(inter))
        assert row.saturation == pytest.approx(np.mean(inter) / k)
        assert row.top1_agreement == pytest.approx(np.mean(a[:, row.layer, 0] == b[:, row.layer, 0]))
    assert (got["saturation"] < 1).any()


@pytest.mark.parametrize("source", ["routes", "aggregates"])
def test_router_saturation_ignores_the_selected_steps_also_with_tags(probe, source):
    """router_saturation widens the selection's steps to the two it is given; the constant step prefilter that
    tags and domains add must not narrow it back (it is computed without the selection's steps)."""
    con, _, _ = probe
    whole = sp.router_saturation(con, Selection(tags=("probe",)), 3, 6, source=source)
    narrowed = sp.router_saturation(con, Selection(tags=("probe",), steps=(6, 6)), 3, 6, source=source)
    assert len(whole) and narrowed.equals(whole)


@pytest.mark.parametrize("source", ["routes", "aggregates"])
def test_saturation_curve_reaches_one_at_the_reference(probe, source):
    con, by_step, k = probe
    got = sp.saturation_curve(con, Selection(tags=("probe",)), source=source)
    assert sorted(set(got["step"])) == [0, 3, 6] and (got["ref_step"] == 6).all()
    assert (got[got.step == 6]["saturation"] == 1.0).all()
    first = got[got.step == 0].set_index("layer")["saturation"]
    for layer, s in first.items():
        a, b = by_step[0][:, layer], by_step[6][:, layer]
        assert s == pytest.approx(np.mean([len(set(x) & set(y)) for x, y in zip(a, b)]) / k)


@pytest.mark.parametrize("sel", [Selection(tags=("probe",)), Selection(tags=("probe",), layers=(1,), steps=(3, 6)),
                                 Selection()])
def test_saturation_from_probe_sets_equals_the_routes_version(probe, sel):
    """probe_sets holds the probe tokens' expert sets: 'auto' reads it where it covers the comparison and gives
    exactly what the routes give; where it cannot (the curve over every step, train steps included; a domain),
    'aggregates' says why."""
    con, _, _ = probe
    pd.testing.assert_frame_equal(sp.router_saturation(con, sel, 0, 6),
                                  sp.router_saturation(con, sel, 0, 6, source="routes"))
    if sel.tags:
        pd.testing.assert_frame_equal(sp.saturation_curve(con, sel), sp.saturation_curve(con, sel, source="routes"))
    else:
        with pytest.raises(sp.SpecializationError, match="probe_sets holds the probe steps"):
            sp.saturation_curve(con, sel, source="aggregates")
    with pytest.raises(sp.SpecializationError, match="probe_sets holds the probe steps"):
        sp.router_saturation(con, sel.with_(domains=("code",)), 0, 6, source="aggregates")


def test_saturation_over_more_than_64_experts_reads_the_routes():
    """probe_sets stores expert sets as 64-bit masks: wider layers read the routes."""
    rng = np.random.default_rng(3)
    T, E, k = 12, 70, 2
    index = np.stack([np.stack([rng.permutation(E)[:k]]) for _ in range(2 * T)])  # [2T, L=1, k]
    con = store_from_routing(index=index, n_experts=E, steps=np.repeat([0, 1], T),
                             tags=np.array(["probe"] * (2 * T), dtype=object), token_ids=np.tile(np.arange(T), 2))
    with pytest.raises(sp.SpecializationError, match="probe_sets holds the probe steps"):
        sp.router_saturation(con, Selection(), 0, 1, source="aggregates")
    got = sp.router_saturation(con, Selection(), 0, 1)
    want = sum(len(set(index[t, 0]) & set(index[T + t, 0])) for t in range(T))
    assert got["overlap"].tolist() == [want] and got["tokens"].tolist() == [T]


def test_router_saturation_refuses_different_tokens_and_missing_steps(probe):
    con, _, _ = probe
    with pytest.raises(sp.SpecializationError, match="different token ids"):
        sp.router_saturation(con, Selection(), 1, 6)  # step 1 is a train step with other tokens
    with pytest.raises(sp.SpecializationError, match="no token is recorded at both"):
        sp.router_saturation(con, Selection(tags=("probe",)), 1, 6)


# -------------------------------------------------------------------------------------------------------------------
# mutual information
# -------------------------------------------------------------------------------------------------------------------


def ref_nmi(pairs):
    """Arithmetic-mean NMI of a list of (x, y) observations from the contingency table (sklearn's definition)."""
    xs, ys = sorted({p[0] for p in pairs}), sorted({p[1] for p in pairs})
    table = np.zeros((len(xs), len(ys)))
    for x, y in pairs:
        table[xs.index(x), ys.index(y)] += 1
    n = table.sum()
    pxy, px, py = table / n, table.sum(1) / n, table.sum(0) / n
    nz = pxy > 0
    mi = float((pxy[nz] * np.log(pxy[nz] / np.outer(px, py)[nz])).sum())
    hx, hy = float(-(px * np.log(px)).sum()), float(-(py * np.log(py)).sum())
    if len(xs) == len(ys) == 1:
        return mi, hx, hy, 1.0
    return mi, hx, hy, (mi / ((hx + hy) / 2) if hx + hy > 0 else 0.0)


@pytest.mark.parametrize("sel", [Selection(), Selection(steps=(0, 1), ranks=(1,))])
def test_mutual_information_matches_contingency_formula(runs, sel):
    con, data = runs
    got = sp.mutual_information(con, sel)
    for run_id, (routing, keep) in data.items():
        toks = tokens_of(routing, keep, sel)
        g = got[got.run_id == run_id]
        assert len(g) == (len(layers_of(routing, sel)) * 4 if toks else 0)  # run b has no rank 1
        for row in g.itertuples():
            key = "token" if row.variable == "token" else "domain"
            width = 1 if row.slots == "first" else None
            pairs = [(t[key], int(e)) for t in toks for e in t["index"][row.layer][:width]]
            mi, hx, he, nmi = ref_nmi(pairs)
            assert row.n == len(pairs)
            assert row.mi == pytest.approx(mi, abs=1e-9) and row.nmi == pytest.approx(nmi, abs=1e-9)
            assert row.h_variable == pytest.approx(hx) and row.h_expert == pytest.approx(he)


def _domain_routed(n_tok, shuffle, seed):
    """E=4, k=1 routing where domain d (of 4) always goes to expert d, optionally with the domains shuffled."""
    rng = np.random.default_rng(seed)
    seqs = np.repeat(np.arange(n_tok // 8), 8)
    dom_of_seq = rng.integers(0, 4, seqs.max() + 1)
    dom = dom_of_seq[seqs]
    expert = dom if not shuffle else rng.integers(0, 4, n_tok)
    names = np.array(["code", "prose", "math", "it"], dtype=object)
    return store_from_routing(index=expert[:, None, None], n_experts=4, seqs=seqs, domains=names[dom],
                              token_ids=rng.integers(0, 500, n_tok))


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_perfect_domain_experts_give_nmi_one_and_shuffled_give_about_zero(seed):
    perfect = sp.mutual_information(_domain_routed(4000, False, seed), Selection(), variables=("domain",))
    assert perfect["nmi"].to_numpy() == pytest.approx(1.0)
    shuffled = sp.mutual_information(_domain_routed(4000, True, seed), Selection(), variables=("domain",))
    assert (shuffled["nmi"] < 0.01).all()


def test_nmi_conventions_for_constant_variables():
    # one domain, one expert: both constant -> 1 (sklearn); one domain, two experts: 0
    con = store_from_routing(index=np.zeros((6, 1, 1), dtype=int), n_experts=2,
                             domains=np.array(["code"] * 6, dtype=object), token_ids=np.arange(6) % 2)
    got = sp.mutual_information(con, Selection()).set_index(["variable", "slots"])
    assert got.loc[("domain", "first"), "nmi"] == 1.0
    assert got.loc[("token", "first"), "nmi"] == 0.0


# -------------------------------------------------------------------------------------------------------------------
# selections, empties and errors
# -------------------------------------------------------------------------------------------------------------------


def test_run_selection_and_side_by_side_runs(runs):
    con, _ = runs
    both = sp.coactivation(con, Selection())
    only_b = sp.coactivation(con, Selection(run_ids=("b",)))
    assert set(both.run_id) == {"a", "b"} and set(only_b.run_id) == {"b"}
    pd.testing.assert_frame_equal(both[both.run_id == "b"].reset_index(drop=True), only_b)


@pytest.mark.parametrize("fn", [
    sp.domain_share, sp.vocab_specialization, sp.vocab_specialization_summary, sp.top_tokens, sp.position_share,
    sp.coactivation, sp.consecutive_agreement, sp.mutual_information, sp.saturation_curve,
    lambda con, sel: sp.layer_flow(con, sel, 0, 1),
])
def test_empty_selection_gives_empty_frame_with_columns(runs, fn):
    con, _ = runs
    for sel in (Selection(run_ids=("nope",)), Selection(domains=("klingon",))):
        got = fn(con, sel)
        assert got.empty and "run_id" in got.columns and ("layer" in got.columns or "layer_a" in got.columns)


def test_bad_arguments_raise_clear_errors(runs):
    con, _ = runs
    with pytest.raises(sp.SpecializationError, match="min_count"):
        sp.vocab_specialization(con, Selection(), min_count=0)
    with pytest.raises(sp.SpecializationError, match="strictly increasing"):
        sp.position_share(con, Selection(), bins=(0, 4, 4))
    with pytest.raises(sp.SpecializationError, match="variables"):
        sp.mutual_information(con, Selection(), variables=("color",))
    with pytest.raises(MoevizError, match="moeviz tables"):
        import duckdb

        sp.domain_share(duckdb.connect(), Selection())


def test_consecutive_agreement_first_choice_only_agrees_with_the_full_version(runs):
    con, _ = runs
    full = sp.consecutive_agreement(con, Selection(steps=(0, 1)))
    fast = sp.consecutive_agreement(con, Selection(steps=(0, 1)), topk=False)
    cols = ["run_id", "layer", "pairs", "same_first", "rate_first", "baseline_first", "uniform_first",
            "baseline_first_in_topk", "uniform_first_in_topk", "uniform_topk_overlap"]
    pd.testing.assert_frame_equal(full[cols], fast[cols])
    assert fast["rate_topk_overlap"].isna().all() and fast["first_in_topk"].isna().all()


def test_domain_share_keeps_tokens_without_a_domain_apart():
    index = np.array([[[0]], [[1]], [[1]], [[2]]])  # k=1, E=3; seq 0 'code', seq 1 no domain
    con = store_from_routing(index=index, n_experts=3, seqs=[0, 0, 1, 1],
                             domains=np.array(["code", "code", None, None], dtype=object))
    got = sp.domain_share(con, Selection())
    assert len(got) == 6 and got["domain"].isna().sum() == 3
    none = got[got.domain.isna()].set_index("expert")["share"]
    code = got[got.domain == "code"].set_index("expert")["share"]
    assert none.tolist() == [0.0, 0.5, 0.5] and code.tolist() == [0.5, 0.5, 0.0]
    only_code = sp.domain_share(con, Selection(domains=("code",)))
    assert (only_code.domain == "code").all() and only_code["tokens"].tolist() == [2, 2, 2]


def test_layer_flow_reads_flow_stats_only_where_they_hold_the_two_layers():
    """flow_stats holds each layer and the next: other pairs and domain selections read the routes ('auto'),
    or raise with the reason ('aggregates'); without sampling both sources agree."""
    r, _ = _routing(9, n_steps=2, n_layers=3, n_experts=5, top_k=2, seqs_per_step=2, seq_len=10,
                    domains=("code", "prose"))
    con = store_from_routing(**r)
    for a, b in ((0, 1), (1, 2)):
        pd.testing.assert_frame_equal(sp.layer_flow(con, Selection(), a, b, source="aggregates"),
                                      sp.layer_flow(con, Selection(), a, b, source="routes"))
    far = sp.layer_flow(con, Selection(), 0, 2)  # not in flow_stats: from the routes
    pd.testing.assert_frame_equal(far, sp.layer_flow(con, Selection(), 0, 2, source="routes"))
    for sel, a, b in ((Selection(), 0, 2), (Selection(domains=("code",)), 0, 1), (Selection(), 1, 0)):
        with pytest.raises(sp.SpecializationError, match=f"flow_stats does not hold layers {a} -> {b}"):
            sp.layer_flow(con, sel, a, b, source="aggregates")


def test_layer_flow_counts_only_tokens_recorded_in_both_layers():
    index = np.array([[[0], [1]], [[0], [2]], [[1], [2]]])  # [T=3, L=2, k=1]
    con = store_from_routing(index=index, n_experts=3)
    con.execute("DELETE FROM routes WHERE layer = 1 AND pos = 2")  # token 2 is not recorded in layer 1
    got = sp.layer_flow(con, Selection(), 0, 1, source="routes")
    assert {(r.expert_a, r.expert_b): r.tokens for r in got.itertuples()} == {(0, 1): 1, (0, 2): 1}
    assert got["share_of_a"].tolist() == [0.5, 0.5]
    both = sp.layer_flow(con, Selection(), 0, 1, slot0_only=False, source="routes")
    assert both["tokens"].sum() == 2


def test_token_keys_too_wide_for_bigint_still_pair_the_right_tokens():
    # steps 0 and 2**40 with positions up to 4999: (steps x ranks x seqs x positions) overflows 62 bits -> HUGEINT keys
    rng = np.random.default_rng(5)
    T = 40
    steps = np.repeat([0, 2**40], T // 2)
    pos = np.tile(np.r_[np.arange(10), 4990 + np.arange(10)], 2)
    seqs = np.tile(np.repeat([0, 4000], 10), 2)
    index = np.stack([rng.permutation(5)[:2] for _ in range(T)])[:, None, :]  # [T, 1, 2]
    con = store_from_routing(index=index, n_experts=5, steps=steps, seqs=seqs, pos=pos)
    got = sp.consecutive_agreement(con, Selection(), source="routes").iloc[0]
    by = {(s, q, p): i for i, (s, q, p) in enumerate(zip(steps, seqs, pos))}
    prev = [(by[(s, q, p - 1)], i) for (s, q, p), i in by.items() if (s, q, p - 1) in by]
    assert got["pairs"] == len(prev) == 36
    assert got["same_first"] == sum(index[a, 0, 0] == index[b, 0, 0] for a, b in prev)
    co = sp.coactivation(con, Selection(), source="routes")
    assert co["tokens_ij"].sum() == T * 2  # every token adds the ordered pairs (i, j) and (j, i)


# -------------------------------------------------------------------------------------------------------------------
# sources: the aggregate tables (pair_stats, layer_stats' adjacency, token_stats, sequence_stats) against routes
# -------------------------------------------------------------------------------------------------------------------

ROUTE_STATS_FUNCTIONS = {
    "domain_share": lambda con, sel, source: sp.domain_share(con, sel, source=source),
    "domain_share_first_choice": lambda con, sel, source: sp.domain_share_first_choice(con, sel, source=source),
    "vocab_specialization": lambda con, sel, source: sp.vocab_specialization(con, sel, min_count=2, source=source),
    "vocab_specialization_slot0": lambda con, sel, source: sp.vocab_specialization(
        con, sel, min_count=2, slot0_only=True, source=source),
    "vocab_specialization_summary": lambda con, sel, source: sp.vocab_specialization_summary(con, sel, source=source),
    "top_tokens": lambda con, sel, source: sp.top_tokens(con, sel, n=3, min_count=2, source=source),
    "mutual_information": lambda con, sel, source: sp.mutual_information(con, sel, source=source),
    "position_share": lambda con, sel, source: sp.position_share(con, sel, bins=(0, 2, 5), source=source),
    "position_share_slot0": lambda con, sel, source: sp.position_share(con, sel, slot0_only=True, source=source),
}


@pytest.mark.parametrize("name", sorted(ROUTE_STATS_FUNCTIONS))
@pytest.mark.parametrize("sel", [Selection(), Selection(ranks=(1,), layers=(1,)), Selection(steps=(1, 2)),
                                 Selection(domains=("code", "math"), tags=("train",))])
def test_token_and_sequence_stats_give_what_the_routes_give(runs, name, sel):
    """token_stats and sequence_stats count the same (kept) routes, so every analysis reading them must equal its
    routes version exactly, for every selection they can serve; `auto` picks them when they can."""
    con, _ = runs
    fn = ROUTE_STATS_FUNCTIONS[name]
    want = fn(con, sel, "routes")
    assert len(want)
    pd.testing.assert_frame_equal(fn(con, sel, "auto"), want)
    whole_run = name.startswith(("vocab", "top_tokens", "mutual", "position"))
    if whole_run and (sel.steps is not None or sel.needs_sequences):
        with pytest.raises(sp.SpecializationError, match="_stats covers whole runs"):
            fn(con, sel, "aggregates")
    else:
        pd.testing.assert_frame_equal(fn(con, sel, "aggregates"), want)


def test_auto_reads_routes_when_the_aggregates_are_missing_and_aggregates_says_why():
    """A store written without the newer aggregates (an older moeviz, RunWriter without them, a live run)."""
    r, keep = _routing(7, n_steps=2, n_layers=2, n_experts=6, top_k=2, seqs_per_step=2, seq_len=10)
    old = store_from_routing(**r, keep=keep, extra_stats=False)
    new = store_from_routing(**r, keep=keep)
    sel = Selection()
    pd.testing.assert_frame_equal(sp.coactivation(old, sel), sp.coactivation(new, sel, source="routes"))
    pd.testing.assert_frame_equal(sp.vocab_specialization(old, sel), sp.vocab_specialization(new, sel))
    with pytest.raises(sp.SpecializationError, match="layer_stats.coactive_pairs is not recorded"):
        sp.coactivation(old, sel, source="aggregates")
    with pytest.raises(sp.SpecializationError, match="sequence_stats exists once a run is compacted"):
        sp.domain_share(old, sel, source="aggregates")
    with pytest.raises(sp.SpecializationError, match="source must be one of"):
        sp.coactivation(new, sel, source="parquet")


def test_auto_reads_routes_on_a_connection_without_the_aggregate_tables():
    """A user's own copy of a few tables in their first form (runs without route_stats_complete, layer_stats
    without the adjacency columns, no pair/token/position/sequence stats): every analysis answers, from routes."""
    import duckdb

    r, keep = _routing(8, n_steps=2, n_layers=2, n_experts=5, top_k=2, seqs_per_step=2, seq_len=8)
    full = store_from_routing(**r, keep=keep)
    copy = duckdb.connect()
    for t in ("runs", "layers", "routes", "sequences", "step_stats", "vocab"):
        copy.register("_t", full.execute(f"SELECT * FROM {t}").df())
        copy.execute(f"CREATE TABLE {t} AS SELECT * FROM _t")
    copy.execute("ALTER TABLE runs DROP COLUMN route_stats_complete")  # `runs` as the first schema had it
    copy.register("_t", full.execute("SELECT run_id, step, rank, layer, tokens, z_loss_sum, entropy_sum, dropped "
                                     "FROM layer_stats").df())
    copy.execute("CREATE TABLE layer_stats AS SELECT * FROM _t")
    sel = Selection()
    for fn in (sp.coactivation, sp.consecutive_agreement, sp.domain_share, sp.vocab_specialization,
               sp.position_share, sp.mutual_information):
        pd.testing.assert_frame_equal(fn(copy, sel), fn(full, sel, source="routes"))
