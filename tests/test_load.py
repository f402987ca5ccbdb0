"""moeviz.analyses.load against hand-computed cases and a numpy brute force over random routing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeviz.analyses.load import AnalysisError, expert_load, imbalance, load_matrix
from moeviz.selection import Selection
from moeviz.testing import store_from_routing, synthetic_routing

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- numpy references ----------------------------------------------------------------------------------------

def ref_counts(index: np.ndarray, n_experts: int, mask: np.ndarray, layer: int, slot0: bool = False) -> np.ndarray:
    """Assignments per expert of one layer over the tokens in `mask` (all k slots, or slot 0)."""
    chosen = index[mask, layer, :1] if slot0 else index[mask, layer, :]
    return np.bincount(chosen.ravel(), minlength=n_experts)


def ref_metrics(counts: np.ndarray, dead_threshold: float = 0.1, top_n: int = 1) -> dict:
    counts = counts.astype(float)
    e = len(counts)
    mean, mx = counts.mean(), counts.max()
    frac = counts / counts.sum()
    nz = frac[frac > 0]
    return {
        "max_over_mean": mx / mean,
        "max_vio": (mx - mean) / mean,
        "cv": counts.std() / mean,
        "norm_entropy": float(-(nz * np.log(nz)).sum() / math.log(e)),
        "dead_experts": int((frac < dead_threshold / e).sum()),
        "top_n_coverage": float(np.sort(frac)[::-1][:top_n].sum()),
    }


def random_topk(rng, n_tokens: int, n_layers: int, n_experts: int, k: int, skew: float = 0.0) -> np.ndarray:
    """Distinct top-k experts per token and layer, optionally skewed towards low expert ids. # [T, L, k]"""
    scores = rng.random((n_tokens, n_layers, n_experts)) - skew * np.arange(n_experts) / n_experts
    return np.argsort(-scores, axis=-1)[..., :k]


# ---- hand-computed -------------------------------------------------------------------------------------------

