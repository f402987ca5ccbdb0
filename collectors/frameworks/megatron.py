"""Megatron-Core's `TopKRouter` (megatron.core.transformer.moe.router; tested with megatron-core 0.16.1).

`TopKRouter.forward(input[S, B, H])` returns `(probs, routing_map)`, both `[S*B, E]` with rows sequence-major
(row s*B + b is token b of position s):
- `probs`: the gate weights the experts' outputs are multiplied by, dense, zero outside the chosen experts
  (and for assignments dropped by the capacity limit), times `moe_router_topk_scaling_factor` if set;
- `routing_map`: bool, True where the token goes to the expert (after capacity dropping).
It returns no logits and no slot order, so this adapter
- recomputes the logits as the router's gating did: `input @ weight.T (+ bias)` in `moe_router_dtype`;
- orders the chosen experts by the score the router ranked them by (logits, softmax or sigmoid + `expert_bias`),
  slot 0 = top choice;
- with `moe_expert_capacity_factor`, recomputes the top-k before dropping (also group-limited), so that a dropped
  assignment keeps its slot with `dropped` True and its weight as it was before the drop;
- reorders rows batch-major ([B*S]), the order of the Recorder's token stream (`input_ids` [B, S]).

Not supported (find_routers raises and asks for adapter=): sinkhorn load balancing and
`moe_router_force_load_balancing` (random logits that cannot be recomputed). With input jitter (training only)
the recomputed logits miss the jitter: the choice and weights are still the router's own.
"""

from __future__ import annotations

from collectors.routers import RouterAdapter, RouterError, RouterOutput, RouterOutputError


def is_topk_router(module) -> bool:
    """A Megatron-Core TopKRouter (or a subclass defined in megatron), recognised without importing megatron."""
    return any(
        cls.__name__ == "TopKRouter" and cls.__module__.startswith("megatron.core.")
        for cls in type(module).__mro__
    )


recognises = is_topk_router


def auto_adapter(module, n_experts: int | None, top_k: int | None):
    if not is_topk_router(module):
        return None
    return MegatronTopKRouterAdapter(module), "megatron-topk"


