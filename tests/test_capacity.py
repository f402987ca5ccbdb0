"""moeviz.analyses.capacity against hand-computed cases, a brute-force Python loop, and Switch Transformers' own router."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from moeviz.analyses.capacity import capacity_drops, drop_curve, expert_capacity
from moeviz.analyses.load import AnalysisError
from moeviz.selection import Selection
from moeviz.testing import store_from_routing, synthetic_routing


# ---- brute force: the capacity rule written as a plain loop ----------------------------------------------------

def brute_force_dropped(r: dict, cf: float, policy: str, group: str, n_experts: int) -> np.ndarray:
    """[T, L, k] bool: which assignments a capacity-limited router drops, one group and expert at a time."""
    index, weights = r["index"], r["weights"]
    n_tok, n_lay, k = index.shape
    dropped = np.zeros(index.shape, dtype=bool)
    groups: dict[tuple, list[int]] = {}
    for t in range(n_tok):
        key = (r["steps"][t], r["ranks"][t]) + ((r["seqs"][t],) if group == "sequence" else ())
        groups.setdefault(key, []).append(t)
    for tokens in groups.values():
        cap = math.ceil(cf * len(tokens) * k / n_experts - 1e-9)
        for layer in range(n_lay):
            for e in range(n_experts):
                queue = [(t, s) for t in tokens for s in range(k) if index[t, layer, s] == e]
                if policy == "position":
                    queue.sort(key=lambda ts: (ts[1], r["seqs"][ts[0]], r["pos"][ts[0]]))
                else:
                    queue.sort(key=lambda ts: (-weights[ts[0], layer, ts[1]], ts[1], r["seqs"][ts[0]], r["pos"][ts[0]]))
                for t, s in queue[cap:]:
                    dropped[t, layer, s] = True
    return dropped


@pytest.fixture(scope="module")
def routing():
    return synthetic_routing(n_steps=3, n_layers=2, n_experts=6, top_k=2, seqs_per_step=4, seq_len=9, n_ranks=2,
                             domains=("code", "prose", "math"), skew=1.2, seed=21)


@pytest.fixture(scope="module")
def store(routing):
    return store_from_routing(**routing)


# ---- hand-computed ----------------------------------------------------------------------------------------------

def test_top1_first_come_first_served():
    # one sequence of 4 tokens, 2 experts, k=1: experts [0, 0, 0, 1]; CF 1 -> C = ceil(4 / 2) = 2
    con = store_from_routing(np.array([0, 0, 0, 1]).reshape(4, 1, 1), n_experts=2)
    df = capacity_drops(con, Selection(), 1.0, by=("pos",))
    assert df.set_index("pos")["dropped"].tolist() == [0, 0, 1, 0]
    assert capacity_drops(con, Selection(), 1.0, by=()).iloc[0][["assigned", "dropped"]].tolist() == [4, 1]
    assert capacity_drops(con, Selection(), 0.5, by=("expert",))["dropped"].tolist() == [2, 0]  # C = 1
    assert capacity_drops(con, Selection(), 1.5, by=())["dropped"].iloc[0] == 0  # C = 3


def test_slot0_choices_are_served_before_slot1_choices():
    # 2 experts, k = 2 (every token picks both); E=2, T=2, CF=0.5 -> C = ceil(0.5 * 2 * 2 / 2) = 1
    # token 0: [0, 1], token 1: [1, 0] -> every expert has one slot-0 and one slot-1 claim: the slot-1 loses
    # even though it comes from the earlier token
    index = np.array([[[0, 1]], [[1, 0]]])
    con = store_from_routing(index, n_experts=2)
    df = capacity_drops(con, Selection(), 0.5, by=("pos", "slot")).set_index(["pos", "slot"])["dropped"]
    assert df.to_dict() == {(0, 0): 0, (0, 1): 1, (1, 0): 0, (1, 1): 1}


def test_probability_policy_keeps_the_highest_weights():
    # 3 tokens to expert 0 with weights 0.2, 0.9, 0.5; C = 2 (fixed): position drops token 2, probs token 0
    index = np.zeros((3, 1, 1), dtype=int)
    weights = np.array([0.2, 0.9, 0.5]).reshape(3, 1, 1)
    con = store_from_routing(index, weights, n_experts=2)
    pos = capacity_drops(con, Selection(), capacity=2, by=("pos",), with_weight=True)
    prob = capacity_drops(con, Selection(), capacity=2, by=("pos",), policy="probability", with_weight=True)
    assert pos["dropped"].tolist() == [0, 0, 1]
    assert prob["dropped"].tolist() == [1, 0, 0]
    total = capacity_drops(con, Selection(), capacity=2, by=(), policy="probability", with_weight=True).iloc[0]
    assert total["dropped_weight"] == pytest.approx(0.2, abs=1e-5)  # stores keep weights to 1/65535
    assert total["weight_drop_rate"] == pytest.approx(0.2 / 1.6, abs=1e-5)


def test_expert_capacity_formula():
    assert expert_capacity(1.25, 64, 2, 8) == 20  # exactly 20, not 21 through float error
    assert expert_capacity(1.0, 10, 1, 4) == 3
    assert expert_capacity(0.1, 3, 1, 8) == 1


# ---- brute force over random routing ---------------------------------------------------------------------------

def _mask_to_frame(r, dropped, by, token_mask=None, cell_mask=None, weights=None):
    """Brute-force counts per `by` from a [T, L, k] drop mask; `cell_mask` picks the assignments counted, and
    `weights` adds dropped_weight and weight_drop_rate."""
    if cell_mask is not None:
        return _cells_to_frame(r, dropped, by, cell_mask, weights)

    n_tok, n_lay, k = r["index"].shape
    cols = {
        "pos": np.broadcast_to(r["pos"][:, None, None], dropped.shape),
        "step": np.broadcast_to(r["steps"][:, None, None], dropped.shape),
        "rank": np.broadcast_to(r["ranks"][:, None, None], dropped.shape),
        "seq": np.broadcast_to(r["seqs"][:, None, None], dropped.shape),
        "domain": np.broadcast_to(r["domains"][:, None, None], dropped.shape),
        "layer": np.broadcast_to(np.arange(n_lay)[None, :, None], dropped.shape),
        "slot": np.broadcast_to(np.arange(k)[None, None, :], dropped.shape),
        "expert": r["index"],
    }
    keep = np.ones(dropped.shape, bool) if token_mask is None else np.broadcast_to(token_mask[:, None, None], dropped.shape)
    df = pd.DataFrame({c: cols[c][keep].ravel() for c in by} | {"dropped": dropped[keep].ravel().astype(int)})
    return df.groupby(list(by)).agg(assigned=("dropped", "size"), dropped=("dropped", "sum")).reset_index() \
        if by else pd.DataFrame({"assigned": [int(keep.sum())], "dropped": [int(dropped[keep].sum())]})


def _cells_to_frame(r, dropped, by, cell, weights):
    cols = {
        "pos": r["pos"][:, None, None], "step": r["steps"][:, None, None], "rank": r["ranks"][:, None, None],
        "seq": r["seqs"][:, None, None], "domain": r["domains"][:, None, None],
        "layer": np.arange(dropped.shape[1])[None, :, None], "slot": np.arange(dropped.shape[2])[None, None, :],
        "expert": r["index"],
    }
    df = pd.DataFrame({c: np.broadcast_to(cols[c], dropped.shape)[cell].ravel() for c in by}
                      | {"dropped": dropped[cell].ravel().astype(int), "w": weights[cell].ravel(),
                         "dw": np.where(dropped, weights, 0.0)[cell].ravel()})
    agg = dict(assigned=("dropped", "size"), dropped=("dropped", "sum"), dropped_weight=("dw", "sum"), w=("w", "sum"))
    out = df.assign(all=0).groupby(list(by) or ["all"]).agg(**agg).reset_index()
    out["weight_drop_rate"] = out["dropped_weight"] / out["w"]
    return out


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("group", ["step", "sequence"])
@pytest.mark.parametrize("by", [("layer", "expert"), ("layer", "step", "rank"), ("slot",), ("domain", "layer"), (),
                                ("seq", "slot")])
def test_drops_match_brute_force(routing, store, policy, group, by):
    for cf in (0.6, 1.0, 1.3):
        want = _mask_to_frame(routing, brute_force_dropped(routing, cf, policy, group, 6), by)
        got = capacity_drops(store, Selection(), cf, policy=policy, group=group, by=by)
        for col in list(by) + ["assigned", "dropped"]:
            assert [str(v) for v in got[col]] == [str(v) for v in want[col]], (col, cf, policy, group, by)
        np.testing.assert_allclose(got["drop_rate"], want["dropped"] / want["assigned"])


@pytest.mark.parametrize("group", ["step", "sequence"])
def test_domain_selection_ranks_all_tokens_then_filters(routing, store, group):
    """At group='step' the other domains' tokens compete for the same slots: filter after ranking."""
    dropped = brute_force_dropped(routing, 0.9, "position", group, 6)
    mask = np.isin(routing["domains"], ["code"])
    want = _mask_to_frame(routing, dropped, ("layer",), token_mask=mask)
    got = capacity_drops(store, Selection(domains=("code",)), 0.9, group=group, by=("layer",))
    assert got["dropped"].tolist() == want["dropped"].tolist()
    assert got["assigned"].tolist() == want["assigned"].tolist()


