"""DeepSpeed's `TopKGate` (deepspeed.moe.sharded_moe, used by `deepspeed.moe.layer.MoE`; tested with deepspeed 0.19.8).

`TopKGate.forward(input[S, M], used_token=None, sparse_routes=False)` computes `logits = input.float() @ wg.weight.T`
and `gates = softmax(logits)`, then, by `k`:
- k = 1: the expert is `argmax(gates)` (`argmax(logits + gumbel)` with noisy_gate_policy='RSample' in training);
- k = 2: the first expert is `argmax(gates)`, the second `argmax` of the logits without the first, plus Gumbel noise
  when `top2_2nd_expert_sampling` (DeepSpeed's default, also in eval): then the second choice is random;
- k > 2: `topk(gates, k)`;
then, with `drop_tokens`, drops assignments past each expert's capacity (k = 1: random token selection with `use_rts`;
k = 2: by position; k > 2: by probability) and renormalises the kept gates over the kept assignments (k >= 2).
`MOELayer` (what `MoE` runs) calls it with `sparse_routes=True`, which returns `(l_aux, capacity, E, indices[k, S]`
(int32, -1 where the capacity limit dropped the route), `locations[k, S], gates[k, S], exp_counts)`; called alone it
returns `(l_aux, combine_weights[S, E, C], dispatch_mask[S, E, C], exp_counts)`. This adapter reads both:
- the logits are recomputed as the gate computed them (float32, same weight, same input);
- the kept assignments (expert and applied weight) are the gate's own output; a dropped assignment keeps its slot,
  `dropped` True, its expert recomputed as the gate chose it and its weight as the gate computed it before the drop
  (k = 1: the probability; k >= 2: the probability over the sum of the k chosen probabilities);
- slots in the gate's order: k = 2 first then second choice, k > 2 by probability, descending.
Refused at find_routers (pass adapter=): configurations whose dropped assignments cannot be known from the output,
because the choice of a dropped route was random: k = 2 with `top2_2nd_expert_sampling` and `drop_tokens`, and a
noisy_gate_policy ('RSample', 'Jitter') with `drop_tokens`. Without `drop_tokens` they are read (nothing is dropped;
with 'Jitter' the recomputed logits miss the training-time jitter, the choice and weights are the gate's own).
Tokens masked out by `used_token` (k = 1) come back as dropped, as the gate reports them.
"""

from __future__ import annotations

from collectors.routers import RouterAdapter, RouterError, RouterOutput, RouterOutputError, _describe


def is_topk_gate(module) -> bool:
    """A DeepSpeed TopKGate (or a subclass defined in deepspeed), recognised without importing deepspeed."""
    return any(cls.__name__ == "TopKGate" and cls.__module__.startswith("deepspeed.") for cls in type(module).__mro__)


recognises = is_topk_gate


def auto_adapter(module, n_experts: int | None, top_k: int | None):
    if not is_topk_gate(module):
        return None
    return DeepSpeedTopKGateAdapter(module), "deepspeed-topk"


