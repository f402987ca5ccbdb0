"""A DeepSeek-V3-shaped run through RunWriter: 58 MoE layers x 256 experts, top-8, simulated data-parallel ranks.

    python bench/bench_dsv3.py --steps 1000 --mode reduced [--route-every 100 --route-tokens 4096]
    python bench/bench_dsv3.py --steps 100 --mode per-rank --ranks 8

Writes one run into bench/out/dsv3/<mode>-r<ranks>-s<steps> (git-ignored) and measures what it costs:
- write: rows and seconds per table kind (aggregates, routes), the write rate, bytes on disk as segments;
- compaction (`moeviz.store.compact`, which also builds the step roll-ups): seconds and bytes after;
- every analysis the dashboard's pages call over steps and layers, the sidebar's catalogue queries, the health
  summary, capacity drops, and expert-parallel GPU load, on the compacted store (best of --repeat);
  `--raw` also times the Overview's analyses with the roll-ups switched off (what they cost before #19's
  roll-ups), to show how their cost grows with steps.

Modes: `per-rank` = every rank writes its own step_stats / layer_stats (what the Recorder writes today:
64 ranks x 58 x 256 = 950,272 step_stats rows a step); `reduced` = the ranks' step aggregates summed before
writing, one writer for the data-parallel group (what `Recorder(reduce_ranks=...)` is to write: 14,848 rows a
step, whatever the number of ranks); both write each rank's own sampled routes. Counts are drawn per step,
layer (and rank) from a multinomial around a per-layer skewed share that drifts over steps, router probability
sums follow the share; sampled routes pick each token's top-8 of Gumbel-noised logits of the same share.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeviz.store import RunWriter, compact, open_store  # noqa: E402

L, E, K = 58, 256, 8
TOKENS_PER_RANK = 16_384  # tokens one rank routes per step (a 4 x 4,096 micro-batch)


class Shares:
    """Each layer's expert shares at a step: a fixed skew plus a slow drift (one layer grows a hot expert)."""

    def __init__(self, rng: np.random.Generator, n_steps: int):
        self.base = rng.normal(0.0, 0.5, (L, E))
        self.drift = rng.normal(0.0, 0.5, (L, E))
        self.drift[L - 1, 0] = 3.0
        self.n_steps = max(1, n_steps)

    def logits(self, step: int) -> np.ndarray:  # [L, E]
        return self.base + (step / self.n_steps) * self.drift

    def at(self, step: int) -> np.ndarray:  # [L, E], rows sum to 1
        x = self.logits(step)
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def aggregates(rng, shares: Shares, steps: np.ndarray, ranks: int, reduced: bool) -> list[tuple[int, dict]]:
    """[(rank, {step_stats, layer_stats})] for these steps: one entry per rank, or one summed over ranks."""
    out = []
    n_writers = 1 if reduced else ranks
    tokens = TOKENS_PER_RANK * (ranks if reduced else 1)
    for r in range(n_writers):
        counts = np.empty((len(steps), L, E), np.int64)
        prob = np.empty((len(steps), L, E))
        for i, s in enumerate(steps):
            p = shares.at(int(s))
            counts[i] = rng.multinomial(tokens * K, p)
            prob[i] = p * tokens
        n = len(steps)
        ss = {"step": np.repeat(steps, L * E), "rank": r, "layer": np.tile(np.repeat(np.arange(L), E), n),
              "expert": np.tile(np.arange(E), n * L), "tokens": tokens, "assigned": counts.ravel(),
              "first_choice": (counts // K).ravel(), "prob_sum": prob.ravel(), "dropped": 0}
        ls = {"step": np.repeat(steps, L), "rank": r, "layer": np.tile(np.arange(L), n), "tokens": tokens,
              "z_loss_sum": rng.gamma(4.0, 0.5, n * L) * tokens,
              "entropy_sum": np.full(n * L, np.log(E) * 0.9 * tokens), "dropped": 0}
        out.append((r, {"step_stats": ss, "layer_stats": ls}))
    return out


def routes(rng, shares: Shares, step: int, rank: int, n_tokens: int, seq_len: int = 512) -> dict:
    """One rank's sampled routes of one step: each token's top-8 of Gumbel-noised logits, layer-major."""
    n_seq = max(1, n_tokens // seq_len)
    n_tok = n_seq * seq_len
    logits = shares.logits(step)[None] + rng.gumbel(size=(n_tok, L, E)).astype(np.float32)  # [T, L, E]
    top = np.argpartition(-logits, K, axis=2)[:, :, :K]  # [T, L, K]
    chosen = np.take_along_axis(logits, top, 2)
    order = np.argsort(-chosen, axis=2)
    top = np.take_along_axis(top, order, 2)
    w = np.exp(np.take_along_axis(chosen, order, 2))
    w = w / w.sum(2, keepdims=True)
    tok = np.arange(n_tok)
    seq, pos = tok // seq_len, tok % seq_len
    token_id = np.minimum(rng.zipf(1.2, n_tok), 128_000) - 1  # Zipf over a 128K vocabulary, as text is
    lt = (L, n_tok, K)  # layer-major, then token, then slot
    t_idx = np.broadcast_to(tok[None, :, None], lt).ravel()
    return {
        "routes": {"step": step, "rank": rank, "seq": seq[t_idx], "pos": pos[t_idx], "token_id": token_id[t_idx],
                   "layer": np.broadcast_to(np.arange(L)[:, None, None], lt).ravel(),
                   "slot": np.broadcast_to(np.arange(K)[None, None, :], lt).ravel(),
                   "expert": top.transpose(1, 0, 2).ravel(), "weight": w.transpose(1, 0, 2).ravel()},
        "sequences": {"step": step, "rank": rank, "seq": np.arange(n_seq), "domain": None, "tag": "train",
                      "n_tokens": seq_len},
    }


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write(out: Path, args) -> dict:
    rng = np.random.default_rng(args.seed)
    shares = Shares(rng, args.steps)
    reduced = args.mode == "reduced"
    n_writers = 1 if reduced else args.ranks
    route_ranks = min(args.ranks, args.route_ranks)  # ranks that keep per-token detail (sampled)
    writer_ranks = sorted(set(range(n_writers)) | set(range(route_ranks)))
    shutil.rmtree(out, ignore_errors=True)
    writers = {r: RunWriter(out, run_id=out.name, run_name=out.name, rank=r, world_size=args.ranks,
                            compact_on_close=False) for r in writer_ranks}
    for w in writers.values():
        w.write_run({"model_class": "DeepseekV3-shaped", "n_layers": L, "n_experts": E, "top_k": K,
                     "sample_every": args.route_every, "max_tokens_per_step": args.route_tokens // max(1, route_ranks),
                     "config": {"bench": "bench/bench_dsv3.py", "mode": args.mode, "ranks": args.ranks}})
        w.write_layers([{"layer": i, "module_name": f"model.layers.{i + 3}.mlp.gate", "n_experts": E, "top_k": K,
                         "block_index": i + 3, "stack": None} for i in range(L)])
    t_agg = t_routes = 0.0
    agg_rows = route_rows = 0
    t0 = time.perf_counter()
    for lo in range(0, args.steps, args.flush):
        steps = np.arange(lo, min(lo + args.flush, args.steps))
        flushes: dict[int, dict] = {r: {} for r in writer_ranks}
        for r, tables in aggregates(rng, shares, steps, args.ranks, reduced):
            flushes[r].update(tables)
        sampled = [int(s) for s in steps if args.route_every and s % args.route_every == 0]
        per_rank_tokens = args.route_tokens // max(1, route_ranks)
        parts: dict[int, list[dict]] = {r: [] for r in range(route_ranks)}
        for s in sampled:
            for r in range(route_ranks):
                parts[r].append(routes(rng, shares, s, r, per_rank_tokens))
        for r in range(route_ranks):
            if parts[r]:
                for t in ("routes", "sequences"):
                    cols = parts[r][0][t].keys()
                    flushes[r][t] = {c: np.concatenate([np.broadcast_to(p[t][c], len(p[t]["seq"]))
                                                        for p in parts[r]]) for c in cols}
        for r, tables in flushes.items():
            if not tables:
                continue
            a = time.perf_counter()
            writers[r].write_flush(tables)
            dt = time.perf_counter() - a
            if "routes" in tables:
                route_rows += len(tables["routes"]["expert"])
            agg_rows += len(tables.get("step_stats", {}).get("expert", ())) + len(tables.get("layer_stats", {}).get("layer", ()))
            t_agg += dt  # the write of the whole flush (aggregates and routes together)
        if not args.quiet:
            print(f"  steps {steps[-1] + 1:,}/{args.steps:,}: {agg_rows:,} aggregate rows, {route_rows:,} routes, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    for w in writers.values():
        w.close()
    wall = time.perf_counter() - t0
    return {"agg_rows": agg_rows, "route_rows": route_rows, "write_s": t_agg + t_routes, "wall_s": wall,
            "segment_bytes": folder_bytes(out)}


def timed(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


OLD_CURVE_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)  # app/views/capacity.CURVE_FACTORS


def analyses(con, steps: int) -> list[tuple[str, object]]:
    """(name, callable) for what the pages call, the way they call it (sidebar selection: the whole run)."""
    from moeviz.analyses.aux_loss import pooled_switch_loss, switch_loss, z_loss
    from moeviz.analyses.capacity import capacity_drops, drop_curve
    from moeviz.store.rollups import DROP_FACTORS
    from moeviz.analyses.health import health_summary
    from moeviz.analyses.load import expert_load, imbalance, load_matrix
    from moeviz.analyses.placement import gpu_load
    from moeviz.analyses.step_buckets import step_bucket_for
    from moeviz.analyses.top_experts import top_expert_load
    from moeviz.selection import Selection
    from moeviz.store import catalog

    run = con.execute("SELECT run_id FROM runs").fetchone()[0]
    sel = Selection(run_ids=(run,))
    b = step_bucket_for(0, steps - 1)
    page = sel.with_(layers=tuple(range(8)))  # the Overview's first page of layers
    return [
        ("sidebar: run_overview", lambda: catalog.run_overview(con, run, count_routes=False)),
        ("sidebar: steps_list", lambda: catalog.steps_list(con, run)),
        ("sidebar: routes_per_step", lambda: catalog.routes_per_step(con, run)),
        ("sidebar: rank_list", lambda: catalog.rank_list(con, run)),
        (f"Overview: top_expert_load (8 layers, top 8, bucket {b})",
         lambda: top_expert_load(con, page, n=8, step_bucket=b)),
        (f"Overview: switch_loss (8 layers, bucket {b})", lambda: switch_loss(con, page, by_step=True, step_bucket=b)),
        (f"Load balance: imbalance (8 layers, bucket {b})",
         lambda: imbalance(con, page, by_step=True, step_bucket=b)),
        ("Overview: health_summary", lambda: health_summary(con, sel)),
        ("Load balance: load_matrix (pooled)", lambda: load_matrix(con, sel)),
        (f"Load balance: imbalance (bucket {b})", lambda: imbalance(con, sel, by_step=True, step_bucket=b)),
        ("Load balance: imbalance (pooled)", lambda: imbalance(con, sel, by_step=False)),
        (f"Aux loss: switch_loss (bucket {b})", lambda: switch_loss(con, sel, by_step=True, step_bucket=b)),
        (f"Aux loss: pooled_switch_loss (bucket {b})",
         lambda: pooled_switch_loss(con, sel, by_step=True, step_bucket=b)),
        (f"Aux loss: z_loss (bucket {b})", lambda: z_loss(con, sel, by_step=True, step_bucket=b)),
        ("Capacity: capacity_drops by layer, CF 1.25", lambda: capacity_drops(con, sel, 1.25, by=("layer",))),
        ("Capacity: capacity_drops total, CF 1.25", lambda: capacity_drops(con, sel, 1.25, by=())),
        ("Capacity: capacity_drops by layer and expert, CF 1.25",
         lambda: capacity_drops(con, sel, 1.25, by=("layer", "expert"))),
        (f"Capacity: capacity_drops by layer and expert, CF 1.25, steps 150-{steps - 151} (edges from rows)",
         lambda: capacity_drops(con, sel.with_(steps=(150, steps - 151)), 1.25, by=("layer", "expert"))),
        ("Capacity: capacity_drops by layer and expert, CF 1.3 (not stored)",
         lambda: capacity_drops(con, sel, 1.3, by=("layer", "expert"))),
        ("Capacity: drop_curve over the 7 stored factors", lambda: drop_curve(con, sel, DROP_FACTORS)),
        ("Capacity: drop_curve over the page's old 11 factors", lambda: drop_curve(con, sel, OLD_CURVE_FACTORS)),
        ("Expert parallel: gpu_load 64 GPUs (pooled)", lambda: gpu_load(con, sel, 64)),
        ("Overview: expert_load all 58 layers x 256 experts (bucket)",
         lambda: expert_load(con, sel, by_step=True, step_bucket=b)),
    ]


def limit_compaction_memory(limit: str) -> None:
    """Every DuckDB connection moeviz opens through duckdb_compat.connect (the compaction's) gets this memory_limit:
    DuckDB then spills or fails cleanly instead of taking the shared machine's memory. Compaction sets a limit of
    its own (moeviz.store.memory), which MOEVIZ_COMPACT_MEMORY gives."""
    import os

    from moeviz.store import duckdb_compat, memory

    os.environ[memory.ENV] = limit

    connect = duckdb_compat.connect

    def limited(database: str = ":memory:", *, read_only: bool = False, config: dict | None = None):
        return connect(database, read_only=read_only, config={"memory_limit": limit, **(config or {})})

    duckdb_compat.connect = limited


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--mode", choices=("reduced", "per-rank"), default="reduced")
    ap.add_argument("--flush", type=int, default=50, help="steps per flush")
    ap.add_argument("--route-every", type=int, default=0, help="sampled routes every N steps (0: none)")
    ap.add_argument("--route-tokens", type=int, default=4096, help="sampled tokens per sampled step, all ranks")
    ap.add_argument("--route-ranks", type=int, default=8, help="ranks that keep sampled tokens")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--raw", action="store_true", help="also time the Overview's analyses without roll-ups")
    ap.add_argument("--skip", default="", help="comma-separated name prefixes of analyses to skip")
    ap.add_argument("--dir", type=Path, default=ROOT / "bench" / "out" / "dsv3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--write-only", action="store_true", help="write and compact the store, time no analysis")
    ap.add_argument("--without-buckets", default=None,
                    help="also time the analyses with the bucket tables (layer_buckets, pooled_buckets, step_drops, "
                         "expert_drops) "
                         "switched off, in the same process: comma-separated name prefixes to time that way "
                         "('all' = every analysis)")
    ap.add_argument("--duckdb-memory", default=None,
                    help="DuckDB memory_limit of the compaction's connections (e.g. 3GB): its 10,000-step compaction "
                         "with 9.5 M routes went past 6.3 GB of RSS with DuckDB's default (80%% of RAM)")
    args = ap.parse_args()
    if args.duckdb_memory:
        limit_compaction_memory(args.duckdb_memory)
    out = args.dir / (f"{args.mode}-r{args.ranks}-s{args.steps}" + (f"-routes{args.route_every}" if args.route_every else ""))
    res: dict = {"steps": args.steps, "ranks": args.ranks, "mode": args.mode}
    if not (out / "run.duckdb").exists():
        res.update(write(out, args))
        t0 = time.perf_counter()
        compact(out)
        res["compact_s"] = time.perf_counter() - t0
    res["compacted_bytes"] = folder_bytes(out)
    print(f"## {args.mode}, {args.ranks} ranks, {args.steps:,} steps (58 x 256, top-8)")
    for k in ("agg_rows", "route_rows", "write_s", "wall_s", "segment_bytes", "compact_s", "compacted_bytes"):
        if k in res:
            v = res[k]
            print(f"- {k}: {v:,.2f}" if isinstance(v, float) else f"- {k}: {v:,}")
    if "agg_rows" in res and res["write_s"]:
        print(f"- write rate: {(res['agg_rows'] + res['route_rows']) / res['write_s'] / 1e6:.2f} M rows/s "
              f"(RunWriter.write_flush time; the wall time includes drawing the data)")
    if args.write_only:
        (args.dir / f"{out.name}.write.json").write_text(json.dumps(res, indent=1))
        return
    con = open_store(out)
    skip = tuple(s for s in args.skip.split(",") if s)
    print("| analysis | s |\n|---|---:|")
    timings = {}
    for name, fn in analyses(con, args.steps):
        if skip and name.startswith(skip):
            continue
        s, df = timed(fn, args.repeat)
        timings[name] = s
        print(f"| {name} | {s:.3f} |", flush=True)
    if args.without_buckets:
        import moeviz.analyses.step_rows as rows_mod

        wanted = None if args.without_buckets == "all" else tuple(args.without_buckets.split(","))
        saved = rows_mod.buckets_complete
        rows_mod.buckets_complete = lambda con: False  # every analysis then reads step_stats / the roll-ups
        print("| without bucket tables: analysis | s |\n|---|---:|")
        for name, fn in analyses(con, args.steps):
            if (wanted is None or name.startswith(wanted)) and not (skip and name.startswith(skip)):
                s, _ = timed(fn, args.repeat)
                print(f"| {name} | {s:.3f} |", flush=True)
                timings["no buckets: " + name] = s
        rows_mod.buckets_complete = saved
    if args.raw:
        import moeviz.analyses.aux_loss as aux_mod
        import moeviz.analyses.health as health_mod
        import moeviz.analyses.load as load_mod
        import moeviz.analyses.top_experts as top_mod

        for m in (aux_mod, health_mod, load_mod, top_mod):
            m.rollups_available = lambda con: False
        print("| without roll-ups: analysis | s |\n|---|---:|")
        for name, fn in analyses(con, args.steps):
            if name.startswith(("Overview", "Load balance", "Aux loss")) and not (skip and name.startswith(skip)):
                s, _ = timed(fn, args.repeat)
                print(f"| {name} | {s:.3f} |", flush=True)
                timings["raw: " + name] = s
    con.close()
    res["timings"] = timings
    (args.dir / f"{out.name}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
