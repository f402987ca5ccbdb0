"""What find_routers + extract capture equals the model's own routing, for every family, token, layer and slot.

Two independent references per family:
1. the routing recomputed in this file from the router logits that the model itself returns
   (`output_router_logits=True`), with each family's rule written out here (softmax/sigmoid, bias correction,
   group limits, renormalisation, scaling, Switch capacity);
2. the router module's own return value (what the experts consumed), captured by a separate raw hook and
   compared as a per-token expert -> weight map (slot order aside).
For Switch, `dropped` is also checked against what the experts actually computed: a dropped token's expert output
row is exactly zero, a kept token's is not.
"""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")

from collectors.routers import find_routers  # noqa: E402
from collectors.testing import ENCODER_DECODER_FAMILIES, FAMILIES, tiny_linear_gate_moe, tiny_model  # noqa: E402

BATCH, SEQ, DEC_SEQ = 2, 12, 7


@functools.lru_cache(maxsize=None)
def _run(family: str) -> dict:
    """Build the family's tiny model, hook every router (extract + raw) and the Switch experts, run a forward."""
    model, config = tiny_model(family, seed=3)
    sites = find_routers(model)
    captured: dict[int, object] = {}
    raw: dict[int, object] = {}
    expert_out: dict[int, torch.Tensor] = {}
    handles = []
    modules = dict(model.named_modules())
    for s in sites:
        store = lambda m, i, o, s=s: captured.__setitem__(s.layer, s.extract(m, i, o))  # noqa: E731
        handles.append(s.module.register_forward_hook(store))
        handles.append(s.module.register_forward_hook(lambda m, i, o, s=s: raw.__setitem__(s.layer, o)))
        experts = modules.get(s.name.rsplit(".", 1)[0] + ".experts")
        if experts is not None:
            handles.append(
                experts.register_forward_hook(lambda m, i, o, s=s: expert_out.__setitem__(s.layer, o.detach().clone()))
            )
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(2, config.vocab_size, (BATCH, SEQ), generator=gen)
    try:
        with torch.no_grad():
            if family in ENCODER_DECODER_FAMILIES:
                dec = torch.randint(2, config.vocab_size, (BATCH, DEC_SEQ), generator=gen)
                out = model(input_ids=ids, decoder_input_ids=dec, output_router_logits=True)
                logits = tuple(out.encoder_router_logits) + tuple(out.decoder_router_logits)
            else:
                out = model(input_ids=ids, output_router_logits=True)
                logits = tuple(out.router_logits)
    finally:
        for h in handles:
            h.remove()
    return dict(config=config, sites=sites, captured=captured, raw=raw, logits=logits, expert_out=expert_out)


@pytest.fixture(scope="module", params=FAMILIES)
def run(request):
    return request.param, _run(request.param)


# --------------------------------------------------------------------------------------------------------------
# Each family's routing rule, written out independently of collectors.routers (index sorted: slot 0 = top choice).