class DeepSpeedTopKGateAdapter(RouterAdapter):
    """Reads a DeepSpeed TopKGate's sparse or dense output (see the module docstring)."""

    def __init__(self, gate):
        where = f"DeepSpeed {type(gate).__name__}"
        self.n_experts = int(gate.wg.out_features)
        self.top_k = int(gate.k)
        self.drop_tokens = bool(gate.drop_tokens)
        self.sampled_second = self.top_k == 2 and bool(getattr(gate, "top2_2nd_expert_sampling", False))
        noisy = gate.noisy_gate_policy if gate.noisy_gate_policy not in (None, "None") else None
        if self.drop_tokens and self.sampled_second:
            raise RouterError(
                f"{where} with k=2, top2_2nd_expert_sampling=True and drop_tokens=True draws each token's second "
                "expert with Gumbel noise and reports a dropped second choice as -1, so which expert it was is in "
                "no output and moeviz cannot record it exactly. Build the MoE with top2_2nd_expert_sampling=False "
                "(the second expert is then the second-best) or drop_tokens=False, or pass adapter="
            )
        if self.drop_tokens and noisy is not None:
            raise RouterError(
                f"{where} with noisy_gate_policy={noisy!r} and drop_tokens=True chooses with random noise in "
                "training, and a dropped route's expert is in no output: build it with noisy_gate_policy=None or "
                "drop_tokens=False, or pass adapter="
            )
        # the capacity factor of the mode the gate is in when found (training: capacity_factor, eval:
        # eval_capacity_factor; `min_capacity` may raise the capacity above it); None: nothing dropped
        factor = gate.capacity_factor if gate.training else gate.eval_capacity_factor
        self.capacity_factor = float(factor) if self.drop_tokens else None

    def __call__(self, module, inputs, output):
        import torch
        from torch.nn import functional as F

        x = inputs[0]
        logits = F.linear(x.reshape(-1, x.shape[-1]).float(), module.wg.weight.float())  # [S, E] as the gate did
        gates = torch.softmax(logits, dim=1)  # [S, E]
        k = self.top_k
        items = tuple(output) if isinstance(output, (tuple, list)) else ()
        if len(items) == 7 and isinstance(items[3], torch.Tensor) and items[3].dim() == 2:
            idx_out = items[3].t().long()  # [S, k] expert, -1 where dropped
            w_out = items[5].t()  # [S, k] gate applied (0 where dropped)
            kept = idx_out >= 0  # [S, k]
            if k == 2 and self.sampled_second:  # the second expert was drawn: only the gate's output knows it
                second = idx_out[:, 1]  # never -1 here: nothing is dropped (drop_tokens=False)
                index = torch.stack([gates.argmax(1), second], dim=1)
            else:
                index = self._chosen(logits, gates)  # [S, k]
            index = torch.where(kept, idx_out, index)
            applied = w_out
        elif len(items) == 4 and isinstance(items[2], torch.Tensor) and items[2].dim() == 3:
            kept_map = items[2].any(-1)  # [S, E] the experts each token was dispatched to
            w_map = items[1].sum(-1)  # [S, E] combine weight per expert
            if k == 2 and self.sampled_second:
                first = gates.argmax(1)  # [S]
                others = kept_map.scatter(1, first[:, None], False)  # [S, E] the kept second choice
                index = torch.stack([first, others.float().argmax(1)], dim=1)
            elif k == 1:  # the dispatched expert where kept ('RSample' noise in training), else argmax(gates)
                index = torch.where(kept_map.any(-1, keepdim=True), kept_map.float().argmax(1, keepdim=True),
                                    gates.argmax(1, keepdim=True))
            else:
                index = self._chosen(logits, gates)
            kept = kept_map.gather(1, index)  # [S, k]
            applied = w_map.gather(1, index)
        else:
            raise RouterOutputError(
                "expected TopKGate's (l_aux, capacity, E, indices, locations, gates, exp_counts) or (l_aux, "
                f"combine_weights, dispatch_mask, exp_counts), got {_describe(output)}"
            )
        chosen = gates.gather(1, index)  # [S, k] probabilities of the chosen experts
        before = chosen if k == 1 else chosen / chosen.sum(-1, keepdim=True).clamp(min=torch.finfo(chosen.dtype).eps)
        weights = torch.where(kept, applied.to(before.dtype), before)
        return RouterOutput(logits=logits, index=index, weights=weights, dropped=~kept)

    def _chosen(self, logits, gates):
        """[S, k] the experts the gate chose before capacity dropping (deterministic configurations)."""
        import torch

        if self.top_k == 1:
            return gates.argmax(1, keepdim=True)
        if self.top_k == 2:
            first = gates.argmax(1)  # [S]
            second = logits.scatter(1, first[:, None], float("-inf")).argmax(1)  # [S]
            return torch.stack([first, second], dim=1)
        return torch.topk(gates, k=self.top_k, dim=1).indices
