"""torchtitan 0.3.0 `TokenChoiceTopKRouter`, out of the box (no predicate, no adapter), on a tiny stack of
torchtitan's own `MoE` layers built with its config builders on a CPU (collectors.testing.tiny_torchtitan_moe).

References, all torchtitan's own, for every token, layer and slot:
- the router's return value `(topk_scores, topk_expert_ids, scores)` (what the experts consumed), captured by a raw
  forward hook on the router;
- the router's logits: the output of its `gate` Linear, captured by a raw forward hook on the gate;
- the expert bias the router ranked with: the second argument of the router call (the MoE's `expert_bias_E`),
  captured by a forward pre-hook;
- slot order: the score torchtitan ranks experts by (scores + expert_bias), written out here.

A missing torchtitan skips this module, except where MOEVIZ_REQUIRE_FRAMEWORKS=1 (set by .ci/run): there a
skipped framework test is not a pass, and the import error fails the run.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from collectors.testing import require_framework  # noqa: E402

require_framework("torchtitan.models.common.moe", "torchtitan")

from collectors.recorder import Recorder  # noqa: E402
from collectors.routers import check_router_output, find_routers  # noqa: E402
from collectors.testing import tiny_torchtitan_moe  # noqa: E402
from moeviz.store import query  # noqa: E402

BATCH, SEQ, VOCAB = 3, 8, 64

pytestmark = [  # torchtitan's router asks a CPU for float32 autocast, which a CPU ignores with a warning
    pytest.mark.filterwarnings("ignore:In CPU autocast.*:UserWarning"),
]

CONFIGS = {
    "sigmoid": dict(),  # torchtitan's defaults: score_func='sigmoid', route_norm=False, route_scale=1
    "softmax_route_norm": dict(score_func="softmax", route_norm=True, top_k=3),
    "softmax_scaled": dict(score_func="softmax", route_scale=2.0),
    "sigmoid_bias_norm_scaled": dict(expert_bias=True, route_norm=True, route_scale=2.5, top_k=3),  # DeepSeek-V3
    "sigmoid_bias_scaled_gate_bias": dict(expert_bias=True, route_scale=2.5, bias=True),
    "node_limited_bias": dict(expert_bias=True, num_expert_groups=4, num_limited_groups=2, top_k=3, route_norm=True),
    "bf16_bias": dict(expert_bias=True, dtype=torch.bfloat16, route_norm=True),
}


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _forward_with_references(model, sites, ids) -> dict[int, dict]:
    """One forward; per layer: the extracted RouterOutput and torchtitan's own gate output, router output and
    expert bias argument."""
    got: dict[int, dict] = {s.layer: {} for s in sites}
    handles = []
    for s in sites:
        d = got[s.layer]
        handles += [
            s.module.gate.register_forward_hook(lambda m, i, o, d=d: d.update(logits=o)),
            s.module.register_forward_pre_hook(lambda m, i, d=d: d.update(bias=i[1] if len(i) > 1 else None)),
            s.module.register_forward_hook(lambda m, i, o, s=s, d=d: d.update(out=s.extract(m, i, o), raw=o)),
        ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.fixture(scope="module", params=list(CONFIGS))
def titan_run(request):
    kwargs = dict(CONFIGS[request.param])
    model = tiny_torchtitan_moe(seed=1, n_layers=2, vocab_size=VOCAB, **kwargs)
    sites = find_routers(model)  # out of the box: no predicate, no adapter
    ids = _ids(2)
    got = _forward_with_references(model, sites, ids)
    return request.param, model, sites, got, ids


def _router(s):
    return s.module  # torchtitan's TokenChoiceTopKRouter


def _ranked(s, scores, bias):
    """[T, E] what torchtitan's top-k ranks: scores + expert bias, with node-limited routing's masking (its own
    `_get_node_limited_routing_scores`: experts of groups left out are -inf)."""
    ranked = scores.float() + (0 if bias is None else bias)
    if _router(s).num_expert_groups is not None:
        ranked = _router(s)._get_node_limited_routing_scores(ranked)
    return ranked


def test_routers_found_with_sizes_and_scale(titan_run):
    name, model, sites, _, _ = titan_run
    assert [s.name for s in sites] == ["layers.0.router", "layers.1.router"]
    assert {s.kind for s in sites} == {"torchtitan-topk"}
    for s in sites:
        r = _router(s)
        assert (s.n_experts, s.top_k, s.weight_scale) == (r.num_experts, r.top_k, r.route_scale)
        assert s.capacity_factor is None  # torchtitan's local dispatch drops nothing


def test_every_token_layer_and_slot_equals_torchtitans_routing(titan_run):
    name, model, sites, got, _ = titan_run
    n_biased = 0
    for s in sites:
        g = got[s.layer]
        out, (topk_scores, topk_ids, scores) = g["out"], g["raw"]
        E, k = s.n_experts, s.top_k
        topk_scores, topk_ids, scores = topk_scores.reshape(-1, k), topk_ids.reshape(-1, k), scores.reshape(-1, E)
        # logits: the gate's own output, and torchtitan's probabilities/scores are a function of exactly them
        torch.testing.assert_close(out.logits, g["logits"].reshape(-1, E), rtol=0, atol=0)
        act = torch.sigmoid if _router(s).score_func == "sigmoid" else (lambda t: torch.softmax(t, -1))
        torch.testing.assert_close(act(out.logits.float()), scores.float(), rtol=1e-2 if out.logits.dtype ==
                                   torch.bfloat16 else 1e-6, atol=1e-2 if out.logits.dtype == torch.bfloat16 else 1e-6)
        # the same k experts per token, each with the weight torchtitan applied to it (route_norm, route_scale)
        assert torch.equal(out.index.sort(-1).values, topk_ids.sort(-1).values)
        order = (out.index[:, :, None] == topk_ids[:, None, :]).float().argmax(-1)  # [T, k]: slot -> titan's slot
        assert torch.equal(topk_ids.gather(1, order), out.index)
        assert torch.equal(out.weights, topk_scores.gather(1, order))
        assert out.dropped is None
        # slot 0 = top choice by the score torchtitan ranked on: scores + the expert bias it was called with
        bias = g["bias"]
        ranked = _ranked(s, scores, bias)
        key = ranked.gather(1, out.index)
        assert bool((key[:, :-1] >= key[:, 1:]).all())
        if bias is not None:  # the bias is the MoE's buffer and really changed some choices
            assert torch.equal(bias, model.layers[s.layer].expert_bias_E)
            unbiased = scores.float().topk(k, -1).indices.sort(-1).values
            n_biased += int((unbiased != out.index.sort(-1).values).any(-1).sum())
        check_router_output(s, out)  # moeviz's first-output check accepts it
    if "bias" in name:
        assert n_biased > 0


def test_recorder_stores_torchtitans_routing(titan_run, tmp_path):
    name, model, sites, got, ids = titan_run
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "saw N tokens ... matches no input batch", clipping
        warnings.filterwarnings("ignore", message="In CPU autocast")
        with Recorder(model, tmp_path / "run", flush_every=1) as rec:
            with torch.no_grad():
                model(ids)
            rec.step(0)
    routes = query(tmp_path / "run", "SELECT seq, pos, token_id, layer, slot, expert, weight, dropped, margin "
                                     "FROM routes ORDER BY layer, seq, pos, slot")
    stats = query(tmp_path / "run", "SELECT layer, expert, tokens, assigned, first_choice, prob_sum, dropped "
                                    "FROM step_stats ORDER BY layer, expert")
    lstats = query(tmp_path / "run", "SELECT layer, z_loss_sum, entropy_sum FROM layer_stats ORDER BY layer")
    for s in sites:
        g = got[s.layer]
        E, k = s.n_experts, s.top_k
        topk_scores, topk_ids = g["raw"][0].reshape(-1, k), g["raw"][1].reshape(-1, k)  # torchtitan's own
        r = routes[routes.layer == s.layer]
        assert len(r) == BATCH * SEQ * k
        np.testing.assert_array_equal(r.seq.to_numpy(), np.repeat(np.arange(BATCH), SEQ * k))
        np.testing.assert_array_equal(r.pos.to_numpy(), np.tile(np.repeat(np.arange(SEQ), k), BATCH))
        np.testing.assert_array_equal(r.token_id.to_numpy(), np.repeat(ids.reshape(-1).numpy(), k))
        expert = r.expert.to_numpy().reshape(-1, k)
        np.testing.assert_array_equal(np.sort(expert, -1), np.sort(topk_ids.numpy(), -1))
        # stored weight = torchtitan's applied weight / route_scale, matched expert by expert
        want = {(t, int(e)): float(w) for t in range(BATCH * SEQ)
                for e, w in zip(topk_ids[t], topk_scores[t].float() / _router(s).route_scale)}
        stored = r.weight.to_numpy().reshape(-1, k)
        for t in range(BATCH * SEQ):
            for j in range(k):
                assert stored[t, j] == pytest.approx(want[(t, int(expert[t, j]))], abs=2e-5)
        assert stored.max() <= 1.0 + 1e-6
        assert not r.dropped.any()  # torchtitan never drops
        # routes.margin in the space the router ranked in: its own scores (sigmoid or softmax) + the expert bias
        space = g["raw"][2].reshape(-1, E).double() + (0 if g["bias"] is None else g["bias"].double())
        picked = np.take_along_axis(space.numpy(), expert, 1).min(1)
        others = space.numpy().copy()
        np.put_along_axis(others, expert, -np.inf, 1)
        tol = 2e-5 if space.dtype == torch.float64 and g["raw"][2].dtype == torch.float32 else 1e-2
        np.testing.assert_allclose(r.margin.to_numpy()[::k], picked - others.max(1), atol=tol)
        # aggregates over torchtitan's own gate output (the logits), not over its sigmoid/softmax scores
        logits = g["logits"].reshape(-1, E).double()
        st = stats[stats.layer == s.layer]
        np.testing.assert_allclose(st.prob_sum.to_numpy(), logits.softmax(-1).sum(0).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(st.assigned.to_numpy(), np.bincount(topk_ids.reshape(-1).numpy(), minlength=E))
        np.testing.assert_array_equal(st.dropped.to_numpy(), np.zeros(E))
        ls = lstats[lstats.layer == s.layer]
        lse = logits.logsumexp(-1)
        p = logits.softmax(-1)
        assert float(ls.z_loss_sum.iloc[0]) == pytest.approx(float((lse * lse).sum()), rel=1e-4)
        assert float(ls.entropy_sum.iloc[0]) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-4)
        # slot 0 as torchtitan ranked: its top biased score (of equal scores, torchtitan's order)
        bias = g["bias"]
        ranked = _ranked(s, g["raw"][2].reshape(-1, E), bias)
        first = torch.tensor(expert[:, 0], dtype=torch.long)
        assert torch.equal(ranked.gather(1, first[:, None])[:, 0], ranked.max(-1).values)
        np.testing.assert_array_equal(st.first_choice.to_numpy(), np.bincount(expert[:, 0], minlength=E))


def test_extract_never_syncs():
    """The reader uses tensor ops only: no host sync inside the hook (collectors.testing.SyncGuard)."""
    from collectors.testing import extractions_under_guard

    model = tiny_torchtitan_moe(seed=3, expert_bias=True, route_norm=True, route_scale=2.5, top_k=3,
                                num_expert_groups=4, num_limited_groups=2, vocab_size=VOCAB)
    sites = find_routers(model)
    with torch.no_grad():
        guard, captured = extractions_under_guard(sites, lambda: model(_ids(4)))
    assert guard.checked_calls == len(sites) == len(captured) == 2


def test_recorded_under_torch_compile_in_one_graph(tmp_path):
    """Recorder attached, then torch.compile(backend='aot_eager'): one graph as the model alone, no graph break, no
    recompile over 3 forwards and 2 steps, and the routes equal torchtitan's router outputs of an eager run."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    model = tiny_torchtitan_moe(seed=1, expert_bias=True, route_norm=True, route_scale=2.5, top_k=3,
                                vocab_size=VOCAB)
    sites = find_routers(model)
    batches = [[_ids(30 + 3 * step + f) for f in range(3)] for step in range(2)]
    eager: list[dict] = []
    seen: dict = {}
    hooks = [s.module.register_forward_hook(lambda m, i, o, s=s: seen.__setitem__(s.layer, (o[1], o[0])))
             for s in sites]
    try:
        for forwards in batches:
            for ids in forwards:
                with torch.no_grad():
                    model(ids)
                eager.append(dict(seen))
    finally:
        for h in hooks:
            h.remove()
    torch._dynamo.reset()
    counters.clear()
    try:
        cnt = CompileCounterWithBackend("aot_eager")
        with Recorder(model, tmp_path / "run") as rec:
            compiled = torch.compile(model, backend=cnt)
            for step, forwards in enumerate(batches):
                for ids in forwards:
                    with torch.no_grad():
                        compiled(ids)
                rec.step(step)
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        assert cnt.frame_count == 1
    finally:
        torch._dynamo.reset()
    routes = query(tmp_path / "run", "SELECT step, seq, pos, layer, slot, expert, weight FROM routes ORDER BY ALL")
    k = 3
    for step in range(2):
        for f in range(3):
            for s in sites:
                ids_k, w = (t.reshape(-1, k) for t in eager[step * 3 + f][s.layer])  # torchtitan's, eager
                r = routes[(routes.step == step) & (routes.layer == s.layer) & (routes.seq // BATCH == f)]
                expert = torch.tensor(r.expert.to_numpy().reshape(-1, k))
                assert torch.equal(expert.sort(-1).values, ids_k.sort(-1).values)
                order = (expert[:, :, None] == ids_k[:, None, :]).float().argmax(-1)
                np.testing.assert_allclose(r.weight.to_numpy().reshape(-1, k), (w.gather(1, order) / 2.5).numpy(),
                                           atol=2e-5)


def test_expert_bias_recorded_every_step_as_the_router_ranked_with_it(tmp_path):
    """torchtitan updates `expert_bias_E` in place outside the forward (an optimizer pre-step hook); here the same
    update (sign of mean - load, centred) is applied by hand after each step's forward and before rec.step(): the
    stored bias of every step equals the one the router got as its call's second argument in that step."""
    model = tiny_torchtitan_moe(seed=2, expert_bias=True, route_norm=True, top_k=2).train()  # counts tokens
    seen: dict[int, list] = {}
    routers = [layer.router for layer in model.layers]
    hooks = [r.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, []).append(a[1].detach().clone()))
             for i, r in enumerate(routers)]
    gen = torch.Generator().manual_seed(7)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="In CPU autocast")
        with Recorder(model, tmp_path / "run", flush_every=2) as rec:
            for step in range(3):
                with torch.no_grad():
                    model(torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen))
                    for layer in model.layers:  # torchtitan's _update_expert_bias, one process
                        tokens = layer.tokens_per_expert_E.float()
                        delta = layer.load_balance_coeff * 50 * torch.sign(tokens.mean() - tokens)
                        layer.expert_bias_E.add_(delta - delta.mean())
                        layer.tokens_per_expert_E.zero_()
                rec.step(step)
    for h in hooks:
        h.remove()
    eb = query(tmp_path / "run", "SELECT step, layer, expert, bias FROM expert_bias ORDER BY step, layer, expert")
    assert len(eb) == 3 * len(routers) * routers[0].num_experts
    for step in range(3):
        for layer in range(len(routers)):
            got = eb[(eb.step == step) & (eb.layer == layer)].bias.to_numpy()
            np.testing.assert_array_equal(got, seen[layer][step].double().numpy())
    assert not torch.equal(seen[0][0], seen[0][2])  # the bias did move between steps
