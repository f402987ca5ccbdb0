"""Megatron-Core 0.16.1 `TopKRouter`, out of the box (no predicate, no adapter), on a real tiny GPTModel with MoE
MLPs built from a TransformerConfig on a CPU (gloo, world size 1; see collectors.testing.megatron_on_cpu).

References, all Megatron's own, for every token, layer and slot:
- the router's return value `(probs, routing_map)` (what the token dispatcher and experts consumed), captured by
  a raw forward hook;
- the router's own logits, captured by wrapping the router's `gating` method;
- for capacity dropping, Megatron's `topk_routing_with_score_function` applied to those logits: its routing
  before the capacity limit, so that the dropped assignments are known;
- slot order: the score each config ranks experts by, written out here (logits, softmax, sigmoid + expert_bias).

A missing megatron-core skips this module, except where MOEVIZ_REQUIRE_FRAMEWORKS=1 (set by .ci/run): there a
skipped framework test is not a pass, and the import error fails the run.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from collectors.testing import require_framework  # noqa: E402

moe_utils = require_framework("megatron.core.transformer.moe.moe_utils", "megatron-core")

from collectors.recorder import Recorder  # noqa: E402
from collectors.routers import find_routers  # noqa: E402
from collectors.testing import megatron_gpt_inputs, megatron_on_cpu, tiny_megatron_gpt  # noqa: E402
from moeviz.store import query  # noqa: E402

BATCH, SEQ = 2, 8

pytestmark = [  # Megatron's own notices on a CPU without Transformer Engine / Apex
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*(Apex|Transformer Engine|full scope).*:UserWarning"),
]

CONFIGS = {
    "softmax": {},
    "pre_softmax": dict(moe_router_pre_softmax=True),
    "sigmoid_expert_bias_scaled": dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5
    ),
    "capacity_drops": dict(moe_expert_capacity_factor=0.5),
    "groups_expert_bias_capacity": dict(
        num_moe_experts=8,
        moe_router_num_groups=4,
        moe_router_group_topk=2,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_expert_capacity_factor=0.5,
    ),
    "bf16": dict(bf16=True, params_dtype=torch.bfloat16),
    "bf16_fp32_router_sigmoid_bias": dict(
        bf16=True, params_dtype=torch.bfloat16, moe_router_dtype="fp32", moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
    ),
}


def _forward_with_references(model, sites, ids, pos, mask) -> dict[int, dict]:
    """One forward; per layer: the extracted RouterOutput and Megatron's own logits, probs and routing_map."""
    got: dict[int, dict] = {s.layer: {} for s in sites}
    handles, originals = [], []
    for s in sites:
        router = s.module
        gating = router.gating
        originals.append(router)

        def wrapped(inp, _g=gating, _d=got[s.layer]):
            _d["logits"] = _g(inp)  # [S*B, E] (Megatron's gating returns [S, B, E] viewed flat later)
            return _d["logits"]

        router.gating = wrapped
        handles.append(router.register_forward_hook(
            lambda m, i, o, s=s: got[s.layer].update(out=s.extract(m, i, o), probs=o[0], routing_map=o[1])))
    try:
        with torch.no_grad():
            model(ids, pos, mask)
    finally:
        for h in handles:
            h.remove()
        for router in originals:
            del router.gating  # the class's method again
    return got


def _to_batch_major(t: torch.Tensor) -> torch.Tensor:
    """[S*B, X] rows s*B + b (Megatron's order) -> [B*S, X] rows b*S + s."""
    return t.reshape(SEQ, BATCH, -1).transpose(0, 1).reshape(SEQ * BATCH, -1)


def _selection_score(cfg, logits, expert_bias):
    if cfg.moe_router_score_function == "softmax":
        return torch.softmax(logits.float(), -1) if cfg.moe_router_pre_softmax else logits.float()
    return torch.sigmoid(logits.float()) + (0 if expert_bias is None else expert_bias)


@pytest.fixture(scope="module", params=list(CONFIGS))
def megatron_run(request):
    with megatron_on_cpu():
        model, cfg = tiny_megatron_gpt(seed=1, **CONFIGS[request.param])
        sites = find_routers(model)  # out of the box: no predicate, no adapter
        ids, pos, mask = megatron_gpt_inputs(BATCH, SEQ, seed=2)
        got = _forward_with_references(model, sites, ids, pos, mask)
    return request.param, model, cfg, sites, got, (ids, pos, mask)


def test_routers_found_with_sizes_scale_and_capacity(megatron_run):
    name, model, cfg, sites, _, _ = megatron_run
    assert [s.name for s in sites] == [f"decoder.layers.{i}.mlp.router" for i in range(cfg.num_layers)]
    assert {s.kind for s in sites} == {"megatron-topk"}
    assert all(s.n_experts == cfg.num_moe_experts and s.top_k == cfg.moe_router_topk for s in sites)
    assert all(s.weight_scale == (cfg.moe_router_topk_scaling_factor or 1.0) for s in sites)
    assert all(s.capacity_factor == cfg.moe_expert_capacity_factor for s in sites)


