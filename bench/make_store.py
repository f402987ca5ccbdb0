"""Generate a realistic moeviz run of N routes with RunWriter, then compact it: the data of bench_analytics.py.

The run looks like a training run of an 8-layer MoE (E experts, top-k), batches of 32 sequences x 512 tokens:
- each sequence has one of 4 domains; token ids are Zipf over a 32k vocabulary, partly domain-specific;
- router logits = per-layer expert bias (one layer drifting towards imbalance over training) + domain preference
  + token preference (slowly changing during training) + a position effect on the first tokens + noise shared
  by 8-token blocks (so neighbouring tokens agree more than chance) + iid noise;
- gate weights = softmax over the top-k logits (Mixtral); the exact aggregates (step_stats, layer_stats) are
  computed from the same logits: counts, sum of full-softmax probabilities, z-loss and entropy sums;
- every `--probe-every` training steps a probe step routes the same fixed batch (tag 'probe') so that router
  saturation has checkpoints to compare.
Everything is vectorised numpy over chunks of steps (no Python loop per token), so memory stays ~0.5 GB.

    python bench/make_store.py --routes 100_000_000 --out bench/out/store100m
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeviz.store import RunWriter, compact  # noqa: E402

DOMAINS = ("code", "prose", "math", "it")
VOCAB = 32_000


@dataclass(frozen=True)
class Shape:
    layers: int = 8
    experts: int = 8
    top_k: int = 2
    batch: int = 32
    seq_len: int = 512
    probe_every: int = 0  # a probe step after every this many training steps (0: ~12 probes over the run)
    probe_seqs: int = 4

    @property
    def routes_per_step(self) -> int:
        return self.layers * self.batch * self.seq_len * self.top_k


class Router:
    """The fixed parameters of the synthetic router (drawn once from the seed)."""

    def __init__(self, shape: Shape, rng: np.random.Generator, total_steps: int):
        L, E = shape.layers, shape.experts
        self.shape, self.total_steps = shape, max(1, total_steps)
        self.bias = rng.normal(0.0, 0.3, (L, E)).astype(np.float32)  # [L, E]
        self.drift_bias = np.zeros((L, E), np.float32)  # [L, E] layer L-1: expert 0 gains share over training
        self.drift_bias[L - 1, 0] = 1.5
        self.dom = rng.normal(0.0, 0.8, (L, len(DOMAINS), E)).astype(np.float32)  # [L, D, E]
        self.tok = rng.normal(0.0, 1.0, (L, VOCAB, E)).astype(np.float32)  # [L, V, E]
        self.tok_drift = rng.normal(0.0, 0.8, (L, VOCAB, E)).astype(np.float32)  # [L, V, E] fades during training
        self.first_pos = rng.normal(0.0, 1.5, (L, 4, E)).astype(np.float32)  # [L, 4, E] positions 0..3
        # token ids: Zipf ranks (p ~ 1/r^1.07); rank -> id by a global and a per-domain permutation
        p = 1.0 / (np.arange(VOCAB) + 1.0) ** 1.07
        self.cdf = np.cumsum(p / p.sum())
        self.perm = rng.permutation(VOCAB).astype(np.int32)  # [V]
        self.dom_perm = np.stack([rng.permutation(VOCAB) for _ in DOMAINS]).astype(np.int32)  # [D, V]

    def token_ids(self, rng: np.random.Generator, domain: np.ndarray) -> np.ndarray:
        """[seqs, seq_len] token ids for sequences of the given domains ([seqs])."""
        n, P = len(domain), self.shape.seq_len
        rank = np.minimum(np.searchsorted(self.cdf, rng.random((n, P))), VOCAB - 1)  # [seqs, P]
        own = rng.random((n, P)) < 0.3  # 30% of a domain's tokens follow its own vocabulary ranking
        return np.where(own, self.dom_perm[domain[:, None], rank], self.perm[rank]).astype(np.int32)

    def logits(self, rng: np.random.Generator, token_id: np.ndarray, domain: np.ndarray, step: np.ndarray) -> np.ndarray:
        """[L, T, E] float32 router logits for tokens laid out as [seqs, seq_len] (token_id) with per-sequence
        domain and step ([seqs])."""
        n, P = token_id.shape
        L, E = self.shape.layers, self.shape.experts
        T = n * P
        tok = token_id.ravel()  # [T]
        frac = (step.astype(np.float32) / self.total_steps)  # [seqs] training progress
        frac_t = np.repeat(frac, P)  # [T]
        x = self.tok[:, tok, :]  # [L, T, E]
        x += self.tok_drift[:, tok, :] * (1.0 - frac_t)[None, :, None]
        x += self.bias[:, None, :] + self.drift_bias[:, None, :] * frac_t[None, :, None]
        x += np.repeat(self.dom[:, domain, :], P, axis=1)  # [L, T, E]
        x = x.reshape(L, n, P, E)
        x[:, :, :4, :] += self.first_pos[:, None, :, :]
        blocks = rng.normal(0.0, 0.7, (L, n, P // 8 + 1, E)).astype(np.float32)  # shared by 8 neighbours
        x += np.repeat(blocks, 8, axis=2)[:, :, :P, :]
        x += rng.normal(0.0, 1.0, (L, n, P, E)).astype(np.float32)
        return x.reshape(L, T, E)


def route(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k experts (slot 0 = best) and their gate weights (softmax over the k logits): [L, T, k] each."""
    idx = np.argpartition(-logits, k - 1, axis=-1)[..., :k]  # [L, T, k] unordered
    top = np.take_along_axis(logits, idx, -1)
    order = np.argsort(-top, axis=-1, kind="stable")
    idx, top = np.take_along_axis(idx, order, -1), np.take_along_axis(top, order, -1)
    w = np.exp(top - top[..., :1])
    return idx.astype(np.int16), (w / w.sum(-1, keepdims=True)).astype(np.float32)


