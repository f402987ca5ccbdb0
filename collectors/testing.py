"""Tiny random MoE models, one per supported family, for tests (no download: built from configs).

Every test that needs a real transformers MoE model should build it here, so that the families and their
sizes are defined once:

    from collectors.testing import FAMILIES, tiny_model
    model, config = tiny_model("mixtral")            # eval mode, float32, seeded
    model, config = tiny_model("deepseek_v3", num_hidden_layers=4)   # overrides go to the config

The models are small (hidden 32, 2-3 layers, 4-8 experts) so that a forward takes milliseconds on a CPU.
`tiny_linear_gate_moe()` builds the transformers 4.x layout (a Mixtral block whose router is a plain
`nn.Linear` called `gate`), which transformers 5 no longer ships.
"""

from __future__ import annotations

from typing import Any

# family -> (config class name, model class name, config kwargs). Kept as names so that importing this module
# does not import every transformers model.
_FAMILY_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            intermediate_size=64,
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            intermediate_size=64,
            norm_topk_prob=True,
            head_dim=8,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            intermediate_size=32,
            norm_topk_prob=False,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=4,
            first_k_dense_replace=1,  # block 0 is dense: MoE layers are blocks 1 and 2
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            moe_intermediate_size=16,
            intermediate_size=64,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=4,
            first_k_dense_replace=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            moe_intermediate_size=16,
            intermediate_size=64,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=1.5,
        ),
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    ),
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    ),
    "switch_transformers": (
        "SwitchTransformersConfig",
        "SwitchTransformersForConditionalGeneration",
        dict(
            d_model=32,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            num_experts=4,
            expert_capacity=3,  # small on purpose: sequences of 8+ tokens overflow and drop tokens
            num_sparse_encoder_layers=2,
            num_sparse_decoder_layers=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
    ),
}

_COMMON_DECODER = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)

FAMILIES: tuple[str, ...] = tuple(_FAMILY_SPECS)
"""Families that `tiny_model` builds (transformers model types)."""

# Families whose routers need their own reader (collectors.routers.Llama4RouterAdapter, NllbMoeTop2Adapter); tested
# in tests/test_llama4_nllb.py with their own references, kept out of FAMILIES and the tests parametrised over it.
_MORE_FAMILY_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=32,
            intermediate_size_mlp=64,
            head_dim=8,
            interleave_moe_layer_step=1,
        ),
    ),
    "nllb_moe": (
        "NllbMoeConfig",
        "NllbMoeForConditionalGeneration",
        dict(
            vocab_size=128,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            num_experts=4,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
    ),
}
MORE_FAMILIES: tuple[str, ...] = tuple(_MORE_FAMILY_SPECS)
"""More families that `tiny_model` builds (Llama 4 text, NLLB-MoE); not in FAMILIES."""

ENCODER_DECODER_FAMILIES: frozenset[str] = frozenset({"switch_transformers"})


def tiny_config(family: str, **overrides: Any):
    """The small transformers config of `family`, with `overrides` applied (for `from_pretrained` tests)."""
    import transformers

    specs = {**_FAMILY_SPECS, **_MORE_FAMILY_SPECS}
    if family not in specs:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES + MORE_FAMILIES)}")
    config_name, _, kwargs = specs[family]
    base = {} if family in ENCODER_DECODER_FAMILIES or family == "nllb_moe" else dict(_COMMON_DECODER)
    base.update(kwargs)
    base.update(overrides)
    base.setdefault("vocab_size", 128)
    return getattr(transformers, config_name)(**base)