def test_every_token_layer_and_slot_equals_megatrons_routing(megatron_run):
    name, model, cfg, sites, got, _ = megatron_run
    E, k = cfg.num_moe_experts, cfg.moe_router_topk
    n_dropped = 0
    for s in sites:
        g = got[s.layer]
        out = g["out"]
        logits = g["logits"].reshape(-1, E)  # [S*B, E]
        torch.testing.assert_close(out.logits, _to_batch_major(logits))

        # Megatron's routing before the capacity limit, from its own function on its own logits
        before, before_map = moe_utils.topk_routing_with_score_function(
            logits, k, use_pre_softmax=cfg.moe_router_pre_softmax, num_groups=cfg.moe_router_num_groups,
            group_topk=cfg.moe_router_group_topk, scaling_factor=cfg.moe_router_topk_scaling_factor,
            score_function=cfg.moe_router_score_function, expert_bias=s.module.expert_bias,
        )
        before, before_map = _to_batch_major(before), _to_batch_major(before_map)  # [B*S, E]
        kept_map = _to_batch_major(g["routing_map"])  # [B*S, E] what the experts got
        probs = _to_batch_major(g["probs"])

        chosen = torch.zeros(SEQ * BATCH, E, dtype=torch.bool).scatter(1, out.index, True)
        assert torch.equal(chosen, before_map)  # the k experts the router chose, per token
        dropped = torch.zeros_like(out.index, dtype=torch.bool) if out.dropped is None else out.dropped
        kept = torch.zeros(SEQ * BATCH, E, dtype=torch.bool).scatter(1, out.index, ~dropped)
        assert torch.equal(kept, kept_map)  # the assignments the experts computed
        n_dropped += int(dropped.sum())
        if cfg.moe_expert_capacity_factor is None:
            assert out.dropped is None
        # weights: as applied where kept, as computed before the drop where dropped
        torch.testing.assert_close(out.weights, before.gather(1, out.index))
        torch.testing.assert_close(out.weights.masked_fill(dropped, 0.0), probs.gather(1, out.index))
        # slot 0 = top choice by the score the router ranked on
        score = _selection_score(cfg, _to_batch_major(logits), s.module.expert_bias).gather(1, out.index)
        assert bool((score[:, :-1] >= score[:, 1:]).all())
    if cfg.moe_expert_capacity_factor is not None:
        assert n_dropped > 0  # the test exercises drops