def test_selection_by_steps_layers_ranks_is_a_filter(routing, store):
    dropped = brute_force_dropped(routing, 1.0, "position", "step", 6)
    sel = Selection(steps=(1, 2), layers=(1,), ranks=(0,))
    mask = (routing["steps"] >= 1) & (routing["ranks"] == 0)
    want = _mask_to_frame(routing, dropped, ("layer",), token_mask=mask)
    want = want[want.layer == 1]
    got = capacity_drops(store, sel, 1.0, by=("layer",))
    assert got["dropped"].tolist() == want["dropped"].tolist()


@pytest.mark.parametrize("policy, group, by", [
    ("position", "step", ()), ("probability", "sequence", ("layer",)), ("position", "step", ("slot",)),
    ("probability", "step", ("domain",)), ("position", "step", ("domain", "slot")), ("position", "sequence", ("slot",)),
])
def test_drop_curve_equals_drops_at_each_factor(routing, store, policy, group, by):
    factors = [0.25, 0.5, 1.0, 1.25, 2.0, 4.0]
    curve = drop_curve(store, Selection(), factors, policy=policy, group=group, by=by)
    assert sorted(curve["capacity_factor"].unique()) == factors
    for cf in factors:
        want = _mask_to_frame(routing, brute_force_dropped(routing, cf, policy, group, 6), by)
        got = curve[curve.capacity_factor == cf]
        assert got["dropped"].astype(int).tolist() == want["dropped"].astype(int).tolist(), cf
        assert got["assigned"].astype(int).tolist() == want["assigned"].astype(int).tolist()
    total = curve.groupby("capacity_factor")["dropped"].sum()
    assert total.is_monotonic_decreasing and total.iloc[-1] == 0