def tiny_model(family: str, *, seed: int = 0, dtype=None, experts_implementation: str | None = None, **overrides):
    """A seeded random `family` model in eval mode, and its config.

    `overrides` go to the config. `experts_implementation` ('eager', 'batched_mm', ...) picks transformers'
    expert kernel; 'batched_mm' has no host sync, which the meta-device tests need.
    DeepSeek-V3 routers get a random `e_score_correction_bias` (it is zero at init) so that tests exercise
    the bias correction.
    """
    import torch
    import transformers

    config = tiny_config(family, **overrides)
    _, model_name, _ = {**_FAMILY_SPECS, **_MORE_FAMILY_SPECS}[family]
    torch.manual_seed(seed)
    kwargs = {}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    model = getattr(transformers, model_name)._from_config(config, **kwargs)
    _randomise_router_buffers(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return model, config


def _randomise_router_buffers(model, seed: int) -> None:
    """Give zero-initialised router parameters random values, so routing is neither uniform nor trivial."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor) and bias.device.type != "meta":
                bias.copy_(torch.rand(bias.shape, generator=gen) * 0.2)
            weight = getattr(module, "weight", None)
            if (
                type(module).__name__.endswith(("TopKRouter", "TopkRouter"))
                and isinstance(weight, torch.Tensor)
                and weight.device.type != "meta"
                and bool((weight == 0).all())
            ):
                weight.copy_(torch.randn(weight.shape, generator=gen) * 0.5)
            # Llama 4's router is a Linear, NLLB-MoE's has a `classifier`: both drawn with std 0.02 at init, which
            # routes nearly every token alike in a tiny model
            router_weight = getattr(getattr(module, "classifier", None), "weight", None)
            on_device = isinstance(weight, torch.Tensor) and weight.device.type != "meta"
            if type(module).__name__ == "NllbMoeTop2Router" and isinstance(router_weight, torch.Tensor) and (
                router_weight.device.type != "meta"
            ):
                router_weight.copy_(torch.randn(router_weight.shape, generator=gen) * 0.5)
            if type(module).__name__ == "Llama4Router" and on_device:
                weight.copy_(torch.randn(weight.shape, generator=gen) * 0.5)


def tiny_linear_gate_moe(
    *, hidden: int = 32, n_experts: int = 4, top_k: int = 2, n_blocks: int = 2, seed: int = 0, norm_topk_prob=None
):
    """A hand-written model in the transformers 4.x Mixtral layout: `model.layers.N.block_sparse_moe` holds
    `gate = nn.Linear(hidden, n_experts)` and `experts = nn.ModuleList`, and the block does the routing itself
    (softmax -> top-k -> renormalise, as Mixtral 4.x did). Returns (model, routing_log) where routing_log is a
    list that each block appends its (router_logits, routing_weights, selected_experts) to on every forward.
    `norm_topk_prob=False` gives the Qwen2-MoE 4.x variant (no renormalisation)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    routing_log: list = []

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(hidden, 2 * hidden, bias=False)
            self.w2 = nn.Linear(2 * hidden, hidden, bias=False)

        def forward(self, x):
            return self.w2(F.silu(self.w1(x)))

    class SparseMoeBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts = n_experts
            self.top_k = top_k
            if norm_topk_prob is not None:
                self.norm_topk_prob = norm_topk_prob
            self.gate = nn.Linear(hidden, n_experts, bias=False)
            self.experts = nn.ModuleList(Expert() for _ in range(n_experts))

        def forward(self, hidden_states):
            batch, seq, dim = hidden_states.shape
            hidden_states = hidden_states.view(-1, dim)
            router_logits = self.gate(hidden_states)  # [tokens, experts]
            routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
            routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
            if getattr(self, "norm_topk_prob", True):
                routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
            routing_weights = routing_weights.to(hidden_states.dtype)
            routing_log.append((router_logits.detach(), routing_weights.detach(), selected_experts.detach()))
            out = torch.zeros_like(hidden_states)
            for e, expert in enumerate(self.experts):  # dense loop: fine for a test model
                w = (routing_weights * (selected_experts == e)).sum(-1, keepdim=True)  # [tokens, 1]
                out = out + w * expert(hidden_states)
            return out.view(batch, seq, dim)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Linear(hidden, hidden)  # stands in for attention
            self.block_sparse_moe = SparseMoeBlock()

        def forward(self, x):
            x = x + self.self_attn(x)
            return x + self.block_sparse_moe(x)

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(64, hidden)
            self.layers = nn.ModuleList(Block() for _ in range(n_blocks))

    class LegacyMixtral(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()
            self.lm_head = nn.Linear(hidden, 64, bias=False)

        def forward(self, input_ids):
            x = self.model.embed_tokens(input_ids)
            for block in self.model.layers:
                x = block(x)
            return self.lm_head(x)

    torch.manual_seed(seed)
    return LegacyMixtral().eval(), routing_log


# ---------------------------------------------------------------------------------------------------------------
# Proving that hook code never waits for the device, on a machine without a GPU.


class HostSyncError(AssertionError):
    """Raised by SyncGuard when checked code does something that would make the host wait for a GPU."""


# aten ops whose result the host must read (a Python scalar) or whose output size depends on tensor values.
_SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",  # .item(), int(t), float(t), bool(t), `if t:`
        "is_nonzero",
        "equal",
        "allclose",
        "nonzero",  # torch.nonzero, torch.where(cond), argwhere
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "bincount",  # output length = max(value) + 1
        "histogram",
    }
)


