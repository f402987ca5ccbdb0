"""find_routers: which modules it takes (and which it must not), layer/block/stack numbering, custom layers through
predicate/adapter, the no-router error, the from_pretrained loading path, and proof that extract never syncs
a GPU (a dispatch-mode guard on CPU, a meta-device run, and a CUDA sync-debug run where a GPU exists)."""

from __future__ import annotations

import doctest

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import collectors.routers as routers  # noqa: E402
from collectors.routers import (  # noqa: E402
    NoRoutersFoundError,
    RouterAdapter,
    RouterError,
    RouterOutput,
    RouterOutputError,
    find_routers,
)
from collectors.testing import (  # noqa: E402
    ENCODER_DECODER_FAMILIES,
    FAMILIES,
    HostSyncError,
    SyncGuard,
    tiny_linear_gate_moe,
    tiny_model,
)
from moeviz.errors import MoevizError  # noqa: E402

_MODELS: dict[str, tuple] = {}


def model_of(family):
    """Each family's tiny model, built once per test session of this file."""
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, seed=5)
    return _MODELS[family]


def forward(family, model, config, seq=10, batch=2):
    ids = torch.randint(2, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        if family in ENCODER_DECODER_FAMILIES:
            return model(input_ids=ids, decoder_input_ids=ids[:, : seq // 2])
        return model(input_ids=ids)


def hooked(sites, wrap=lambda fn, *a: fn(*a)):
    """Register a hook per site that stores wrap(extract, m, i, o); returns (captured dict, handles)."""
    captured = {}
    handles = [
        s.module.register_forward_hook(lambda m, i, o, s=s: captured.__setitem__(s.layer, wrap(s.extract, m, i, o)))
        for s in sites
    ]
    return captured, handles


# ----------------------------------------------------------------------------------------------------------------
# Discovery per family

EXPECTED = {  # family -> (router names, block indices, n_experts, top_k, stacks)
    "mixtral": (["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"], [0, 1], 4, 2, [None, None]),
    "qwen2_moe": (["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"], [0, 1], 4, 2, [None, None]),
    "qwen3_moe": (["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"], [0, 1], 8, 2, [None, None]),
    "olmoe": (["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"], [0, 1], 8, 2, [None, None]),
    # first_k_dense_replace=1: block 0 is dense, so MoE layers 0 and 1 live in blocks 1 and 2
    "deepseek_v3": (["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"], [1, 2], 8, 2, [None, None]),
    "deepseek_v2": (["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"], [1, 2], 8, 2, [None, None]),
    "granitemoe": (
        ["model.layers.0.block_sparse_moe.router", "model.layers.1.block_sparse_moe.router"],
        [0, 1],
        4,
        2,
        [None, None],
    ),
    "phimoe": (["model.layers.0.mlp.router", "model.layers.1.mlp.router"], [0, 1], 4, 2, [None, None]),
    "switch_transformers": (
        [
            "encoder.block.0.layer.1.mlp.router",
            "encoder.block.1.layer.1.mlp.router",
            "decoder.block.0.layer.2.mlp.router",
            "decoder.block.1.layer.2.mlp.router",
        ],
        [0, 1, 0, 1],
        4,
        1,
        ["encoder", "encoder", "decoder", "decoder"],
    ),
}


def test_every_family_has_an_expectation():
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_find_routers_per_family(family):
    model, config = model_of(family)
    names, blocks, n_experts, top_k, stacks = EXPECTED[family]
    sites = find_routers(model)
    assert [s.name for s in sites] == names
    assert [s.layer for s in sites] == list(range(len(names)))
    assert [s.block_index for s in sites] == blocks
    assert [s.stack for s in sites] == stacks
    assert {s.n_experts for s in sites} == {n_experts} and {s.top_k for s in sites} == {top_k}
    modules = dict(model.named_modules())
    assert all(modules[s.name] is s.module for s in sites)
    taken = {s.name.rsplit(".", 1)[-1] for s in sites}
    assert not taken & {"shared_expert_gate", "gate_proj", "classifier"}
    if family == "switch_transformers":
        assert all(s.expert_capacity == config.expert_capacity and s.capacity_factor is None for s in sites)
        assert sites[0].capacity_factor_for(8) == pytest.approx(config.expert_capacity * 4 / 8)
    else:
        assert all(s.capacity_factor is None and s.expert_capacity is None for s in sites)


def test_qwen2_moe_shared_expert_gate_exists_but_is_not_a_router():
    model, _ = model_of("qwen2_moe")
    names = [n for n, _ in model.named_modules()]
    assert "model.layers.0.mlp.shared_expert_gate" in names
    assert not any("shared_expert" in s.name for s in find_routers(model))


def test_structure_rule_ignores_gates_that_are_not_one_output_per_expert():
    """4.x layout with the traps: a shared-expert gate (1 output) beside the experts, and a gate_proj with as many
    outputs as there are experts but inside an MLP that has no `experts`."""

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(16, 4), nn.Linear(16, 4)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.top_k = 2
            self.gate = nn.Linear(16, 4, bias=False)
            self.experts = nn.ModuleList(MLP() for _ in range(4))
            self.shared_expert = MLP()
            self.shared_expert_gate = nn.Linear(16, 1, bias=False)

    model = nn.ModuleDict({"layers": nn.ModuleList([Block(), MLP(), Block()])})
    sites = find_routers(model)
    assert [(s.name, s.layer, s.block_index, s.kind) for s in sites] == [
        ("layers.0.gate", 0, 0, "linear-gate"),
        ("layers.2.gate", 1, 2, "linear-gate"),
    ]


def test_deepseek_unsorted_slots_are_sorted_by_the_routers_choice_score():
    """DeepSeek routers call topk(sorted=False): on a GPU the slots can come in any order. Feed extract the
    router's real output with its slots reversed: the result must be the same, slot 0 the top choice."""
    model, config = model_of("deepseek_v3")
    site = find_routers(model)[0]
    seen = {}
    handle = site.module.register_forward_hook(lambda m, i, o: seen.update(inputs=i, output=o))
    try:
        forward("deepseek_v3", model, config)
    finally:
        handle.remove()
    logits, w, idx = seen["output"]
    normal = site.extract(site.module, seen["inputs"], (logits, w, idx))
    flipped = site.extract(site.module, seen["inputs"], (logits, w.flip(-1), idx.flip(-1)))
    assert torch.equal(normal.index, flipped.index) and torch.equal(normal.weights, flipped.weights)
    key = (logits.sigmoid() + site.module.e_score_correction_bias).gather(1, normal.index)
    assert bool((key[:, 0] >= key[:, 1]).all())
    assert not torch.equal(flipped.index, idx.flip(-1)), "the reversed input really was out of order"


def test_phimoe_keeps_first_choice_in_slot_zero():
    """PhiMoE's sparsemixer picks its first expert by argmax of the logits; slot 0 stays that expert even when
    its weight is smaller than the second's."""
    model, config = model_of("phimoe")
    sites = find_routers(model)
    captured, handles = hooked(sites)
    try:
        forward("phimoe", model, config)
    finally:
        for h in handles:
            h.remove()
    for out in captured.values():
        assert torch.equal(out.index[:, 0], out.logits.argmax(-1))


class MoEGate(nn.Module):
    """The layout of DeepSeek-V3's trust_remote_code `MoEGate`: returns (topk_idx, topk_weight, aux_loss) and no
    logits; sigmoid scores, bias-corrected choice, unsorted top-k."""

    def __init__(self, dim=16, n_experts=8, k=3):
        super().__init__()
        self.top_k, self.n_routed_experts, self.scoring_func = k, n_experts, "sigmoid"
        self.weight = nn.Parameter(torch.randn(n_experts, dim))
        self.e_score_correction_bias = nn.Parameter(torch.rand(n_experts) * 0.3)

    def forward(self, x):  # [batch, seq, dim]
        scores = nn.functional.linear(x.reshape(-1, x.shape[-1]).float(), self.weight.float()).sigmoid()
        idx = (scores + self.e_score_correction_bias).topk(self.top_k, dim=-1).indices.flip(-1)  # worst first
        w = scores.gather(1, idx)
        return idx, w / w.sum(-1, keepdim=True), None


def test_remote_code_moegate_without_logits_in_its_output():
    torch.manual_seed(2)
    block = nn.Module()
    block.gate, block.experts = MoEGate(), nn.ModuleList(nn.Linear(16, 16) for _ in range(8))
    model = nn.ModuleDict({"layers": nn.ModuleList([block])})
    (site,) = find_routers(model)
    assert (site.name, site.n_experts, site.top_k, site.kind) == ("layers.0.gate", 8, 3, "topk-router")
    x = torch.randn(2, 5, 16)
    out = site.extract(block.gate, (x,), block.gate(x))
    logits = x.reshape(-1, 16) @ block.gate.weight.T  # [tokens, experts]
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    want = (logits.sigmoid() + block.gate.e_score_correction_bias).topk(3, dim=-1).indices  # sorted, best first
    assert torch.equal(out.index, want)
    w = logits.sigmoid().gather(1, want)
    torch.testing.assert_close(out.weights, w / w.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Errors


class PlainGate(nn.Module):
    """Named like a router, but routes to no experts (a gating unit of something else)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return torch.sigmoid(self.proj(x)) * x


def test_no_router_error_says_what_was_searched_and_what_to_do():
    model = nn.Sequential(nn.Linear(8, 8), PlainGate(), nn.LayerNorm(8))
    with pytest.raises(NoRoutersFoundError) as err:
        find_routers(model)
    assert isinstance(err.value, MoevizError)
    msg = str(err.value)
    for pattern in routers.ROUTER_CLASS_PATTERNS:
        assert pattern in msg
    assert "experts" in msg and "nn.Linear" in msg  # the structures searched
    for cls in ("Sequential", "Linear", "PlainGate", "LayerNorm"):  # module classes seen
        assert cls in msg
    assert "predicate=" in msg and "adapter=" in msg and "RouterOutput" in msg


def test_predicate_matching_nothing_raises():
    model, _ = tiny_linear_gate_moe()
    with pytest.raises(NoRoutersFoundError, match="predicate= given to find_routers matched no module"):
        find_routers(model, predicate=lambda name, m: name.endswith("no_such_module"))


def test_predicate_on_unknown_module_without_adapter_asks_for_one():
    model = nn.Sequential(nn.Linear(8, 8))
    model[0].num_experts, model[0].top_k = 8, 2
    with pytest.raises(RouterError, match="adapter="):
        find_routers(model, predicate=lambda name, m: isinstance(m, nn.Linear))


def test_predicate_on_module_with_unknown_sizes_asks_for_them():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(RouterError, match="n_experts"):
        find_routers(model, predicate=lambda name, m: isinstance(m, nn.Linear), adapter=lambda m, i, o: None)


def test_adapter_with_wrong_shapes_is_reported():
    model = nn.Sequential(nn.Linear(8, 4))

    class Bad(RouterAdapter):
        n_experts, top_k = 4, 2

        def __call__(self, module, inputs, output):
            w, idx = output.topk(3, dim=-1)  # three slots where the adapter promised two
            return RouterOutput(logits=output, index=idx, weights=w)

    (site,) = find_routers(model, predicate=lambda n, m: n == "0", adapter=Bad())
    x = torch.randn(5, 8)
    with pytest.raises(RouterOutputError, match="index has shape"):
        site.extract(model[0], (x,), model[0](x))


# ----------------------------------------------------------------------------------------------------------------
# A user's own MoE layer


class ToyMoE(nn.Module):
    """A user's MoE layer: sigmoid scores, top-k, weights not renormalised; it keeps its routing for the test."""

    def __init__(self, dim=8, n_experts=6, k=2):
        super().__init__()
        self.scorer, self.k = nn.Linear(dim, n_experts), k
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_experts))
        self.last = None

    def forward(self, x):  # [batch, seq, dim]
        scores = self.scorer(x).sigmoid()  # [batch, seq, experts]
        w, idx = scores.topk(self.k, dim=-1)  # [batch, seq, k]
        self.last = (idx.reshape(-1, self.k), w.reshape(-1, self.k))
        outs = torch.stack([e(x) for e in self.experts], -2)  # [batch, seq, experts, dim]
        picked = outs.gather(-2, idx[..., None].expand(*idx.shape, x.shape[-1]))  # [batch, seq, k, dim]
        return x + (picked * w[..., None]).sum(-2)


def toy_adapter(module, inputs, output):
    logits = module.scorer(inputs[0])  # [batch, seq, experts]
    w, idx = logits.sigmoid().topk(module.k, dim=-1)
    return RouterOutput(logits=logits, index=idx, weights=w, dropped=None)


class ToyAdapter(RouterAdapter):
    n_experts, top_k = 6, 2

    def __call__(self, module, inputs, output):
        return toy_adapter(module, inputs, output)


@pytest.mark.parametrize("adapter", [ToyAdapter(), toy_adapter], ids=["RouterAdapter", "function"])
def test_custom_moe_layer_through_predicate_and_adapter(adapter):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), ToyMoE(), nn.ReLU(), ToyMoE())
    with pytest.raises(NoRoutersFoundError):
        find_routers(model)  # nothing the built-in rules know (no router class name, no top_k to recompute with)
    if not isinstance(adapter, RouterAdapter):  # a plain function: sizes come from the module
        for m in model:
            if isinstance(m, ToyMoE):
                m.num_experts, m.top_k = 6, 2
    sites = find_routers(model, predicate=lambda name, m: isinstance(m, ToyMoE), adapter=adapter)
    assert [(s.name, s.layer, s.block_index, s.n_experts, s.top_k, s.kind) for s in sites] == [
        ("1", 0, 1, 6, 2, "custom"),
        ("3", 1, 3, 6, 2, "custom"),
    ]
    captured, handles = hooked(sites)
    try:
        with torch.no_grad():
            model(torch.randn(3, 5, 8))
    finally:
        for h in handles:
            h.remove()
    for s in sites:
        idx, w = s.module.last
        assert captured[s.layer].logits.shape == (15, 6)
        assert torch.equal(captured[s.layer].index, idx) and torch.equal(captured[s.layer].weights, w)


