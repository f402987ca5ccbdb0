"""Expert parallelism: how a routing log loads G GPUs, how many tokens cross between them, and better placements.

With expert parallelism each GPU holds some of a layer's experts, and the layer waits for its busiest GPU. The
questions, answered from what a store already holds:

- `gpu_load`: the assignments each GPU's experts receive under a placement, and per layer the busiest GPU over
  the mean GPU (`max_over_mean`: 1 = an even spread; 2 = the layer takes twice as long as an even spread would).
  Read from the exact per-step aggregates (`step_stats`), so it covers every token and takes milliseconds.
- `balanced_placement`: a placement computed from a load matrix, with `redundant` extra replicas of hot experts
  (as DeepSeek's EPLB does for V3/R1 serving) and node-aware packing.
- `dispatch_traffic` and `local_share`: the token copies each source sends to each GPU (from the per-token
  routes), and the share that stays on the sending GPU (or node).
- `placement_staleness`: a balanced placement fitted on some steps, evaluated on later ones, against one refitted
  on every step: how fast a placement goes stale as routing drifts.
- `placement_comparison` / `placement_summary`: the per-layer tables the CLI (`moeviz placement`) and the
  dashboard's Expert parallel page show.

Definitions (the README's "Expert parallelism" section and the page help say the same):

- A placement puts each expert of a layer on one or more GPUs; a replicated expert's assignments are split evenly
  over its replicas (share = 1 / replicas). Placements: "contiguous" (expert e on GPU floor(e*G/E), Megatron-LM
  and DeepSpeed's layout), "round_robin" (e mod G), "balanced" (`balanced_placement` of the selection's load, or
  of the `fit_steps` load), or an explicit table `[layer,] gpu, expert[, share]` (`balanced_placement` returns
  one). A fixed layout has no replicas: `redundant` applies to "balanced" only.
- GPU load (`tokens`): assignments (one token copy per chosen expert, over all k slots) that reach the GPU's
  experts; fractional when a replicated expert's load is split.
- Traffic: with source="rank", the tokens of recording rank r start on GPU r mod G; with source="sequence",
  sequence `seq` of each step and rank starts on data-parallel rank `seq mod G` (the batch dealt to G ranks in
  turn; the useful source for a run recorded on one rank). A token copy is local when it starts on the GPU that
  holds its expert (node-local: on a GPU of the same node, G/N consecutive GPUs per node). One copy per
  assignment, as Megatron's all-to-all dispatcher sends; a dispatcher that sends a token once per GPU sends fewer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from moeviz.analyses.load import AnalysisError, expert_counts_sql, run_query
from moeviz.analyses.step_buckets import check_step_bucket
from moeviz.analyses.step_rows import rollups_available
from moeviz.selection import Selection

__all__ = [
    "PlacementError",
    "PLACEMENTS",
    "gpu_load",
    "balanced_placement",
    "fixed_placement",
    "slots_per_gpu",
    "dispatch_traffic",
    "local_share",
    "placement_staleness",
    "placement_comparison",
    "placement_summary",
]

PLACEMENTS = ("contiguous", "round_robin", "balanced")
SOURCES = ("rank", "sequence")
_TOL = 1e-9  # relative: loads within this of each other are equal (float sums of shares)


class PlacementError(AnalysisError):
    """Expert-parallel arguments that cannot describe a layout: GPUs, replicas, nodes or a placement table."""


# --- arguments ------------------------------------------------------------------------------------------------


def _as_int(name: str, value: Any, lowest: int) -> int:
    try:
        ok = int(value) == value
    except (TypeError, ValueError):
        ok = False
    if not ok or int(value) < lowest:
        raise PlacementError(f"{name} must be an integer >= {lowest}; got {value!r}")
    return int(value)


def _check_shape(gpus: Any, redundant: Any = 0, nodes: Any = 1) -> tuple[int, int, int]:
    g = _as_int("gpus", gpus, 1)
    r = _as_int("redundant", redundant, 0)
    n = _as_int("nodes", nodes, 1)
    if g % n:
        raise PlacementError(f"nodes must divide gpus (G/N GPUs per node); got gpus={g}, nodes={n}")
    return g, r, n


def _check_fit(n_experts: int, gpus: int, redundant: int, nodes: int, where: str = "") -> None:
    """Can `balanced` place E experts and R extra replicas on G GPUs in N nodes? Raise a PlacementError if not."""
    at = f" ({where})" if where else ""
    if gpus > n_experts + redundant:
        raise PlacementError(f"gpus={gpus} exceed the {n_experts} experts + {redundant} redundant replicas{at}: "
                             "some GPU would hold no expert; use fewer GPUs or more replicas")
    per_node = gpus // nodes
    if redundant > n_experts * (per_node - 1):
        raise PlacementError(f"redundant={redundant} is more than the {n_experts * (per_node - 1)} replicas "
                             f"{n_experts} experts can have{at}: an expert has at most one replica per GPU of its "
                             f"node ({per_node} GPUs per node)")


def _check_fixed(kind: str, n_experts: int, gpus: int, redundant: int, where: str = "") -> None:
    if redundant:
        raise PlacementError(f"placement={kind!r} is a fixed layout without replicas; redundant replicas apply to "
                             "placement='balanced' (or pass an explicit expert->GPU table with replicas)")
    if gpus > n_experts:
        at = f" ({where})" if where else ""
        raise PlacementError(f"gpus={gpus} exceed the {n_experts} experts{at}: some GPU would hold no expert")


def slots_per_gpu(n_experts: int, gpus: int, redundant: int = 0) -> int:
    """Replica slots per GPU of a balanced placement: ceil((E + R) / G) (the memory each GPU sets aside)."""
    return -(-(int(n_experts) + int(redundant)) // int(gpus))


def fixed_placement(n_experts: int, gpus: int, kind: str = "contiguous") -> np.ndarray:
    """GPU of each expert in a fixed layout. # [E]

    contiguous: floor(e*G/E) (blocks of E/G consecutive experts, Megatron-LM's and DeepSpeed's layout);
    round_robin: e mod G."""
    e = np.arange(int(n_experts))
    if kind == "contiguous":
        return e * int(gpus) // int(n_experts)
    if kind == "round_robin":
        return e % int(gpus)
    raise PlacementError(f"a fixed placement is 'contiguous' or 'round_robin'; got {kind!r}")


def _fixed_shares(n_experts: int, gpus: int, kind: str) -> np.ndarray:
    share = np.zeros((n_experts, gpus))  # [E, G]
    share[np.arange(n_experts), fixed_placement(n_experts, gpus, kind)] = 1.0
    return share


# --- balanced placement ---------------------------------------------------------------------------------------


def balanced_placement(load, gpus: int, *, redundant: int = 0, nodes: int = 1) -> pd.DataFrame:
    """A placement of each layer's experts on `gpus` GPUs that keeps the busiest GPU low, from a load matrix.

    `load`: [layers x experts] assignments (a numpy array, rows = layers 0..L-1; or a DataFrame whose index holds
    the layer ids and whose columns are experts 0..E-1, e.g. `load_matrix(...).pivot(index="layer",
    columns="expert", values="assigned")`). Returns `layer, gpu, expert, share`: one row per replica placed, share =
    1 / that expert's replicas. `gpu_load(..., placement=<this frame>)` evaluates it on any steps.

    Constraints (the ones a serving system has): every expert has at least one replica, at most E + R replicas in
    all, replicas of one expert on distinct GPUs, at most ceil((E + R) / G) replicas per GPU; with nodes > 1 all
    replicas of an expert sit in one node (a token crosses to that node once).

    Algorithm, per layer (vectorised over layers):
    1. nodes > 1: experts to nodes, heaviest first, each to the least loaded node with room (ceil(E/N) experts);
    2. replicas: one at a time to the expert with the largest load per replica (D'Hondt's rule) whose node has a
       free slot; with one node this minimises the largest load per replica over every choice of counts;
    3. replicas onto GPUs, heaviest first, each to the least loaded GPU of its node with a free slot that holds no
       replica of the same expert (longest processing time first);
    4. local search: move or swap one replica between the busiest GPU and another GPU of its node while that lowers
       the larger of the two loads;
    5. steps 2-4 run with R, R // 2 and 0 replicas (an expert split in two must use two GPUs, which can hurt), and
       with nodes > 1 also with the contiguous layout's experts per node instead of step 1's; the layer keeps the
       best, and contiguous itself if that is better still.
    Guarantee: never worse than contiguous (step 5), by construction. With one node the busiest GPU of any
    placement is at least max(total / G, step 2's largest load per replica), a lower bound to compare with. Against
    the optimum (exhaustive search over every placement for 90 cases with E <= 8, G <= 4, R <= 2, one or two nodes;
    tests/test_placement.py) the worst ratio found is 1.096 (1.020 with one node), optimal in 69 of 90: measured,
    not proved. 58 layers x 256 experts x 64 GPUs with 32 replicas take about 0.3 s (docs/benchmarks.md).
    """
    layers = None
    if isinstance(load, pd.DataFrame):
        layers = np.asarray(load.index, dtype=np.int64)
        cols = np.asarray(load.columns, dtype=np.int64)
        if not np.array_equal(cols, np.arange(len(cols))):
            raise PlacementError("a load DataFrame's columns must be the experts 0..E-1 in order")
        load = load.to_numpy(dtype=float, na_value=0.0)
    a = np.asarray(load, dtype=float)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] < 1:
        raise PlacementError(f"load must be a [layers x experts] array; got shape {a.shape}")
    if not np.all(np.isfinite(a)) or (a < 0).any():
        raise PlacementError("load must hold finite, non-negative assignment counts")
    g, r, n = _check_shape(gpus, redundant, nodes)
    _check_fit(a.shape[1], g, r, n)
    share = _balanced_shares(a, g, r, n)  # [L, E, G]
    frame = _shares_frame(share)
    if layers is not None:
        frame["layer"] = layers[frame["layer"].to_numpy()]
    return frame


def _shares_frame(share: np.ndarray) -> pd.DataFrame:
    """[L, E, G] shares -> rows layer, gpu, expert, share (one per replica), sorted."""
    li, ei, gi = np.nonzero(share)
    frame = pd.DataFrame({"layer": li.astype(np.int64), "gpu": gi.astype(np.int64), "expert": ei.astype(np.int64),
                          "share": share[li, ei, gi]})
    return frame.sort_values(["layer", "gpu", "expert"], ignore_index=True)


def _busiest(load: np.ndarray, share: np.ndarray) -> np.ndarray:
    """Busiest GPU's assignments per row: load [L, E], share [L, E, G] or [E, G] -> [L]."""
    sub = "le,leg->lg" if share.ndim == 3 else "le,eg->lg"
    return np.einsum(sub, load, share).max(axis=-1)


def _balanced_shares(load: np.ndarray, gpus: int, redundant: int, nodes: int) -> np.ndarray:
    """`balanced_placement` on load [L, E]: shares [L, E, G], per layer the best of a few candidates.

    Candidates: the steps 1-4 with R, R // 2 and no replicas (splitting an expert forces its parts onto distinct
    GPUs, which can hurt: the best use of replicas is not always all of them), and with nodes > 1 also with the contiguous layout's experts per
    node instead of step 1's; then contiguous itself (step 5). Ties go to the earlier candidate."""
    n_lay, n_exp = load.shape
    per_node = gpus // nodes
    node_choices = [_experts_to_nodes(load, nodes)]  # [L, E] each
    if nodes > 1:
        node_choices.append(np.broadcast_to(np.arange(n_exp) * nodes // n_exp, (n_lay, n_exp)).copy())
    best = best_busy = None
    for node_of in node_choices:
        for reps in dict.fromkeys([redundant, redundant // 2, 0]):
            share = _balanced_candidate(load, gpus, reps, per_node, node_of)  # [L, E, G]
            busy = _busiest(load, share)  # [L]
            if best is None:
                best, best_busy = share, busy
                continue
            better = busy < best_busy * (1 - _TOL)
            best[better], best_busy[better] = share[better], busy[better]
    contiguous = _fixed_shares(n_exp, gpus, "contiguous")  # [E, G]
    worse = best_busy > _busiest(load, contiguous) * (1 + _TOL)  # [L]
    best[worse] = contiguous
    return best


def _balanced_candidate(load: np.ndarray, gpus: int, redundant: int, per_node: int,
                        node_of: np.ndarray) -> np.ndarray:
    """Steps 2-4 of `balanced_placement` for given experts per node: shares [L, E, G]."""
    n_lay, n_exp = load.shape
    nodes = gpus // per_node
    cap = slots_per_gpu(n_exp, gpus, redundant)
    reps = _replica_counts(load, node_of, nodes, redundant, per_node, cap * per_node)  # [L, E]
    share = np.zeros((n_lay, n_exp, gpus))  # [L, E, G]
    gpu_node = np.arange(gpus) // per_node  # [G]
    item_exp, item_w, assign, stuck = _pack_lpt(load, reps, node_of, gpu_node, cap)  # [L, P] each, [L]
    for row in range(n_lay):
        valid = item_exp[row] >= 0
        e, w = item_exp[row, valid], item_w[row, valid]
        a = _deal(e, node_of[row], per_node) if stuck[row] else assign[row, valid]
        a = _improve(a, w, e, gpu_node, cap, n_exp)
        np.add.at(share[row], (e, a), 1.0 / reps[row, e])
    return share


def _experts_to_nodes(load: np.ndarray, nodes: int) -> np.ndarray:
    """Node of each expert: heaviest first to the least loaded node holding fewer than ceil(E/N). # [L, E]"""
    n_lay, n_exp = load.shape
    node_of = np.zeros((n_lay, n_exp), dtype=np.int64)
    if nodes == 1:
        return node_of
    room = -(-n_exp // nodes)
    rows = np.arange(n_lay)
    order = np.lexsort((np.broadcast_to(np.arange(n_exp), load.shape), -load), axis=-1)  # [L, E] heaviest first
    node_load = np.zeros((n_lay, nodes))  # [L, N]
    node_count = np.zeros((n_lay, nodes), dtype=np.int64)  # [L, N]
    for i in range(n_exp):
        e = order[:, i]  # [L]
        node = np.where(node_count < room, node_load, np.inf).argmin(axis=1)  # [L]
        node_of[rows, e] = node
        node_load[rows, node] += load[rows, e]
        node_count[rows, node] += 1
    return node_of


def _replica_counts(load: np.ndarray, node_of: np.ndarray, nodes: int, redundant: int, per_expert: int,
                    node_slots: int) -> np.ndarray:
    """Replicas per expert: 1 each, then `redundant` more, each to the largest load per replica (D'Hondt) among
    experts with fewer than `per_expert` replicas whose node has a free slot. Experts with no load get none
    (a replica of nothing balances nothing). # [L, E]"""
    n_lay, n_exp = load.shape
    rows = np.arange(n_lay)
    reps = np.ones((n_lay, n_exp), dtype=np.int64)
    free = node_slots - np.stack([np.bincount(node_of[i], minlength=nodes) for i in range(n_lay)])  # [L, N]
    for _ in range(redundant):
        room = (reps < per_expert) & (np.take_along_axis(free, node_of, axis=1) > 0)  # [L, E]
        per = np.where(room, load / reps, -1.0)  # [L, E]
        e = per.argmax(axis=1)  # [L]
        give = per[rows, e] > 0  # [L]
        reps[rows[give], e[give]] += 1
        free[rows[give], node_of[rows[give], e[give]]] -= 1
    return reps


def _pack_lpt(load, reps, node_of, gpu_node, cap):
    """Longest processing time first, vectorised over layers: each replica, heaviest first (ties: lower expert),
    to the least loaded GPU of its node with a free slot and no replica of the same expert.

    Returns item_exp [L, P] (-1 = padding), item_w [L, P], assign [L, P] (GPU of each item) and stuck [L] (a layer
    whose later replicas found no eligible GPU: it is dealt instead, see `_deal`)."""
    n_lay, n_exp = load.shape
    gpus = len(gpu_node)
    n_items = int(reps.sum(axis=1).max())
    rows = np.arange(n_lay)
    # items: the replicas of each expert, expert-major, padded to P per layer
    slot = np.arange(n_items)
    ends = np.cumsum(reps, axis=1)  # [L, E]
    item_exp = np.stack([np.searchsorted(ends[i], slot, side="right") for i in range(n_lay)])  # [L, P]
    pad = item_exp >= n_exp
    item_exp = np.where(pad, 0, item_exp)
    item_w = np.where(pad, -np.inf, np.take_along_axis(load / reps, item_exp, axis=1))  # [L, P]
    item_exp = np.where(pad, -1, item_exp)
    order = np.lexsort((item_exp, -item_w), axis=-1)  # [L, P] heaviest first, padding last
    item_exp = np.take_along_axis(item_exp, order, axis=1)
    item_w = np.take_along_axis(item_w, order, axis=1)

    gpu_load_ = np.zeros((n_lay, gpus))  # [L, G]
    used = np.zeros((n_lay, gpus), dtype=np.int64)  # [L, G]
    holds = np.zeros((n_lay, gpus, n_exp + 1), dtype=bool)  # [L, G, E+1] (last column: padding)
    assign = np.full((n_lay, n_items), -1, dtype=np.int64)
    stuck = np.zeros(n_lay, dtype=bool)
    gidx = np.arange(gpus)
    for i in range(n_items):
        e = item_exp[:, i]  # [L]
        live = e >= 0
        ok = (used < cap) & ~holds[rows[:, None], gidx[None, :], e[:, None]]  # [L, G]
        ok &= gpu_node[None, :] == np.take_along_axis(node_of, np.maximum(e, 0)[:, None], axis=1)
        g = np.where(ok, gpu_load_, np.inf).argmin(axis=1)  # [L]
        put = live & ok[rows, g]
        stuck |= live & ~ok[rows, g]
        r, gg = rows[put], g[put]
        assign[r, i] = gg
        gpu_load_[r, gg] += item_w[r, i]
        used[r, gg] += 1
        holds[r, gg, e[put]] = True
    return item_exp, np.where(item_exp >= 0, item_w, 0.0), assign, stuck


def _deal(item_exp: np.ndarray, node_of: np.ndarray, per_node: int) -> np.ndarray:
    """A layout that always fits: each node's replicas in expert order, dealt to its GPUs in turn (replicas of one
    expert are consecutive and at most G/N, so they land on distinct GPUs; no GPU gets more than its slots)."""
    assign = np.empty(len(item_exp), dtype=np.int64)
    node = node_of[item_exp]
    for nd in np.unique(node):
        idx = np.flatnonzero(node == nd)
        idx = idx[np.argsort(item_exp[idx], kind="stable")]
        assign[idx] = nd * per_node + np.arange(len(idx)) % per_node
    return assign


def _improve(assign: np.ndarray, w: np.ndarray, e: np.ndarray, gpu_node: np.ndarray, cap: int,
             n_exp: int) -> np.ndarray:
    """Local search on one layer's replicas (assign, w, e: [P]): move a replica off the busiest GPU to a GPU of
    its node with a free slot, or swap it with a replica there, choosing the change that most lowers the larger
    of the two GPUs' loads; stop when none lowers it. Every change keeps the constraints and lowers the sorted
    load vector, so the search ends (capped at 4P changes)."""
    assign = assign.copy()
    gpus = len(gpu_node)
    loads = np.bincount(assign, weights=w, minlength=gpus)  # [G]
    used = np.bincount(assign, minlength=gpus)  # [G]
    holds = np.zeros((gpus, n_exp), dtype=bool)  # [G, E]
    holds[assign, e] = True
    for _ in range(4 * len(assign)):
        b = int(loads.argmax())
        top = loads[b]
        tol = _TOL * max(top, 1.0)
        on_b = np.flatnonzero(assign == b)  # [A]
        same_node = gpu_node == gpu_node[b]  # [G]
        best, change = top - tol, None
        # moves: replica a to GPU g (free slot, same node, no replica of e[a] there)
        g_ok = same_node & (used < cap)
        g_ok[b] = False
        if g_ok.any() and len(on_b):
            ok = g_ok[None, :] & ~holds[:, e[on_b]].T  # [A, G]
            val = np.maximum(top - w[on_b][:, None], loads[None, :] + w[on_b][:, None])  # [A, G]
            val = np.where(ok, val, np.inf)
            i, g = np.unravel_index(val.argmin(), val.shape)
            if val[i, g] < best:
                best, change = val[i, g], ("move", on_b[i], g)
        # swaps: replica a on b with replica x on g (same node, different experts, neither already there)
        others = np.flatnonzero((assign != b) & same_node[assign])  # [X]
        if len(others) and len(on_b):
            ga = assign[others]  # [X]
            ok = (e[on_b][:, None] != e[others][None, :])
            ok &= ~holds[ga[None, :], e[on_b][:, None]]  # e[a] not on g
            ok &= ~holds[b, e[others]][None, :]  # e[x] not on b
            d = w[on_b][:, None] - w[others][None, :]  # [A, X] what b sheds
            val = np.maximum(top - d, loads[ga][None, :] + d)
            val = np.where(ok & (d > 0), val, np.inf)
            i, j = np.unravel_index(val.argmin(), val.shape)
            if val[i, j] < best:
                best, change = val[i, j], ("swap", on_b[i], others[j])
        if change is None:
            break
        if change[0] == "move":
            _, a, g = change
            loads[b] -= w[a]; loads[g] += w[a]; used[b] -= 1; used[g] += 1  # noqa: E702
            holds[b, e[a]] = False; holds[g, e[a]] = True  # noqa: E702
            assign[a] = g
        else:
            _, a, x = change
            g = assign[x]
            loads[b] += w[x] - w[a]; loads[g] += w[a] - w[x]  # noqa: E702
            holds[b, e[a]] = False; holds[g, e[x]] = False  # noqa: E702
            holds[b, e[x]] = True; holds[g, e[a]] = True  # noqa: E702
            assign[a], assign[x] = g, b
    return assign


# --- reading the counts ---------------------------------------------------------------------------------------


class _Counts:
    """One run's assignments as a dense array: counts [S, L, E] (S = 1 when pooled), with its step, layer ids and
    experts per layer. Experts beyond a layer's own E are zero."""

    def __init__(self, steps: np.ndarray, layers: np.ndarray, n_experts: np.ndarray, counts: np.ndarray):
        self.steps, self.layers, self.n_experts, self.counts = steps, layers, n_experts, counts


def _dense(df: pd.DataFrame, by_step: bool, value: str = "assigned") -> dict[str, _Counts]:
    """Long rows run_id, [step,] layer, expert, n_experts, value -> {run_id: _Counts}."""
    out = {}
    for run_id, d in df.groupby("run_id", sort=True):
        layers, li = np.unique(d["layer"].to_numpy(np.int64), return_inverse=True)
        steps, si = (np.unique(d["step"].to_numpy(np.int64), return_inverse=True) if by_step
                     else (np.zeros(1, np.int64), np.zeros(len(d), np.int64)))
        n_exp = np.zeros(len(layers), dtype=np.int64)
        np.maximum.at(n_exp, li, d["n_experts"].to_numpy(np.int64))
        counts = np.zeros((len(steps), len(layers), int(n_exp.max())))  # [S, L, E]
        np.add.at(counts, (si, li, d["expert"].to_numpy(np.int64)), d[value].to_numpy(float))
        out[str(run_id)] = _Counts(steps, layers, n_exp, counts)
    return out


def _counts(con, sel: Selection, by_step: bool, step_bucket: int | None = None,
            only_steps: np.ndarray | None = None) -> dict[str, _Counts]:
    """Assignments per run, [step (or bucket of `step_bucket` steps),] layer and expert of the selection (the exact
    aggregates unless the selection filters domains or tags: see `moeviz.analyses.load.expert_counts_sql`; pooled
    over steps, the step roll-ups for whole blocks: moeviz.analyses.step_rows). `only_steps`: those steps only."""
    sql, params = expert_counts_sql(sel, by_step=by_step, step_bucket=step_bucket, rollups=rollups_available(con),
                                    only_steps=None if only_steps is None else only_steps.tolist())
    return _dense(run_query(con, sql, params), by_step)


def _evenly_spaced(steps: np.ndarray, n: int) -> np.ndarray:
    """At most n of the sorted `steps`, evenly spaced, the first and the last kept."""
    if len(steps) <= n:
        return steps
    return steps[np.unique(np.round(np.linspace(0, len(steps) - 1, n)).astype(np.int64))]


def _sampled_step_counts(con, sel: Selection, max_steps: int) -> dict[str, _Counts]:
    """Per-step counts of at most `max_steps` steps of each run of `sel`, evenly spaced (`_evenly_spaced`).
    Why not read every step and keep a few: at 100,000 steps of 58 x 256 experts the rows of 75,000 steps took
    26-37 s and 19-24 GB of DuckDB memory, the 500 kept 1.4 s. The steps are listed from layer_stats (one row per
    step and layer, 1/E of step_stats), which a Recorder writes with every step's step_stats; a run without
    layer_stats rows in the selection (RunWriter takes any tables), and a selection by domain or tag (counts from
    the routes), read every step, then sample."""
    out: dict[str, _Counts] = {}
    if not sel.needs_sequences:
        where, params = sel.where("l")
        listed = run_query(con, f"SELECT DISTINCT run_id, step FROM layer_stats l WHERE {where} "
                                "ORDER BY run_id, step", params)
        for run_id, d in listed.groupby("run_id", sort=True):
            keep = _evenly_spaced(d["step"].to_numpy(np.int64), max_steps)
            out.update(_counts(con, sel.with_(run_ids=(run_id,)), by_step=True, only_steps=keep))
    rwhere, rparams = Selection(run_ids=sel.run_ids).where()
    rest = tuple(r for r in run_query(con, f"SELECT DISTINCT run_id FROM runs WHERE {rwhere}", rparams)["run_id"]
                 if str(r) not in out)
    if rest:
        for run_id, run in _counts(con, sel.with_(run_ids=rest), by_step=True).items():
            keep = np.searchsorted(run.steps, _evenly_spaced(run.steps, max_steps))
            out[run_id] = _Counts(run.steps[keep], run.layers, run.n_experts, run.counts[keep])  # counts [S', L, E]
    return out


def _steps_sel(sel: Selection, steps) -> Selection:
    if steps is None:
        return sel
    try:
        lo, hi = int(steps[0]), int(steps[1])
    except (TypeError, ValueError, IndexError):
        raise PlacementError(f"a step range is (first, last), inclusive; got {steps!r}") from None
    if lo > hi:
        raise PlacementError(f"a step range is (first, last) with first <= last; got {steps!r}")
    return sel.with_(steps=(lo, hi))


# --- placements as shares ---------------------------------------------------------------------------------------


def _layer_groups(n_experts: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(E, rows of the layers with E experts): balanced placements are computed per group of equal E."""
    return [(int(E), np.flatnonzero(n_experts == E)) for E in np.unique(n_experts)]


def _balanced_for(load: np.ndarray, n_experts: np.ndarray, gpus: int, redundant: int, nodes: int,
                  where: str) -> np.ndarray:
    """Balanced shares [L, Emax, G] of load [L, Emax] whose layers have n_experts [L] experts."""
    share = np.zeros(load.shape + (gpus,))
    for n_exp, rows in _layer_groups(n_experts):
        _check_fit(n_exp, gpus, redundant, nodes, where)
        share[rows, :n_exp] = _balanced_shares(load[rows, :n_exp], gpus, redundant, nodes)
    return share


def _fixed_for(kind: str, n_experts: np.ndarray, width: int, gpus: int, redundant: int, where: str) -> np.ndarray:
    share = np.zeros((len(n_experts), width, gpus))
    for n_exp, rows in _layer_groups(n_experts):
        _check_fixed(kind, n_exp, gpus, redundant, where)
        share[rows, :n_exp] = _fixed_shares(n_exp, gpus, kind)
    return share


def _table_shares(table: pd.DataFrame, layers: np.ndarray, n_experts: np.ndarray, width: int,
                  gpus: int) -> np.ndarray:
    """An explicit placement table `[layer,] gpu, expert[, share]` as shares [L, E, G] for these layers."""
    missing = {"gpu", "expert"} - set(table.columns)
    if missing:
        raise PlacementError(f"a placement table needs columns gpu and expert (and layer, share); missing {sorted(missing)}")
    t = table.copy()
    if "layer" not in t.columns:  # one layout for every layer
        t = pd.concat([t.assign(layer=int(layer)) for layer in layers], ignore_index=True)
    try:
        lay, gpu, exp = (t[c].to_numpy(np.int64) for c in ("layer", "gpu", "expert"))
    except (TypeError, ValueError):
        raise PlacementError("a placement table's layer, gpu and expert columns must hold integers") from None
    if t.duplicated(["layer", "expert", "gpu"]).any():
        raise PlacementError("a placement table lists one expert twice on the same GPU of a layer")
    if len(gpu) and (gpu.min() < 0 or gpu.max() >= gpus):
        raise PlacementError(f"a placement table puts experts on GPU {int(gpu.min())}..{int(gpu.max())}, outside "
                             f"0..{gpus - 1} (gpus={gpus})")
    pos = pd.Index(layers).get_indexer(lay)  # row of each table row's layer, -1 if not selected
    absent = sorted(set(int(x) for x in layers) - set(int(x) for x in lay))
    if absent:
        raise PlacementError(f"the placement table has no rows for layer(s) {absent}")
    keep = pos >= 0
    lay, gpu, exp, pos = lay[keep], gpu[keep], exp[keep], pos[keep]
    bad = (exp < 0) | (exp >= n_experts[pos])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise PlacementError(f"the placement table names expert {int(exp[i])} of layer {int(lay[i])}, which has "
                             f"{int(n_experts[pos[i]])} experts")
    if "share" in t.columns:
        share_v = pd.to_numeric(t["share"], errors="coerce").to_numpy(float)[keep]
        if not np.all(np.isfinite(share_v)) or (share_v <= 0).any():
            raise PlacementError("a placement table's shares must be positive numbers")
    else:  # 1 / the expert's replicas
        reps = pd.Series(1, index=pd.MultiIndex.from_arrays([pos, exp])).groupby(level=[0, 1]).transform("size")
        share_v = 1.0 / reps.to_numpy(float)
    share = np.zeros((len(layers), width, gpus))
    np.add.at(share, (pos, exp, gpu), share_v)
    total = share.sum(axis=2)  # [L, E]
    for row, n_exp in enumerate(n_experts):
        t_row = total[row, :n_exp]
        if not np.allclose(t_row, 1.0, atol=1e-6):
            e = int(np.flatnonzero(~np.isclose(t_row, 1.0, atol=1e-6))[0])
            what = "is on no GPU" if t_row[e] == 0 else f"has shares summing to {t_row[e]:.6g}, not 1"
            raise PlacementError(f"in the placement table, expert {e} of layer {int(layers[row])} {what}")
    return share


def _shares(placement, run: _Counts, gpus: int, redundant: int, nodes: int, fit: _Counts | None,
            run_id: str) -> np.ndarray:
    """The placement's shares [L, E, G] for the layers of `run` (balanced: fitted on `fit`, pooled)."""
    width = run.counts.shape[2]
    where = f"run {run_id}"
    if isinstance(placement, pd.DataFrame):
        if redundant:
            raise PlacementError("redundant replicas apply to placement='balanced'; an explicit table already says "
                                 "where every replica is")
        return _table_shares(placement, run.layers, run.n_experts, width, gpus)
    if placement in ("contiguous", "round_robin"):
        return _fixed_for(placement, run.n_experts, width, gpus, redundant, where)
    if placement == "balanced":
        if fit is None or fit.counts.shape[0] == 0:
            raise PlacementError(f"no recorded steps to fit the balanced placement on ({where})")
        # the fit's layers, lined up with the evaluated ones (a layer the fit window lacks has no load: contiguous)
        pooled = fit.counts.sum(axis=0)  # [L_fit, E_fit]
        load = np.zeros((len(run.layers), width))  # [L, E]
        rows = pd.Index(fit.layers).get_indexer(run.layers)
        have = rows >= 0
        w = min(width, pooled.shape[1])
        load[have, :w] = pooled[rows[have], :w]
        return _balanced_for(load, run.n_experts, gpus, redundant, nodes, where)
    raise PlacementError(f"placement must be one of {PLACEMENTS} or a DataFrame layer, gpu, expert[, share]; "
                         f"got {placement!r}")


def _fit_counts(con, sel: Selection, placement, fit_steps) -> dict[str, _Counts] | None:
    if isinstance(placement, str) and placement == "balanced":
        return _counts(con, _steps_sel(sel, fit_steps), by_step=False)
    if fit_steps is not None:
        raise PlacementError("fit_steps applies to placement='balanced' (the placement fitted on those steps)")
    return None


# --- GPU load ---------------------------------------------------------------------------------------------------

_GPU_LOAD_COLUMNS = ["run_id", "layer", "step", "gpu", "tokens", "share", "max_over_mean"]


def _gpu_frame(run_id: str, run: _Counts, per_gpu: np.ndarray, by_step: bool) -> pd.DataFrame:
    """per_gpu [S, L, G] -> long rows run_id, layer, [step,] gpu, tokens, share, max_over_mean."""
    n_s, n_l, n_g = per_gpu.shape
    total = per_gpu.sum(axis=2, keepdims=True)  # [S, L, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, per_gpu / total, np.nan)
        ratio = np.where(total[..., 0] > 0, per_gpu.max(axis=2) / (total[..., 0] / n_g), np.nan)  # [S, L]
    si, li, gi = np.unravel_index(np.arange(per_gpu.size), per_gpu.shape)
    frame = pd.DataFrame({
        "run_id": run_id, "layer": run.layers[li], "step": run.steps[si], "gpu": gi.astype(np.int64),
        "tokens": per_gpu.ravel(), "share": share.ravel(), "max_over_mean": ratio[si, li],
    })
    return frame if by_step else frame.drop(columns="step")


def gpu_load(
    con,
    sel: Selection,
    gpus: int,
    *,
    placement="contiguous",
    redundant: int = 0,
    nodes: int = 1,
    by_step: bool = False,
    fit_steps: tuple[int, int] | None = None,
    eval_steps: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Assignments each of `gpus` GPUs receives per run, layer (and step) under a placement.

    Columns: run_id, layer, [step,] gpu, tokens (assignments reaching the GPU's experts; a replicated expert's
    split evenly over its replicas), share (of the layer's assignments), max_over_mean (the layer's busiest GPU
    over its mean GPU, on every row of the layer: 1 = even, the slowdown of an expert-parallel layer over an even
    spread). Read from the exact per-step aggregates.

    placement: "contiguous" | "round_robin" | "balanced" | a DataFrame `[layer,] gpu, expert[, share]` (see the
    module docstring). "balanced" is fitted on the selection's pooled load, or on `fit_steps` (first, last) when
    given; `eval_steps` (first, last) evaluates on those steps instead of the selection's (fit on one range,
    evaluate on another). `redundant` and `nodes` shape the balanced placement (nodes must divide gpus).
    """
    g, r, n = _check_shape(gpus, redundant, nodes)
    eval_sel = _steps_sel(sel, eval_steps)
    fits = _fit_counts(con, sel, placement, fit_steps)
    frames = []
    for run_id, run in _counts(con, eval_sel, by_step).items():
        fit = fits.get(run_id) if fits is not None else None
        share = _shares(placement, run, g, r, n, fit, run_id)  # [L, E, G]
        per_gpu = np.einsum("sle,leg->slg", run.counts, share)  # [S, L, G]
        frames.append(_gpu_frame(run_id, run, per_gpu, by_step))
    cols = [c for c in _GPU_LOAD_COLUMNS if by_step or c != "step"]
    if not frames:
        return pd.DataFrame(columns=cols)
    keys = ["run_id", "layer", "step", "gpu"] if by_step else ["run_id", "layer", "gpu"]
    return pd.concat(frames, ignore_index=True)[cols].sort_values(keys, ignore_index=True)


def _ratio(counts: np.ndarray, share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Busiest GPU and mean GPU assignments: counts [S, L, E], share [L, E, G] -> ([S, L], [S, L])."""
    per_gpu = np.einsum("sle,leg->slg", counts, share)  # [S, L, G]
    return per_gpu.max(axis=2), per_gpu.mean(axis=2)


def placement_comparison(
    con,
    sel: Selection,
    gpus: int,
    *,
    redundant: int = 0,
    nodes: int = 1,
    by_step: bool = False,
    fit_steps: tuple[int, int] | None = None,
    eval_steps: tuple[int, int] | None = None,
    step_bucket: int | None = None,
) -> pd.DataFrame:
    """The busiest GPU under each placement, per run, layer (and step), from one read of the aggregates.
    `step_bucket=b` (with by_step): one row per bucket of b steps, from the bucket's summed counts, `step` its first
    step (moeviz.analyses.step_buckets): a long run's curve in at most ~1,500 points, not a steps x layers x
    experts array of every step.

    Columns: run_id, layer, [step,] placement ('contiguous', 'round_robin', 'balanced'), redundant (the balanced
    placement's extra replicas: 0, and `redundant` on a second balanced row when > 0, to show what replicas buy),
    busiest (assignments of the busiest GPU), mean (assignments per GPU), max_over_mean. Balanced is fitted on
    `fit_steps` (default: the selection) and every placement evaluated on `eval_steps` (default: the selection).
    Fixed layouts that cannot spread a layer over `gpus` GPUs (G > E) are left out for that layer's run.
    """
    g, r, n = _check_shape(gpus, redundant, nodes)
    step_bucket = check_step_bucket(step_bucket, by_step)
    eval_sel = _steps_sel(sel, eval_steps)
    fits = _counts(con, _steps_sel(sel, fit_steps), by_step=False)
    frames = []
    for run_id, run in _counts(con, eval_sel, by_step, step_bucket).items():
        variants = [(kind, 0) for kind in ("contiguous", "round_robin")] + [("balanced", 0)]
        if r:
            variants.append(("balanced", r))
        for kind, reps in variants:
            if kind != "balanced" and g > int(run.n_experts.min()):
                continue
            share = _shares(kind, run, g, reps, n, fits.get(run_id), run_id)
            busiest, mean = _ratio(run.counts, share)  # [S, L]
            si, li = np.unravel_index(np.arange(busiest.size), busiest.shape)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(mean > 0, busiest / mean, np.nan)
            frames.append(pd.DataFrame({
                "run_id": run_id, "layer": run.layers[li], "step": run.steps[si], "placement": kind,
                "redundant": reps, "busiest": busiest.ravel(), "mean": mean.ravel(), "max_over_mean": ratio.ravel(),
            }))
    cols = ["run_id", "layer", "step", "placement", "redundant", "busiest", "mean", "max_over_mean"]
    if not by_step:
        cols.remove("step")
    if not frames:
        return pd.DataFrame(columns=cols)
    out = pd.concat(frames, ignore_index=True)[cols]
    keys = ["run_id", "layer", "step"] if by_step else ["run_id", "layer"]
    return out.sort_values(keys, kind="stable", ignore_index=True)


def placement_staleness(
    con,
    sel: Selection,
    gpus: int,
    fit_steps: tuple[int, int],
    *,
    redundant: int = 0,
    nodes: int = 1,
    eval_steps: tuple[int, int] | None = None,
    max_steps: int | None = None,
) -> pd.DataFrame:
    """How a balanced placement fitted on `fit_steps` holds up on later steps.

    Columns: run_id, step, layer, fitted (max_over_mean at that step of the placement fitted on fit_steps), refit
    (max_over_mean of a balanced placement fitted on that step alone: what rebalancing every step would reach),
    contiguous (the fixed layout's), staleness = fitted / refit (1 = the old placement is as good as a fresh one).
    Evaluated on `eval_steps`, default every selected step after the fit window.

    `max_steps`: evaluate at most this many of those steps per run, evenly spaced with the first and the last
    kept (every step's row is what it would be without the cap; the steps between have no row). Why: the refit
    is a placement search per step and layer, 13 s for one layer over 7,500 steps of a 256-expert model, and a
    curve of ~1,000 points shows the same trend.
    """
    if max_steps is not None and int(max_steps) < 1:
        raise PlacementError(f"max_steps must be at least 1 (or None: every step); got {max_steps!r}")
    g, r, n = _check_shape(gpus, redundant, nodes)
    fit_sel = _steps_sel(sel, fit_steps)
    if eval_steps is None:
        last = sel.steps[1] if sel.steps is not None else 2**62
        eval_steps = (fit_sel.steps[1] + 1, last)
        if eval_steps[0] > eval_steps[1]:
            return pd.DataFrame(columns=["run_id", "step", "layer", "fitted", "refit", "contiguous", "staleness"])
    fits = _counts(con, fit_sel, by_step=False)
    eval_sel = _steps_sel(sel, eval_steps)
    evaluated = _counts(con, eval_sel, by_step=True) if max_steps is None else \
        _sampled_step_counts(con, eval_sel, int(max_steps))
    frames = []
    for run_id, run in evaluated.items():
        fitted = _shares("balanced", run, g, r, n, fits.get(run_id), run_id)  # [L, E, G]
        busy_fit, mean = _ratio(run.counts, fitted)  # [S, L]
        n_s, n_l, width = run.counts.shape
        # refit: every (step, layer) its own balanced placement, computed as one batch of S*L "layers"
        refit = _balanced_for(run.counts.reshape(n_s * n_l, width), np.tile(run.n_experts, n_s), g, r, n,
                              f"run {run_id}").reshape(n_s, n_l, width, g)  # [S, L, E, G]
        busy_refit = np.einsum("sle,sleg->slg", run.counts, refit).max(axis=2)  # [S, L]
        busy_contig = (_ratio(run.counts, _fixed_for("contiguous", run.n_experts, width, g, 0, f"run {run_id}"))[0]
                       if g <= int(run.n_experts.min()) else np.full((n_s, n_l), np.nan))
        si, li = np.unravel_index(np.arange(n_s * n_l), (n_s, n_l))
        with np.errstate(invalid="ignore", divide="ignore"):
            m = np.where(mean > 0, mean, np.nan)
            frames.append(pd.DataFrame({
                "run_id": run_id, "step": run.steps[si], "layer": run.layers[li],
                "fitted": (busy_fit / m).ravel(), "refit": (busy_refit / m).ravel(),
                "contiguous": (busy_contig / m).ravel(), "staleness": (busy_fit / busy_refit).ravel(),
            }))
    cols = ["run_id", "step", "layer", "fitted", "refit", "contiguous", "staleness"]
    if not frames:
        return pd.DataFrame(columns=cols)
    return pd.concat(frames, ignore_index=True)[cols]


# --- dispatch traffic -------------------------------------------------------------------------------------------


def _route_counts(con, sel: Selection, gpus: int, source: str, from_routes: bool = False) -> pd.DataFrame:
    """Routes per run, layer, source GPU and expert: run_id, layer, src, expert, n.

    A compacted run's `sequence_stats` holds the routes counted per sequence, layer and expert (every route while
    `runs.route_stats_complete`): read there, a source needs no scan of the routes (100 M routes: 8.4 s -> see
    docs/benchmarks.md); other runs count their routes."""
    from moeviz.store.reader import route_stats_complete

    col = {"rank": "rank", "sequence": "seq"}[source]
    complete = [] if from_routes else sorted(r for r, ok in route_stats_complete(con).items() if ok)
    runs = [str(r) for r in run_query(con, "SELECT DISTINCT run_id FROM runs", [])["run_id"]]
    chosen = [r for r in runs if sel.run_ids is None or r in sel.run_ids]
    complete = [r for r in complete if r in chosen]
    live = [r for r in chosen if r not in complete]
    # routes are counted one run at a time, without run_id in the GROUP BY (a string key per route: 100 M routes
    # 7-10 s with it, 1.8 s without), and without a run_id predicate when the store holds that run only
    parts = ([("sequence_stats", "CAST(sum(r.assigned) AS BIGINT)", complete)] if complete else [])
    parts += [("routes", "count(*)", [r]) for r in live]
    frames = []
    for table, n, run_ids in parts:
        alone = table == "routes" and len(runs) == 1
        where, params = sel.with_(domains=None, tags=None, run_ids=None if alone else tuple(run_ids)).where("r")
        semi = ""
        if sel.needs_sequences:
            qwhere, qparams = sel.with_(layers=None).where("q", per_token=True)
            semi = f"""SEMI JOIN (SELECT q.run_id, q.step, q.rank, q.seq FROM sequences q WHERE {qwhere}) q
                       ON q.run_id = r.run_id AND q.step = r.step AND q.rank = r.rank AND q.seq = r.seq"""
            params = qparams + params
        keys = "r.run_id, " if table == "sequence_stats" else ""
        sql = f"""
            SELECT {keys}CAST(r.layer AS INTEGER) AS layer, CAST(r.{col} % ? AS INTEGER) AS src,
                   CAST(r.expert AS INTEGER) AS expert, {n} AS n
            FROM {table} r {semi} WHERE {where} GROUP BY ALL"""
        df = run_query(con, sql, [int(gpus)] + params)
        if table == "routes":
            df.insert(0, "run_id", run_ids[0])
        frames.append(df)
    if not frames:
        return pd.DataFrame({"run_id": pd.Series(dtype=object), "layer": pd.Series(dtype=np.int64),
                             "src": pd.Series(dtype=np.int64), "expert": pd.Series(dtype=np.int64),
                             "n": pd.Series(dtype=np.int64)})
    return pd.concat(frames, ignore_index=True)


def dispatch_traffic(
    con,
    sel: Selection,
    gpus: int,
    *,
    placement="contiguous",
    source: str = "sequence",
    hidden_size: int | None = None,
    bytes_per_value: int = 2,
    redundant: int = 0,
    nodes: int = 1,
    fit_steps: tuple[int, int] | None = None,
    from_routes: bool = False,
) -> pd.DataFrame:
    """Token copies sent from each source GPU to each GPU per run and layer, from the per-token routes.

    Columns: run_id, layer, src, gpu, tokens (assignments starting on src whose expert is on gpu; a replicated
    expert's split evenly over its replicas), and bytes = tokens x hidden_size x bytes_per_value (2: bf16) when
    `hidden_size` is given. source="rank": the recording rank's tokens start on GPU rank mod G; "sequence":
    sequence `seq` of each step and rank starts on GPU seq mod G (the batch dealt to G data-parallel ranks).
    Every (src, gpu) pair has a row. `local_share` turns this into the share that stays local. Covers the tokens
    the run kept per token (all, unless it sampled); a balanced placement is fitted on the aggregates of the same
    selection (or `fit_steps`). A compacted run's counts come from `sequence_stats` (the routes counted per
    sequence at compaction); others, or `from_routes=True`, take one scan of the selected routes.
    """
    g, r, n = _check_shape(gpus, redundant, nodes)
    if source not in SOURCES:
        raise PlacementError(f"source must be 'rank' (the recording rank) or 'sequence' (seq mod G); got {source!r}")
    if hidden_size is not None:
        _as_int("hidden_size", hidden_size, 1)
    _as_int("bytes_per_value", bytes_per_value, 1)
    counts = _route_counts(con, sel, g, source, from_routes)
    return _traffic(con, sel, counts, g, placement, r, n, fit_steps, hidden_size, bytes_per_value)


def _traffic(con, sel: Selection, counts: pd.DataFrame, gpus: int, placement, redundant: int, nodes: int, fit_steps,
             hidden_size: int | None, bytes_per_value: int) -> pd.DataFrame:
    """`dispatch_traffic` from the route counts of `_route_counts` (so that several placements share one scan)."""
    fits = _fit_counts(con, sel, placement, fit_steps)
    frames = []
    # the sources stand in for steps: run.steps holds the sources present, run.counts is [src, L, E]
    as_steps = counts.rename(columns={"src": "step"}).assign(n_experts=counts["expert"] + 1)
    for run_id, run in _dense(as_steps, by_step=True, value="n").items():
        # the layers' E from the store (the routes name only the experts that were chosen)
        run.n_experts = _layer_experts(con, run_id, run.layers, run.counts.shape[2])
        run.counts = _widen(run.counts, int(run.n_experts.max()))
        fit = fits.get(run_id) if fits is not None else None
        share = _shares(placement, run, gpus, redundant, nodes, fit, run_id)  # [L, E, G]
        per = np.zeros((gpus, len(run.layers), gpus))  # [src, L, G]
        per[run.steps] = np.einsum("sle,leg->slg", run.counts, share)
        si, li, gi = np.unravel_index(np.arange(per.size), per.shape)
        frames.append(pd.DataFrame({"run_id": run_id, "layer": run.layers[li], "src": si.astype(np.int64),
                                    "gpu": gi.astype(np.int64), "tokens": per.ravel()}))
    cols = ["run_id", "layer", "src", "gpu", "tokens"] + (["bytes"] if hidden_size is not None else [])
    if not frames:
        return pd.DataFrame(columns=cols)
    out = pd.concat(frames, ignore_index=True)
    if hidden_size is not None:
        out["bytes"] = out["tokens"] * int(hidden_size) * int(bytes_per_value)
    return out[cols].sort_values(["run_id", "layer", "src", "gpu"], ignore_index=True)


def _widen(counts: np.ndarray, width: int) -> np.ndarray:
    if counts.shape[2] >= width:
        return counts
    out = np.zeros(counts.shape[:2] + (width,))
    out[..., : counts.shape[2]] = counts
    return out


def _layer_experts(con, run_id: str, layers: np.ndarray, seen: int) -> np.ndarray:
    """Experts of each layer from `layers` (else `runs`), at least the number of experts the routes name."""
    df = run_query(con, """
        SELECT d.layer, coalesce(l.n_experts, ru.n_experts) AS n_experts
        FROM (SELECT unnest(?::INTEGER[]) AS layer) d
        LEFT JOIN layers l ON l.run_id = ? AND l.layer = d.layer
        LEFT JOIN runs ru ON ru.run_id = ?""", [[int(x) for x in layers], run_id, run_id])
    by_layer = dict(zip(df["layer"].astype(int), df["n_experts"]))
    return np.array([int(by_layer.get(int(x)) or seen) for x in layers], dtype=np.int64)


def local_share(traffic: pd.DataFrame, *, gpus: int | None = None, nodes: int = 1) -> pd.DataFrame:
    """The share of a layer's token copies that stays where it starts, from `dispatch_traffic` rows.

    Columns: run_id, layer, tokens, local_tokens (src == gpu), local_share, and with nodes > 1 (G/N consecutive
    GPUs per node; give `gpus`) node_local_share (src and gpu on one node); remote_bytes when the traffic has bytes.
    """
    n = _as_int("nodes", nodes, 1)
    if n > 1:
        g, _, n = _check_shape(gpus, 0, n)
    t = traffic.assign(local=traffic["src"] == traffic["gpu"])
    t["local_tokens"] = t["tokens"].where(t["local"], 0.0)
    agg = {"tokens": ("tokens", "sum"), "local_tokens": ("local_tokens", "sum")}
    if n > 1:
        per_node = g // n
        t["node_tokens"] = t["tokens"].where(t["src"] // per_node == t["gpu"] // per_node, 0.0)
        agg["node_local_tokens"] = ("node_tokens", "sum")
    if "bytes" in t.columns:
        t["remote_bytes"] = t["bytes"].where(~t["local"], 0.0)
        agg["remote_bytes"] = ("remote_bytes", "sum")
    out = t.groupby(["run_id", "layer"], sort=True).agg(**agg).reset_index()
    with np.errstate(invalid="ignore", divide="ignore"):
        out["local_share"] = out["local_tokens"] / out["tokens"].where(out["tokens"] > 0)
        if n > 1:
            out["node_local_share"] = out.pop("node_local_tokens") / out["tokens"].where(out["tokens"] > 0)
    cols = ["run_id", "layer", "tokens", "local_tokens", "local_share"]
    cols += [c for c in ("node_local_share", "remote_bytes") if c in out.columns]
    return out[cols]


def placement_summary(
    con,
    sel: Selection,
    gpus: int,
    *,
    redundant: int = 0,
    nodes: int = 1,
    fit_steps: tuple[int, int] | None = None,
    eval_steps: tuple[int, int] | None = None,
    source: str = "sequence",
    traffic_sel: Selection | None = None,
    hidden_size: int | None = None,
    bytes_per_value: int = 2,
) -> pd.DataFrame:
    """Per run and layer: max/mean GPU load and the local share of the traffic, for each placement (`moeviz
    placement` prints this).

    Columns: run_id, layer, placement, redundant, max_over_mean (aggregates over `eval_steps`, default the
    selection; balanced fitted on `fit_steps`, default the selection), local_share (routes of `traffic_sel`,
    default the evaluated steps), node_local_share when nodes > 1, and with `hidden_size`: bytes (every token
    copy the layer dispatches, tokens x hidden_size x bytes_per_value, one way) and remote_bytes (the copies
    whose expert sits on another GPU: what crosses the interconnect).
    """
    g, r, n = _check_shape(gpus, redundant, nodes)
    if hidden_size is not None:
        _as_int("hidden_size", hidden_size, 1)
    _as_int("bytes_per_value", bytes_per_value, 1)
    comparison = placement_comparison(con, sel, g, redundant=r, nodes=n, fit_steps=fit_steps, eval_steps=eval_steps)
    tsel = traffic_sel if traffic_sel is not None else _steps_sel(sel, eval_steps)
    if source not in SOURCES:
        raise PlacementError(f"source must be 'rank' (the recording rank) or 'sequence' (seq mod G); got {source!r}")
    counts = _route_counts(con, tsel, g, source)  # one scan of the routes for every placement
    rows = []
    for (kind, reps), _ in comparison.groupby(["placement", "redundant"], sort=False):
        # balanced: fitted on the same steps as in the comparison (fit_steps, else the whole selection)
        fit = (fit_steps if fit_steps is not None else sel.steps or (-(2**62), 2**62)) if kind == "balanced" else None
        traffic = _traffic(con, tsel, counts, g, kind, reps, n, fit, hidden_size, bytes_per_value)
        loc = local_share(traffic, gpus=g, nodes=n).assign(placement=kind, redundant=reps)
        if hidden_size is not None:
            loc["bytes"] = loc["tokens"] * int(hidden_size) * int(bytes_per_value)
        rows.append(loc)
    local = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["run_id", "layer", "placement", "redundant", "local_share"])
    keep = ["run_id", "layer", "placement", "redundant", "local_share"] + (["node_local_share"] if n > 1 else [])
    keep += ["bytes", "remote_bytes"] if hidden_size is not None else []
    out = comparison.drop(columns=["busiest", "mean"]).merge(local[keep], how="left",
                                                             on=["run_id", "layer", "placement", "redundant"])
    return out
