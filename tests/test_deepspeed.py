"""DeepSpeed 0.19.8 `TopKGate` (`deepspeed.moe.layer.MoE`), out of the box (no predicate, no adapter), on a tiny
stack of DeepSpeed's own `MoE` layers on a CPU (collectors.testing.tiny_deepspeed_moe; ep_size 1).

References, all DeepSpeed's own, for every token, layer and slot:
- the gate's return value inside `MOELayer` (`sparse_routes=True`: `indices[k, S]` with -1 where the capacity
  limit dropped the route, `gates[k, S]` as applied, `exp_counts`), captured by a raw forward hook;
- the gate's logits: the argument DeepSpeed passes to its own `top1gating` / `top2gating` / `topkgating`;
- for dropped routes, which expert and which weight: the same gate (same weights, same input) run again with
  `drop_tokens=False`, i.e. DeepSpeed's routing before the capacity limit;
- the dense output of the gate called alone (`combine_weights`, `dispatch_mask`), read the same way.

A missing deepspeed skips this module, except where MOEVIZ_REQUIRE_FRAMEWORKS=1 (set by .ci/run): there a skipped
framework test is not a pass, and the import error fails the run.
"""

from __future__ import annotations

import warnings
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from collectors.testing import require_framework  # noqa: E402

sharded_moe = require_framework("deepspeed.moe.sharded_moe", "deepspeed")

from collectors.recorder import Recorder  # noqa: E402
from collectors.routers import RouterError, check_router_output, find_routers  # noqa: E402
from collectors.testing import extractions_under_guard, tiny_deepspeed_moe  # noqa: E402
from moeviz.store import query  # noqa: E402

BATCH, SEQ, VOCAB = 3, 8, 64
DROPS = dict(eval_capacity_factor=0.5, min_capacity=0)  # eval capacity below the load: the gate drops routes

CONFIGS = {
    "k1_drops": dict(k=1, **DROPS),  # random token selection (use_rts) picks which tokens are dropped
    "k1_no_drops": dict(k=1, drop_tokens=False),
    "k2_drops": dict(k=2, top2_2nd_expert_sampling=False, **DROPS),
    "k2_sampled_no_drops": dict(k=2, drop_tokens=False),  # second expert drawn with Gumbel noise (the default)
    "k3_drops": dict(k=3, num_experts=6, **DROPS),  # topkgating, drop_policy 'probs'
    "k2_drops_bf16": dict(k=2, top2_2nd_expert_sampling=False, dtype=torch.bfloat16, **DROPS),
}
GATING = ("top1gating", "top2gating", "topkgating")


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _forward_with_references(model, sites, ids) -> dict[int, dict]:
    """One forward; per layer: the extracted RouterOutput, the gate's own sparse output and logits, and the gate's
    own output before capacity dropping (run again with drop_tokens=False on the same input)."""
    got: dict[int, dict] = {s.layer: {} for s in sites}
    current: list[dict] = []
    handles = []

    def capture_logits(name):
        original = getattr(sharded_moe, name)

        def wrapped(logits, *args, **kwargs):
            if current:
                current[-1].setdefault("logits", logits.detach().clone())  # top2gating adds noise in place
            return original(logits, *args, **kwargs)

        return mock.patch.object(sharded_moe, name, wrapped)

    def pre(m, i, d):
        current.append(d)
        d["rng"] = torch.get_rng_state()  # to draw the gate's own noise (Gumbel, random token selection) again

    def post(m, i, o, s, d):
        current.pop()
        d.update(out=s.extract(m, i, o), raw=o, input=i[0].detach().clone())
        drop = m.drop_tokens
        m.drop_tokens = False  # DeepSpeed's own routing before the capacity limit
        after = torch.get_rng_state()
        torch.set_rng_state(d["rng"])
        try:
            d["before"] = m.forward(i[0], None, True)  # forward: not through the hooks again
        finally:
            m.drop_tokens = drop
            torch.set_rng_state(after)

    for s in sites:
        d = got[s.layer]
        handles += [
            s.module.register_forward_pre_hook(lambda m, i, d=d: pre(m, i, d)),
            s.module.register_forward_hook(lambda m, i, o, s=s, d=d: post(m, i, o, s, d)),
        ]
    patches = [capture_logits(name) for name in GATING]
    try:
        for p in patches:
            p.start()
        with torch.no_grad():
            model(ids)
    finally:
        for p in patches:
            p.stop()
        for h in handles:
            h.remove()
    return got