def _sync_reason(func, args, kwargs) -> str | None:
    """Why running aten `func` on these arguments would synchronise a GPU, or None."""
    import torch

    name = func._schema.name.split("::")[-1]
    if name in _SYNC_OPS:
        return "its result (or its output size) depends on tensor values, so the host must wait for the device"
    bound = dict(zip((a.name for a in func._schema.arguments), args), **kwargs)
    repeats = bound.get("repeats")
    if name == "repeat_interleave" and isinstance(repeats, torch.Tensor) and bound.get("output_size") is None:
        return "repeat_interleave with tensor repeats and no output_size reads the repeats on the host"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = bound.get("indices", ())
        if any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ()):
            return "boolean-mask indexing has a value-dependent output size"
    if name in ("_to_copy", "copy_"):
        target = kwargs.get("device") if name == "_to_copy" else (args[0].device if args else None)
        source = args[0].device if name == "_to_copy" else (args[1].device if len(args) > 1 else None)
        if target is not None and torch.device(target).type == "cpu" and source is not None and source.type != "cpu":
            return "a device-to-host copy"
    return None


class SyncGuard:
    """Raises HostSyncError on anything that would make the host wait for a GPU, but only inside
    `guard.call(fn, ...)` / `with guard.watching():`, i.e. only for hook code (the model around the hook may
    sync as it likes: transformers' eager expert loops call nonzero).

    While watching, a TorchDispatchMode checks every aten op and the Tensor methods that leave torch without an
    aten op on CPU (`.tolist()`, `.numpy()`, `.cpu()`, `.to('cpu')`, `.item()`, `int()`/`float()`/`bool()`) are
    patched to raise. Caught: those, `if t:`, `torch.nonzero`, one-argument `torch.where`, boolean-mask indexing,
    `masked_select`, `unique`, `bincount`, `torch.equal`, `repeat_interleave` with tensor repeats and no
    output_size, device-to-host copies. Usage:

        guard = SyncGuard()
        handle = router.register_forward_hook(lambda m, i, o: [guard.call(site.extract, m, i, o)] and None)
        model(x)                                  # raises HostSyncError if extract syncs
        assert guard.checked_calls > 0
    """

    _PATCHED = ("item", "tolist", "numpy", "cpu", "__int__", "__float__", "__bool__", "__array__", "to")

    def __init__(self):
        self.active = False
        self.checked_calls = 0

    def __enter__(self):  # kept so that `with SyncGuard() as guard:` reads naturally; checking is per call
        return self

    def __exit__(self, *exc):
        return False

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) with checking on."""
        if self.active:
            return fn(*args, **kwargs)
        with self.watching():
            self.checked_calls += 1
            return fn(*args, **kwargs)

    def watching(self):
        """Context manager: check everything run inside it."""
        import contextlib

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                reason = _sync_reason(func, args, kwargs)
                if reason is not None:
                    raise HostSyncError(f"{func} inside a hook: {reason}")
                return func(*args, **kwargs)

        original_to = torch.Tensor.to

        def forbid(name):
            def method(t, *a, **k):
                raise HostSyncError(f"Tensor.{name}() inside a hook: it copies to the host and waits for the device")

            return method

        def checked_to(t, *a, **k):
            device = torch._C._nn._parse_to(*a, **k)[0]
            if device is not None and device.type == "cpu":
                raise HostSyncError("Tensor.to('cpu') inside a hook: a device-to-host copy")
            return original_to(t, *a, **k)

        @contextlib.contextmanager
        def _watching():
            names = [name for name in self._PATCHED if hasattr(torch.Tensor, name)]
            own = {name: torch.Tensor.__dict__[name] for name in names if name in torch.Tensor.__dict__}
            self.active = True
            try:
                for name in names:
                    setattr(torch.Tensor, name, checked_to if name == "to" else forbid(name))
                with _Mode():
                    yield self
            finally:
                self.active = False
                for name in names:  # restore exactly: own attributes back, inherited ones by deleting the patch
                    if name in own:
                        setattr(torch.Tensor, name, own[name])
                    else:
                        delattr(torch.Tensor, name)

        return _watching()


# ---------------------------------------------------------------------------------------------------------------
# Megatron-Core on a CPU (test-only dependency: requirements-frameworks.txt)


def require_framework(module: str, package: str):
    """Import `module` of a training framework a test module needs, or skip that test module when `package` is not
    installed. Under MOEVIZ_REQUIRE_FRAMEWORKS=1 (set by .ci/run) a missing framework fails the run instead: there a
    skipped framework test is not a pass (tests/test_frameworks_required.py)."""
    import importlib
    import os
    import warnings

    import pytest

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed": expected on a CPU
            return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("MOEVIZ_REQUIRE_FRAMEWORKS") == "1":
            raise ImportError(f"{package} is required here (MOEVIZ_REQUIRE_FRAMEWORKS=1): {e}") from e
        pytest.skip(f"{package} not installed ({e}); pip install --no-deps -r requirements-frameworks.txt",
                    allow_module_level=True)


def megatron_on_cpu():
    """A context manager under which Megatron-Core 0.16.1 builds and runs a GPTModel on a CPU, in this process:
    a gloo process group of world size 1 and model parallel sizes 1 (initialised once, kept), and the three
    CUDA-only calls patched for the duration:
    - `torch.cuda.current_device()` (router buffers are created on it, and `Router.gating` moves CPU weights
      there) returns "cpu";
    - `CudaRNGStatesTracker.fork()` (attention dropout's RNG fork, which needs CUDA RNG states) does nothing;
    - `moe_utils.te_general_gemm`, referenced but undefined without Transformer Engine, is None.
    Wrap model construction and every forward in it."""
    import contextlib
    import tempfile
    from unittest import mock

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer.moe import moe_utils

    if not dist.is_initialized():
        store = tempfile.NamedTemporaryFile(prefix="moeviz-gloo-", delete=False).name
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: "cpu"))
    stack.enter_context(
        mock.patch.object(
            megatron_random.CudaRNGStatesTracker, "fork", lambda self, name=None: contextlib.nullcontext()
        )
    )
    stack.enter_context(mock.patch.object(moe_utils, "te_general_gemm", None, create=True))
    return stack


def tiny_megatron_gpt(*, seed: int = 0, vocab_size: int = 128, max_sequence_length: int = 32, **overrides):
    """A seeded random Megatron-Core GPTModel with MoE MLPs (local spec, allgather token dispatcher), eval mode,
    float32 (bfloat16 with `bf16=True, params_dtype=torch.bfloat16`), and its TransformerConfig; `overrides` go
    to the config. Call it, and the model, inside `megatron_on_cpu()`. Weights are initialised with std 0.5 so
    that routing is neither uniform nor trivial; with `moe_router_enable_expert_bias=True` the (zero at init)
    expert bias is set to random values."""
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="none",
        use_cpu_initialization=True,
        add_bias_linear=False,
        init_method_std=0.5,
    )
    kwargs.update(overrides)
    config = TransformerConfig(**kwargs)
    torch.manual_seed(seed)
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=vocab_size, max_sequence_length=max_sequence_length
    )
    if config.bf16:
        model = model.bfloat16()  # what Megatron's Float16Module does; the routers keep expert_bias in float32
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "expert_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.rand(bias.shape, generator=gen) * 0.2)
    return model.eval(), config


def megatron_gpt_inputs(batch: int, seq: int, vocab_size: int = 128, seed: int = 0):
    """(input_ids [B, S], position_ids [B, S], attention_mask [B, 1, S, S] bool, True = masked out) for a
    GPTModel forward: `model(ids, pos, mask)`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=gen)
    pos = torch.arange(seq)[None].expand(batch, seq)
    mask = ~torch.ones(batch, 1, seq, seq, dtype=torch.bool).tril()
    return ids, pos, mask