def test_imbalance_hand_computed():
    # 4 tokens, 1 layer, k=1, 4 experts: loads [3, 1, 0, 0]
    con = store_from_routing(np.array([0, 0, 0, 1]).reshape(4, 1, 1), n_experts=4)
    row = imbalance(con, by_step=False, dead_threshold=0.1).iloc[0]
    assert row["assignments"] == 4 and row["n_experts"] == 4 and row["tokens"] == 4
    assert row["max_over_mean"] == pytest.approx(3.0)
    assert row["max_vio"] == pytest.approx(2.0)
    assert row["cv"] == pytest.approx(math.sqrt(((3 - 1) ** 2 + 0 + 1 + 1) / 4))
    assert row["norm_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    assert row["dead_experts"] == 2 and row["dead_share"] == pytest.approx(0.5)
    assert row["top_n"] == 1 and row["top_n_coverage"] == pytest.approx(0.75)


def test_expert_load_hand_computed_top2_and_grid():
    # 3 tokens, k=2, 5 experts; expert 4 never chosen still gets a row with 0
    index = np.array([[[0, 1]], [[1, 2]], [[1, 0]]])
    con = store_from_routing(index, n_experts=5)
    df = expert_load(con, by_step=False).set_index("expert")
    assert list(df.index) == [0, 1, 2, 3, 4]
    assert df["assigned"].tolist() == [2, 3, 1, 0, 0]
    assert df["first_choice"].tolist() == [1, 2, 0, 0, 0]
    assert df["load_fraction"].tolist() == pytest.approx([2 / 6, 3 / 6, 1 / 6, 0, 0])
    assert df["relative_load"].tolist() == pytest.approx([5 * 2 / 6, 5 * 3 / 6, 5 / 6, 0, 0])
    assert df["token_share"].tolist() == pytest.approx([2 / 3, 1, 1 / 3, 0, 0])
    assert (df["tokens"] == 3).all() and (df["top_k"] == 2).all()
    # top-N coverage defaults to N = k = 2: the two busiest take 5/6
    assert imbalance(con, by_step=False).iloc[0]["top_n_coverage"] == pytest.approx(5 / 6)
    assert imbalance(con, by_step=False, top_n=3).iloc[0]["top_n_coverage"] == pytest.approx(1.0)
    imb_first = imbalance(con, by_step=False, count="first_choice").iloc[0]
    assert imb_first["max_vio"] == pytest.approx((2 - 3 / 5) / (3 / 5))


# ---- brute force over random routing ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def routing():
    return synthetic_routing(n_steps=5, n_layers=3, n_experts=8, top_k=2, seqs_per_step=3, seq_len=20, n_ranks=2,
                             domains=("code", "prose", "math"), skew=1.5, seed=7)


@pytest.fixture(scope="module")
def store(routing):
    return store_from_routing(**routing)


def _token_mask(r, steps=None, ranks=None, domains=None):
    m = np.ones(len(r["steps"]), dtype=bool)
    if steps is not None:
        m &= (r["steps"] >= steps[0]) & (r["steps"] <= steps[1])
    if ranks is not None:
        m &= np.isin(r["ranks"], ranks)
    if domains is not None:
        m &= np.isin(r["domains"], domains)
    return m


@pytest.mark.parametrize("sel_kwargs", [
    {},
    {"steps": (1, 3)},
    {"layers": (0, 2)},
    {"ranks": (1,)},
    {"steps": (2, 4), "layers": (1,), "ranks": (0,)},
    {"domains": ("code",)},
    {"domains": ("prose", "math"), "steps": (0, 2), "layers": (2,)},
])
def test_expert_load_matches_brute_force_filter(routing, store, sel_kwargs):
    sel = Selection(**sel_kwargs)
    df = expert_load(store, sel, by_step=True)
    layers = sel.layers or (0, 1, 2)
    steps = sorted(set(routing["steps"][_token_mask(routing, sel.steps, sel.ranks, sel.domains)]))
    assert sorted(df["layer"].unique()) == list(layers)
    assert sorted(df["step"].unique()) == steps
    for step in steps:
        mask = _token_mask(routing, (step, step), sel.ranks, sel.domains)
        for layer in layers:
            got = df[(df.step == step) & (df.layer == layer)].sort_values("expert")
            want = ref_counts(routing["index"], 8, mask, layer)
            assert got["assigned"].tolist() == want.tolist()
            assert got["first_choice"].tolist() == ref_counts(routing["index"], 8, mask, layer, slot0=True).tolist()
            assert (got["tokens"] == mask.sum()).all()
            if sel.domains is None:  # router probabilities are exact aggregates; routes do not hold them
                probs = np.exp(routing["logits"][mask, layer]) / np.exp(routing["logits"][mask, layer]).sum(-1, keepdims=True)
                np.testing.assert_allclose(got["prob_sum"], probs.sum(0), rtol=1e-9)
            else:
                assert got["prob_sum"].isna().all()


@pytest.mark.parametrize("sel_kwargs", [{}, {"steps": (0, 1), "ranks": (1,)}, {"domains": ("math",)}])
def test_imbalance_matches_brute_force(routing, store, sel_kwargs):
    sel = Selection(**sel_kwargs)
    for by_step in (True, False):
        df = imbalance(store, sel, by_step=by_step, dead_threshold=0.3, top_n=3)
        for row in df.itertuples(index=False):
            steps = (row.step, row.step) if by_step else sel.steps
            mask = _token_mask(routing, steps, sel.ranks, sel.domains)
            want = ref_metrics(ref_counts(routing["index"], 8, mask, row.layer), dead_threshold=0.3, top_n=3)
            for name, value in want.items():
                assert getattr(row, name) == pytest.approx(value, rel=1e-9), (name, row)


def test_load_matrix_pools_steps(routing, store):
    df = load_matrix(store, Selection(layers=(1,)))
    want = ref_counts(routing["index"], 8, np.ones(len(routing["steps"]), bool), 1)
    assert "step" not in df.columns
    assert df.sort_values("expert")["assigned"].tolist() == want.tolist()
    assert df["load_fraction"].sum() == pytest.approx(1.0)


def test_domain_selection_uses_only_kept_tokens():
    """With sampling, per-token results come from the kept tokens while aggregates count every token."""
    r = synthetic_routing(n_steps=2, n_layers=1, n_experts=4, top_k=1, seqs_per_step=4, seq_len=8, seed=3)
    keep = np.arange(len(r["steps"])) % 3 != 0
    con = store_from_routing(**r, keep=keep)
    dom = expert_load(con, Selection(domains=("code", "prose")), by_step=False).sort_values("expert")
    assert dom["assigned"].tolist() == np.bincount(r["index"][keep, 0, 0], minlength=4).tolist()
    exact = expert_load(con, Selection(), by_step=False).sort_values("expert")
    assert exact["assigned"].tolist() == np.bincount(r["index"][:, 0, 0], minlength=4).tolist()


def test_two_runs_side_by_side():
    rng = np.random.default_rng(0)
    a, b = random_topk(rng, 40, 2, 6, 2), random_topk(rng, 50, 2, 6, 2, skew=3.0)
    con = store_from_routing(a, n_experts=6, run_id="a")
    store_from_routing(b, n_experts=6, run_id="b", con=con)
    df = imbalance(con, by_step=False)
    assert sorted(df["run_id"].unique()) == ["a", "b"]
    for run, idx in (("a", a), ("b", b)):
        for layer in (0, 1):
            got = df[(df.run_id == run) & (df.layer == layer)].iloc[0]
            want = ref_metrics(ref_counts(idx, 6, np.ones(len(idx), bool), layer), top_n=2)
            assert got["max_vio"] == pytest.approx(want["max_vio"])
            assert got["norm_entropy"] == pytest.approx(want["norm_entropy"])
    only_b = imbalance(con, Selection(run_ids=("b",)), by_step=False)
    assert set(only_b["run_id"]) == {"b"}


# ---- properties -----------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n_experts=st.integers(2, 10), k=st.integers(1, 3), skew=st.floats(0, 4))
def test_imbalance_invariant_under_expert_relabelling(seed, n_experts, k, skew):
    k = min(k, n_experts)
    rng = np.random.default_rng(seed)
    index = random_topk(rng, 30, 2, n_experts, k, skew)
    perm = rng.permutation(n_experts)
    a = imbalance(store_from_routing(index, n_experts=n_experts), by_step=False)
    b = imbalance(store_from_routing(perm[index], n_experts=n_experts), by_step=False)
    cols = ["max_over_mean", "max_vio", "cv", "norm_entropy", "dead_experts", "top_n_coverage"]
    np.testing.assert_allclose(a[cols].to_numpy(float), b[cols].to_numpy(float), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(n_experts=st.integers(2, 12), k=st.integers(1, 4), reps=st.integers(1, 4))
def test_uniform_routing_gives_uniform_values(n_experts, k, reps):
    k = min(k, n_experts)
    t = np.arange(n_experts * reps)
    index = ((t[:, None] + np.arange(k)[None, :]) % n_experts)[:, None, :]  # [T, 1, k]: each expert T*k/E times
    row = imbalance(store_from_routing(index, n_experts=n_experts), by_step=False).iloc[0]
    assert row["max_vio"] == pytest.approx(0, abs=1e-12)
    assert row["max_over_mean"] == pytest.approx(1)
    assert row["cv"] == pytest.approx(0, abs=1e-12)
    assert row["norm_entropy"] == pytest.approx(1)
    assert row["dead_experts"] == 0
    assert row["top_n_coverage"] == pytest.approx(k / n_experts)


# ---- errors ---------------------------------------------------------------------------------------------------

def test_bad_arguments_raise_clear_errors(store):
    with pytest.raises(AnalysisError, match="count must be"):
        imbalance(store, count="tokens")
    with pytest.raises(AnalysisError, match="dead_threshold"):
        imbalance(store, dead_threshold=2)
    with pytest.raises(AnalysisError, match="top_n"):
        imbalance(store, top_n=0)


def test_missing_tables_say_what_to_do():
    import duckdb

    with pytest.raises(AnalysisError, match="open_store"):
        expert_load(duckdb.connect(), Selection())


def test_empty_selection_returns_empty_frame(store):
    assert imbalance(store, Selection(steps=(100, 200))).empty
    assert expert_load(store, Selection(layers=())).empty


def test_layer_shape_falls_back_to_runs_when_layers_are_missing():
    index = np.array([0, 0, 1]).reshape(3, 1, 1)
    con = store_from_routing(index, n_experts=4)
    con.execute("DELETE FROM layers")
    df = expert_load(con, by_step=False)
    assert df["expert"].tolist() == [0, 1, 2, 3] and (df["n_experts"] == 4).all()
    assert imbalance(con, by_step=False).iloc[0]["dead_experts"] == 2