@pytest.fixture(scope="module", params=list(CONFIGS))
def ds_run(request):
    kwargs = dict(CONFIGS[request.param])
    model = tiny_deepspeed_moe(seed=1, vocab_size=VOCAB, **kwargs)
    sites = find_routers(model)  # out of the box: no predicate, no adapter
    ids = _ids(2)
    got = _forward_with_references(model, sites, ids)
    return request.param, model, sites, got, ids


def _gate(s):
    return s.module  # DeepSpeed's TopKGate


def test_gates_found_with_sizes_and_capacity(ds_run):
    name, model, sites, _, _ = ds_run
    assert [s.name for s in sites] == ["layers.0.deepspeed_moe.gate", "layers.1.deepspeed_moe.gate"]
    assert {s.kind for s in sites} == {"deepspeed-topk"}
    for s in sites:
        g = _gate(s)
        assert (s.n_experts, s.top_k, s.weight_scale) == (g.wg.out_features, g.k, 1.0)
        assert not g.training  # found in eval mode: the eval capacity factor is the one in effect
        assert s.capacity_factor == (g.eval_capacity_factor if g.drop_tokens else None)


def test_every_token_layer_and_slot_equals_deepspeeds_routing(ds_run):
    name, model, sites, got, _ = ds_run
    n_dropped = 0
    for s in sites:
        g = got[s.layer]
        out, raw, before = g["out"], g["raw"], g["before"]
        k = s.top_k
        torch.testing.assert_close(out.logits, g["logits"], rtol=0, atol=0)  # DeepSpeed's own logits
        idx, gates = raw[3].t().long(), raw[5].t()  # [S, k] as the gate returned them (-1 = dropped)
        kept = idx >= 0
        assert torch.equal(out.dropped, ~kept)  # dropped exactly where DeepSpeed dropped, slot by slot
        assert torch.equal(out.index[kept], idx[kept])  # kept: DeepSpeed's expert, in DeepSpeed's slot
        assert torch.equal(out.weights[kept], gates[kept].float())  # and the gate weight it applied
        # every slot, dropped ones included: DeepSpeed's routing before the capacity limit
        idx_before, gates_before = before[3].t().long(), before[5].t()
        assert bool((idx_before >= 0).all())
        assert torch.equal(out.index, idx_before)
        torch.testing.assert_close(out.weights[~kept], gates_before[~kept].float(), rtol=1e-6, atol=1e-6)
        # DeepSpeed's exp_counts count the assignments before dropping
        assert torch.equal(torch.bincount(out.index.reshape(-1), minlength=s.n_experts), raw[6].long())
        n_dropped += int((~kept).sum())
        check_router_output(s, out)  # moeviz's first-output check accepts it
        if k > 1:  # slots in DeepSpeed's order: the first choice is the most probable expert
            probs = torch.softmax(out.logits, -1)
            assert torch.equal(probs.gather(1, out.index[:, :1])[:, 0], probs.max(-1).values)
    if _gate(sites[0]).drop_tokens:
        assert n_dropped > 0  # the test exercises drops
    else:
        assert n_dropped == 0


def test_dense_output_of_the_gate_alone_reads_the_same(ds_run):
    """TopKGate called alone returns (l_aux, combine_weights [S, E, C], dispatch_mask [S, E, C], exp_counts)."""
    name, model, sites, got, _ = ds_run
    for s in sites:
        g = got[s.layer]
        gate = _gate(s)
        with torch.no_grad():
            dense = gate(g["input"])  # sparse_routes=False
        assert len(dense) == 4 and dense[2].dim() == 3
        out = s.extract(gate, (g["input"],), dense)
        if "sampled" in name:  # the second expert is drawn anew: only the first is comparable
            assert torch.equal(out.index[:, 0], g["out"].index[:, 0])
            kept_map = dense[2].any(-1)
            assert torch.equal(torch.zeros_like(kept_map).scatter(1, out.index, True), kept_map)
            continue
        if s.top_k == 1 and gate.drop_tokens:  # random token selection draws which tokens are dropped anew
            kept_map = dense[2].any(-1)  # [S, E]
            assert torch.equal(out.dropped[:, 0], ~kept_map.any(-1))
            assert torch.equal(out.index, g["out"].index)
            continue
        assert torch.equal(out.index, g["out"].index)
        assert torch.equal(out.dropped, g["out"].dropped)
        torch.testing.assert_close(out.weights, g["out"].weights)