def flush_tables(router: Router, rng, shape: Shape, seqs: dict[str, np.ndarray], every_pair: bool = True) -> dict:
    """One flush from a batch of sequences: seqs has step, seq, domain (index), tag, token_id [n, P];
    sequences are sorted by step. Returns the four data tables of RunWriter.write_flush."""
    L, E, k, P = shape.layers, shape.experts, shape.top_k, shape.seq_len
    step, token_id, domain = seqs["step"], seqs["token_id"], seqs["domain"]
    n = len(step)
    T = n * P
    logits = router.logits(rng, token_id, domain, step)  # [L, T, E]
    idx, w = route(logits, k)  # [L, T, k]

    # exact aggregates per (step, layer[, expert]) from the full softmax
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    ex = np.exp(x - m)
    z = ex.sum(-1, keepdims=True)
    prob = ex / z  # [L, T, E]
    lse = (m + np.log(z))[..., 0]  # [L, T]
    ent = -(prob * np.log(np.maximum(prob, 1e-300))).sum(-1)  # [L, T]
    steps_u, seq_start = np.unique(step, return_index=True)
    tok_start = seq_start * P  # first token of each step (tokens are step-ordered)
    S = len(steps_u)
    tokens = np.diff(np.append(tok_start, T))  # [S]
    step_local = np.repeat(np.repeat(np.arange(S), np.diff(np.append(seq_start, n))), P)  # [T]
    cell = (np.arange(L)[:, None] * S + step_local[None, :]) * E  # [L, T]
    assigned = np.bincount((cell[..., None] + idx).ravel(), minlength=L * S * E).reshape(L, S, E)
    first = np.bincount((cell + idx[..., 0]).ravel(), minlength=L * S * E).reshape(L, S, E)
    prob_sum = np.add.reduceat(prob, tok_start, axis=1)  # [L, S, E]
    z_sum = np.add.reduceat(lse ** 2, tok_start, axis=1)  # [L, S]
    ent_sum = np.add.reduceat(ent, tok_start, axis=1)  # [L, S]
    ls, ss, es = np.meshgrid(np.arange(L), steps_u, np.arange(E), indexing="ij")  # [L, S, E]
    step_stats = {"step": ss.ravel(), "layer": ls.ravel(), "expert": es.ravel(),
                  "tokens": np.broadcast_to(tokens[None, :, None], (L, S, E)).ravel(),
                  "assigned": assigned.ravel(), "first_choice": first.ravel(), "prob_sum": prob_sum.ravel(),
                  "dropped": 0}
    layer_stats = {"step": np.tile(steps_u, L), "layer": np.repeat(np.arange(L), S),
                   "tokens": np.tile(tokens, L), "z_loss_sum": z_sum.ravel(), "entropy_sum": ent_sum.ravel(),
                   "dropped": 0, **adjacency_columns(idx, step_local, S, P)}
    pairs = pair_counts(idx, step_local, S, E)  # [L, S, E, E], upper triangle
    layer_stats["coactive_pairs"] = pairs.sum(axis=(2, 3)).ravel()
    pl, ps, pi, pj = np.nonzero(pairs)
    pair_stats = {"step": steps_u[ps], "layer": pl, "expert_i": pi, "expert_j": pj, "tokens": pairs[pl, ps, pi, pj]}
    sequences = {"step": step, "seq": seqs["seq"], "domain": [DOMAINS[d] for d in domain], "tag": seqs["tag"],
                 "n_tokens": np.full(n, P, np.int32)}

    shp = (L, T, k)  # routes: layer-major, then token, then slot
    per_tok = lambda a: np.broadcast_to(a[None, :, None], shp).ravel()  # noqa: E731  [T] -> [L*T*k]
    routes = {
        "step": per_tok(np.repeat(step, P)), "seq": per_tok(np.repeat(seqs["seq"], P).astype(np.int32)),
        "pos": per_tok(np.tile(np.arange(P, dtype=np.int32), n)), "token_id": per_tok(token_id.ravel()),
        "layer": np.broadcast_to(np.arange(L, dtype=np.int16)[:, None, None], shp).ravel(),
        "slot": np.broadcast_to(np.arange(k, dtype=np.int8)[None, None, :], shp).ravel(),
        "expert": idx.ravel(), "weight": w.ravel(),
    }
    return {"routes": routes, "step_stats": step_stats, "layer_stats": layer_stats, "sequences": sequences,
            "pair_stats": pair_stats, "flow_stats": flow_table(idx, step_local, steps_u, E, every_pair)}


