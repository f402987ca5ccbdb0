"""moeviz.analyses.aux_loss against transformers' own loss functions fed the same router logits, and numpy."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeviz.analyses.aux_loss import pooled_switch_loss, switch_loss, z_loss
from moeviz.analyses.load import AnalysisError
from moeviz.selection import Selection
from moeviz.testing import softmax, store_from_routing, synthetic_routing

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared 2-core machine

SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
B, S, L, E = 3, 10, 3, 8


def random_logits(seed: int) -> "torch.Tensor":
    g = torch.Generator().manual_seed(seed)
    bias = 1.5 * torch.randn(L, 1, E, generator=g)  # some experts favoured, so the loss is far from uniform
    return torch.randn(L, B * S, E, generator=g) + bias  # [layers, batch*seq, experts]


def store_from_torch(logits: "torch.Tensor", top_k: int, mask: "torch.Tensor | None" = None, **kw):
    """Store the tokens inside the mask: moeviz never records padding."""
    arr = logits.double().numpy().transpose(1, 0, 2)  # [T, L, E]
    seqs, pos = np.divmod(np.arange(B * S), S)
    keep = np.ones(B * S, bool) if mask is None else mask.reshape(-1).numpy().astype(bool)
    return store_from_routing(logits=arr[keep], top_k=top_k, seqs=seqs[keep], pos=pos[keep], **kw)


# ---- transformers: pooled load-balancing loss (Mixtral, Qwen2-MoE, OLMoE share one function) -------------------

@pytest.mark.parametrize("family, top_k", [("mixtral", 1), ("mixtral", 2), ("mixtral", 3), ("qwen2_moe", 2),
                                           ("olmoe", 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_pooled_loss_equals_transformers(family, top_k, masked):
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    logits = random_logits(seed=top_k + 10 * masked)
    mask = None
    if masked:  # left and right padding of different lengths
        mask = torch.ones(B, S, dtype=torch.long)
        mask[0, :3] = 0
        mask[2, 6:] = 0
    want = float(mod.load_balancing_loss_func(tuple(logits), E, top_k, mask))
    con = store_from_torch(logits, top_k, mask)
    got = pooled_switch_loss(con).iloc[0]
    assert got["aux_loss"] == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert got["aux_loss_per_slot"] == pytest.approx(want / top_k, rel=1e-6)
    assert got["n_layers"] == L and got["tokens"] == L * (B * S if mask is None else int(mask.sum()))


def test_pooled_loss_is_k_times_per_layer_definition_on_pooled_data():
    r = synthetic_routing(n_steps=3, n_layers=4, n_experts=6, top_k=2, n_ranks=2, seed=5, skew=2.0)
    con = store_from_routing(**r)
    probs = softmax(r["logits"])  # [T, L, E]
    pooled = pooled_switch_loss(con, Selection(layers=(1, 2, 3)))
    per_layer = switch_loss(con, Selection(layers=(1, 2, 3)))
    for row in pooled.itertuples(index=False):
        m = r["steps"] == row.step
        idx, p = r["index"][m][:, 1:], probs[m][:, 1:]  # layers 1..3 pooled: [T*3 rows]
        f = np.bincount(idx.ravel(), minlength=6) / (idx.shape[0] * idx.shape[1] * 2)  # share of T*L*k slots
        per_def = 6 * (f * p.reshape(-1, 6).mean(0)).sum()
        assert row.aux_loss == pytest.approx(2 * per_def, rel=1e-9)
        layer_losses = per_layer[per_layer.step == row.step]["aux_loss"]
        assert row.mean_layer_loss == pytest.approx(layer_losses.mean(), rel=1e-12)
        assert row.max_layer_loss == pytest.approx(layer_losses.max(), rel=1e-12)
        assert row.worst_layer == per_layer.loc[layer_losses.idxmax(), "layer"]


# ---- transformers: Switch Transformers per-layer loss and z-loss ---------------------------------------------------

def test_switch_loss_equals_switch_transformers_per_layer():
    from transformers.models.switch_transformers import modeling_switch_transformers as sw

    logits = random_logits(seed=3)[:, :S]  # one sequence: Switch averages per group, one group = our pooling
    con = store_from_routing(logits=logits.double().numpy().transpose(1, 0, 2), top_k=1)
    got = switch_loss(con).set_index("layer")["aux_loss"]
    for layer in range(L):
        lg = logits[layer][None]  # [1, S, E]
        want = float(sw.load_balancing_loss_func(torch.softmax(lg, -1), lg.argmax(-1)))
        assert got[layer] == pytest.approx(want, rel=1e-6)


def test_z_loss_equals_switch_transformers_router_z_loss():
    from transformers.models.switch_transformers import modeling_switch_transformers as sw

    logits = 3 * random_logits(seed=4)  # [L, B*S, E]
    con = store_from_torch(logits, top_k=1)
    per_layer = z_loss(con).set_index("layer")
    for layer in range(L):
        want = float(sw.router_z_loss_func(logits[layer].reshape(B, S, E)))
        assert per_layer.loc[layer, "z_loss"] == pytest.approx(want, rel=1e-6)
    # Switch Transformers concatenates the logits of all sparse layers along the sequence: the pooled z-loss
    cat = torch.cat([logits[layer].reshape(B, S, E) for layer in range(L)], dim=1)
    assert z_loss(con, pooled=True).iloc[0]["z_loss"] == pytest.approx(float(sw.router_z_loss_func(cat)), rel=1e-6)
    p = torch.softmax(logits.double(), -1)
    want_entropy = -(p * p.log()).sum(-1).mean(-1)  # [L]
    np.testing.assert_allclose(per_layer["mean_entropy"], want_entropy.numpy(), rtol=1e-9)


# ---- numpy brute force with selections ------------------------------------------------------------------------

@pytest.mark.parametrize("sel_kwargs", [{}, {"steps": (1, 2)}, {"ranks": (1,)}, {"layers": (0, 2), "ranks": (0,)}])
def test_switch_loss_matches_numpy_by_step_and_pooled_steps(sel_kwargs):
    r = synthetic_routing(n_steps=4, n_layers=3, n_experts=5, top_k=2, n_ranks=2, seq_len=12, seed=11, skew=1.0)
    con = store_from_routing(**r)
    sel = Selection(**sel_kwargs)
    probs = softmax(r["logits"])

    def ref(mask, layer):
        idx = r["index"][mask, layer]
        f = np.bincount(idx.ravel(), minlength=5) / idx.size
        return 5 * (f * probs[mask, layer].mean(0)).sum()

    base = np.ones(len(r["steps"]), bool)
    if sel.ranks:
        base &= np.isin(r["ranks"], sel.ranks)
    if sel.steps:
        base &= (r["steps"] >= sel.steps[0]) & (r["steps"] <= sel.steps[1])
    by_step = switch_loss(con, sel)
    assert sorted(by_step["layer"].unique()) == list(sel.layers or (0, 1, 2))
    for row in by_step.itertuples(index=False):
        assert row.aux_loss == pytest.approx(ref(base & (r["steps"] == row.step), row.layer), rel=1e-9)
    for row in switch_loss(con, sel, by_step=False).itertuples(index=False):
        assert row.aux_loss == pytest.approx(ref(base, row.layer), rel=1e-9)
        zs = np.log(np.exp(r["logits"][base, row.layer]).sum(-1)) ** 2
        got_z = z_loss(con, sel, by_step=False).set_index("layer").loc[row.layer, "z_loss"]
        assert got_z == pytest.approx(zs.mean(), rel=1e-9)


# ---- properties ---------------------------------------------------------------------------------------------------

@SETTINGS
@given(n_experts=st.integers(2, 10), k=st.integers(1, 4), reps=st.integers(1, 3))
def test_uniform_routing_gives_one_per_layer_and_k_pooled(n_experts, k, reps):
    k = min(k, n_experts)
    t = np.arange(n_experts * reps)
    index = np.stack([(t[:, None] + np.arange(k)) % n_experts] * 2, axis=1)  # [T, 2, k] each expert T*k/E times
    logits = np.zeros((len(t), 2, n_experts))  # the router is undecided: P_i = 1/E
    con = store_from_routing(index, logits=logits)
    assert switch_loss(con)["aux_loss"].to_numpy() == pytest.approx([1.0, 1.0])
    pooled = pooled_switch_loss(con).iloc[0]
    assert pooled["aux_loss"] == pytest.approx(k)
    assert pooled["aux_loss_per_slot"] == pytest.approx(1.0)
    assert z_loss(con)["z_loss"].to_numpy() == pytest.approx([np.log(n_experts) ** 2] * 2)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n_experts=st.integers(2, 9), k=st.integers(1, 3))
def test_losses_invariant_under_expert_relabelling(seed, n_experts, k):
    k = min(k, n_experts)
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(25, 2, n_experts)) * 2
    perm = rng.permutation(n_experts)
    a = store_from_routing(logits=logits, top_k=k)
    b = store_from_routing(logits=logits[..., perm], top_k=k)
    np.testing.assert_allclose(switch_loss(a)["aux_loss"], switch_loss(b)["aux_loss"], rtol=1e-12)
    np.testing.assert_allclose(pooled_switch_loss(a)["aux_loss"], pooled_switch_loss(b)["aux_loss"], rtol=1e-12)


def test_two_runs_side_by_side():
    con = store_from_routing(**synthetic_routing(seed=1, skew=0.0), run_id="balanced")
    store_from_routing(**synthetic_routing(seed=1, skew=4.0), run_id="skewed", con=con)
    df = switch_loss(con, by_step=False).groupby("run_id")["aux_loss"].mean()
    assert df["skewed"] > df["balanced"] > 0.99
    assert set(pooled_switch_loss(con)["run_id"]) == {"balanced", "skewed"}
    assert set(z_loss(con)["run_id"]) == {"balanced", "skewed"}


def test_domains_cannot_be_asked_of_router_probabilities():
    con = store_from_routing(**synthetic_routing(seed=2))
    for f in (switch_loss, pooled_switch_loss, z_loss):
        with pytest.raises(AnalysisError, match="per-step aggregates"):
            f(con, Selection(domains=("code",)))