def test_recorder_stores_deepspeeds_routing(ds_run, tmp_path):
    """The Recorder's own forward: DeepSpeed's gate output of that very forward (random token selection and the
    second-expert noise draw anew) is captured beside it by a raw hook and is the reference."""
    name, model, sites, _, ids = ds_run
    raw: dict[int, tuple] = {}
    hooks = [s.module.register_forward_hook(
        lambda m, i, o, s=s: raw.__setitem__(s.layer, (o[3].t().long(), o[5].t().float(), o[6].long())))
        for s in sites]
    logits: list = []  # the logits DeepSpeed passed to its gating function, one per layer in order

    def recording(name):
        original = getattr(sharded_moe, name)

        def wrapped(lg, *args, **kwargs):
            logits.append(lg.detach().clone())
            return original(lg, *args, **kwargs)

        return mock.patch.object(sharded_moe, name, wrapped)

    capture = [recording(name) for name in GATING]
    try:
        for c in capture:
            c.start()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # e.g. "saw N tokens ... matches no input batch", clipping
            with Recorder(model, tmp_path / "run", flush_every=1) as rec:
                with torch.no_grad():
                    model(ids)
                rec.step(0)
    finally:
        for c in capture:
            c.stop()
        for h in hooks:
            h.remove()
    routes = query(tmp_path / "run", "SELECT seq, pos, token_id, layer, slot, expert, weight, dropped, margin "
                                     "FROM routes ORDER BY layer, seq, pos, slot")
    stats = query(tmp_path / "run", "SELECT layer, expert, assigned, dropped, prob_sum FROM step_stats "
                                    "ORDER BY layer, expert")
    for s in sites:
        k, E = s.top_k, s.n_experts
        idx, gates, exp_counts = raw[s.layer]  # DeepSpeed's own: [S, k] (-1 = dropped), [S, k], [E]
        r = routes[routes.layer == s.layer]
        assert len(r) == BATCH * SEQ * k
        np.testing.assert_array_equal(r.seq.to_numpy(), np.repeat(np.arange(BATCH), SEQ * k))
        np.testing.assert_array_equal(r.pos.to_numpy(), np.tile(np.repeat(np.arange(SEQ), k), BATCH))
        np.testing.assert_array_equal(r.token_id.to_numpy(), np.repeat(ids.reshape(-1).numpy(), k))
        expert, stored = r.expert.to_numpy().reshape(-1, k), r.weight.to_numpy().reshape(-1, k)
        kept = (idx >= 0).numpy()
        np.testing.assert_array_equal(expert[kept], idx.numpy()[kept])  # every kept route, in DeepSpeed's slot
        np.testing.assert_allclose(stored[kept], gates.numpy()[kept], atol=2e-5)
        np.testing.assert_array_equal(r.dropped.to_numpy().reshape(-1, k), ~kept)  # DeepSpeed's -1, slot by slot
        # routes.margin: the full softmax of the logits DeepSpeed's gating function got
        p = torch.softmax(logits[s.layer].double(), -1).numpy()
        picked = np.take_along_axis(p, expert, 1).min(1)
        np.put_along_axis(p, expert, -np.inf, 1)
        np.testing.assert_allclose(r.margin.to_numpy().reshape(-1, k), np.repeat((picked - p.max(1))[:, None], k, 1),
                                   atol=2e-5)
        st = stats[stats.layer == s.layer]
        # DeepSpeed's exp_counts count the assignments before dropping; dropped = those minus the kept ones
        np.testing.assert_array_equal(st.assigned.to_numpy(), exp_counts.numpy())
        kept_counts = np.bincount(idx.numpy()[kept], minlength=E)
        np.testing.assert_array_equal(st.dropped.to_numpy(), exp_counts.numpy() - kept_counts)
        if _gate(s).drop_tokens:
            assert st.dropped.sum() > 0
        np.testing.assert_allclose(st.prob_sum.to_numpy(),
                                   torch.softmax(logits[s.layer].double(), -1).sum(0).numpy(), rtol=1e-5)