class MegatronTopKRouterAdapter(RouterAdapter):
    """Reads a Megatron-Core TopKRouter's `(probs, routing_map)` (see the module docstring)."""

    def __init__(self, router):
        cfg = router.config
        where = f"Megatron-Core {type(router).__name__}"
        if cfg.moe_router_load_balancing_type == "sinkhorn":
            raise RouterError(f"{where} with sinkhorn load balancing is not read out of the box: pass adapter=")
        if cfg.moe_router_force_load_balancing:
            raise RouterError(
                f"{where} with moe_router_force_load_balancing routes on random logits that cannot be recomputed: "
                "pass adapter="
            )
        self.n_experts = int(cfg.num_moe_experts)
        self.top_k = int(cfg.moe_router_topk)
        self.weight_scale = float(cfg.moe_router_topk_scaling_factor or 1.0)
        self.capacity_factor = cfg.moe_expert_capacity_factor  # None: no token is ever dropped
        self.score_function = cfg.moe_router_score_function  # 'softmax' or 'sigmoid'
        self.pre_softmax = bool(cfg.moe_router_pre_softmax)
        self.num_groups = cfg.moe_router_num_groups
        self.group_topk = cfg.moe_router_group_topk
        self.router_dtype = cfg.moe_router_dtype  # None (input dtype), 'fp32' or 'fp64'

    def bias_reader(self, module, parent):
        """The router's `expert_bias` buffer (`moe_router_enable_expert_bias`), None when it has none."""
        if getattr(module, "expert_bias", None) is None:
            return None
        return lambda: getattr(module, "expert_bias", None)

    def __call__(self, module, inputs, output):
        import torch
        from torch.nn import functional as F

        if not (isinstance(output, (tuple, list)) and len(output) == 2):
            raise RouterOutputError(f"expected TopKRouter's (probs, routing_map), got {type(output).__name__}")
        probs, routing_map = output  # [S*B, E] float, [S*B, E] bool
        hidden = inputs[0]  # [S, B, H]
        if hidden.dim() != 3 or probs.shape[0] != hidden.shape[0] * hidden.shape[1]:
            raise RouterOutputError(
                f"TopKRouter input {tuple(hidden.shape)} is not [seq, batch, hidden] with seq*batch = "
                f"{probs.shape[0]} rows of probs"
            )
        seq, batch = hidden.shape[0], hidden.shape[1]
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.router_dtype, hidden.dtype)
        bias = None if module.bias is None else module.bias.to(dtype)
        logits = F.linear(hidden.reshape(-1, hidden.shape[-1]).to(dtype), module.weight.to(dtype), bias)  # [S*B, E]

        score = self._selection_score(module, logits)  # [S*B, E] what top-k ranked, float32
        kept_map = routing_map.bool()  # [S*B, E]
        chosen = kept_map if self.capacity_factor is None else self._topk_before_drops(score)  # [S*B, E]
        _, index = score.masked_fill(~chosen, float("-inf")).topk(self.top_k, dim=-1)  # [S*B, k], slot 0 = top
        weights = probs.gather(1, index)  # [S*B, k] as applied (0 where dropped)
        dropped = None
        if self.capacity_factor is not None:
            kept = kept_map.gather(1, index)  # [S*B, k]
            weights = torch.where(kept, weights, self._weights_before_drops(logits, index).to(weights.dtype))
            dropped = ~kept

        def batch_major(t):  # [S*B, X] rows s*B + b -> [B*S, X] rows b*S + s
            return None if t is None else t.reshape(seq, batch, -1).transpose(0, 1).reshape(seq * batch, -1)

        return RouterOutput(
            logits=batch_major(logits), index=batch_major(index), weights=batch_major(weights),
            dropped=batch_major(dropped),
        )

    def _selection_score(self, module, logits):
        """The score Megatron's top-k ranks experts by (topk_routing_with_score_function), in float32."""
        import torch

        if self.score_function == "softmax":
            return torch.softmax(logits, dim=-1, dtype=torch.float32) if self.pre_softmax else logits.float()
        score = torch.sigmoid(logits.float())  # [T, E]
        bias = getattr(module, "expert_bias", None)
        return score if bias is None else score + bias.float()

    def _topk_before_drops(self, score):
        """[T, E] bool: the top-k choice before capacity dropping, group-limited as Megatron's
        group_limited_topk (groups ranked by the sum of their top (k / group_topk) scores)."""
        import torch

        tokens, n_exp = score.shape
        if self.group_topk:
            groups = score.view(tokens, self.num_groups, -1)  # [T, G, E/G]
            group_score = groups.topk(self.top_k // self.group_topk, dim=-1).values.sum(-1)  # [T, G]
            top_groups = group_score.topk(self.group_topk, dim=-1).indices  # [T, gk]
            allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, top_groups, True)  # [T, G]
            allowed = allowed[:, :, None].expand(tokens, self.num_groups, n_exp // self.num_groups)
            score = score.masked_fill(~allowed.reshape(tokens, n_exp), float("-inf"))
        top = score.topk(self.top_k, dim=-1).indices  # [T, k]
        return torch.zeros_like(score, dtype=torch.bool).scatter(1, top, True)

    def _weights_before_drops(self, logits, index):
        """[T, k] gate weights the router computed for the chosen experts before capacity dropping."""
        import torch

        if self.score_function == "softmax":
            if self.pre_softmax:
                w = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(1, index)
            else:
                w = torch.softmax(logits.gather(1, index), dim=-1, dtype=torch.float32)
        else:
            w = torch.sigmoid(logits.float()).gather(1, index)
            if self.top_k > 1:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.weight_scale
