"""torchtitan's `TokenChoiceTopKRouter` (torchtitan.models.common.moe; tested with torchtitan 0.3.0).

`MoE.forward` calls `self.router(x_BLD, self.expert_bias_E)`; the router returns
`(topk_scores_BLK, topk_expert_ids_BLK, scores_BLE)`:
- `scores_BLE`: sigmoid or softmax (`score_func`) of the gate's output, float32 on a GPU (the gate runs under
  `torch.autocast(dtype=float32)`, which a CPU ignores: there it runs in the input's dtype);
- `topk_expert_ids_BLK`: `topk(scores + expert_bias, sorted=False)`, after masking the groups that node-limited
  routing (`num_expert_groups`/`num_limited_groups`) leaves out: the slots come in no particular order;
- `topk_scores_BLK`: the unbiased scores of the chosen experts, divided by their sum if `route_norm`, times
  `route_scale`: the gate weights the experts' outputs are multiplied by.
So `scores_BLE` are probabilities or sigmoid scores, not logits, and the weights carry `route_scale`. This adapter
- recomputes the logits as the gate computed them (`F.linear` with the gate's weight and bias, float32 on CUDA as
  the router's autocast does, in the input's dtype elsewhere), so that moeviz's softmax, entropy and z-loss are
  taken of real logits;
- declares `route_scale` as the site's `weight_scale` (the store keeps weight / route_scale in [0, 1]);
- orders the chosen experts by the score the router ranked them by (`scores + expert_bias`, the bias read from
  the router call's own second argument), slot 0 = top choice;
- keeps the router's own expert ids and weights (nothing is recomputed there; torchtitan drops no tokens).
Rows are batch-major ([B*L]), the Recorder's token order.
"""

from __future__ import annotations

from collectors.routers import RouterAdapter, RouterError, RouterOutput, RouterOutputError, _describe, _sort_slots


def is_token_choice_router(module) -> bool:
    """A torchtitan TokenChoiceTopKRouter (or a subclass defined in torchtitan), known without importing it."""
    return any(
        cls.__name__ == "TokenChoiceTopKRouter" and cls.__module__.startswith("torchtitan.")
        for cls in type(module).__mro__
    )


recognises = is_token_choice_router


def auto_adapter(module, n_experts: int | None, top_k: int | None):
    if not is_token_choice_router(module):
        return None
    return TorchtitanRouterAdapter(module), "torchtitan-topk"


class TorchtitanRouterAdapter(RouterAdapter):
    """Reads a torchtitan TokenChoiceTopKRouter's `(topk_scores, topk_expert_ids, scores)` (see the module
    docstring)."""

    def __init__(self, router):
        self.n_experts = int(router.num_experts)
        self.top_k = int(router.top_k)
        self.weight_scale = float(router.route_scale)
        self.score_func = router.score_func  # 'softmax' or 'sigmoid'
        if self.score_func not in ("softmax", "sigmoid"):
            raise RouterError(
                f"torchtitan {type(router).__name__} with score_func={self.score_func!r} is not read out of the "
                "box: pass adapter="
            )

    def bias_reader(self, module, parent):
        """The MoE layer's `expert_bias_E` buffer (the router gets it as its call's second argument); read by
        name at each step, since training code may replace the tensor (None: the layer has no bias)."""
        if parent is None or not hasattr(parent, "expert_bias_E"):
            return None
        return lambda: getattr(parent, "expert_bias_E", None)

    def __call__(self, module, inputs, output):
        import torch
        from torch.nn import functional as F

        if not (isinstance(output, (tuple, list)) and len(output) == 3):
            raise RouterOutputError(
                f"expected TokenChoiceTopKRouter's (topk_scores, topk_expert_ids, scores), got {_describe(output)}"
            )
        weights, index, scores = output  # [B, L, K] float, [B, L, K] int64, [B, L, E] float
        x = inputs[0]  # [B, L, D]
        bias = inputs[1] if len(inputs) > 1 and isinstance(inputs[1], torch.Tensor) else None  # [E] or None
        gate = module.gate
        with torch.autocast(x.device.type, enabled=False):
            if x.device.type == "cuda":  # the router's autocast(dtype=float32) computes the gate in float32
                logits = F.linear(x.float(), gate.weight.float(), None if gate.bias is None else gate.bias.float())
            else:  # other devices' autocast ignores float32: the gate runs in the input's dtype
                logits = F.linear(x, gate.weight, gate.bias)
        logits = logits.reshape(-1, self.n_experts)  # [T, E]
        scores = scores.reshape(-1, self.n_experts)  # [T, E]
        index = index.reshape(-1, self.top_k)  # [T, K]
        weights = weights.reshape(-1, self.top_k)  # [T, K]
        ranked = scores if bias is None else scores + bias  # [T, E] what the router's top-k ranked
        index, weights = _sort_slots(index, weights, key=ranked.gather(1, index))
        return RouterOutput(logits=logits, index=index, weights=weights, dropped=None)