# ---------------------------------------------------------------------------------------------------------------
# torchtitan on a CPU (test-only dependency: requirements-frameworks.txt)


def tiny_torchtitan_moe(
    *,
    seed: int = 0,
    n_layers: int = 2,
    dim: int = 16,
    num_experts: int = 8,
    top_k: int = 2,
    vocab_size: int = 64,
    expert_bias: bool = False,
    dtype=None,
    **router,
):
    """A seeded random stack of torchtitan 0.3.0 `MoE` layers (torchtitan's own config builders: `make_moe_config`,
    `make_router_config`, `make_routed_experts_config`; local token dispatch), behind a token embedding, each
    after an RMSNorm (a block's `ffn_norm`) and with residual connections: `model(input_ids [B, L]) -> [B, L,
    dim]`, eval mode. `router` goes to `make_router_config` (score_func, route_norm, route_scale,
    num_expert_groups, num_limited_groups, bias). Weights are drawn with std 0.5 so that routing is neither
    uniform nor trivial; with `expert_bias=True` each MoE's `expert_bias_E` buffer (torchtitan's aux-loss-free
    balancing bias, zero at init) gets random values in [0, 0.3), else the layers have no bias
    (`load_balance_coeff=None`). `dtype` (e.g. torch.bfloat16) casts the model, keeping the bias buffers in
    float32 as torchtitan's training does.
    """
    from functools import partial

    import torch
    from torch import nn
    from torchtitan.models.common.config_utils import (
        make_moe_config,
        make_routed_experts_config,
        make_router_config,
    )

    init = {"weight": partial(nn.init.normal_, std=0.5), "bias": partial(nn.init.normal_, std=0.5)}
    experts_init = {"w1_EFD": init["weight"], "w2_EDF": init["weight"], "w3_EFD": init["weight"]}

    def moe_config():
        return make_moe_config(
            num_experts=num_experts,
            load_balance_coeff=1e-3 if expert_bias else None,
            router=make_router_config(
                dim=dim, num_experts=num_experts, gate_param_init=init, top_k=top_k, **router
            ),
            routed_experts=make_routed_experts_config(
                dim=dim, hidden_dim=2 * dim, num_experts=num_experts, top_k=top_k, param_init=experts_init,
                comm_backend="standard",
            ),
        )

    class TinyTorchtitanMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embeddings = nn.Embedding(vocab_size, dim)
            self.norms = nn.ModuleList(nn.RMSNorm(dim) for _ in range(n_layers))  # a block's ffn_norm
            self.layers = nn.ModuleList(moe_config().build() for _ in range(n_layers))

        def forward(self, input_ids):  # [B, L] -> [B, L, dim]
            h = self.tok_embeddings(input_ids)
            for norm, layer in zip(self.norms, self.layers):
                h = h + layer(norm(h))
            return h

    torch.manual_seed(seed)
    model = TinyTorchtitanMoE()
    for layer in model.layers:
        layer.init_states()
    if dtype is not None:
        model = model.to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.layers:
            if layer.expert_bias_E is not None:
                layer.expert_bias_E = torch.rand(num_experts, generator=gen) * 0.3  # float32
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed on a CPU (test-only dependency: requirements-frameworks.txt)