def test_module_docstring_example_runs():
    result = doctest.testmod(routers, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


# ----------------------------------------------------------------------------------------------------------------
# The loading path


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_find_routers_after_save_and_from_pretrained(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model, config = model_of(family)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    before, after = find_routers(model), find_routers(loaded)
    assert [(s.name, s.layer, s.block_index, s.n_experts, s.top_k) for s in after] == [
        (s.name, s.layer, s.block_index, s.n_experts, s.top_k) for s in before
    ]
    results = []
    for m, sites in ((model, before), (loaded, after)):
        captured, handles = hooked(sites)
        try:
            forward(family, m, config)
        finally:
            for h in handles:
                h.remove()
        results.append(captured)
    for layer, out in results[0].items():
        assert torch.equal(out.index, results[1][layer].index)
        assert torch.equal(out.weights, results[1][layer].weights)


# ----------------------------------------------------------------------------------------------------------------
# No host sync inside extract


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_never_syncs_under_dispatch_guard(family):
    model, config = model_of(family)
    sites = find_routers(model)
    guard = SyncGuard()
    with guard:
        captured, handles = hooked(sites, wrap=guard.call)
        try:
            forward(family, model, config)  # the model itself may sync (eager expert loops): only hooks are checked
        finally:
            for h in handles:
                h.remove()
    assert guard.checked_calls == len(sites) and sorted(captured) == [s.layer for s in sites]


def test_linear_gate_and_custom_adapter_never_sync():
    model, _ = tiny_linear_gate_moe()
    toy = nn.Sequential(ToyMoE(), ToyMoE())
    toy_sites = find_routers(toy, predicate=lambda n, m: isinstance(m, ToyMoE), adapter=ToyAdapter())
    guard = SyncGuard()
    with guard:
        for m, sites, x in (
            (model, find_routers(model), torch.randint(0, 64, (2, 7))),
            (toy, toy_sites, torch.randn(2, 7, 8)),
        ):
            captured, handles = hooked(sites, wrap=guard.call)
            try:
                with torch.no_grad():
                    m(x)
            finally:
                for h in handles:
                    h.remove()
            assert len(captured) == 2
    assert guard.checked_calls == 4


SYNCING_HOOKS = {
    "item": lambda o: o.max().item(),
    "tolist": lambda o: o.tolist(),
    "cpu": lambda o: o.cpu(),
    "to_cpu": lambda o: o.to("cpu"),
    "numpy": lambda o: o.numpy(),
    "python_branch": lambda o: 1 if o.sum() > 0 else 0,
    "float": lambda o: float(o[0, 0]),
    "nonzero": lambda o: torch.nonzero(o > 0),
    "where_1arg": lambda o: torch.where(o > 0),
    "mask_index": lambda o: o[o > 0],
    "bincount": lambda o: torch.bincount(o.argmax(-1)),
    "unique": lambda o: torch.unique(o.argmax(-1)),
    "equal": lambda o: torch.equal(o, o),
    "repeat_interleave": lambda o: o.repeat_interleave(o.argmax(-1), dim=0),
}


@pytest.mark.parametrize("name", list(SYNCING_HOOKS))
def test_guard_catches_a_hook_that_syncs(name):
    """Negative control: the guard is not vacuous. Also: it restores Tensor methods and ignores code outside."""
    model, _ = tiny_linear_gate_moe()
    site = find_routers(model)[0]
    bad = SYNCING_HOOKS[name]

    def syncing_extract(m, i, o):
        out = site.extract(m, i, o)
        bad(o)
        return out

    guard = SyncGuard()
    with guard:
        handle = site.module.register_forward_hook(lambda m, i, o: [guard.call(syncing_extract, m, i, o)] and None)
        try:
            with pytest.raises(HostSyncError):
                with torch.no_grad():
                    model(torch.randint(0, 64, (2, 7)))
        finally:
            handle.remove()
        bad(torch.ones(3, 4))  # outside a hook: allowed
    assert torch.ones(2).tolist() == [1.0, 1.0] and bool(torch.ones(1))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_extract_runs_on_meta_device_in_bfloat16(family):
    """On the meta device there is no data: any .item()/.tolist()/.cpu()/branch on a value raises."""
    with torch.device("meta"):
        model, config = tiny_model(family, experts_implementation="batched_mm")
    model = model.to(torch.bfloat16)
    sites = find_routers(model)
    assert all(p.device.type == "meta" for p in model.parameters())
    captured, handles = hooked(sites)
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(2, 6, dtype=torch.long, device="meta"))
    finally:
        for h in handles:
            h.remove()
    assert sorted(captured) == [s.layer for s in sites]
    for s in sites:
        out = captured[s.layer]
        assert out.logits.device.type == out.index.device.type == out.weights.device.type == "meta"
        assert out.logits.shape == (12, s.n_experts) and out.index.shape == out.weights.shape == (12, s.top_k)
        assert out.logits.dtype == torch.bfloat16 and out.index.dtype == torch.int64


@pytest.mark.parametrize("bad", ["tolist", "item", "cpu", "branch"])
def test_meta_device_catches_a_hook_that_syncs(bad):
    with torch.device("meta"):
        model, _ = tiny_model("qwen3_moe", experts_implementation="batched_mm")
    site = find_routers(model)[0]
    act = {
        "tolist": lambda t: t.tolist(),
        "item": lambda t: t[0, 0].item(),
        "cpu": lambda t: t.cpu(),
        "branch": lambda t: bool(t.sum() > 0),
    }[bad]
    handle = site.module.register_forward_hook(lambda m, i, o: act(site.extract(m, i, o).index))
    try:
        with pytest.raises((NotImplementedError, RuntimeError)):
            with torch.no_grad():
                model(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"))
    finally:
        handle.remove()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "switch_transformers"])