# ---- the probability policy per assignment from weight_hist (moeviz.analyses.probability_drops) --------------------------

@pytest.fixture(scope="module")
def tied():
    """Routing whose gate weights sit on a grid of eighths: many exact ties, broken by slot, seq, pos."""
    r = synthetic_routing(n_steps=3, n_layers=2, n_experts=6, top_k=2, seqs_per_step=4, seq_len=9, n_ranks=2,
                          domains=("code", "prose", "math"), skew=1.2, seed=5)
    r["weights"] = np.round(r["weights"] * 8) / 8
    return r


@pytest.mark.parametrize("by, with_weight", [
    (("layer", "expert"), True), (("step", "rank"), True), ((), True), (("domain",), False),
    (("domain", "layer"), False), (("seq", "slot"), False), (("pos",), False), (("slot", "expert"), True),
    (("domain",), True), (("pos", "layer"), True)])
def test_probability_policy_from_weight_hist_matches_brute_force(tied, by, with_weight):
    """The cut-bin reduction (weight_hist + one pass) against the plain loop, with ties at every cut."""
    con = store_from_routing(**tied)
    weights = np.round(tied["weights"] * 65535) / 65535  # as the store keeps them
    sels = [(Selection(), None), (Selection(domains=("code",)), np.isin(tied["domains"], ["code"])),
            (Selection(steps=(1, 2), layers=(1,)), tied["steps"] >= 1), (Selection(ranks=(1,)), tied["ranks"] == 1)]
    for cf in (0.5, 1.0, 1.4, None):
        for sel, mask in sels:
            if cf is None:  # a fixed capacity of 3 assignments per expert and step
                got = capacity_drops(con, sel, capacity=3, policy="probability", by=by, with_weight=with_weight,
                                     source="aggregates")
                dropped = brute_force_fixed(tied, 3, weights)
            else:
                got = capacity_drops(con, sel, cf, policy="probability", by=by, with_weight=with_weight,
                                     source="aggregates")
                dropped = brute_force_dropped(dict(tied, weights=weights), cf, "probability", "step", 6)
            if sel.layers:
                dropped = dropped & (np.arange(2) == 1)[None, :, None]
                keep_layer = np.broadcast_to((np.arange(2) == 1)[None, :, None], dropped.shape)
            else:
                keep_layer = np.ones(dropped.shape, bool)
            tok = np.ones(len(tied["steps"]), bool) if mask is None else mask
            cell = np.broadcast_to(tok[:, None, None], dropped.shape) & keep_layer
            want = _mask_to_frame(tied, dropped & cell, by, token_mask=None, cell_mask=cell, weights=weights)
            for col in list(by) + ["assigned", "dropped"]:
                assert [str(v) for v in got[col]] == [str(v) for v in want[col]], (col, cf, sel, by)
            if with_weight:
                np.testing.assert_allclose(got["dropped_weight"].fillna(0), want["dropped_weight"], atol=1e-9)
                np.testing.assert_allclose(got["weight_drop_rate"].fillna(0), want["weight_drop_rate"].fillna(0),
                                           atol=1e-12)