def _top(scores, k):
    """(values, index) of the k largest scores per row, descending (argsort, not topk)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), order


def ref_softmax_topk(logits, k, renormalize):  # Mixtral (always renormalises), Qwen2/3-MoE, OLMoE
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = _top(probs, k)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return idx, w


def ref_granite(logits, k):  # top-k on logits, then softmax over the k chosen logits
    top_logits, idx = _top(logits.float(), k)
    return idx, torch.softmax(top_logits, dim=-1)


def ref_phimoe(logits, eps):  # sparsemixer in eval mode: two rounds of (argmax, threshold mask, masked softmax)
    scores = logits.float()
    idx, ws = [], []
    masked = scores.clone()
    for _ in range(2):
        top_val, top = masked.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=top_val)
        outside = ((top_val - scores) / factor) > 2 * eps
        gates = torch.softmax(masked.masked_fill(outside, float("-inf")), dim=-1)
        idx.append(top)
        ws.append(gates.gather(1, top))
        masked = masked.scatter(1, top, float("-inf"))
    return torch.cat(idx, 1), torch.cat(ws, 1)


def ref_deepseek_v3(logits, cfg, bias):  # sigmoid + bias for choice, groups by sum of top-2, unbiased weights
    E, G = cfg.n_routed_experts, cfg.n_group
    scores = logits.float().sigmoid()
    choice = scores + bias
    group_score = choice.view(-1, G, E // G).sort(dim=-1, descending=True).values[..., :2].sum(-1)  # [T, G]
    _, groups = _top(group_score, cfg.topk_group)
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, groups, True)  # [T, G]
    allowed = allowed.repeat_interleave(E // G, dim=1)  # [T, E]
    _, idx = _top(choice.masked_fill(~allowed, float("-inf")), cfg.num_experts_per_tok)
    w = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * cfg.routed_scaling_factor


def ref_deepseek_v2(logits, cfg):  # softmax, groups by max (group_limited_greedy), weights * scaling
    E, G = cfg.n_routed_experts, cfg.n_group
    probs = torch.softmax(logits.float(), dim=-1)
    _, groups = _top(probs.view(-1, G, E // G).amax(-1), cfg.topk_group)
    allowed = torch.zeros(probs.shape[0], G, dtype=torch.bool).scatter(1, groups, True).repeat_interleave(E // G, 1)
    w, idx = _top(probs.masked_fill(~allowed, 0.0), cfg.num_experts_per_tok)
    return idx, w * cfg.routed_scaling_factor


def ref_switch(logits_bse, capacity):
    """Top-1 with a per-sequence capacity: a token is dropped when `capacity` earlier-or-equal tokens of its
    sequence already chose the same expert (brute force over positions)."""
    probs = torch.softmax(logits_bse.float(), dim=-1)
    B, S, E = probs.shape
    choice = probs.argmax(-1)  # [B, S]
    dropped = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        count = [0] * E
        for s in range(S):
            e = int(choice[b, s])
            count[e] += 1
            dropped[b, s] = count[e] > capacity
    return choice.reshape(-1, 1), probs.amax(-1).reshape(-1, 1), dropped.reshape(-1, 1)


def reference(family, cfg, site, logits):
    """(index, weights, dropped or None) of the family's rule applied to the model's returned logits."""
    k = site.top_k
    if family == "mixtral":
        return (*ref_softmax_topk(logits, k, True), None)
    if family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        return (*ref_softmax_topk(logits, k, cfg.norm_topk_prob), None)
    if family == "granitemoe":
        return (*ref_granite(logits, k), None)
    if family == "phimoe":
        return (*ref_phimoe(logits, cfg.router_jitter_noise), None)
    if family == "deepseek_v3":
        return (*ref_deepseek_v3(logits, cfg, site.module.e_score_correction_bias), None)
    if family == "deepseek_v2":
        return (*ref_deepseek_v2(logits, cfg), None)
    if family == "switch_transformers":
        return ref_switch(logits, cfg.expert_capacity)
    raise AssertionError(f"no reference routing rule for {family}")


def _dense(index, weights, n_experts):
    """[tokens, experts] map of expert -> weight (0 where not chosen): compares routings regardless of slot order."""
    return torch.zeros(index.shape[0], n_experts, dtype=torch.float64).scatter(1, index.long(), weights.double())


# --------------------------------------------------------------------------------------------------------------


def test_every_router_fired_once_per_layer(run):
    family, r = run
    assert sorted(r["captured"]) == [s.layer for s in r["sites"]]
    assert len(r["logits"]) == len(r["sites"]), "the model returns one logits tensor per MoE layer"


def test_captured_logits_are_the_models_logits(run):
    family, r = run
    for site, model_logits in zip(r["sites"], r["logits"]):
        got = r["captured"][site.layer]
        assert torch.equal(got.logits, model_logits.reshape(-1, site.n_experts)), site.name
        assert not got.logits.requires_grad and not got.weights.requires_grad


def test_captured_routing_equals_recomputed_rule(run):
    family, r = run
    for site, model_logits in zip(r["sites"], r["logits"]):
        got = r["captured"][site.layer]
        idx, w, dropped = reference(family, r["config"], site, model_logits)
        tokens = idx.shape[0]
        assert got.index.shape == (tokens, site.top_k) and got.weights.shape == (tokens, site.top_k)
        assert torch.equal(got.index, idx.long()), f"{family} {site.name}: expert index differs"
        torch.testing.assert_close(got.weights.float(), w.float(), rtol=1e-6, atol=1e-7)
        if dropped is None:
            assert got.dropped is None
        else:
            assert torch.equal(got.dropped, dropped), f"{family} {site.name}: dropped differs from capacity rule"


def test_captured_routing_equals_router_return_value(run):
    """The (expert, weight) pairs the experts consumed, per token, equal the captured ones (any slot order)."""
    family, r = run
    for site in r["sites"]:
        got, raw = r["captured"][site.layer], r["raw"][site.layer]
        if family == "switch_transformers":
            dispatch, probs, _ = raw
            dispatch = dispatch.reshape(-1, site.n_experts)
            kept = ~got.dropped[:, 0]
            assert torch.equal(dispatch[kept].argmax(-1), got.index[kept, 0])
            assert torch.equal(dispatch.sum(-1) == 0, got.dropped[:, 0])
            assert torch.equal(probs.reshape(-1, 1), got.weights)
            continue
        _, model_w, model_idx = raw
        want = _dense(model_idx.reshape(got.index.shape), model_w.reshape(got.weights.shape), site.n_experts)
        assert torch.equal(_dense(got.index, got.weights, site.n_experts), want), f"{family} {site.name}"


# PhiMoE (slot 0 is its argmax choice, checked by the rule test) and top-1 Switch have no order to check here.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("phimoe", "switch_transformers")])
def test_slot_zero_is_the_top_choice(family):
    """Slot order is the order of the router's choice, even where the model's topk is unsorted (DeepSeek)."""
    r = _run(family)
    for site in r["sites"]:
        got = r["captured"][site.layer]
        if family == "deepseek_v3":
            key = got.logits.float().sigmoid() + site.module.e_score_correction_bias
        elif family == "granitemoe":
            key = got.logits.float()
        else:
            key = got.logits.float().softmax(-1)
        chosen = key.gather(1, got.index)  # [tokens, k]
        assert bool((chosen[:, :-1] >= chosen[:, 1:]).all()), site.name


def test_deepseek_rules_are_exercised():
    """The tiny DeepSeek-V3 model is one where bias correction and group limits change the routing, so the
    rule test above would fail if extract ignored them."""
    r = _run("deepseek_v3")
    cfg = r["config"]
    changed_by_bias = changed_by_groups = 0
    for site, logits in zip(r["sites"], r["logits"]):
        scores = logits.float().sigmoid()
        plain = _top(scores, cfg.num_experts_per_tok)[1]
        biased = _top(scores + site.module.e_score_correction_bias, cfg.num_experts_per_tok)[1]
        grouped = r["captured"][site.layer].index
        changed_by_bias += int((plain.sort(-1).values != biased.sort(-1).values).any(-1).sum())
        changed_by_groups += int((biased.sort(-1).values != grouped.sort(-1).values).any(-1).sum())
    assert changed_by_bias > 0 and changed_by_groups > 0


def test_switch_dropped_tokens_are_the_ones_the_experts_skipped():
    r = _run("switch_transformers")
    n_dropped = 0
    for site in r["sites"]:
        got = r["captured"][site.layer]
        rows = r["expert_out"][site.layer].reshape(got.index.shape[0], -1)  # [tokens, hidden]
        zero_rows = (rows == 0).all(-1)
        assert torch.equal(zero_rows, got.dropped[:, 0]), site.name
        n_dropped += int(got.dropped.sum())
        assert site.expert_capacity == r["config"].expert_capacity
        assert site.capacity_factor_for(SEQ) == pytest.approx(r["config"].expert_capacity * site.n_experts / SEQ)
    assert n_dropped > 0, "the tiny Switch model should overflow its experts' capacity"
    stacks = [s.stack for s in r["sites"]]
    assert stacks == ["encoder"] * 2 + ["decoder"] * 2


@pytest.mark.parametrize("norm", [None, False])
def test_linear_gate_4x_layout_matches_block_routing(norm):
    """transformers 4.x layout: the router is a plain nn.Linear; extract recomputes what the block did."""
    model, log = tiny_linear_gate_moe(norm_topk_prob=norm)
    sites = find_routers(model)
    assert [s.name for s in sites] == ["model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"]
    captured = []
    handles = [s.module.register_forward_hook(lambda m, i, o, s=s: captured.append(s.extract(m, i, o))) for s in sites]
    try:
        with torch.no_grad():
            model(torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1)))
    finally:
        for h in handles:
            h.remove()
    assert len(captured) == len(log) == 2
    for got, (logits, weights, experts) in zip(captured, log):
        assert torch.equal(got.logits, logits)
        assert torch.equal(got.index, experts)
        torch.testing.assert_close(got.weights, weights, rtol=0, atol=0)
        idx, w = ref_softmax_topk(logits, 2, renormalize=norm is None)
        assert torch.equal(got.index, idx)
        torch.testing.assert_close(got.weights, w, rtol=1e-6, atol=1e-7)