def test_extract_never_syncs_on_cuda(family):
    """On a GPU, CUDA's own sync debug mode raises on any synchronising call made while the hook runs."""
    model, config = tiny_model(family, experts_implementation=None)
    model = model.cuda()
    sites = find_routers(model)

    def strict(fn, *args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    captured, handles = hooked(sites, wrap=strict)
    ids = torch.randint(2, config.vocab_size, (2, 10), device="cuda")
    try:
        with torch.no_grad():
            if family in ENCODER_DECODER_FAMILIES:
                model(input_ids=ids, decoder_input_ids=ids[:, :5])
            else:
                model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    assert all(out.index.is_cuda for out in captured.values()) and len(captured) == len(sites)


@pytest.mark.parametrize("family", ["phimoe", "switch_transformers"])
def test_training_mode_records_what_the_router_did_and_backward_still_works(family):
    """In training PhiMoE samples its experts (Gumbel) and Switch jitters its inputs: what is recorded must be
    the router's actual decision, detached, and the model's backward must be unaffected by the hooks."""
    model, config = tiny_model(family, seed=9, router_jitter_noise=0.1)
    model.train()
    sites = find_routers(model)
    captured, handles = hooked(sites)
    raw = {}
    handles += [s.module.register_forward_hook(lambda m, i, o, s=s: raw.__setitem__(s.layer, o)) for s in sites]
    ids = torch.randint(2, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    try:
        if family in ENCODER_DECODER_FAMILIES:
            out = model(input_ids=ids, labels=ids[:, :4].contiguous())
        else:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    finally:
        for h in handles:
            h.remove()
    assert any(p.grad is not None for p in sites[0].module.parameters())
    for s in sites:
        got = captured[s.layer]
        assert not (got.logits.requires_grad or got.weights.requires_grad)
        if family == "switch_transformers":
            dispatch = raw[s.layer][0].reshape(-1, s.n_experts)
            assert torch.equal(dispatch.sum(-1) == 0, got.dropped[:, 0])
            kept = ~got.dropped[:, 0]
            assert torch.equal(dispatch[kept].argmax(-1), got.index[kept, 0])
            torch.testing.assert_close(raw[s.layer][2].reshape(-1, s.n_experts).detach(), got.logits)
        else:
            _, w, idx = raw[s.layer]
            assert torch.equal(got.index, idx) and torch.equal(got.weights, w.detach())


@pytest.mark.parametrize("family, scale", [("deepseek_v3", 2.5), ("deepseek_v2", 1.5), ("mixtral", 1.0)])
def test_weight_scale_is_the_routers_routed_scaling_factor(family, scale):
    """The Recorder divides stored weights by site.weight_scale: it must be the factor the router multiplied by."""
    model, config = model_of(family)
    assert getattr(config, "routed_scaling_factor", 1.0) == scale
    assert [s.weight_scale for s in find_routers(model)] == [scale] * len(find_routers(model))


def test_custom_adapter_declares_its_weight_scale():
    class Scaled(ToyAdapter):
        weight_scale = 3.0

    model = nn.Sequential(ToyMoE(), ToyMoE())
    pick = lambda name, m: isinstance(m, ToyMoE)  # noqa: E731
    assert [s.weight_scale for s in find_routers(model, predicate=pick, adapter=Scaled())] == [3.0, 3.0]
    assert [s.weight_scale for s in find_routers(model, predicate=pick, adapter=ToyAdapter())] == [1.0, 1.0]