def brute_force_fixed(r: dict, cap: int, weights: np.ndarray) -> np.ndarray:
    """[T, L, k] bool: drops at a fixed capacity per expert and step, probability policy, as a plain loop."""
    index = r["index"]
    dropped = np.zeros(index.shape, dtype=bool)
    for key in {(s, k) for s, k in zip(r["steps"], r["ranks"])}:
        tokens = [t for t in range(len(r["steps"])) if (r["steps"][t], r["ranks"][t]) == key]
        for layer in range(index.shape[1]):
            for e in range(6):
                queue = [(t, s) for t in tokens for s in range(index.shape[2]) if index[t, layer, s] == e]
                queue.sort(key=lambda ts: (-weights[ts[0], layer, ts[1]], ts[1], r["seqs"][ts[0]], r["pos"][ts[0]]))
                for t, s in queue[cap:]:
                    dropped[t, layer, s] = True
    return dropped


def test_weight_hist_path_equals_the_window_over_two_runs():
    """Two runs side by side (the run_id joins) and a capacity of 0: the weight_hist path equals the window."""
    con = store_from_routing(**synthetic_routing(seed=3, skew=0.5, n_ranks=2), run_id="a")
    store_from_routing(**synthetic_routing(seed=4, skew=2.0, domains=("x", "y")), run_id="b", con=con)
    for kw in ({"by": ("layer", "expert"), "with_weight": True}, {"by": ("domain",)}, {"by": ("pos", "slot")},
               {"by": ("seq",), "with_weight": True}):
        for cap in ({"capacity_factor": 0.8}, {"capacity": 0}, {"capacity": 2}):
            for sel in (Selection(), Selection(run_ids=("b",)), Selection(domains=("x",))):
                fast = capacity_drops(con, sel, policy="probability", source="aggregates", **cap, **kw)
                window = capacity_drops(con, sel, policy="probability", source="routes", **cap, **kw)
                pd.testing.assert_frame_equal(fast, window, check_dtype=False, atol=1e-9)


def test_weight_hist_path_over_compacted_parquet_equals_the_window(tmp_path):
    """Real run folders (compacted: the pass reads their Parquet files in a private connection under one key per
    run, step, rank, layer and expert): two runs, two ranks in one, selections of steps and layers that start
    above 0; every shape of the pass equals the window, which the brute-force loop above checks."""
    from test_app import write_run_dir

    from moeviz.store.reader import open_store

    write_run_dir(tmp_path / "a", synthetic_routing(seed=5, skew=0.5, n_ranks=2, n_steps=3), run_id="a")
    write_run_dir(tmp_path / "b", synthetic_routing(seed=6, skew=2.0, domains=("x", "y")), run_id="b")
    con = open_store(tmp_path)
    assert con.execute("SELECT count(DISTINCT rank) FROM weight_hist WHERE run_id = 'a'").fetchone()[0] == 2
    one = open_store(tmp_path / "b")
    for kw in ({"by": ("layer", "expert"), "with_weight": True}, {"by": ("domain",)}, {"by": ("pos",)},
               {"by": ("pos", "slot"), "with_weight": True}, {"by": ("seq",), "with_weight": True},
               {"by": ("step", "layer")}):
        for cap in ({"capacity_factor": 0.8}, {"capacity": 0}, {"capacity": 1}):
            for c, sel in ((con, Selection()), (con, Selection(run_ids=("a",), steps=(1, 2), layers=(0, 2))),
                           (con, Selection(domains=("x",))), (one, Selection()), (one, Selection(steps=(2, 3)))):
                fast = capacity_drops(c, sel, policy="probability", source="aggregates", **cap, **kw)
                window = capacity_drops(c, sel, policy="probability", source="routes", **cap, **kw)
                assert len(fast) > 0
                pd.testing.assert_frame_equal(fast, window, check_dtype=False, atol=1e-9)


def test_weight_hist_source_errors():
    con = store_from_routing(**synthetic_routing(seed=1), extra_stats=False)  # no weight_hist
    with pytest.raises(AnalysisError, match="weight_hist does not cover"):
        capacity_drops(con, Selection(), 1.0, policy="probability", by=("pos",), source="aggregates")
    with pytest.raises(AnalysisError, match="source must be"):
        capacity_drops(con, Selection(), 1.0, policy="probability", source="parquet")
    got = capacity_drops(con, Selection(), 1.0, policy="probability", by=("pos",))  # 'auto': the window
    assert got["dropped"].sum() > 0


