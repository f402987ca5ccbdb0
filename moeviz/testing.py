"""Build an in-memory moeviz store from plain numpy routing arrays, for tests, notebooks and benchmarks.

Every analysis in moeviz reads a DuckDB connection exposing the public schema (`moeviz.store.schema`). Tests need
such a connection filled with routing whose right answer they can compute independently (numpy brute force,
transformers' own loss functions). `store_from_routing` turns arrays shaped like a router's output
(`index [T, L, k]`, `weights [T, L, k]`, `logits [T, L, E]`, one row per token) into the seven public tables,
with the exact aggregates (`step_stats`, `layer_stats`) computed over every token and the per-token `routes`
over the kept ones, exactly as the collectors would record them. `synthetic_routing` draws random, skewable
routing with steps, ranks, sequences and domains; `synthetic_store` stores it.

Nothing here imports torch: arrays may be numpy arrays or anything `numpy.asarray` accepts (call `.numpy()`
on a CPU tensor first).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np

from moeviz.errors import MoevizError
from moeviz.store.schema import SCHEMA_VERSION, TABLES
from moeviz.store.layout import BUCKET_TABLES, ROLLUP_TABLES, WEIGHT_SCALE, sequence_key

__all__ = ["store_from_routing", "synthetic_routing", "synthetic_store", "create_schema", "softmax",
           "long_run_aggregates", "write_aggregates"]


class RoutingArrayError(MoevizError, ValueError):
    """Routing arrays given to `store_from_routing` have inconsistent shapes or values."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64 (the router probabilities used for `prob_sum`)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def create_schema(con) -> None:
    """Create every public table (empty, with the public column types) unless it exists; not the step roll-ups,
    which are derived from step_stats and layer_stats (`store_from_routing` adds them for its runs): empty
    roll-up tables beside filled per-step tables would answer wrongly, absent ones send the analyses to the
    per-step tables."""
    for t in TABLES.values():
        if t.name in ROLLUP_TABLES or t.name in BUCKET_TABLES:
            continue
        cols = ", ".join(f'"{c.name}" {c.sql_type}' for c in t.columns)
        con.execute(f"CREATE TABLE IF NOT EXISTS {t.name} ({cols})")


def _insert(con, table: str, columns: dict[str, Any]) -> None:
    """Bulk insert a dict of equal-length columns (numpy arrays or lists, None = NULL) by column name."""
    import pyarrow as pa

    arrays = {}
    for name, values in columns.items():
        if name == "seq_key":  # full 64-bit hashes: never inferred as int64
            arrays[name] = pa.array([None if v is None else int(v) for v in values], pa.uint64())
        elif isinstance(values, np.ndarray) and values.dtype.kind == "f":
            arrays[name] = pa.array(values, mask=np.isnan(values))
        else:
            arrays[name] = pa.array(values if not isinstance(values, np.ndarray) or values.dtype != object else list(values))
    tbl = pa.table(arrays)
    view = f"_moeviz_testing_{table}"
    con.register(view, tbl)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {view}")
    finally:
        con.unregister(view)


def _per_token(name: str, values, n_tokens: int, default, dtype=None) -> np.ndarray:
    """A per-token array of length T (broadcasting a scalar default)."""
    if values is None:
        return np.full(n_tokens, default, dtype=dtype if dtype is not None else type(default))
    arr = np.asarray(values, dtype=dtype) if dtype is not None else np.asarray(values)
    if arr.ndim == 0:
        arr = np.full(n_tokens, arr.item(), dtype=arr.dtype if dtype is None else dtype)
    if arr.shape != (n_tokens,):
        raise RoutingArrayError(f"{name} must have one value per token, shape ({n_tokens},); got {arr.shape}")
    return arr