@pytest.mark.parametrize("kwargs, says", [
    (dict(k=2), "top2_2nd_expert_sampling=True and drop_tokens=True"),  # DeepSpeed's defaults for k=2
    (dict(k=1, noisy_gate_policy="RSample"), "noisy_gate_policy='RSample' and drop_tokens=True"),
    (dict(k=2, top2_2nd_expert_sampling=False, noisy_gate_policy="Jitter"), "noisy_gate_policy='Jitter'"),
])
def test_unreadable_configurations_refused_at_start(kwargs, says, tmp_path):
    """A dropped route whose expert was drawn at random is in no output: refused before anything runs."""
    model = tiny_deepspeed_moe(seed=1, vocab_size=VOCAB, **kwargs)
    with pytest.raises(RouterError, match="adapter=") as e:
        find_routers(model)
    assert says in str(e.value) and "DeepSpeed TopKGate" in str(e.value)
    with pytest.raises(RouterError, match="adapter="):
        Recorder(model, tmp_path / "run").start()


def test_extract_never_syncs():
    for kwargs in (dict(k=2, top2_2nd_expert_sampling=False, **DROPS), dict(k=1, **DROPS)):
        model = tiny_deepspeed_moe(seed=3, vocab_size=VOCAB, **kwargs)
        sites = find_routers(model)
        with torch.no_grad():
            guard, captured = extractions_under_guard(sites, lambda: model(_ids(4)))
        assert guard.checked_calls == len(sites) == len(captured) == 2


def test_training_steps_record_what_the_gate_did(tmp_path):
    """model.train() (capacity_factor in effect, random token selection), forward and backward for two steps: each
    step's kept routes equal the gate's own output of that step, and the gate still gets its gradient."""
    model = tiny_deepspeed_moe(seed=5, vocab_size=VOCAB, k=2, top2_2nd_expert_sampling=False, capacity_factor=0.5,
                               min_capacity=0).train()
    sites = find_routers(model)
    seen: list[dict] = []
    hooks = [s.module.register_forward_hook(
        lambda m, i, o, s=s: seen[-1].__setitem__(s.layer, (o[3].t().long(), o[5].t().detach().float())))
        for s in sites]
    try:
        with Recorder(model, tmp_path / "run", flush_every=1) as rec:
            for step in range(2):
                seen.append({})
                model.zero_grad()
                model(_ids(20 + step)).pow(2).mean().backward()
                assert all(s.module.wg.weight.grad is not None for s in sites)
                rec.step(step)
    finally:
        for h in hooks:
            h.remove()
    assert all(s.capacity_factor == 0.5 for s in sites)
    routes = query(tmp_path / "run", "SELECT step, layer, seq, pos, slot, expert, weight FROM routes ORDER BY ALL")
    dropped = query(tmp_path / "run", "SELECT step, layer, sum(dropped) AS n FROM step_stats GROUP BY ALL ORDER BY ALL")
    for step in range(2):
        for s in sites:
            idx, gates = seen[step][s.layer]
            r = routes[(routes.step == step) & (routes.layer == s.layer)]
            expert, weight = r.expert.to_numpy().reshape(-1, 2), r.weight.to_numpy().reshape(-1, 2)
            kept = (idx >= 0).numpy()
            np.testing.assert_array_equal(expert[kept], idx.numpy()[kept])
            np.testing.assert_allclose(weight[kept], gates.numpy()[kept], atol=2e-5)
            n = dropped[(dropped.step == step) & (dropped.layer == s.layer)].n.iloc[0]
            assert n == int((~kept).sum()) > 0


