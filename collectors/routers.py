"""Find the router of every MoE layer in a PyTorch model and read its decision from a forward hook.

`find_routers(model)` returns one `RouterSite` per MoE layer. `site.extract(module, inputs, output)` takes the
arguments of a forward hook registered on `site.module` and returns a `RouterOutput` of detached device tensors,
flattened to one row per token (batch * seq):

    sites = find_routers(model)
    captured = []
    handles = [s.module.register_forward_hook(lambda m, i, o, s=s: captured.append((s.layer, s.extract(m, i, o))))
               for s in sites]
    try:
        model(input_ids)
    finally:
        for h in handles:
            h.remove()

How routers are found (never by attribute names such as `gate` alone: Qwen2-MoE also has `shared_expert_gate`,
DeepSeek `gate_proj`):

0. training frameworks' routers, by class and defining package (collectors.frameworks: Megatron-Core
   `TopKRouter`, torchtitan `TokenChoiceTopKRouter`, DeepSpeed `TopKGate`), sizes from the framework's config;
1. by class name: `*TopKRouter`, `*TopkRouter`, `*Top1Router`, `*Top2Router`, `*Router`, `*Gate`, `*Gating`
   (transformers 5 MoE routers, Switch Transformers, Llama 4, NLLB-MoE, DeepSeek's remote-code `MoEGate`, ...),
   when the module (or its MoE block, or the model config) says how many experts it routes to;
2. by structure: a plain `nn.Linear` with one output per expert that sits beside an `experts` module in the same
   block (the transformers 4.x layout, e.g. `block_sparse_moe.gate` in Mixtral); its top-k is recomputed from
   the linear's output the way the block did it (softmax -> top-k -> renormalise unless `norm_topk_prob` is
   False).

A custom MoE layer is recorded with `predicate=` and `adapter=`:

    >>> import torch
    >>> from torch import nn
    >>> from collectors.routers import RouterAdapter, RouterOutput, find_routers
    >>> class MyMoE(nn.Module):                       # a user's own layer: no class name we know
    ...     def __init__(self, dim=8, n_experts=4, k=2):
    ...         super().__init__()
    ...         self.scorer, self.k = nn.Linear(dim, n_experts), k
    ...         self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_experts))
    ...     def forward(self, x):                     # x: [batch, seq, dim]
    ...         probs = self.scorer(x).softmax(-1)    # [batch, seq, experts]
    ...         w, idx = probs.topk(self.k, dim=-1)   # [batch, seq, k]
    ...         outs = torch.stack([e(x) for e in self.experts], -2)    # [batch, seq, experts, dim]
    ...         return (outs.gather(-2, idx[..., None].expand(*idx.shape, x.shape[-1])) * w[..., None]).sum(-2)
    >>> class MyAdapter(RouterAdapter):
    ...     n_experts, top_k = 4, 2
    ...     def __call__(self, module, inputs, output):
    ...         logits = module.scorer(inputs[0])     # recomputed: tensor ops only, no host sync
    ...         w, idx = logits.softmax(-1).topk(module.k, dim=-1)
    ...         return RouterOutput(logits=logits, index=idx, weights=w, dropped=None)
    >>> model = nn.Sequential(MyMoE(), MyMoE())
    >>> sites = find_routers(model, predicate=lambda name, m: isinstance(m, MyMoE), adapter=MyAdapter())
    >>> [(s.name, s.layer, s.n_experts, s.top_k) for s in sites]
    [('0', 0, 4, 2), ('1', 1, 4, 2)]

A plain function `adapter(module, inputs, output) -> RouterOutput` works too; `n_experts`/`top_k` then come from
the module's attributes (`num_experts`, `top_k`, ...) or the model config.

Nothing here may synchronise a GPU: extraction uses tensor ops only (no `.item()`, `.tolist()`, `.cpu()`,
`nonzero`, boolean-mask indexing, or Python branching on tensor values). Python decisions use shapes and dtypes,
which the host knows without waiting for the device.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from moeviz.errors import MoevizError

if TYPE_CHECKING:  # torch is a real dependency of collectors, imported lazily to keep `import collectors` cheap
    from torch import Tensor, nn

ROUTER_CLASS_PATTERNS: tuple[str, ...] = (
    "*TopKRouter",
    "*TopkRouter",
    "*Top1Router",
    "*Top2Router",
    "*Router",
    "*Gate",
    "*Gating",
)
"""Class-name patterns (fnmatch) of router modules."""

EXCLUDED_CLASS_PATTERNS: tuple[str, ...] = ("*ForgetGate", "*ResidualGate", "*DensityRouter", "*HashRouter")
"""Class names that match a router pattern but are not learned top-k routers (linear-attention gates, ...)."""

ROUTER_STRUCTURES: tuple[str, ...] = (
    "a module whose class matches a router pattern and that (or its parent block, or the model config) gives "
    "the number of experts (num_experts / num_local_experts / n_routed_experts)",
    "an nn.Linear with one output per expert beside an `experts` child in the same block "
    "(transformers 4.x layout, e.g. block_sparse_moe.gate)",
)

_N_EXPERTS_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "n_experts", "moe_num_experts")
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "topk", "moe_k", "num_selected_experts")


class RouterError(MoevizError):
    """Base class of router discovery and extraction errors."""


class NoRoutersFoundError(RouterError):
    """No MoE router was found in the model; the message says what was searched and how to point at one."""


class RouterOutputError(RouterError):
    """A router (or a user adapter) returned something of an unexpected structure or shape."""


@dataclass
class RouterOutput:
    """What an adapter extracts from one router call; tensors stay on the device, detached.

    After `RouterSite.extract`, every tensor is flattened to one row per token (batch * seq)."""

    logits: Tensor  # [tokens, experts] router logits as the model computed them (float, any float dtype)
    index: Tensor  # [tokens, k] chosen experts (int64), slot 0 = top choice
    weights: Tensor  # [tokens, k] gate weights the model applied (after any renormalisation / scaling)
    dropped: Tensor | None = None  # [tokens, k] bool, True where the model itself dropped the assignment
    scores: Tensor | None = None  # [tokens, experts] the scores the router ranked experts by, when they are not
    # softmax(logits): sigmoid + bias (DeepSeek-V3, torchtitan/Megatron expert_bias), sigmoid (Llama 4). routes.margin
    # is taken in this space; None = a softmax router (the margin comes from softmax(logits), computed at step())


@dataclass
class RouterSite:
    """One MoE layer's router, found in a model.

    `layer` counts MoE layers only (0-based, module order: dense blocks are skipped, encoder before decoder);
    `block_index` is the index of the transformer block that holds the router (the first integer in `name`).
    `capacity_factor` is the model's own capacity factor when it has one; models with a fixed per-sequence
    capacity in tokens (HF Switch Transformers' `expert_capacity`) give `expert_capacity` instead, and
    `capacity_factor_for(tokens_per_group)` converts it.

    `weight_scale` is the constant the router multiplied its gate weights by after top-k and renormalisation
    (DeepSeek-V2/V3, GLM-4-MoE, ... `routed_scaling_factor`, e.g. 2.5): `extract` returns the weights as the
    model applied them (scaled), and the Recorder stores `weights / weight_scale`, the gate probabilities in
    [0, 1] that users compare with Megatron-LM's routing logs (the factor is in the run's config)."""

    name: str
    module: nn.Module
    layer: int
    n_experts: int
    top_k: int
    block_index: int | None
    stack: str | None
    capacity_factor: float | None
    extract: Callable[[Any, tuple, Any], RouterOutput]
    expert_capacity: int | None = None  # tokens per expert per sequence (Switch), else None
    kind: str = ""  # which rule found it and reads it, e.g. 'topk-router', 'switch-top1', 'megatron-topk', 'custom'
    weight_scale: float = 1.0  # factor the model multiplied the gate weights by (DeepSeek's routed_scaling_factor,
    # Megatron's moe_router_topk_scaling_factor)
    expert_bias: Callable[[], Any] | None = None  # reads the router's selection bias [E] as it is now (aux-loss-free
    # balancing: added to the scores before top-k, not to the weights), None when the router has none; from the
    # adapter's `bias_reader`. The Recorder copies it on the device once per step (collectors.balance)

    def capacity_factor_for(self, tokens_per_group: int) -> float | None:
        """Capacity factor at a given group size: expert_capacity * n_experts / tokens_per_group for
        fixed-capacity routers (Switch: a group is one sequence), else `capacity_factor`."""
        if self.expert_capacity is not None and tokens_per_group > 0:
            return self.expert_capacity * self.n_experts / tokens_per_group
        return self.capacity_factor


class RouterAdapter:
    """Base class for a user adapter: `__call__(module, inputs, output) -> RouterOutput`.

    Set `n_experts` and `top_k` (class or instance attributes) when the module does not carry them as
    `num_experts`/`top_k` attributes. Tensors may keep leading batch dims: they are flattened to [tokens, ...]
    and detached afterwards. Use tensor ops only (no `.item()`, `.tolist()`, `.cpu()`, `nonzero`, mask indexing).
    If the weights you return are multiplied by a constant (a routed scaling factor), set `weight_scale` to it:
    the store keeps the gate weights before scaling, in [0, 1]."""

    n_experts: int | None = None
    top_k: int | None = None
    weight_scale: float | None = None

    def __call__(self, module, inputs: tuple, output: Any) -> RouterOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def bias_reader(self, module, parent) -> Callable[[], Any] | None:
        """Where the router's selection bias lives: a function of no argument that returns the bias tensor [E] as
        it is when called (the training loop replaces or updates it between steps), or None when the router adds
        no bias before its top-k. `parent` is the module that holds the router (torchtitan keeps the bias on the
        MoE layer, not the router). Override it in an adapter for a biased custom router."""
        return None


# ---------------------------------------------------------------------------------------------------------------
# Adapters for the known router layouts. Each returns a RouterOutput with leading dims not yet flattened;
# `_finalize` flattens, detaches and checks shapes.


class TopKRouterAdapter(RouterAdapter):
    """transformers 5 routers returning `(router_logits, top_k_weights, top_k_index)` (Mixtral, Qwen2/3-MoE,
    OLMoE, GraniteMoe, PhiMoE, DeepSeek-V2/V3 and most newer families).

    The tuple is read by dtype and width, not position: the integer tensor of width k is the index, the float
    tensor of width n_experts the logits, the float tensor of width k the weights. Routers that return no logits
    (DeepSeek's remote-code `MoEGate` returns `(index, weights, aux_loss)`) get them recomputed as
    `linear(input, module.weight)`.

    Slot order: DeepSeek-V2/V3 call `topk(sorted=False)`, so their slots come in no particular order. Slots are
    then sorted, descending, by the score the router chose on: `sigmoid(logits) + e_score_correction_bias` for
    V3-style routers, the weight for V2 (`topk_method`). Other routers keep the model's order (already sorted,
    and PhiMoE's sparsemixer emits its first choice first even where its second weight is larger)."""

    def __init__(self, n_experts: int, top_k: int, slot_order: str = "model"):
        if slot_order not in ("model", "weight", "biased_score"):
            raise ValueError(f"slot_order must be 'model', 'weight' or 'biased_score', got {slot_order!r}")
        self.n_experts, self.top_k, self.slot_order = n_experts, top_k, slot_order

    def bias_reader(self, module, parent):
        """DeepSeek-V3 (and GLM-4-MoE, ...): the gate's `e_score_correction_bias` buffer."""
        if not hasattr(module, "e_score_correction_bias"):
            return None
        return lambda: getattr(module, "e_score_correction_bias", None)

    def __call__(self, module, inputs, output):
        import torch
        from torch.nn import functional as F

        logits, weights, index = self._split(output)
        if logits is None:
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != self.n_experts:
                raise RouterOutputError(
                    f"{type(module).__name__} returned no router logits and has no [n_experts, hidden] weight to "
                    "recompute them from; pass adapter= to find_routers (see collectors.routers docs)"
                )
            hidden = inputs[0].reshape(-1, weight.shape[1])  # [tokens, hidden]
            logits = F.linear(hidden.to(torch.float32), weight.to(torch.float32))  # [tokens, experts]
        logits = logits.reshape(-1, self.n_experts)  # [tokens, experts]
        index = index.reshape(-1, self.top_k)  # [tokens, k]
        weights = weights.reshape(-1, self.top_k)  # [tokens, k]
        if self.slot_order == "weight":
            index, weights = _sort_slots(index, weights, key=weights)
        elif self.slot_order == "biased_score":
            scoring = getattr(module, "scoring_func", "sigmoid")
            scores = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()
            bias = module.e_score_correction_bias.to(scores.dtype)  # [experts]
            ranked = scores + bias  # [tokens, experts] what the router's top-k chose on
            index, weights = _sort_slots(index, weights, key=ranked.gather(1, index))
            return RouterOutput(logits=logits, index=index, weights=weights, dropped=None, scores=ranked)
        return RouterOutput(logits=logits, index=index, weights=weights, dropped=None)

    def _split(self, output):
        """(logits or None, weights, index) from a router's tuple output, by dtype and last dim."""
        import torch

        items = output if isinstance(output, (tuple, list)) else (output,)
        tensors = [t for t in items if isinstance(t, torch.Tensor)]
        ints = [t for t in tensors if not t.is_floating_point() and t.dim() >= 1 and t.shape[-1] == self.top_k]
        floats = [t for t in tensors if t.is_floating_point() and t.dim() >= 1]
        if not ints:
            raise RouterOutputError(
                f"router output has no integer tensor of width top_k={self.top_k} "
                f"(got {_describe(output)}); pass adapter= to find_routers for this router"
            )
        logits = next((t for t in floats if t.shape[-1] == self.n_experts), None)
        rest = [t for t in floats if t is not logits and t.shape[-1] == self.top_k]
        if not rest:
            raise RouterOutputError(
                f"router output has no float tensor of width top_k={self.top_k} for the gate weights "
                f"(got {_describe(output)}); pass adapter= to find_routers for this router"
            )
        return logits, rest[0], ints[0]


class SwitchTop1Adapter(RouterAdapter):
    """Switch Transformers' `Top1Router`, returning `(dispatch_mask, router_probs, router_logits)`:
    dispatch_mask [batch, seq, experts] is the one-hot choice with tokens past `expert_capacity` zeroed (the
    model then skips the expert for them: only the residual passes), router_probs [batch, seq, 1] the
    probability of the chosen expert (the gate weight).

    The chosen expert is read from the dispatch mask; for dropped tokens (all-zero rows) it is recomputed as the
    router did, argmax of softmax(logits) in the router dtype cast to the input dtype. `dropped` is True
    exactly where the model zeroed the row."""

    top_k = 1

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def __call__(self, module, inputs, output):
        import torch

        if not (isinstance(output, (tuple, list)) and len(output) == 3):
            raise RouterOutputError(f"expected (dispatch_mask, router_probs, router_logits), got {_describe(output)}")
        dispatch, probs, logits = output
        dispatch = dispatch.reshape(-1, self.n_experts)  # [tokens, experts] one-hot or zero row
        logits = logits.reshape(-1, self.n_experts)  # [tokens, experts]
        weights = probs.reshape(-1, 1)  # [tokens, 1]
        router_dtype = getattr(module, "dtype", torch.float32)
        input_dtype = getattr(module, "input_dtype", weights.dtype)
        if not isinstance(router_dtype, torch.dtype):
            router_dtype = torch.float32
        model_choice = torch.softmax(logits, dim=-1, dtype=router_dtype).to(input_dtype).argmax(-1)  # [tokens]
        kept = dispatch.sum(-1) > 0  # [tokens]
        index = torch.where(kept, dispatch.argmax(-1), model_choice).unsqueeze(-1)  # [tokens, 1]
        return RouterOutput(logits=logits, index=index, weights=weights, dropped=~kept.unsqueeze(-1))


class Llama4RouterAdapter(RouterAdapter):
    """transformers' `Llama4Router` (an `nn.Linear` subclass) returning `(router_scores, router_logits)`, both
    [tokens, experts]: `router_scores` is sigmoid of the top-k logits scattered into a -inf row, i.e. the gate
    weight (the experts' input is multiplied by it) at the chosen experts and 0 elsewhere. The chosen experts are
    the router's own `topk(router_logits, k)` (sorted, slot 0 = largest logit), recomputed with the same call on the
    logits it returned; the weights are read from `router_scores`."""

    def __init__(self, n_experts: int, top_k: int):
        self.n_experts, self.top_k = n_experts, top_k

    def __call__(self, module, inputs, output):
        import torch

        if not (isinstance(output, (tuple, list)) and len(output) == 2):
            raise RouterOutputError(f"expected Llama4Router's (router_scores, router_logits), got {_describe(output)}")
        scores, logits = output  # [T, E], [T, E]
        logits = logits.reshape(-1, self.n_experts)
        index = torch.topk(logits, self.top_k, dim=1).indices  # [T, k] the router's own call
        weights = scores.reshape(-1, self.n_experts).gather(1, index)  # [T, k]
        # a sigmoid router: the margin is taken between sigmoid scores (the order is that of the logits)
        return RouterOutput(logits=logits, index=index, weights=weights, dropped=None, scores=logits.float().sigmoid())


class NllbMoeTop2Adapter(RouterAdapter):
    """transformers' `NllbMoeTop2Router` returning `(top_1_mask, router_probs, router_logits)`, all [tokens,
    experts]: `top_1_mask` the one-hot first choice after the capacity limit (a zero row where it was dropped, also
    for padding), `router_probs` the combine weights of the kept first and second choices, `router_logits` the
    classifier's output. As the router does: the first expert is argmax of softmax(logits) (in the router dtype,
    cast to the input dtype), the second argmax of the logits without the first (`second_expert_policy` 'all' or
    'random'). A choice the model did not compute (capacity, padding, or 'random' not sampling the second expert) is
    `dropped`, with its weight as computed before the drop (its probability over the two chosen ones'). Policy
    'sampling' (a Gumbel-noised second expert) is refused at find_routers: a dropped second choice is in no output.
    Capacity is per batch and changes with the batch (`moe_eval_capacity_token_fraction` in eval), so no fixed
    capacity factor is recorded."""

    capacity_factor = None  # declared: the batch decides it (see above)
    expert_capacity = None

    def __init__(self, module, n_experts: int):
        self.n_experts, self.top_k = n_experts, 2
        policy = getattr(module, "second_expert_policy", "all")
        if policy not in ("all", "random"):
            raise RouterError(
                f"{type(module).__name__} with second_expert_policy={policy!r} draws each token's second expert with "
                "random noise and a dropped second choice is in no output, so moeviz cannot record it exactly: use "
                "second_expert_policy='all' (the default) or pass adapter= to find_routers"
            )

    def __call__(self, module, inputs, output):
        import torch

        if not (isinstance(output, (tuple, list)) and len(output) == 3):
            raise RouterOutputError(
                f"expected NllbMoeTop2Router's (top_1_mask, router_probs, router_logits), got {_describe(output)}"
            )
        top_1_mask, combine, logits = (t.reshape(-1, self.n_experts) for t in output)  # [T, E] each
        router_dtype = getattr(module, "dtype", torch.float32)
        router_dtype = router_dtype if isinstance(router_dtype, torch.dtype) else torch.float32
        input_dtype = getattr(module, "input_dtype", combine.dtype)
        probs = torch.softmax(logits, dim=-1, dtype=router_dtype).to(input_dtype)  # [T, E] as the router did
        first = probs.argmax(-1, keepdim=True)  # [T, 1]
        second = logits.scatter(1, first, float("-inf")).argmax(-1, keepdim=True)  # [T, 1]
        index = torch.cat([first, second], dim=1)  # [T, 2]
        kept = torch.cat([top_1_mask.sum(-1, keepdim=True) > 0, combine.gather(1, second) > 0], dim=1)  # [T, 2]
        chosen = probs.gather(1, index)  # [T, 2]
        before = chosen / chosen.sum(-1, keepdim=True).clamp(min=torch.finfo(chosen.dtype).eps)
        weights = torch.where(kept, combine.gather(1, index), before.to(combine.dtype))
        return RouterOutput(logits=logits, index=index, weights=weights, dropped=~kept)


class LinearGateAdapter(RouterAdapter):
    """A plain `nn.Linear` router (transformers 4.x layout): its output is the logits; the block computed
    softmax (float32) -> top-k -> renormalise (if `renormalize`) -> cast to the logits' dtype, as Mixtral 4.x
    and Qwen2-MoE 4.x did, and so does this."""

    def __init__(self, n_experts: int, top_k: int, renormalize: bool = True):
        self.n_experts, self.top_k, self.renormalize = n_experts, top_k, renormalize

    def __call__(self, module, inputs, output):
        import torch

        logits = output.reshape(-1, self.n_experts)  # [tokens, experts]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [tokens, experts]
        weights, index = torch.topk(probs, self.top_k, dim=-1)  # [tokens, k]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(logits=logits, index=index, weights=weights.to(logits.dtype), dropped=None)


def _sort_slots(index, weights, key):
    """index and weights reordered so that slot 0 has the largest key (stable: ties keep the model's order)."""
    order = key.argsort(dim=-1, descending=True, stable=True)  # [tokens, k]
    return index.gather(1, order), weights.gather(1, order)


def _describe(output) -> str:
    """Types and shapes of a router's output, for error messages (metadata only: no device sync)."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    parts = []
    for t in items:
        shape = getattr(t, "shape", None)
        parts.append(f"{type(t).__name__}{tuple(shape) if shape is not None else ''}:{getattr(t, 'dtype', '')}")
    return "(" + ", ".join(parts) + ")"


def _finalize(out: RouterOutput, n_experts: int, top_k: int, where: str) -> RouterOutput:
    """out flattened to [tokens, ...], detached, index as int64, with shapes checked against the site."""
    import torch

    if not isinstance(out, RouterOutput):
        raise RouterOutputError(f"{where}: the adapter returned {type(out).__name__}, expected a RouterOutput")
    logits = out.logits.detach().reshape(-1, n_experts) if out.logits.shape[-1] == n_experts else None
    if logits is None:
        raise RouterOutputError(f"{where}: logits have shape {tuple(out.logits.shape)}, expected [..., {n_experts}]")
    tokens = logits.shape[0]
    fields = {}
    for field in ("index", "weights", "dropped"):
        t = getattr(out, field)
        if t is None and field == "dropped":
            fields[field] = None
            continue
        if t is None or t.numel() != tokens * top_k:
            raise RouterOutputError(
                f"{where}: {field} has shape {None if t is None else tuple(t.shape)}, expected {tokens} tokens x "
                f"top_k={top_k} (logits give {tokens} tokens)"
            )
        fields[field] = t.detach().reshape(tokens, top_k)
    for field, t in (("logits", logits), ("weights", fields["weights"])):
        if not t.is_floating_point():
            raise RouterOutputError(f"{where}: {field} have dtype {t.dtype}, expected a float dtype")
    index = fields["index"]
    if index.is_floating_point() or index.dtype == torch.bool:
        raise RouterOutputError(f"{where}: index has dtype {index.dtype}, expected integer expert ids")
    if index.dtype != torch.int64:
        index = index.to(torch.int64)
    dropped = fields["dropped"]
    if dropped is not None and dropped.dtype != torch.bool:
        dropped = dropped.to(torch.bool)
    scores = out.scores
    if scores is not None:
        if scores.numel() != tokens * n_experts:
            raise RouterOutputError(
                f"{where}: scores have shape {tuple(scores.shape)}, expected {tokens} tokens x n_experts={n_experts}"
            )
        scores = scores.detach().reshape(tokens, n_experts)
    return RouterOutput(logits=logits, index=index, weights=fields["weights"], dropped=dropped, scores=scores)


def check_router_output(site: "RouterSite", out: RouterOutput) -> None:
    """Raise RouterOutputError, naming the router and what to pass, if a finalised output is not a routing
    decision moeviz can store as it is: indices outside [0, n_experts) or repeated within a token; logits that
    look like probabilities (rows in [0, 1] summing to 1) or sigmoid scores (all strictly inside (0, 1)),
    which the aggregates would softmax again; gate weights that are negative or exceed the declared
    `weight_scale` (the store keeps weights / weight_scale in [0, 1] and would clip them without saying which
    router was wrong). Tokens whose logits or weights are NaN or infinite are left out of the judgement: that is
    the model's state, not a wrong reading, and the Recorder counts them (`layer_stats.nonfinite_tokens`) and goes
    on; raising here would stop training on the first forward (issue 13: recording never stops training).

    Reads values: a host sync. The Recorder calls it once per router, on the router's first recorded forward
    and before anything of that forward is stored, never again."""
    import torch

    where = f"router {site.name} ({type(site.module).__name__}, read as {site.kind or 'custom'})"
    fix = (
        "pass find_routers/Recorder adapter= a RouterAdapter that returns the router's logits, top-k indices and "
        "the gate weights it applied, with `weight_scale` set to any constant the weights were multiplied by"
    )
    logits, index, weights = out.logits, out.index, out.weights  # [T, E], [T, k], [T, k]
    if logits.shape[0] == 0 or logits.device.type == "meta":  # nothing to read (meta: shapes only)
        return
    with torch.no_grad():
        lg = logits.float()  # [T, E]
        w = weights.float()  # [T, k]
        # note: CPU-GPU sync point (boolean indexing, then .cpu()), once per router on its first recorded forward
        finite = torch.isfinite(torch.logsumexp(lg, dim=-1)) & torch.isfinite(w).all(-1)  # [T], as the Recorder's
        lg, w, index = lg[finite], w[finite], index[finite]  # [T', E], [T', k], [T', k]
        if lg.shape[0] == 0:  # every token NaN/inf: nothing to judge (the Recorder counts and warns)
            return
        stats = torch.stack(
            [
                index.min().float(),
                index.max().float(),
                lg.min(),
                lg.max(),
                (lg.sum(-1) - 1).abs().max(),
                w.min(),
                w.max(),
                (index.sort(-1).values.diff(dim=-1) == 0).any().float() if index.shape[1] > 1 else lg.new_zeros(()),
            ]
        ).cpu().tolist()
    i_min, i_max, lg_min, lg_max, row_err, w_min, w_max, repeated = stats
    if i_min < 0 or i_max >= site.n_experts:
        raise RouterOutputError(
            f"{where}: expert indices range over [{i_min:.0f}, {i_max:.0f}] but the router has n_experts="
            f"{site.n_experts}; {fix} (and n_experts/top_k set)"
        )
    if repeated:
        raise RouterOutputError(f"{where}: a token has the same expert in two of its top_k={site.top_k} slots; {fix}")
    # probabilities: every row in [0, 1] and summing to 1. Sigmoid scores: every value strictly inside (0, 1),
    # over enough values that real logits would have shown a sign or a size (all-zero logits of a router whose
    # weights are still zero-initialised are logits, and pass)
    looks_like_probs = lg_min >= 0.0 and lg_max <= 1.0 and row_err < 1e-3
    looks_like_scores = lg_min > 0.0 and lg_max < 1.0 and logits.numel() >= 64
    if site.n_experts >= 2 and (looks_like_probs or looks_like_scores):
        what = "probabilities (every row sums to 1)" if looks_like_probs else "sigmoid scores (every value in (0, 1))"
        raise RouterOutputError(
            f"{where}: the values read as router logits look like {what}, not logits; moeviz takes softmax of "
            f"the logits for prob_sum, entropy and z-loss, so these would be stored wrong. {fix}, where `logits` "
            "are the pre-activation scores (e.g. the gate linear's output)"
        )
    if w_min < -1e-6:
        raise RouterOutputError(f"{where}: gate weights are negative (min {w_min:.4g}); {fix}")
    # rounding: a weight renormalised or scaled in bfloat16 may land a few ulps above the scale
    tol = max(1e-3, 4 * torch.finfo(weights.dtype).eps) * max(1.0, site.weight_scale)
    if w_max > site.weight_scale + tol:
        raise RouterOutputError(
            f"{where}: gate weights reach {w_max:.4g} but the declared weight_scale is {site.weight_scale:g}: the "
            "store keeps weight / weight_scale in [0, 1] and would clip them. If the model multiplies its gate "
            f"weights by a constant, {fix}"
        )


def _make_extract(adapter: Callable, n_experts: int, top_k: int, where: str):
    """The site's `extract`: the adapter's output, finalised."""

    def extract(module, inputs, output) -> RouterOutput:
        import torch

        with torch.no_grad():  # recording never builds autograd graph (during training the router's params need grad)
            return _finalize(adapter(module, inputs, output), n_experts, top_k, where)

    extract.adapter = adapter  # type: ignore[attr-defined]  # for introspection in tests and error messages
    return extract


# ---------------------------------------------------------------------------------------------------------------
# Discovery


def _text_config(model):
    """The model's (text) config, or None: where n_experts/top_k/norm_topk_prob fall back to."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            return get_text()
        except Exception:  # some configs raise when there is no text sub-config: use the config itself
            return config
    return config


def _int_attr(objs, names) -> int | None:
    """The first positive int attribute among `names` on `objs` (in order), else None."""
    for obj in objs:
        if obj is None:
            continue
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _experts_child(block):
    """The `experts` child of an MoE block, or None."""
    if block is None:
        return None
    children = dict(block.named_children())
    return children.get("experts")


def _n_experts(module, parent, config) -> int | None:
    """Number of experts a router routes to, from the router, its block, the experts module or the config."""
    experts = _experts_child(parent)
    n = _int_attr((module, parent, experts), _N_EXPERTS_ATTRS)
    if n is None and experts is not None and hasattr(experts, "__len__"):
        try:
            n = len(experts) or None
        except TypeError:
            n = None
    return n if n is not None else _int_attr((config,), _N_EXPERTS_ATTRS)


def _top_k(module, parent, config) -> int | None:
    """Experts chosen per token: the router's or block's attribute, Top1/Top2 in the class name, or the config."""
    k = _int_attr((module, parent), _TOP_K_ATTRS)
    if k is not None:
        return k
    match = re.search(r"Top(\d+)(Router|Gate)", type(module).__name__)
    if match:
        return int(match.group(1))
    return _int_attr((config,), _TOP_K_ATTRS)


def _matches_router_class(cls_name: str) -> bool:
    return any(fnmatch.fnmatchcase(cls_name, p) for p in ROUTER_CLASS_PATTERNS) and not any(
        fnmatch.fnmatchcase(cls_name, p) for p in EXCLUDED_CLASS_PATTERNS
    )


def _is_linear_gate(module, parent, n_experts: int | None) -> bool:
    """A plain nn.Linear with one output per expert beside an `experts` child (the 4.x layout)."""
    from torch import nn

    return (
        isinstance(module, nn.Linear)
        and _experts_child(parent) is not None
        and n_experts is not None
        and n_experts > 1
        and module.out_features == n_experts
    )


def _block_index(name: str) -> int | None:
    """The transformer block holding a module: the first integer component of its qualified name
    (model.layers.3.mlp.gate -> 3, encoder.block.1.layer.1.mlp.router -> 1)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _stack(name: str) -> str | None:
    """'encoder' or 'decoder' for encoder-decoder models (a name component says so), else None."""
    for part in name.split("."):
        if part in ("encoder", "decoder"):
            return part
    return None


def _auto_adapter(module, parent, config, n_experts: int, top_k: int) -> tuple[Callable, str] | None:
    """The built-in adapter for a router module and its kind, or None if it is not a router we know."""
    from collectors import frameworks

    found = frameworks.auto_adapter(module, n_experts, top_k)  # Megatron-Core, ...: known by class and package
    if found is not None:
        return found
    cls_name = type(module).__name__
    if _matches_router_class(cls_name):
        transformers_class = type(module).__module__.startswith("transformers.")
        if cls_name == "Llama4Router" and transformers_class:
            return Llama4RouterAdapter(n_experts, top_k), "llama4-router"
        if cls_name == "NllbMoeTop2Router" and transformers_class:
            return NllbMoeTop2Adapter(module, n_experts), "nllb-top2"
        if fnmatch.fnmatchcase(cls_name, "*Top1Router") and hasattr(module, "expert_capacity"):
            return SwitchTop1Adapter(n_experts), "switch-top1"
        if hasattr(module, "e_score_correction_bias"):
            order = "biased_score"
        elif hasattr(module, "topk_method"):
            order = "weight"
        else:
            order = "model"
        return TopKRouterAdapter(n_experts, top_k, slot_order=order), "topk-router"
    if _is_linear_gate(module, parent, n_experts):
        renorm = getattr(parent, "norm_topk_prob", None)
        if renorm is None:
            renorm = getattr(config, "norm_topk_prob", True) if config is not None else True
        return LinearGateAdapter(n_experts, top_k, renormalize=bool(renorm)), "linear-gate"
    return None


def _capacity(module, config) -> tuple[float | None, int | None]:
    """(capacity_factor, expert_capacity) of a router: the model's own, when it drops tokens."""
    expert_capacity = _int_attr((module,), ("expert_capacity",))
    factor = None
    for obj in (module, config):
        value = getattr(obj, "capacity_factor", None) if obj is not None else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            factor = float(value)
            break
    return factor, expert_capacity


def _module_tree(model):
    """[(name, module, parent)] in module order."""
    out = []
    parents = {}
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            parents.setdefault(id(child), module)
        out.append((name, module, parents.get(id(module))))
    return out


def _is_class_router(module, parent, config) -> bool:
    """Named like a router and routing to a known number (>= 2) of experts with a known top-k."""
    if not _matches_router_class(type(module).__name__):
        return False
    n_experts = _n_experts(module, parent, config)
    return n_experts is not None and n_experts >= 2 and _top_k(module, parent, config) is not None


def _is_builtin_router(module, parent, config) -> bool:
    """What the built-in search takes: a training framework's router (collectors.frameworks), a class-named router,
    or a 4.x linear gate in a block that has no class-named router (a block has one router)."""
    from collectors import frameworks

    if frameworks.recognises(module) or _is_class_router(module, parent, config):
        return True
    return (
        _is_linear_gate(module, parent, _n_experts(module, parent, config))
        and _top_k(module, parent, config) is not None
        and not any(_is_class_router(c, parent, config) for c in parent.children())
    )


def _site(name, module, parent, config, adapter, layer: int) -> RouterSite:
    """The RouterSite of a chosen router module; RouterError if its sizes or its reader are unknown."""
    from collectors import frameworks

    # a training framework's router: its adapter reads the sizes from the framework's own config
    framework = frameworks.auto_adapter(module, None, None) if adapter is None else None
    declares = adapter if adapter is not None else None if framework is None else framework[0]
    n_experts = _int_attr((declares,), ("n_experts",)) or _n_experts(module, parent, config)
    top_k = _int_attr((declares,), ("top_k",)) or _top_k(module, parent, config)
    where = f"{name} ({type(module).__name__})"
    if n_experts is None or top_k is None:
        raise RouterError(
            f"{where} was selected by predicate= but its number of experts ({n_experts}) or top_k ({top_k}) is "
            "unknown: give the module `num_experts`/`top_k` attributes or pass adapter= a RouterAdapter with "
            "`n_experts` and `top_k` set"
        )
    if adapter is not None:
        read, kind = adapter, "custom"
    else:
        auto = framework if framework is not None else _auto_adapter(module, parent, config, n_experts, top_k)
        if auto is None:
            raise RouterError(
                f"{where} was selected by predicate= but no built-in adapter reads it: pass "
                "adapter=fn(module, inputs, output) -> RouterOutput (see collectors.routers docs)"
            )
        read, kind = auto
    factor, expert_capacity = _capacity(module, config)
    # an adapter that declares the router's capacity knows it better than the module's attributes (None: the
    # router drops nothing, or its capacity is no fixed number: NLLB-MoE's changes with each batch)
    if hasattr(read, "capacity_factor"):
        own = read.capacity_factor
        factor = float(own) if isinstance(own, (int, float)) and not isinstance(own, bool) and own > 0 else None
    if hasattr(read, "expert_capacity"):
        expert_capacity = None if read.expert_capacity is None else int(read.expert_capacity)
    # the scale a user adapter declares, else the built-in adapter's (Megatron), else the module's own attribute
    scale = _weight_scale(adapter if adapter is not None else read if _declares_scale(read) else module)
    bias_reader = getattr(read, "bias_reader", None)  # a RouterAdapter says where the selection bias lives
    expert_bias = bias_reader(module, parent) if callable(bias_reader) else None
    return RouterSite(
        name=name,
        module=module,
        layer=layer,
        n_experts=n_experts,
        top_k=top_k,
        block_index=_block_index(name),
        stack=_stack(name),
        capacity_factor=factor,
        extract=_make_extract(read, n_experts, top_k, where),
        expert_capacity=expert_capacity,
        kind=kind,
        weight_scale=scale,
        expert_bias=expert_bias,
    )


def _declares_scale(obj) -> bool:
    value = getattr(obj, "weight_scale", None)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _weight_scale(obj) -> float:
    """The routed scaling factor a router (or a user adapter, as `weight_scale`) applies to its gate weights:
    1.0 unless it has a positive `routed_scaling_factor` / `weight_scale`."""
    for name in ("weight_scale", "routed_scaling_factor"):
        value = getattr(obj, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return 1.0


def find_routers(model, *, predicate=None, adapter=None) -> list[RouterSite]:
    """One RouterSite per MoE router in `model`, in module order (`layer` = position in that list).

    predicate(name, module) -> bool: take exactly the modules it accepts (instead of the built-in search).
    adapter: `adapter(module, inputs, output) -> RouterOutput` (a function or a `RouterAdapter`) used for every
    site instead of the built-in one; required for modules the built-in rules do not know.
    Raises NoRoutersFoundError when nothing is found, RouterError when a chosen module's n_experts/top_k or
    reader are unknown. Submodules of a chosen router (Switch's `classifier`) are never routers themselves."""
    config = _text_config(model)
    tree = _module_tree(model)
    sites: list[RouterSite] = []
    for name, module, parent in tree:
        if not name or any(name.startswith(s.name + ".") for s in sites):
            continue
        chosen = predicate(name, module) if predicate is not None else _is_builtin_router(module, parent, config)
        if chosen:
            sites.append(_site(name, module, parent, config, adapter, layer=len(sites)))
    if not sites:
        raise NoRoutersFoundError(_no_routers_message(model, tree, predicate))
    return sites


def _no_routers_message(model, tree, predicate) -> str:
    seen = sorted({type(m).__name__ for _, m, _ in tree})
    shown = ", ".join(seen[:60]) + (f", ... ({len(seen) - 60} more)" if len(seen) > 60 else "")
    if predicate is not None:
        head = f"the predicate= given to find_routers matched no module of {type(model).__name__}."
    else:
        head = (
            f"no MoE router found in {type(model).__name__}. Searched for class names matching "
            f"{', '.join(ROUTER_CLASS_PATTERNS)} (excluding {', '.join(EXCLUDED_CLASS_PATTERNS)}) and for these "
            "structures: " + "; ".join(ROUTER_STRUCTURES) + "."
        )
    return (
        f"{head}\nModule classes seen: {shown}.\n"
        "If the model has its own MoE layer, pass find_routers(model, predicate=lambda name, module: "
        "isinstance(module, MyMoE), adapter=my_adapter), where my_adapter(module, inputs, output) returns a "
        "collectors.routers.RouterOutput(logits=[tokens, experts], index=[tokens, k], weights=[tokens, k], "
        "dropped=None) using tensor ops only; subclass collectors.routers.RouterAdapter to set n_experts/top_k."
    )