def test_recorder_stores_megatrons_routing_in_token_order(megatron_run, tmp_path):
    name, model, cfg, sites, got, (ids, pos, mask) = megatron_run
    E, k = cfg.num_moe_experts, cfg.moe_router_topk
    scale = cfg.moe_router_topk_scaling_factor or 1.0
    with megatron_on_cpu(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "saw N tokens ... matches no input batch"
        warnings.filterwarnings("ignore", module="megatron")
        with Recorder(model, tmp_path / "run", flush_every=1) as rec:
            with torch.no_grad():
                model(ids, pos, mask)
            rec.step(0)
    routes = query(
        tmp_path / "run", "SELECT seq, pos, layer, slot, expert, weight FROM routes ORDER BY layer, seq, pos, slot"
    )
    stats = query(tmp_path / "run", "SELECT layer, expert, assigned, dropped FROM step_stats ORDER BY layer, expert")
    for s in sites:
        out = got[s.layer]["out"]  # checked against Megatron above
        r = routes[routes.layer == s.layer]
        assert len(r) == BATCH * SEQ * k
        np.testing.assert_array_equal(r.seq.to_numpy(), np.repeat(np.arange(BATCH), SEQ * k))
        np.testing.assert_array_equal(r.pos.to_numpy(), np.tile(np.repeat(np.arange(SEQ), k), BATCH))
        np.testing.assert_array_equal(r.expert.to_numpy().reshape(-1, k), out.index.numpy())  # int64
        recorded = torch.tensor(r.expert.to_numpy().reshape(-1, k), dtype=torch.long)  # [B*S, k] by (seq, pos)
        recorded_map = torch.zeros(BATCH * SEQ, E, dtype=torch.bool).scatter(1, recorded, True)
        kept_by_megatron = _to_batch_major(got[s.layer]["routing_map"])  # straight from Megatron, not via `out`
        assert bool((recorded_map | ~kept_by_megatron).all())  # every expert a token was sent to is recorded
        np.testing.assert_allclose(r.weight.to_numpy().reshape(-1, k), out.weights.float().numpy() / scale, atol=2e-5)
        st = stats[stats.layer == s.layer]
        kept_map = _to_batch_major(got[s.layer]["routing_map"])
        dropped = out.dropped if out.dropped is not None else torch.zeros_like(out.index, dtype=torch.bool)
        dropped_experts = out.index[dropped]  # [n_dropped]
        want_dropped = torch.zeros(E, dtype=torch.long).scatter_add(
            0, dropped_experts, torch.ones_like(dropped_experts)
        )
        np.testing.assert_array_equal(st.dropped.to_numpy(), want_dropped.numpy())
        np.testing.assert_array_equal(st.assigned.to_numpy() - st.dropped.to_numpy(), kept_map.sum(0).numpy())


def test_training_with_aux_loss_and_expert_bias_records_what_the_router_did(tmp_path):
    """model.train() with aux and z losses (Megatron attaches them to probs through autograd functions), sigmoid
    scores with expert_bias, forward and backward for two steps: each step's routes equal the routing_map and
    probs Megatron returned in that step, and the router still gets its gradient."""
    overrides = dict(
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
    )
    with megatron_on_cpu():
        model, cfg = tiny_megatron_gpt(seed=4, **overrides)
        model.train()
        sites = find_routers(model)
        seen: list[dict] = []
        raw = [s.module.register_forward_hook(
            lambda m, i, o, s=s: seen[-1].__setitem__(s.layer, (o[0].detach().clone(), o[1].clone())))
            for s in sites]
        try:
            with Recorder(model, tmp_path / "run", flush_every=1) as rec:
                for step in range(2):
                    ids, pos, mask = megatron_gpt_inputs(BATCH, SEQ, seed=10 + step)
                    seen.append({})
                    model.zero_grad()
                    model(ids, pos, mask).float().pow(2).mean().backward()
                    assert all(s.module.weight.grad is not None for s in sites)
                    rec.step(step)
        finally:
            for h in raw:
                h.remove()
    k = cfg.moe_router_topk
    routes = query(tmp_path / "run", "SELECT step, layer, seq, pos, slot, expert, weight FROM routes ORDER BY ALL")
    for step in range(2):
        for s in sites:
            probs, routing_map = (_to_batch_major(t) for t in seen[step][s.layer])  # [B*S, E]
            r = routes[(routes.step == step) & (routes.layer == s.layer)]
            index = torch.tensor(r.expert.to_numpy().reshape(-1, k), dtype=torch.long)  # [B*S, k]
            recorded = torch.zeros_like(routing_map).scatter(1, index, True)
            assert torch.equal(recorded, routing_map)
            np.testing.assert_allclose(r.weight.to_numpy().reshape(-1, k), probs.gather(1, index).numpy(), atol=2e-5)
    config = query(tmp_path / "run", "SELECT config FROM runs").config[0]
    assert '"moe_router_score_function": "sigmoid"' in config  # the TransformerConfig, stored as the run's config


def test_expert_bias_recorded_every_step_through_megatrons_own_update(tmp_path):
    """Training with `moe_router_enable_expert_bias`: after each step's forward and backward the bias is moved by
    Megatron's own `get_updated_expert_bias` from the router's `local_tokens_per_expert` (what
    finalize_model_grads does) before rec.step(); the stored bias of each step is the one the router ranked with."""
    overrides = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                     moe_router_bias_update_rate=0.05)
    with megatron_on_cpu():
        model, cfg = tiny_megatron_gpt(seed=6, **overrides)
        model.train()
        sites = find_routers(model)
        seen: dict[int, list] = {}
        hooks = [s.module.register_forward_pre_hook(
            lambda m, a, s=s: seen.setdefault(s.layer, []).append(m.expert_bias.detach().clone())) for s in sites]
        try:
            with Recorder(model, tmp_path / "run", flush_every=1) as rec:
                for step in range(3):
                    ids, pos, mask = megatron_gpt_inputs(BATCH, SEQ, seed=20 + step)
                    model.zero_grad()
                    model(ids, pos, mask).float().pow(2).mean().backward()
                    for s in sites:
                        r = s.module
                        with torch.no_grad():
                            r.expert_bias.copy_(moe_utils.get_updated_expert_bias(
                                r.local_tokens_per_expert, r.expert_bias, cfg.moe_router_bias_update_rate))
                            r.local_tokens_per_expert.zero_()
                    rec.step(step)
        finally:
            for h in hooks:
                h.remove()
    eb = query(tmp_path / "run", "SELECT step, layer, expert, bias FROM expert_bias ORDER BY step, layer, expert")
    assert len(eb) == 3 * len(sites) * cfg.num_moe_experts
    for step in range(3):
        for s in sites:
            got = eb[(eb.step == step) & (eb.layer == s.layer)].bias.to_numpy()
            np.testing.assert_array_equal(got, seen[s.layer][step].double().numpy())
    assert not torch.equal(seen[sites[0].layer][0], seen[sites[0].layer][2])  # Megatron's update moved it