def test_recorded_under_torch_compile(tmp_path):
    """torch.compile(backend='aot_eager') with the Recorder attached: the routes equal the gate's own outputs of an
    eager run. DeepSpeed's MOELayer breaks the graph itself (`C = int(C)`, once per MoE layer), so its layers share
    the frame resumed after the break; the Recorder adds no break and no recompile of that frame (one hook for every
    router, which finds its sink on the module: no per-layer constant for Dynamo to guard on)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    kwargs = dict(k=2, top2_2nd_expert_sampling=False, **DROPS)
    model = tiny_deepspeed_moe(seed=1, vocab_size=VOCAB, **kwargs)
    sites = find_routers(model)
    batches = [[_ids(40 + 2 * step + f) for f in range(2)] for step in range(2)]
    eager, seen = [], {}
    hooks = [s.module.register_forward_hook(
        lambda m, i, o, s=s: seen.__setitem__(s.layer, (o[3].t().long(), o[5].t()))) for s in sites]
    try:
        for forwards in batches:
            for ids in forwards:
                with torch.no_grad():
                    model(ids)
                eager.append(dict(seen))
    finally:
        for h in hooks:
            h.remove()
    try:
        frames, breaks = [], []
        for record in (False, True):
            torch._dynamo.reset()
            counters.clear()
            cnt = CompileCounterWithBackend("aot_eager")
            compiled = torch.compile(model, backend=cnt)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Dynamo's notice about DeepSpeed's Tensor.item()
                rec = Recorder(model, tmp_path / "run").start() if record else None
                for step, forwards in enumerate(batches):
                    for ids in forwards:
                        with torch.no_grad():
                            compiled(ids)
                    if rec is not None:
                        rec.step(step)
                if rec is not None:
                    rec.close()
            frames.append(cnt.frame_count)
            breaks.append(sum(counters["graph_break"].values()))
    finally:
        torch._dynamo.reset()
    assert len(sites) > 1 and breaks[1] == breaks[0] and frames[1] == frames[0], (frames, breaks)
    routes = query(tmp_path / "run", "SELECT step, seq, pos, layer, slot, expert, weight FROM routes ORDER BY ALL")
    dropped = query(tmp_path / "run", "SELECT step, layer, sum(dropped) AS n FROM step_stats GROUP BY ALL")
    for step in range(2):
        for f in range(2):
            for s in sites:
                idx, gates = eager[step * 2 + f][s.layer]
                r = routes[(routes.step == step) & (routes.layer == s.layer) & (routes.seq // BATCH == f)]
                expert, weight = r.expert.to_numpy().reshape(-1, 2), r.weight.to_numpy().reshape(-1, 2)
                kept = (idx >= 0).numpy()
                np.testing.assert_array_equal(expert[kept], idx.numpy()[kept])
                np.testing.assert_allclose(weight[kept], gates.float().numpy()[kept], atol=2e-5)
    assert dropped.n.sum() > 0


def test_rsample_noise_without_drops_reads_the_gates_noisy_choice():
    """k=1 with noisy_gate_policy='RSample' in training (drop_tokens=False): the gate chooses argmax(logits +
    Gumbel noise), not argmax of its probabilities; both the sparse and the dense output read its own choice."""
    model = tiny_deepspeed_moe(seed=1, vocab_size=VOCAB, k=1, noisy_gate_policy="RSample", drop_tokens=False).train()
    site = find_routers(model)[0]
    gate = site.module
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.manual_seed(0)
        sparse = gate(x, None, True)
        torch.manual_seed(0)
        dense = gate(x)
    read_sparse, read_dense = site.extract(gate, (x,), sparse), site.extract(gate, (x,), dense)
    assert torch.equal(read_sparse.index[:, 0], sparse[3][0].long())
    assert torch.equal(read_dense.index, read_sparse.index)
    torch.testing.assert_close(read_dense.weights, read_sparse.weights)
    assert not bool(read_sparse.dropped.any())
    noiseless = torch.softmax(read_sparse.logits, -1).argmax(-1)
    assert bool((noiseless != read_sparse.index[:, 0]).any())  # the noise changed some choices: the test bites
