"""Device-side recording of load balancing: the routers' selection bias and the per-sequence balance losses.

Two things the per-step aggregates (`collectors.aggregates`) cannot give:
- **The selection bias** of aux-loss-free balancing (DeepSeek-V3's `e_score_correction_bias`, torchtitan's and
  Megatron-Core's `expert_bias`): a buffer the training loop nudges every step, outside the forward. The Recorder
  copies it on the device when the step's first forward starts (`BiasSnapshots.take`, from the model's pre-hook,
  which runs eagerly), so the stored value is the one the routers ranked with during the step, even when the
  optimizer (torchtitan's pre-step hook, Megatron's finalize_model_grads) updates it before `Recorder.step()`.
  The copies travel with the flush's one device-to-host copy: no sync.
- **Per-sequence balance losses**, which cannot be recomputed from a step's pooled counts once a step has several
  sequences: the product f_i * P_i is taken per batch row before the mean (`SequenceBalance`). Summed over the
  step's sequences on the device into 4 float64 per layer: sequences, Switch's loss per row (transformers'
  `switch_transformers.load_balancing_loss_func` on one batch row), the same pooled over the layers of the stack so
  far (the way the model concatenates a stack's router logits), and DeepSeek-V3's complementary sequence-wise
  loss (normalised sigmoid affinities).

Fixed-size ops only (scatter/index_add into zero tensors of known size, `torch.where` for masks): no `.item()`,
no boolean indexing, so neither adds a sync to a step.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

BIAS_PIECE = "bias"  # float64 [E]: a layer's selection bias at the step
BALANCE_PIECE = "balance"  # float64 [4]: BALANCE_SCALARS of a layer at the step
PIECE_KINDS = (BIAS_PIECE, BALANCE_PIECE)
BALANCE_SCALARS = ("sequences", "switch_sum", "switch_stack_sum", "seq_aux_sum")
COLUMN_DTYPES = {"bias": np.float64, "sequences": np.int64, "switch_sum": np.float64,
                 "switch_stack_sum": np.float64, "seq_aux_sum": np.float64}


# ---------------------------------------------------------------------------------------------------------------
# The selection bias


class BiasSnapshots:
    """Copies of each biased router's selection bias, taken once per step on the device.

    sites: the Recorder's RouterSites; a site whose `expert_bias` reader is None has no bias. `take()` copies
    every bias the first time it is called after `clear()` (the model's pre-hook calls it at every forward; the
    first forward of a step wins), `pieces()` hands the copies over to the step's record."""

    def __init__(self, sites):
        self._readers: list[tuple[int, Callable[[], Tensor | None]]] = [
            (int(s.layer), s.expert_bias) for s in sites if getattr(s, "expert_bias", None) is not None
        ]
        self._taken: list[tuple[int, Tensor]] | None = None

    def take(self) -> None:
        if self._taken is not None or not self._readers:
            return
        taken = []
        for layer, read in self._readers:
            bias = read()
            if isinstance(bias, Tensor) and bias.dim() == 1:  # None: the layer has no bias (yet)
                taken.append((layer, bias.detach().clone().to(torch.float64)))  # [E], a device copy: no sync
        self._taken = taken

    def pieces(self) -> list[tuple[str, int, Tensor]]:
        """(kind, layer, tensor) of the copies taken for this step (taken now if no forward took them)."""
        self.take()
        return [(BIAS_PIECE, layer, t) for layer, t in (self._taken or [])]

    def clear(self) -> None:
        self._taken = None


# ---------------------------------------------------------------------------------------------------------------
# Per-sequence balance losses