def _order_within(keys: Sequence[np.ndarray]) -> np.ndarray:
    """0-based position of each row within its group of equal keys, in input order (a vectorised cumcount)."""
    n = len(keys[0])
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # lexsort: the last key is the primary one; input order breaks ties
    order = np.lexsort((np.arange(n),) + tuple(np.asarray(k) for k in reversed(keys)))
    sorted_keys = [np.asarray(k)[order] for k in keys]
    new_group = np.zeros(n, dtype=bool)
    new_group[0] = True
    for k in sorted_keys:
        new_group[1:] |= k[1:] != k[:-1]
    idx = np.arange(n)
    starts = np.maximum.accumulate(np.where(new_group, idx, 0))
    out = np.empty(n, dtype=np.int64)
    out[order] = idx - starts
    return out


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits, largest first (slot 0 = top choice). # [T, L, k]"""
    return np.argsort(-np.asarray(logits, dtype=np.float64), axis=-1, kind="stable")[..., :k]


def store_from_routing(
    index=None,
    weights=None,
    logits=None,
    *,
    steps=None,
    seqs=None,
    pos=None,
    ranks=None,
    domains=None,
    tags=None,
    token_ids=None,
    sample_ids=None,
    dropped=None,
    keep=None,
    margins=None,
    prompt_tokens=None,
    top_k: int | None = None,
    n_experts: int | None = None,
    run_id: str = "run0",
    run_name: str | None = None,
    capacity_factor: float | None = None,
    model_class: str = "SyntheticMoE",
    sample_every: int = 1,
    extra_stats: bool = True,
    con=None,
):
    """An in-memory DuckDB (or `con`, added to) holding one run built from routing arrays.

    Shapes (T tokens, L MoE layers, k experts per token, E experts):
      index    [T, L, k] int   chosen experts, slot 0 = top choice; None = top-`top_k` of `logits`
      weights  [T, L, k] float gate weights applied; None = softmax(logits) at `index`, else 1/k
      logits   [T, L, E] float router logits; gives exact `prob_sum`, `z_loss_sum`, `entropy_sum`.
               Without logits, `prob_sum` scatters the gate weights (a router whose distribution is its
               gates) and `z_loss_sum`/`entropy_sum` are NULL.
      steps, seqs, pos, ranks, token_ids  [T] int (defaults 0, 0, order within (step, rank, seq), 0, -1)
      domains, tags  [T] str or None, constant within a sequence (step, rank, seq); stored in `sequences`
      sample_ids  [T] str or None, constant within a sequence: `sequences.sample_id` (the user's key)
    `sequences.seq_key` is the hash of each sequence's token ids in position order (`moeviz.store.sequence_key`,
    as the Recorder writes it), NULL where a sequence has a token id below 0 (none given); `pos_offset` is its
    first position (left padding: give positions that start after the padding).
      dropped  [T, L, k] bool  assignments the model itself dropped (capacity); summed into the aggregates
      keep     [T] bool  tokens kept in `routes` (the sampling policy); aggregates always cover every token
      margins  [T, L] float  `routes.margin` of each token and layer (NaN = NULL); None: all NULL
      prompt_tokens  [T] int, constant within a sequence: `sequences.prompt_tokens` (negative = NULL); None: NULL
    `extra_stats`: also fill `pair_stats`, `flow_stats` (each layer to the next), the adjacency and co-activation
    columns of `layer_stats` (over every token, as the Recorder does) and `token_stats`, `position_stats`,
    `sequence_stats`, `probe_sets`, `token_sets` (over the kept routes, as compaction does);
    False gives a store as a moeviz without them wrote it, whose specialization analyses read `routes`.
    Call again with the same `con` and another `run_id` to put two runs side by side.
    Returns the connection.
    """
    from moeviz.store import duckdb_compat

    if logits is not None:
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim != 3:
            raise RoutingArrayError(f"logits must be [tokens, layers, experts]; got shape {logits.shape}")
    if index is None:
        if logits is None or top_k is None:
            raise RoutingArrayError("give `index` [T, L, k], or `logits` [T, L, E] together with `top_k`")
        index = _top_k(logits, top_k)
    index = np.asarray(index)
    if index.ndim != 3 or index.dtype.kind not in "iu":
        raise RoutingArrayError(f"index must be an integer array [tokens, layers, k]; got {index.dtype} {index.shape}")
    n_tok, n_lay, k = index.shape
    if logits is not None and logits.shape[:2] != (n_tok, n_lay):
        raise RoutingArrayError(f"logits {logits.shape} do not match index {index.shape} in tokens and layers")
    n_exp = int(n_experts or (logits.shape[2] if logits is not None else (index.max() + 1 if index.size else 1)))
    if logits is not None and logits.shape[2] != n_exp:
        raise RoutingArrayError(f"n_experts={n_exp} but logits have {logits.shape[2]} experts")
    if index.size and (index.min() < 0 or index.max() >= n_exp):
        raise RoutingArrayError(f"expert indices must lie in [0, {n_exp}); got [{index.min()}, {index.max()}]")
    index = index.astype(np.int64)

    probs = softmax(logits) if logits is not None else None  # [T, L, E]
    if weights is None:
        weights = np.take_along_axis(probs, index, axis=-1) if probs is not None else np.full(index.shape, 1.0 / k)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != index.shape:
        raise RoutingArrayError(f"weights {weights.shape} must match index {index.shape}")
    dropped = np.zeros(index.shape, dtype=bool) if dropped is None else np.asarray(dropped, dtype=bool)
    if dropped.shape != index.shape:
        raise RoutingArrayError(f"dropped {dropped.shape} must match index {index.shape}")

    steps = _per_token("steps", steps, n_tok, 0, np.int64)
    ranks = _per_token("ranks", ranks, n_tok, 0, np.int64)
    seqs = _per_token("seqs", seqs, n_tok, 0, np.int64)
    pos = _order_within([steps, ranks, seqs]) if pos is None else _per_token("pos", pos, n_tok, 0, np.int64)
    token_ids = _per_token("token_ids", token_ids, n_tok, -1, np.int64)
    keep = _per_token("keep", keep, n_tok, True, bool)
    dom = None if domains is None else _per_token("domains", np.asarray(domains, dtype=object), n_tok, None)
    tag = None if tags is None else _per_token("tags", np.asarray(tags, dtype=object), n_tok, None)
    sid = None if sample_ids is None else _per_token("sample_ids", np.asarray(sample_ids, dtype=object), n_tok, None)

    con = con if con is not None else duckdb_compat.connect(":memory:")
    create_schema(con)
    existing = con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0]
    if existing:
        raise RoutingArrayError(f"run {run_id!r} is already in this connection; give another run_id")

    # -- runs, layers ------------------------------------------------------------------------------------------
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    _insert(con, "runs", {
        "run_id": [run_id], "run_name": [run_name or run_id], "model_class": [model_class],
        "n_layers": [n_lay], "n_experts": [n_exp], "top_k": [k], "capacity_factor": [capacity_factor],
        "config": [json.dumps({"num_experts": n_exp, "top_k": k, "num_layers": n_lay})],
        "world_size": [int(ranks.max()) + 1 if n_tok else 1], "sample_every": [sample_every],
        "max_tokens_per_step": [None], "started_at": [now], "ended_at": [now], "status": ["finished"],
        "error": [None], "schema_version": [SCHEMA_VERSION], "route_stats_complete": [bool(extra_stats)],
    })
    _insert(con, "layers", {
        "run_id": [run_id] * n_lay, "layer": list(range(n_lay)),
        "module_name": [f"model.layers.{i}.mlp.gate" for i in range(n_lay)], "n_experts": [n_exp] * n_lay,
        "top_k": [k] * n_lay, "block_index": list(range(n_lay)), "stack": ["decoder"] * n_lay,
    })

    # -- exact aggregates over every token: group g = (step, rank) ---------------------------------------------
    if n_tok:
        groups, g = np.unique(np.stack([steps, ranks], axis=1), axis=0, return_inverse=True)
        g = g.reshape(-1)
    else:
        groups, g = np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
    n_grp = len(groups)
    lay = np.arange(n_lay)
    cell = (g[:, None, None] * n_lay + lay[None, :, None]) * n_exp  # [T, L, 1]
    size = n_grp * n_lay * n_exp
    assigned = np.bincount((cell + index).ravel(), minlength=size)
    first = np.bincount((cell[..., 0] + index[..., 0]).ravel(), minlength=size)
    drop_e = np.bincount((cell + index).ravel(), weights=dropped.ravel().astype(np.float64), minlength=size)
    if probs is not None:
        prob_sum = np.bincount((cell + np.arange(n_exp)).ravel(), weights=probs.ravel(), minlength=size)
    else:
        prob_sum = np.bincount((cell + index).ravel(), weights=weights.ravel(), minlength=size)
    tok_g = np.bincount(g, minlength=n_grp)  # [G]
    gi, li, ei = np.unravel_index(np.arange(size), (n_grp, n_lay, n_exp))
    _insert(con, "step_stats", {
        "run_id": np.full(size, run_id, dtype=object), "step": groups[gi, 0], "rank": groups[gi, 1],
        "layer": li, "expert": ei, "tokens": tok_g[gi], "assigned": assigned, "first_choice": first,
        "prob_sum": prob_sum, "dropped": np.rint(drop_e).astype(np.int64),
    })
    gl = n_grp * n_lay
    gi2, li2 = np.unravel_index(np.arange(gl), (n_grp, n_lay))
    cell2 = (g[:, None] * n_lay + lay[None, :]).ravel()  # [T*L]
    if logits is not None:
        lse = _logsumexp(logits)  # [T, L]
        ent = -(probs * np.log(np.clip(probs, 1e-300, None))).sum(-1)  # [T, L]
        z_sum = np.bincount(cell2, weights=(lse**2).ravel(), minlength=gl)
        e_sum = np.bincount(cell2, weights=ent.ravel(), minlength=gl)
    else:
        z_sum = e_sum = np.full(gl, np.nan)
    layer_cols = {
        "run_id": np.full(gl, run_id, dtype=object), "step": groups[gi2, 0], "rank": groups[gi2, 1],
        "layer": li2, "tokens": tok_g[gi2], "z_loss_sum": z_sum, "entropy_sum": e_sum,
        "dropped": np.rint(np.bincount(cell2, weights=dropped.sum(-1).ravel().astype(np.float64), minlength=gl)).astype(np.int64),
    }
    if extra_stats:
        layer_cols.update(_adjacency_counts(index, steps, ranks, seqs, pos, g, gl))
        pairs = _pair_counts(index, g, n_grp, n_exp)  # [G, L, E, E], upper triangle
        layer_cols["coactive_pairs"] = pairs.sum(axis=(2, 3)).ravel()
        pg, pl, pi, pj = np.nonzero(pairs)
        _insert(con, "pair_stats", {
            "run_id": np.full(len(pg), run_id, dtype=object), "step": groups[pg, 0], "rank": groups[pg, 1],
            "layer": pl, "expert_i": pi, "expert_j": pj, "tokens": pairs[pg, pl, pi, pj],
        })
        flow = _flow_counts(index, g, n_grp, n_exp)  # [G, L-1, E, E, 2]
        fg, fl, fa, fb = np.nonzero(flow[..., 1])
        _insert(con, "flow_stats", {
            "run_id": np.full(len(fg), run_id, dtype=object), "step": groups[fg, 0], "rank": groups[fg, 1],
            "layer_a": fl, "layer_b": fl + 1, "expert_a": fa, "expert_b": fb,
            "first_tokens": flow[fg, fl, fa, fb, 0], "topk_pairs": flow[fg, fl, fa, fb, 1],
        })
    _insert(con, "layer_stats", layer_cols)

    # -- sequences: one row per (step, rank, seq) --------------------------------------------------------------
    if n_tok:
        skeys, first_tok, s_inv, s_count = np.unique(
            np.stack([steps, ranks, seqs], axis=1), axis=0, return_index=True, return_inverse=True, return_counts=True
        )
        s_inv = s_inv.reshape(-1)
    else:
        skeys, first_tok, s_inv, s_count = np.zeros((0, 3), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    seq_keys = np.full(len(skeys), None, object)
    pos_offset = np.zeros(len(skeys), np.int64)
    order = np.lexsort((pos, s_inv)) if n_tok else np.zeros(0, np.int64)  # tokens by sequence, then position
    bounds = np.concatenate([[0], np.cumsum(np.bincount(s_inv, minlength=len(skeys)))]) if n_tok else [0]
    for i in range(len(skeys)):
        ids = token_ids[order[bounds[i]:bounds[i + 1]]]
        pos_offset[i] = pos[order[bounds[i]]] if bounds[i + 1] > bounds[i] else 0  # the sequence's first position
        if len(ids) and ids.min() >= 0:
            seq_keys[i] = sequence_key(ids)
    for name, lab in (("domains", dom), ("tags", tag), ("sample_ids", sid)):
        if lab is not None and n_tok:
            codes = np.unique(lab.astype(str), return_inverse=True)[1].reshape(-1)
            if np.any(codes != codes[first_tok][s_inv]):
                raise RoutingArrayError(f"{name} must be constant within a sequence (step, rank, seq)")
    _insert(con, "sequences", {
        "run_id": np.full(len(skeys), run_id, dtype=object), "step": skeys[:, 0], "rank": skeys[:, 1],
        "seq": skeys[:, 2], "domain": (dom[first_tok] if dom is not None else np.full(len(skeys), None, object)),
        "tag": (tag[first_tok] if tag is not None else np.full(len(skeys), None, object)), "n_tokens": s_count,
        "seq_key": seq_keys, "pos_offset": pos_offset, "sample_id": (sid[first_tok] if sid is not None else np.full(len(skeys), None, object)),
        **({} if prompt_tokens is None else {"prompt_tokens": np.array(
            [None if p < 0 else int(p) for p in _per_token("prompt_tokens", prompt_tokens, n_tok, -1, np.int64)[first_tok]],
            dtype=object)}),
    })

    # -- routes: one row per kept token, layer and slot ---------------------------------------------------------
    kt = np.flatnonzero(keep)
    n_r = len(kt) * n_lay * k
    shape = (len(kt), n_lay, k)

    def per_route(a):  # [T] -> [kept * L * k]
        return np.broadcast_to(a[kt][:, None, None], shape).ravel()

    _insert(con, "routes", {
        "run_id": np.full(n_r, run_id, dtype=object), "step": per_route(steps), "rank": per_route(ranks),
        "seq": per_route(seqs), "pos": per_route(pos), "token_id": per_route(token_ids),
        "layer": np.broadcast_to(lay[None, :, None], shape).ravel(),
        "slot": np.broadcast_to(np.arange(k)[None, None, :], shape).ravel(),
        # stored as a store stores it: quantised to 1/WEIGHT_SCALE
        "expert": index[kt].ravel(), "weight": np.round(weights[kt].ravel() * WEIGHT_SCALE) / WEIGHT_SCALE,
        **({} if margins is None else {"margin": _margin_column(margins, kt, shape, n_tok)}),
    })
    if extra_stats:
        _insert_route_stats(con, run_id)
    _insert_rollups(con, run_id)
    return con


def _insert_rollups(con, run_id: str) -> None:
    """The step roll-ups of one run from its step_stats and layer_stats, with compaction's own query (creating
    the tables on the first run of the connection)."""
    from moeviz.store.rollups import SPEC, rollup_sql

    for table, (source, _, _) in SPEC.items():
        cols = ", ".join(f'"{c.name}" {c.sql_type}' for c in TABLES[table].columns)
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({cols})")
        con.execute(f"INSERT INTO {table} {rollup_sql(table, f'(SELECT * FROM {source} WHERE run_id = ?)')}",
                    [run_id])
    from moeviz.store.rollups import build_buckets

    for table in BUCKET_TABLES:  # rebuilt for every run of the connection: compaction's own query
        cols = ", ".join(f'"{c.name}" {c.sql_type}' for c in TABLES[table].columns)
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({cols})")
    build_buckets(con, None)


def _adjacency_counts(index, steps, ranks, seqs, pos, g, gl: int) -> dict[str, np.ndarray]:
    """layer_stats' adjacency columns over every token: pairs (pos, pos+1) of one (step, rank, seq), counted in
    the group (step, rank) g of the pair, per layer. index [T, L, k]; steps/ranks/seqs/pos/g [T]. Each [G * L]."""
    order = np.lexsort((pos, seqs, ranks, steps))  # [T] tokens by (step, rank, seq, pos)
    a, b = order[:-1], order[1:]  # candidate pairs: neighbours in that order
    adj = (steps[a] == steps[b]) & (ranks[a] == ranks[b]) & (seqs[a] == seqs[b]) & (pos[b] == pos[a] + 1)
    a, b = a[adj], b[adj]  # [P] token t and t+1
    n_lay = index.shape[1]
    ia, ib = index[a], index[b]  # [P, L, k]
    same = ia[..., 0] == ib[..., 0]  # [P, L]
    first_in = (ia == ib[..., :1]).any(-1)  # [P, L]
    overlap = (ia[..., :, None] == ib[..., None, :]).any((-1, -2))  # [P, L]
    cell = (g[a][:, None] * n_lay + np.arange(n_lay)[None, :]).ravel()  # [P * L]
    ones = np.ones(len(cell))
    return {
        "adjacent_pairs": np.bincount(cell, weights=ones, minlength=gl).astype(np.int64),
        "same_first": np.bincount(cell, weights=same.ravel(), minlength=gl).astype(np.int64),
        "first_in_topk": np.bincount(cell, weights=first_in.ravel(), minlength=gl).astype(np.int64),
        "topk_overlap": np.bincount(cell, weights=overlap.ravel(), minlength=gl).astype(np.int64),
    }


def _pair_counts(index, g, n_grp: int, n_exp: int) -> np.ndarray:
    """Tokens choosing both experts i < j, per group (step, rank) and layer: [G, L, E, E] (zero below the
    diagonal). index [T, L, k]; g [T]."""
    n_tok, n_lay, k = index.shape
    out = np.zeros((n_grp, n_lay, n_exp, n_exp), dtype=np.int64)
    for a in range(k):
        for b in range(a + 1, k):
            lo, hi = np.minimum(index[..., a], index[..., b]), np.maximum(index[..., a], index[..., b])  # [T, L]
            ok = lo != hi
            gg = np.broadcast_to(g[:, None], lo.shape)
            ll = np.broadcast_to(np.arange(n_lay)[None, :], lo.shape)
            np.add.at(out, (gg[ok], ll[ok], lo[ok], hi[ok]), 1)
    return out


def _flow_counts(index, g, n_grp: int, n_exp: int) -> np.ndarray:
    """Flow from layer l to l+1, per group (step, rank): [G, L-1, E, E, 2], [..., 0] tokens whose first choices
    are (i, j), [..., 1] pairs (i among the token's k experts in l, j among its k in l+1). index [T, L, k]; g [T]."""
    n_tok, n_lay, k = index.shape
    out = np.zeros((n_grp, max(n_lay - 1, 0), n_exp, n_exp, 2), dtype=np.int64)
    for layer in range(n_lay - 1):
        a, b = index[:, layer], index[:, layer + 1]  # [T, k]
        np.add.at(out, (g, layer, a[:, 0], b[:, 0], 0), 1)
        for i in range(k):
            for j in range(k):
                np.add.at(out, (g, layer, a[:, i], b[:, j], 1), 1)
    return out


def _margin_column(margins, kt: np.ndarray, shape: tuple, n_tok: int) -> np.ndarray:
    """routes.margin from margins [T, L] (NaN = NULL): the same value on every slot row of a token and layer."""
    m = np.asarray(margins, dtype=np.float64)
    if m.shape != (n_tok, shape[1]):
        raise RoutingArrayError(f"margins must be [tokens, layers] = {(n_tok, shape[1])}; got shape {m.shape}")
    col = np.broadcast_to(m[kt][:, :, None], shape).ravel()
    return np.array([None if np.isnan(x) else float(x) for x in col], dtype=object)


def _insert_route_stats(con, run_id: str) -> None:
    """token_stats, position_stats, sequence_stats, probe_sets and token_sets of one run from its routes, as
    compaction builds them (probe_sets and token_sets with compaction's own queries)."""
    from moeviz.store.compaction import _PROBE_SETS_SQL, _WEIGHT_HIST_ROWS_SQL, _WEIGHT_HIST_SQL, token_sets_sql

    con.execute(f"INSERT INTO probe_sets {_PROBE_SETS_SQL.format(source='SELECT * FROM routes WHERE run_id = ?')}",
                [run_id])
    has_margin = "margin" in {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                                         "WHERE table_name = 'routes'").fetchall()}
    con.execute(f"INSERT INTO token_sets {token_sets_sql('SELECT * FROM routes WHERE run_id = ?', has_margin)}",
                [run_id])
    counts = _WEIGHT_HIST_SQL.format(source=f"SELECT *, CAST(round(weight * {WEIGHT_SCALE}) AS USMALLINT) AS weight_q "
                                            "FROM routes WHERE run_id = ?")
    con.execute(f"INSERT INTO weight_hist {_WEIGHT_HIST_ROWS_SQL.format(counts=counts)}", [run_id])
    con.execute("""
        INSERT INTO token_stats SELECT run_id, rank, layer, token_id, expert, count(*),
            count(*) FILTER (WHERE slot = 0) FROM routes WHERE run_id = ? GROUP BY ALL""", [run_id])
    con.execute("""
        INSERT INTO position_stats SELECT run_id, rank, layer, pos, expert, count(*),
            count(*) FILTER (WHERE slot = 0) FROM routes WHERE run_id = ? GROUP BY ALL""", [run_id])
    con.execute("""
        INSERT INTO sequence_stats SELECT run_id, step, rank, seq, layer, expert, count(*),
            count(*) FILTER (WHERE slot = 0) FROM routes WHERE run_id = ? GROUP BY ALL""", [run_id])