def tiny_deepspeed_moe(
    *,
    seed: int = 0,
    n_layers: int = 2,
    hidden: int = 16,
    num_experts: int = 4,
    vocab_size: int = 64,
    dtype=None,
    **moe,
):
    """A seeded random stack of DeepSpeed 0.19.8 `deepspeed.moe.layer.MoE` layers (expert: Linear-GELU-Linear,
    ep_size 1, no process group needed on a CPU), behind a token embedding, each after an RMSNorm and with residual
    connections: `model(input_ids [B, L]) -> [B, L, hidden]`, eval mode. `moe` goes to `MoE` (k, capacity_factor,
    eval_capacity_factor, min_capacity, drop_tokens, use_rts, top2_2nd_expert_sampling, noisy_gate_policy). The
    gates' weights are drawn with std 0.5 so that routing is neither uniform nor trivial. `dtype` casts the model
    (the gate computes its logits in float32 whatever the input dtype)."""
    import logging

    import torch
    from torch import nn

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # "Creating MoE layer with num_experts ..." per layer
    from deepspeed.moe.layer import MoE

    class TinyDeepSpeedMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embeddings = nn.Embedding(vocab_size, hidden)
            self.norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(n_layers))
            expert = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
            self.layers = nn.ModuleList(
                MoE(hidden_size=hidden, expert=expert, num_experts=num_experts, **moe) for _ in range(n_layers)
            )

        def forward(self, input_ids):  # [B, L] -> [B, L, hidden]
            h = self.tok_embeddings(input_ids)
            for norm, layer in zip(self.norms, self.layers):
                out, _l_aux, _exp_counts = layer(norm(h))
                h = h + out
            return h

    torch.manual_seed(seed)
    model = TinyDeepSpeedMoE()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.layers:
            wg = layer.deepspeed_moe.gate.wg.weight
            wg.copy_(torch.randn(wg.shape, generator=gen) * 0.5)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def GuardedRecorder(*args, guard: SyncGuard | None = None, **kwargs):
    """A real collectors.Recorder whose hooks and step() run under a SyncGuard (`rec.guard`; a new one unless
    given): on the meta device any host sync in the recording path raises. The tests of every device-side feature
    (non-finite counts, balance sums, generate()) build one instead of each subclassing the Recorder."""
    global _GUARDED
    if _GUARDED is None:
        from collectors.recorder import Recorder

        class _Guarded(Recorder):
            guard: SyncGuard

            def _on_model_call(self, *a):
                return self.guard.call(super()._on_model_call, *a)

            def _on_router(self, *a):
                return self.guard.call(super()._on_router, *a)

            def step(self, *a, **kw):
                return self.guard.call(super().step, *a, **kw)

        _GUARDED = _Guarded
    rec = _GUARDED.__new__(_GUARDED)
    rec.guard = guard if guard is not None else SyncGuard()
    rec.__init__(*args, **kwargs)
    return rec


_GUARDED = None


def extractions_under_guard(sites, forward) -> tuple[SyncGuard, list]:
    """Run `forward()` with every site's `extract` called from a forward hook under a SyncGuard: (guard, the
    extracted outputs in call order). The no-sync test each framework adapter gets; the hooks are removed after."""
    guard = SyncGuard()
    captured: list = []
    handles = [s.module.register_forward_hook(lambda m, i, o, s=s: captured.append(guard.call(s.extract, m, i, o)))
               for s in sites]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    return guard, captured