class SequenceBalance:
    """The per-sequence balance losses of one step, layer by layer (a new one per step).

    Layers that route the same token stream (a decoder-only model's layers; an encoder's, a decoder's) are pooled
    in module order for Switch's per-stack loss: `switch_stack_sum` of a layer covers that layer and the earlier
    layers of its stream, so at a stack's last layer it is what transformers' Switch Transformers computes from
    the stack's concatenated router logits."""

    def __init__(self):
        self._pooled: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}  # (stream, E) -> C [B, E], P, n [B]

    def layer(self, stream_key: int, logits: Tensor, index: Tensor, keep: Tensor, seq: Tensor, n_seqs: int,
              lse: Tensor | None = None) -> Tensor:
        """float64 [4] (BALANCE_SCALARS) of one layer.

        logits [N, E] router logits; index [N, k] chosen experts; keep [N] bool (inside the mask and finite);
        seq [N] the token's sequence, 0 .. n_seqs - 1 of this step's rows; lse [N] logsumexp of the logits
        (None: computed here)."""
        n_tok, n_exp = logits.shape
        dev = logits.device
        keep = keep.to(device=dev, dtype=torch.bool)  # [N]
        # tokens left out (outside the mask, or not finite: their logits may be NaN) are summed into a spare row
        # n_seqs that is then dropped, so no [N, E] masking copy is needed
        rows = torch.where(keep, seq.to(device=dev, dtype=torch.int64), n_seqs)  # [N]
        lg = logits.float()  # [N, E] (the logits themselves when float32)
        if lse is None:
            lse = torch.logsumexp(lg, dim=-1)
        # one [N, E] buffer serves the three per-token quantities in turn, each summed per sequence before the next
        # is written into it (float32 adds within one sequence; the rest in float64)
        buf = torch.sub(lg, lse[:, None]).exp_()  # [N, E] softmax
        prob_sums = self._per_seq(rows, buf, n_seqs)  # [B, E]
        torch.sigmoid(lg, out=buf)  # [N, E] DeepSeek-V3's affinities ...
        buf.div_(buf.sum(-1, keepdim=True))  # ... normalised per token
        aff_sums = self._per_seq(rows, buf, n_seqs)  # [B, E]
        buf.zero_().scatter_(1, index.to(torch.int64), 1.0)  # [N, E]: 1 where the token chose the expert in any slot
        counts = self._per_seq(rows, buf, n_seqs)  # [B, E]
        n = torch.zeros(n_seqs + 1, dtype=torch.float32, device=dev).index_add_(
            0, rows, torch.ones(n_tok, dtype=torch.float32, device=dev))[:n_seqs].to(torch.float64)  # [B] tokens
        k = index.shape[1]
        n2 = n.clamp(min=1.0) ** 2  # [B]; a row with no token has zero sums: it adds 0

        # Switch (transformers, one batch row): E * sum_i (c_i / n) (p_i / n)
        switch_sum = (n_exp * (counts * prob_sums).sum(-1) / n2).sum()
        # DeepSeek-V3 (eq. 17-20, without alpha): sum_i (E c_i / (k n)) (a_i / n)
        seq_aux_sum = (n_exp / k * (counts * aff_sums).sum(-1) / n2).sum()

        key = (int(stream_key), n_exp)  # layers of another width are never pooled with these (nor could the model)
        if key in self._pooled:
            pc, pp, pn = (t.to(dev, non_blocking=True) for t in self._pooled[key])
            pc, pp, pn = pc + counts, pp + prob_sums, pn + n
        else:
            pc, pp, pn = counts, prob_sums, n
        self._pooled[key] = (pc, pp, pn)
        stack_sum = (n_exp * (pc * pp).sum(-1) / pn.clamp(min=1.0) ** 2).sum()
        sequences = (n > 0).sum(dtype=torch.float64)
        return torch.stack([sequences, switch_sum, stack_sum, seq_aux_sum])  # [4]

    @staticmethod
    def _per_seq(rows: Tensor, values: Tensor, n_seqs: int) -> Tensor:
        """float64 [n_seqs, E]: `values` [N, E] summed per row of `rows` [N] (in float32; row n_seqs, the left-out
        tokens', dropped)."""
        sums = torch.zeros(n_seqs + 1, values.shape[1], dtype=torch.float32, device=values.device)
        return sums.index_add_(0, rows, values)[:n_seqs].to(torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Host side (the writer thread): rows of the store's tables from a flush's host copy


def add_rows(add: Callable[..., None], kind: str, layer: int, arr: np.ndarray, step: int) -> None:
    """Append the rows of one piece to the flush's tables through the Recorder's `add(table, **columns)`."""
    if kind == BIAS_PIECE:  # [E]
        n = arr.shape[0]
        add("expert_bias", step=np.full(n, step), layer=np.full(n, layer), expert=np.arange(n), bias=arr)
    elif kind == BALANCE_PIECE:  # [4]
        sequences, switch_sum, stack_sum, seq_aux_sum = arr
        add("balance_stats", step=np.array([step]), layer=np.array([layer]), sequences=np.array([sequences]),
            switch_sum=np.array([switch_sum]), switch_stack_sum=np.array([stack_sum]),
            seq_aux_sum=np.array([seq_aux_sum]))