def synthetic_routing(
    *,
    n_steps: int = 4,
    n_layers: int = 3,
    n_experts: int = 8,
    top_k: int = 2,
    seqs_per_step: int = 4,
    seq_len: int = 16,
    n_ranks: int = 1,
    domains: Sequence[str] | None = ("code", "prose"),
    skew: float = 1.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random routing arrays, as keyword arguments for `store_from_routing` (so tests keep them for brute force).

    Logits are Gaussian plus a per-layer expert bias of scale `skew` (0 = balanced on average, large = a few
    experts take most tokens); domains cycle over sequences; the index is the top-k of the logits.
    Keys: logits [T, L, E], index [T, L, k], weights [T, L, k], steps, ranks, seqs, pos, token_ids, domains [T].
    """
    rng = np.random.default_rng(seed)
    per_step = n_ranks * seqs_per_step * seq_len
    n_tok = n_steps * per_step
    steps = np.repeat(np.arange(n_steps), per_step)
    ranks = np.tile(np.repeat(np.arange(n_ranks), seqs_per_step * seq_len), n_steps)
    seqs = np.tile(np.repeat(np.arange(seqs_per_step), seq_len), n_steps * n_ranks)
    pos = np.tile(np.arange(seq_len), n_steps * n_ranks * seqs_per_step)
    bias = skew * rng.standard_normal((1, n_layers, n_experts))
    logits = rng.standard_normal((n_tok, n_layers, n_experts)) + bias
    index = _top_k(logits, top_k)
    probs = softmax(logits)
    weights = np.take_along_axis(probs, index, axis=-1)
    out = {
        "logits": logits, "index": index, "weights": weights, "steps": steps, "ranks": ranks, "seqs": seqs,
        "pos": pos, "token_ids": rng.integers(0, 100, n_tok),
    }
    if domains:
        seq_global = (steps * n_ranks + ranks) * seqs_per_step + seqs
        out["domains"] = np.asarray(domains, dtype=object)[seq_global % len(domains)]
    return out


def synthetic_store(*, run_id: str = "run0", con=None, **kwargs):
    """`store_from_routing(**synthetic_routing(**kwargs))`: a ready store of random routing (see both)."""
    return store_from_routing(**synthetic_routing(**kwargs), run_id=run_id, con=con)


def long_run_aggregates(*, n_steps: int, n_layers: int = 4, n_experts: int = 8, top_k: int = 2,
                        tokens_per_step: int = 512, skew: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Random exact per-step aggregates of a long run, without per-token routing (for curves over many steps).

    Each step and layer routes `tokens_per_step` tokens x k slots over the experts by a multinomial around a
    per-layer skewed share that drifts slowly over steps; the router probability sums follow the same share.
    Keys: counts [S, L, E] int (assignments), first [S, L, E] int (slot 0), prob_sum [S, L, E] float,
    tokens (int), z_loss_sum [S, L] float, entropy_sum [S, L] float.
    """
    rng = np.random.default_rng(seed)
    base = skew * rng.standard_normal((n_layers, n_experts))
    drift = np.linspace(0, 1, n_steps)[:, None, None] * rng.standard_normal((1, n_layers, n_experts))
    share = softmax(base[None] + drift)  # [S, L, E]
    counts = rng.multinomial(tokens_per_step * top_k, share)  # [S, L, E], one draw per step and layer
    first = counts // top_k
    prob_sum = share * tokens_per_step
    z = rng.gamma(4.0, 0.5, (n_steps, n_layers)) * tokens_per_step
    entropy = np.full((n_steps, n_layers), np.log(n_experts) * 0.9 * tokens_per_step)
    return {"counts": counts.astype(np.int64), "first": first.astype(np.int64), "prob_sum": prob_sum,
            "tokens": int(tokens_per_step), "z_loss_sum": z, "entropy_sum": entropy}


def write_aggregates(run_dir, agg: dict, *, run_id: str = "long", steps_per_flush: int = 1000,
                     compact_on_close: bool = True) -> None:
    """`long_run_aggregates` written as a real run folder through RunWriter (rank 0; step_stats and layer_stats,
    `steps_per_flush` steps per flush), so that benchmarks and page tests read a long run as the dashboard would."""
    from moeviz.store import RunWriter

    n_steps, n_layers, n_experts = agg["counts"].shape
    top_k = int(round(agg["counts"][0, 0].sum() / agg["tokens"])) or 1
    w = RunWriter(run_dir, run_id=run_id, run_name=run_id, compact_on_close=compact_on_close)
    w.write_run({"model_class": "LongRun", "n_layers": n_layers, "n_experts": n_experts, "top_k": top_k})
    w.write_layers([{"layer": i, "n_experts": n_experts, "top_k": top_k} for i in range(n_layers)])
    for lo in range(0, n_steps, steps_per_flush):
        hi = min(lo + steps_per_flush, n_steps)
        s = np.arange(lo, hi)
        n = len(s)
        step_stats = {
            "step": np.repeat(s, n_layers * n_experts), "rank": 0,
            "layer": np.tile(np.repeat(np.arange(n_layers), n_experts), n),
            "expert": np.tile(np.arange(n_experts), n * n_layers),
            "tokens": np.full(n * n_layers * n_experts, agg["tokens"]),
            "assigned": agg["counts"][lo:hi].ravel(), "first_choice": agg["first"][lo:hi].ravel(),
            "prob_sum": agg["prob_sum"][lo:hi].ravel(), "dropped": np.zeros(n * n_layers * n_experts, np.int64)}
        layer_stats = {
            "step": np.repeat(s, n_layers), "rank": 0, "layer": np.tile(np.arange(n_layers), n),
            "tokens": np.full(n * n_layers, agg["tokens"]), "z_loss_sum": agg["z_loss_sum"][lo:hi].ravel(),
            "entropy_sum": agg["entropy_sum"][lo:hi].ravel(), "dropped": np.zeros(n * n_layers, np.int64)}
        w.write_flush({"step_stats": step_stats, "layer_stats": layer_stats})
    w.close()