def adjacency_columns(idx: np.ndarray, step_local: np.ndarray, S: int, P: int) -> dict[str, np.ndarray]:
    """layer_stats' adjacency counts per (layer, step), layer-major [L * S]: tokens t and t+1 of one sequence
    (every token is inside the mask; sequences are P tokens long). idx [L, T, k]; step_local [T]."""
    L, T, _ = idx.shape
    a = np.flatnonzero(np.arange(T - 1) % P != P - 1)  # [pairs]: t with t + 1 in the same sequence
    prev, nxt = idx[:, a], idx[:, a + 1]  # [L, pairs, k]
    flags = {
        "adjacent_pairs": np.ones(prev.shape[:2], bool),
        "same_first": prev[..., 0] == nxt[..., 0],
        "first_in_topk": (prev == nxt[..., :1]).any(-1),
        "topk_overlap": (prev[..., :, None] == nxt[..., None, :]).any((-1, -2)),
    }
    cell = (np.arange(L)[:, None] * S + step_local[a][None, :]).ravel()  # [L * pairs]
    return {c: np.bincount(cell, weights=f.ravel(), minlength=L * S).astype(np.int64) for c, f in flags.items()}


def pair_counts(idx: np.ndarray, step_local: np.ndarray, S: int, E: int) -> np.ndarray:
    """Tokens choosing both experts i < j, per layer and step: [L, S, E, E]. idx [L, T, k]; step_local [T]."""
    L, T, k = idx.shape
    base = (np.arange(L)[:, None] * S + step_local[None, :]) * E * E  # [L, T]
    out = np.zeros(L * S * E * E, dtype=np.int64)
    for a in range(k):
        for b in range(a + 1, k):
            lo = np.minimum(idx[..., a], idx[..., b]).astype(np.int64)
            hi = np.maximum(idx[..., a], idx[..., b]).astype(np.int64)
            out += np.bincount((base + lo * E + hi).ravel(), minlength=L * S * E * E)
    return out.reshape(L, S, E, E)