def test_two_runs_side_by_side():
    con = store_from_routing(**synthetic_routing(seed=3, skew=0.0), run_id="a")
    store_from_routing(**synthetic_routing(seed=3, skew=3.0), run_id="b", con=con)
    df = capacity_drops(con, Selection(), 1.0, by=()).set_index("run_id")
    assert df.loc["b", "drop_rate"] > df.loc["a", "drop_rate"]
    assert set(drop_curve(con, Selection(), [1.0, 2.0])["run_id"]) == {"a", "b"}


def test_bad_arguments(store):
    with pytest.raises(AnalysisError, match="policy"):
        capacity_drops(store, Selection(), 1.0, policy="random")
    with pytest.raises(AnalysisError, match="group"):
        capacity_drops(store, Selection(), 1.0, group="batch")
    with pytest.raises(AnalysisError, match="by takes"):
        capacity_drops(store, Selection(), 1.0, by=("token",))
    with pytest.raises(AnalysisError, match="exactly one"):
        capacity_drops(store, Selection(), 1.0, capacity=3)
    with pytest.raises(AnalysisError, match="> 0"):
        drop_curve(store, Selection(), [1.0, 0.0])


# ---- the real check: Switch Transformers applies capacity itself -------------------------------------------------

def test_predicted_drops_equal_switch_transformers_drops():
    """Record which tokens a tiny Switch Transformers encoder dropped, store its routing without capacity
    (the argmax expert) and require moeviz to predict exactly those drops. transformers 5.x caps per batch row:
    `token_priority = cumsum(one_hot(argmax), dim=-2)` over the sequence of each row -> group='sequence',
    first come first served in position order, C = config.expert_capacity."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared 2-core machine (100x slower)
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersEncoderModel, SwitchTransformersTop1Router)

    batch, seq_len, n_experts = 3, 12, 4
    for capacity in (1, 2, 3, 5):
        torch.manual_seed(capacity)
        config = SwitchTransformersConfig(
            vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, num_experts=n_experts,
            expert_capacity=capacity, encoder_sparse_step=1, router_jitter_noise=0.0)
        model = SwitchTransformersEncoderModel(config).eval()
        with torch.no_grad():  # skew layer 0's router so that drops are frequent
            model.encoder.block[0].layer[1].mlp.router.classifier.weight[0] += 0.5
        captured: list[tuple] = []
        routers = [m for m in model.modules() if isinstance(m, SwitchTransformersTop1Router)]
        handles = [m.register_forward_hook(lambda mod, args, out: captured.append(out)) for m in routers]
        try:
            with torch.no_grad():
                model(input_ids=torch.randint(0, 50, (batch, seq_len)))
        finally:
            for h in handles:
                h.remove()
        assert len(captured) == len(routers) == 2

        logits = torch.stack([c[2].reshape(-1, n_experts) for c in captured], dim=1)  # [T, L, E]
        model_dropped = torch.stack([c[0].reshape(-1, n_experts).sum(-1) == 0 for c in captured], dim=1)  # [T, L]
        seqs, pos = np.divmod(np.arange(batch * seq_len), seq_len)
        con = store_from_routing(logits=logits.double().numpy(), top_k=1, seqs=seqs, pos=pos)
        cf = capacity * n_experts / seq_len  # so that ceil(CF * seq_len * 1 / E) = expert_capacity
        got = capacity_drops(con, Selection(), cf, group="sequence", by=("layer", "seq", "pos"))
        got_mask = got["dropped"].to_numpy().reshape(2, batch * seq_len).T  # rows ordered layer, seq, pos
        want = model_dropped.numpy()
        assert want.any() or capacity >= 5
        np.testing.assert_array_equal(got_mask.astype(bool), want, err_msg=f"capacity {capacity}")
        fixed = capacity_drops(con, Selection(), capacity=capacity, group="sequence", by=("layer",))
        assert fixed["dropped"].tolist() == want.sum(0).tolist()


def test_layer_shape_falls_back_to_runs_when_layers_are_missing(routing, store):
    con = store_from_routing(**routing)
    con.execute("DELETE FROM layers")
    for by in (("layer",), ("slot",), ("domain",)):
        want = capacity_drops(store, Selection(), 1.0, by=by)
        got = capacity_drops(con, Selection(), 1.0, by=by)
        assert got["dropped"].tolist() == want["dropped"].tolist() and want["dropped"].sum() > 0
