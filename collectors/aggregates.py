"""Device-side math of the Recorder: exact per-step aggregates and the kept-token selection.

Everything here runs on the router's device with fixed output sizes, so that it never waits for the GPU:
no `.item()`, no `.tolist()`, no boolean indexing, no `nonzero`, no `bincount` without a size. Counts use
`scatter_add_` into zero tensors of known size; masked sums use `torch.where` (a padded token's logits may be
anything, NaN included, and must not leak into a sum). A token inside the mask whose router logits or gate weights
are NaN or infinite (`finite_tokens`) is counted in `nonfinite_tokens` and left out of everything else, the same
way: one bad token must not turn a layer's sums into NaN, and the count (not a host-side check) says it happened. Aggregates are packed into float64 vectors (float64
holds every count below 2**53 exactly), routes into int32 / float32 matrices; the Recorder copies a whole flush
off the device as one byte buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Layout of one layer's packed aggregates (see `layer_aggregates`): 9 scalars, then 4 vectors of n_experts.
LAYER_SCALARS = ("tokens", "z_loss_sum", "entropy_sum", "dropped",
                 "adjacent_pairs", "same_first", "first_in_topk", "topk_overlap", "nonfinite_tokens")
EXPERT_VECTORS = ("assigned", "first_choice", "prob_sum", "dropped")


def packed_aggregate_size(n_experts: int) -> int:
    """Length of the vector `layer_aggregates` returns for a layer with `n_experts` experts."""
    return len(LAYER_SCALARS) + len(EXPERT_VECTORS) * n_experts


def router_lse(logits: Tensor) -> Tensor:
    """logsumexp of the router logits in float32, [N]: computed once per layer and step, shared by
    `finite_tokens` and `layer_aggregates` (it is most of their cost for wide layers)."""
    return torch.logsumexp(logits.float(), dim=-1)


def finite_tokens(logits: Tensor, weights: Tensor | None = None, lse: Tensor | None = None) -> Tensor:
    """Which tokens have usable router outputs, as bool [N] (computed on the device: no sync).

    logits [N, E]; weights [N, k] or None; lse [N] from `router_lse` (None: computed here). A token is finite
    when logsumexp of its logits is finite (no NaN, no +inf, not every expert at -inf: then its softmax, z-loss
    and entropy are finite too; single experts masked with -inf are fine) and all its gate weights are finite.
    """
    ok = torch.isfinite(router_lse(logits) if lse is None else lse)  # [N]
    if weights is not None:
        ok = ok & torch.isfinite(weights.float()).all(-1)  # [N]
    return ok


def layer_aggregates(
    logits: Tensor, index: Tensor, dropped: Tensor | None, mask: Tensor, seq: Tensor | None = None,
    pos: Tensor | None = None, finite: Tensor | None = None, lse: Tensor | None = None, order: Tensor | None = None,
) -> Tensor:
    """Exact aggregates of one layer over one step, packed as float64 [9 + 4 * n_experts].

    logits [N, E] router logits; index [N, k] chosen experts (slot 0 first); dropped [N, k] bool or None;
    mask [N] bool, False for tokens outside the attention mask (they count nowhere); seq/pos [N] the token
    layout (None when unknown: the adjacency counts are then NaN, stored as NULL); finite [N] bool from
    `finite_tokens` (None: computed from the logits alone); lse [N] from `router_lse` (None: computed here);
    order [N] the tokens sorted by (seq, pos), when the stream does not hold each sequence's tokens contiguously
    (generate()'s decode forwards): the adjacency counts read them in that order.
    Tokens inside the mask that are not finite are counted in nonfinite_tokens and nowhere else.
    Layout: tokens, z_loss_sum, entropy_sum, dropped_total, adjacent_pairs, same_first, first_in_topk,
    topk_overlap, nonfinite_tokens, assigned[E], first_choice[E], prob_sum[E], dropped[E].
    """
    n, n_experts = logits.shape
    k = index.shape[1]
    inside = mask.to(torch.bool)  # [N]
    lse = router_lse(logits) if lse is None else lse  # [N] float32
    if finite is None:
        finite = finite_tokens(logits, lse=lse)
    keep = inside & finite  # [N]
    nonfinite = (inside & ~finite).sum(dtype=torch.float64)  # []
    m = keep.to(torch.int64)  # [N]
    logp = logits.float() - lse[:, None]  # [N, E]: log_softmax, reusing the logsumexp
    p = logp.exp()  # [N, E]

    prob_sum = torch.where(keep[:, None], p, 0.0).sum(0, dtype=torch.float64)  # [E]
    lse64 = lse.to(torch.float64)  # [N]
    z_loss_sum = torch.where(keep, lse64 * lse64, 0.0).sum()  # []
    plogp = torch.where(p > 0, p * logp, 0.0)  # [N, E]; 0 log 0 = 0 for experts masked with -inf
    entropy_sum = torch.where(keep, -plogp.sum(-1), 0.0).sum(dtype=torch.float64)  # []

    idx = index.to(torch.int64)  # [N, k]
    m_slots = m[:, None].expand(n, k)  # [N, k]
    assigned = torch.zeros(n_experts, dtype=torch.int64, device=logits.device)
    assigned.scatter_add_(0, idx.reshape(-1), m_slots.reshape(-1))  # [E]
    first = torch.zeros(n_experts, dtype=torch.int64, device=logits.device)
    first.scatter_add_(0, idx[:, 0], m)  # [E]
    dropped_e = torch.zeros(n_experts, dtype=torch.int64, device=logits.device)
    if dropped is not None:
        dropped_e.scatter_add_(0, idx.reshape(-1), (dropped.to(torch.int64) * m_slots).reshape(-1))  # [E]

    if seq is not None and pos is not None:
        if order is None:
            adjacency = adjacency_counts(idx, keep, seq, pos)  # [4]
        else:
            adjacency = adjacency_counts(idx[order], keep[order], seq[order], pos[order])  # [4]
    else:
        adjacency = torch.full((4,), float("nan"), dtype=torch.float64, device=logits.device)
    scalars = torch.cat([
        torch.stack([m.sum().to(torch.float64), z_loss_sum, entropy_sum, dropped_e.sum().to(torch.float64)]),
        adjacency,
        nonfinite[None],
    ])  # [9]
    return torch.cat(
        [scalars, assigned.to(torch.float64), first.to(torch.float64), prob_sum, dropped_e.to(torch.float64)]
    )


def adjacency_counts(index: Tensor, keep: Tensor, seq: Tensor, pos: Tensor) -> Tensor:
    """How often consecutive tokens share experts (Mixtral §5), as float64 [4]: adjacent_pairs, same_first,
    first_in_topk, topk_overlap.

    index [N, k]; keep/seq/pos [N]. Tokens n and n+1 of the stream form a pair when both are inside the mask and
    they are positions p and p+1 of one sequence (the stream is batch-major, so a sequence's tokens are contiguous).
    """
    adj = keep[:-1] & keep[1:] & (seq[1:] == seq[:-1]) & (pos[1:] == pos[:-1] + 1)  # [N-1]
    prev, nxt = index[:-1], index[1:]  # [N-1, k]
    same_first = prev[:, 0] == nxt[:, 0]  # [N-1]
    first_in_topk = (prev == nxt[:, :1]).any(-1)  # [N-1]
    overlap = (prev[:, :, None] == nxt[:, None, :]).flatten(1).any(-1)  # [N-1]; [N-1, k, k] compared
    hits = torch.stack([adj, adj & same_first, adj & first_in_topk, adj & overlap])  # [4, N-1]
    return hits.sum(-1, dtype=torch.float64)  # [4]


def pair_counts(index: Tensor, mask: Tensor, n_experts: int) -> Tensor:
    """Tokens that chose both experts i < j, for every pair (upper triangle, row-major), as int32 [E(E-1)/2].

    index [N, k]; mask [N]. One scatter into E*E counts (for each of the k(k-1)/2 slot pairs of each token), then
    the upper triangle: for E = 256 that is a 256 KiB scratch buffer and a 130 KiB result per layer and step.
    """
    n, k = index.shape
    dev = index.device
    idx = index.to(torch.int64)
    a, b = torch.triu_indices(k, k, offset=1, device=dev)  # [P] slot pairs, P = k(k-1)/2
    lo = torch.minimum(idx[:, a], idx[:, b])  # [N, P]
    hi = torch.maximum(idx[:, a], idx[:, b])  # [N, P]
    counted = mask.to(torch.bool)[:, None] & (lo != hi)  # [N, P]; a repeated expert is no pair
    counts = torch.zeros(n_experts * n_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, (lo * n_experts + hi).reshape(-1), counted.to(torch.int64).reshape(-1))  # [E*E]
    i, j = torch.triu_indices(n_experts, n_experts, offset=1, device=dev)  # [E(E-1)/2]
    return counts[i * n_experts + j].to(torch.int32)


def kept_token_slots(mask: Tensor, max_tokens: int | None) -> tuple[Tensor, Tensor]:
    """Which tokens get per-token detail: the first `max_tokens` tokens inside the mask, in stream order.

    mask [N] bool. Returns (index [M], valid [M]) with M = N if max_tokens is None else min(N, max_tokens):
    index[i] is the position (in the stream) of the i-th kept token, valid[i] says whether there is one (a step
    may have fewer than M tokens inside the mask). The size M is known without looking at the data, so no sync.
    """
    n = mask.shape[0]
    m = n if max_tokens is None else min(n, int(max_tokens))
    keep = mask.to(torch.bool)  # [N]
    order = torch.cumsum(keep.to(torch.int64), 0)  # [N], 1-based rank among masked-in tokens
    kept = keep & (order <= m)  # [N]
    target = torch.where(kept, order - 1, m)  # [N]; everything not kept lands in the spare slot m
    slots = torch.zeros(m + 1, dtype=torch.int64, device=mask.device)
    slots.scatter_(0, target, torch.arange(n, device=mask.device))  # [M + 1]
    total = order[-1] if n else torch.zeros((), dtype=torch.int64, device=mask.device)
    valid = torch.arange(m, device=mask.device) < total  # [M]
    return slots[:m], valid


def routing_margin(scores: Tensor, index: Tensor) -> Tensor:
    """How close each token's routing call was, as float32 [N]: the score of its weakest chosen expert minus that
    of its best unchosen one, in the space the router ranked experts in (softmax probabilities, or sigmoid score
    plus bias for DeepSeek-V3-style routers). 0 is a tie; a negative value means an expert outside the set scored
    higher (group-limited routing left it out, or a router that does not take the plain top-k).

    scores [N, E]; index [N, k]. Fixed-size ops only (a gather, a scatter of -inf, two reductions): no sync, and
    traceable by torch.compile. NaN where the token has no unchosen expert (k = E) or its scores are not finite."""
    weakest, best_other = _weakest_and_best_other(scores.float(), index)  # [N], [N]
    margin = weakest - best_other  # [N]
    return torch.where(torch.isfinite(margin), margin, torch.full_like(margin, float("nan")))


def _weakest_and_best_other(scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Per token, the score of its weakest chosen expert and of its best unchosen one (-inf if none): scores
    [N, E], index [N, k] -> ([N], [N]); a gather and a scatter of -inf, fixed-size."""
    idx = index.to(torch.int64)  # [N, k]
    return scores.gather(1, idx).min(1).values, scores.scatter(1, idx, float("-inf")).max(1).values


def kept_margin(logits: Tensor, index: Tensor, sel: Tensor, margin: Tensor | None = None,
                lse: Tensor | None = None) -> Tensor:
    """`routing_margin` of the kept tokens `sel` [M], float32 [M]: the margin the hook computed from the router's
    own scores when it had them (`margin` [N], sigmoid + bias routers), else that of the full softmax of the
    logits (softmax routers), computed here, at step(), for the kept tokens only. The softmax is monotonic, so the
    weakest chosen and the best unchosen expert are found on the logits and only their two probabilities are
    taken, exp(logit - logsumexp), reusing step()'s logsumexp `lse` [N] when given."""
    if margin is not None:
        return margin[sel].float()
    lg = logits[sel].float()  # [M, E]
    idx = index[sel].to(torch.int64)  # [M, k]
    if idx.shape[1] >= lg.shape[1]:  # every expert chosen: no unchosen one to compare with
        return torch.full((lg.shape[0],), float("nan"), device=lg.device)
    weakest, best_other = _weakest_and_best_other(lg, idx)  # [M], [M]
    norm = torch.logsumexp(lg, dim=-1) if lse is None else lse[sel].float()  # [M]
    return torch.exp(weakest - norm) - torch.exp(best_other - norm)  # [M]


def packed_routes(
    sel: Tensor,
    valid: Tensor,
    seq: Tensor,
    pos: Tensor,
    token_id: Tensor,
    index: Tensor,
    weights: Tensor,
    weight_scale: float = 1.0,
    dropped: Tensor | None = None,
    margin: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token detail of one layer for the kept tokens: (ints int32 [M, 4 + k], floats float32 [M, k + 1]).

    Int columns: valid, seq, pos, token_id, expert[k], where an assignment the model dropped (`dropped` [N, k]
    True) is written as -(expert + 1): the sign carries routes.dropped at no extra byte (expert ids are >= 0).
    Float columns: weight[k], then the token's margin (`margin` [M], from `kept_margin`; NaN = unknown).
    sel/valid come from `kept_token_slots`; seq/pos/token_id [N] describe the token stream; index/weights [N, k]
    are the layer's routing. 32-bit columns halve what a flush copies compared with float64 (routes are most of a
    flush). Weights are divided by `weight_scale` (DeepSeek's routed_scaling_factor), so that the stored gate
    weights are the router's probabilities in [0, 1].
    """
    cols = torch.stack([valid.to(torch.int64), seq[sel], pos[sel], token_id[sel]], dim=1)  # [M, 4]
    experts = index[sel].to(torch.int64)  # [M, k]
    if dropped is not None:
        experts = torch.where(dropped[sel], -experts - 1, experts)  # [M, k]
    ints = torch.cat([cols, experts], dim=1).to(torch.int32)  # [M, 4 + k]
    w = weights[sel].to(torch.float32)  # [M, k]
    if weight_scale != 1.0:
        w = w / float(weight_scale)
    if margin is None:
        margin = torch.full((w.shape[0],), float("nan"), dtype=torch.float32, device=w.device)
    floats = torch.cat([w, margin.to(torch.float32)[:, None]], dim=1)  # [M, k + 1]
    return ints, floats  # [M, 4 + k], [M, k + 1]


def flow_counts(index_a: Tensor, index_b: Tensor, mask: Tensor, n_a: int, n_b: int) -> Tensor:
    """How the tokens of one step flow from the experts of layer a to those of layer b, as int32 [2, n_a * n_b]
    (row-major: cell i * n_b + j). Row 0: tokens whose first choice is i in a and j in b. Row 1: (i, j) pairs
    with i among the token's k_a experts in a and j among its k_b in b, summed over tokens (k_a * k_b per token).

    index_a [N, k_a], index_b [N, k_b]: the same N tokens, in the same order, routed by two layers of one
    forward; mask [N]. Two scatters into zero tensors of fixed size (64 Ki cells each for E = 256): no sync.
    """
    n, ka = index_a.shape
    kb = index_b.shape[1]
    dev = index_a.device
    a = index_a.to(torch.int64)  # [N, k_a]
    b = index_b.to(device=dev, dtype=torch.int64, non_blocking=True)  # [N, k_b]; a pipeline stage may hold b elsewhere
    m = mask.to(device=dev, dtype=torch.int64, non_blocking=True)  # [N]
    counts = torch.zeros(2, n_a * n_b, dtype=torch.int64, device=dev)
    counts[0].scatter_add_(0, a[:, 0] * n_b + b[:, 0], m)  # [n_a * n_b]
    cells = a[:, :, None] * n_b + b[:, None, :]  # [N, k_a, k_b]
    counts[1].scatter_add_(0, cells.reshape(-1), m[:, None, None].expand(n, ka, kb).reshape(-1))
    return counts.to(torch.int32)