def flow_table(idx: np.ndarray, step_local: np.ndarray, steps_u: np.ndarray, E: int, every_pair: bool) -> dict:
    """flow_stats rows (as Recorder(flow_stats='all' | 'adjacent') writes them) for layer pairs a < b: tokens
    per (first choice in a, first choice in b) and k x k pairs, per step. idx [L, T, k]; step_local [T]."""
    L, T, k = idx.shape
    S = len(steps_u)
    cols: dict[str, list] = {c: [] for c in ("step", "layer_a", "layer_b", "expert_a", "expert_b", "first_tokens",
                                             "topk_pairs")}
    base = step_local.astype(np.int64) * E * E  # [T]
    for a in range(L):
        for b in range(a + 1, L if every_pair else min(a + 2, L)):
            ia, ib = idx[a].astype(np.int64), idx[b].astype(np.int64)  # [T, k]
            first = np.bincount(base + ia[:, 0] * E + ib[:, 0], minlength=S * E * E)
            pairs = (base[:, None, None] + ia[:, :, None] * E + ib[:, None, :]).ravel()  # [T * k * k]
            both = np.bincount(pairs, minlength=S * E * E)
            nz = np.flatnonzero(both)
            s_i, cell = np.divmod(nz, E * E)
            for c, v in (("step", steps_u[s_i]), ("layer_a", np.full(len(nz), a)), ("layer_b", np.full(len(nz), b)),
                         ("expert_a", cell // E), ("expert_b", cell % E), ("first_tokens", first[nz]),
                         ("topk_pairs", both[nz])):
                cols[c].append(v)
    return {c: np.concatenate(v) for c, v in cols.items()}


def plan_steps(shape: Shape, routes: int) -> list[tuple[int, str]]:
    """(step, tag) of every step: training steps until `routes` routes, a probe step after every probe_every
    training steps (and one first, at step 0, so the run starts with a checkpoint)."""
    probe_routes = shape.layers * shape.probe_seqs * shape.seq_len * shape.top_k
    every = shape.probe_every or max(1, round(routes / shape.routes_per_step / 12))
    out, total, step = [], 0, 0
    train = 0
    while total < routes or not out:
        if train % every == 0 and (total + probe_routes <= routes or not out):
            out.append((step, "probe"))
            total += probe_routes
            step += 1
        if total >= routes:
            break
        out.append((step, "train"))
        total += shape.routes_per_step
        train += 1
        step += 1
    return out


def _compact(out: Path, routes_format: str | None) -> dict:
    """moeviz.store.compact, with routes_format when given (older stores had no such option)."""
    return (compact(out) if routes_format is None else compact(out, routes_format=routes_format))["runs"][0]


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def generate(out: Path, routes: int, shape: Shape = Shape(), *, seed: int = 0, steps_per_flush: int = 8,
             quiet: bool = False, routes_format: str | None = None, flow: str = "all") -> dict:
    """Write and compact the run; returns figures (routes, seconds, bytes per route)."""
    rng = np.random.default_rng(seed)
    plan = plan_steps(shape, routes)
    router = Router(shape, rng, total_steps=plan[-1][0])
    probe_domain = np.arange(shape.probe_seqs) % len(DOMAINS)
    probe_tokens = router.token_ids(np.random.default_rng(seed + 1), probe_domain)  # the fixed probe batch
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    written = 0
    w = RunWriter(out, run_name=out.name, compact_on_close=False)
    w.write_run({"model_class": "SyntheticMoE", "n_layers": shape.layers, "n_experts": shape.experts,
                 "top_k": shape.top_k, "capacity_factor": None, "sample_every": 1, "max_tokens_per_step": None,
                 "config": {"generator": "bench/make_store.py", "seed": seed, "batch": shape.batch,
                            "seq_len": shape.seq_len, "domains": DOMAINS}})
    w.write_layers([{"layer": l, "module_name": f"model.layers.{l}.mlp.gate", "n_experts": shape.experts,
                     "top_k": shape.top_k, "block_index": l, "stack": "decoder"} for l in range(shape.layers)])
    w.write_vocab(np.arange(VOCAB), [f"tok{i}" for i in range(VOCAB)])
    for i in range(0, len(plan), steps_per_flush):
        chunk = plan[i:i + steps_per_flush]
        parts = []
        for step, tag in chunk:
            if tag == "probe":
                n, dom, toks = shape.probe_seqs, probe_domain, probe_tokens
            else:
                n = shape.batch
                dom = rng.integers(0, len(DOMAINS), n)
                toks = router.token_ids(rng, dom)
            parts.append({"step": np.full(n, step, np.int64), "seq": np.arange(n, dtype=np.int32), "domain": dom,
                          "tag": [tag] * n, "token_id": toks})
        seqs = {c: (np.concatenate([p[c] for p in parts]) if c != "tag" else sum((p[c] for p in parts), []))
                for c in parts[0]}
        tables = flush_tables(router, rng, shape, seqs, every_pair=flow == "all")
        w.write_flush(tables)
        written += len(tables["routes"]["expert"])
        if not quiet and (i // steps_per_flush) % 10 == 0:
            print(f"  {written:,} routes, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    w.close()
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = _compact(out, routes_format)
    compact_s = time.perf_counter() - t0
    size = _folder_bytes(out)  # run.duckdb plus any compacted routes files
    return {"routes": written, "steps": len(plan), "probe_steps": sum(t == "probe" for _, t in plan),
            "generate_write_s": gen_s, "compact_s": compact_s, "segment_bytes": res["segment_bytes_folded"],
            "compacted_bytes": size, "bytes_per_route": size / max(1, written),
            "segment_bytes_per_route": res["segment_bytes_folded"] / max(1, written)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routes", type=lambda s: int(s.replace("_", "")), default=2_000_000)
    ap.add_argument("--out", type=Path, default=Path("bench/out/store"))
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-per-flush", type=int, default=8)
    ap.add_argument("--routes-format", default=None, help="compact(routes_format=...): 'parquet' or 'duckdb' "
                    "(default: moeviz's default)")
    ap.add_argument("--flow", choices=("all", "adjacent"), default="all",
                    help="flow_stats for every pair of layers (as Recorder(flow_stats='all')) or each layer and the "
                         "next (the Recorder's default)")
    args = ap.parse_args(argv)
    shape = Shape(layers=args.layers, experts=args.experts, top_k=args.top_k, batch=args.batch,
                  seq_len=args.seq_len)
    r = generate(args.out, args.routes, shape, seed=args.seed, steps_per_flush=args.steps_per_flush,
                 routes_format=args.routes_format, flow=args.flow)
    print("| measure | value |\n|---|---|")
    print(f"| routes | {r['routes']:,} ({r['steps']} steps, {r['probe_steps']} of them probe steps) |")
    print(f"| generate + write segments | {r['generate_write_s']:.1f} s ({r['routes'] / r['generate_write_s'] / 1e6:.2f} M routes/s) |")
    print(f"| compact | {r['compact_s']:.1f} s |")
    print(f"| segments | {r['segment_bytes'] / 1e6:.1f} MB, {r['segment_bytes_per_route']:.3f} bytes/route |")
    print(f"| compacted run folder | {r['compacted_bytes'] / 1e6:.1f} MB, {r['bytes_per_route']:.3f} bytes/route |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
