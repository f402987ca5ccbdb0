"""A billion routes (issue #19): a DeepSeek-V3-shaped run (58 layers x 256 experts, top-8) of --steps steps of
aggregates plus sampled routes of 8 ranks, written through RunWriter, then compacted; prints the write rate, bytes,
compaction time and a few route-window queries' times.

    nice -n 10 python bench/bench_billion.py                       # 10,000 steps, routes every 18: 1.06 B routes
    nice -n 10 python bench/bench_billion.py --steps 500           # ~53 M routes: the projection run

The data: `bench_dsv3.aggregates` (reduced mode: one writer of the step aggregates) and `bench_dsv3.routes` (each
token's top-8 of Gumbel-noised logits); drawing a billion routes' logits would take longer than writing them, so
each rank draws --distinct blocks of one sampled step's routes and reuses them with the step number changed (what
is measured is the store, not the generator). DuckDB's memory limit during compaction is --memory-gb (the machine
is shared). Writes bench/out/billion/s<steps>-e<every> (git-ignored) and a JSON of the figures beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_dsv3 import E, K, L, Shares, aggregates, folder_bytes, routes  # noqa: E402

from moeviz.store import RunWriter, compact, duckdb_compat, memory, open_store, store_info  # noqa: E402

ROUTE_RANKS = 8


def write(out: Path, args) -> dict:
    """Write the run; {routes, aggregate rows, seconds in write_flush, wall seconds, segment bytes}."""
    rng = np.random.default_rng(args.seed)
    shares = Shares(rng, args.steps)
    per_rank_tokens = args.route_tokens // ROUTE_RANKS
    # [rank][block] one sampled step's routes of a rank, reused with the step number changed
    blocks = [[routes(rng, shares, 0, r, per_rank_tokens) for _ in range(args.distinct)] for r in range(ROUTE_RANKS)]
    shutil.rmtree(out, ignore_errors=True)
    writers = {r: RunWriter(out, run_id=out.name, run_name=out.name, rank=r, world_size=ROUTE_RANKS * 8,
                            compact_on_close=False) for r in range(ROUTE_RANKS)}
    for w in writers.values():
        w.write_run({"model_class": "DeepseekV3-shaped", "n_layers": L, "n_experts": E, "top_k": K,
                     "sample_every": args.route_every, "max_tokens_per_step": per_rank_tokens,
                     "config": {"bench": "bench/bench_billion.py"}})
        w.write_layers([{"layer": i, "module_name": f"model.layers.{i + 3}.mlp.gate", "n_experts": E, "top_k": K,
                         "block_index": i + 3, "stack": None} for i in range(L)])
    n_routes = n_agg = 0
    in_write = 0.0
    t0 = time.perf_counter()
    for lo in range(0, args.steps, args.flush):
        steps = np.arange(lo, min(lo + args.flush, args.steps))
        flushes: dict[int, dict] = {r: {} for r in writers}
        for r, tables in aggregates(rng, shares, steps, ROUTE_RANKS * 8, reduced=True):
            flushes[r].update(tables)
        sampled = [int(s) for s in steps if s % args.route_every == 0]
        for r in range(ROUTE_RANKS):
            parts = [blocks[r][(s // args.route_every) % args.distinct] for s in sampled]
            if not parts:
                continue
            for t in ("routes", "sequences"):
                cols = [c for c in parts[0][t] if c != "step"]
                flushes[r][t] = {c: np.concatenate([np.broadcast_to(p[t][c], len(p[t]["seq"])) for p in parts])
                                 for c in cols}
                flushes[r][t]["step"] = np.concatenate([np.full(len(p[t]["seq"]), s) for p, s in zip(parts, sampled)])
        for r, tables in flushes.items():
            if not tables:
                continue
            a = time.perf_counter()
            writers[r].write_flush(tables)
            in_write += time.perf_counter() - a
            n_routes += len(tables.get("routes", {}).get("expert", ()))
            n_agg += len(tables.get("step_stats", {}).get("expert", ())) + len(tables.get("layer_stats", {}).get("layer", ()))
        if not args.quiet and (lo // args.flush) % 10 == 0:
            print(f"  steps {steps[-1] + 1:,}/{args.steps:,}: {n_routes:,} routes, {n_agg:,} aggregate rows, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    for w in writers.values():
        w.close()
    return {"routes": n_routes, "agg_rows": n_agg, "write_flush_s": in_write, "write_wall_s": time.perf_counter() - t0,
            "segment_bytes": folder_bytes(out)}


def limit_duckdb_memory(gb: float, spill: Path) -> None:
    """Every DuckDB connection that sets no limit of its own gets memory_limit=gb GiB and spills under `spill`;
    compaction's own (moeviz.store.memory) gets the same limit through MOEVIZ_COMPACT_MEMORY."""
    os.environ[memory.ENV] = f"{int(gb * 1024)}MiB"
    real = duckdb_compat.connect
    spill.mkdir(parents=True, exist_ok=True)

    def connect(database=":memory:", *, read_only=False, config=None):
        config = dict(config or {})
        config.setdefault("memory_limit", f"{int(gb * 1024)}MiB")
        config.setdefault("temp_directory", str(spill))
        return real(database, read_only=read_only, config=config)

    duckdb_compat.connect = connect


def route_queries(con, steps: int, route_every: int) -> list[tuple[str, str]]:
    """(name, SQL) of what the route-window readers ask: a window of sampled steps of routes, token_sets and
    the derived counts."""
    mid = (steps // 2) // route_every * route_every
    window = f"step BETWEEN {mid} AND {mid + 10 * route_every}"  # ~10 sampled steps, ~19 M routes
    return [
        ("routes: count(*) in a 10-sampled-step window", f"SELECT count(*) FROM routes WHERE {window}"),
        ("routes: load per layer and expert in the window",
         f"SELECT layer, expert, count(*) FROM routes WHERE {window} GROUP BY ALL"),
        ("routes: mean weight and margin per layer in the window",
         f"SELECT layer, avg(weight), avg(margin) FROM routes WHERE {window} GROUP BY ALL"),
        ("token_sets: tokens per layer in the window", f"SELECT layer, count(*) FROM token_sets WHERE {window} GROUP BY ALL"),
        ("token_stats: top 20 tokens of layer 10",
         "SELECT token_id, sum(assigned) a FROM token_stats WHERE layer = 10 GROUP BY ALL ORDER BY a DESC LIMIT 20"),
        ("weight_hist: one step's bins of layer 0", f"SELECT count(*), sum(assigned) FROM weight_hist WHERE step = {mid} AND layer = 0"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--route-every", type=int, default=18, help="sampled routes every N steps")
    ap.add_argument("--route-tokens", type=int, default=4096, help="sampled tokens per sampled step, 8 ranks")
    ap.add_argument("--flush", type=int, default=100, help="steps per flush")
    ap.add_argument("--distinct", type=int, default=4, help="distinct route blocks drawn per rank")
    ap.add_argument("--memory-gb", type=float, default=4.0, help="DuckDB memory limit during compaction")
    ap.add_argument("--dir", type=Path, default=ROOT / "bench" / "out" / "billion")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the run folder (default: delete it after)")
    ap.add_argument("--write-only", action="store_true", help="write the run and stop (kept, not compacted)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    out = args.dir / f"s{args.steps}-e{args.route_every}"
    res: dict = {"steps": args.steps, "route_every": args.route_every, "route_tokens": args.route_tokens}
    res.update(write(out, args))
    print(f"written: {res['routes']:,} routes, {res['agg_rows']:,} aggregate rows in {res['write_wall_s']:.0f} s wall "
          f"({res['write_flush_s']:.0f} s in write_flush: {res['routes'] / res['write_flush_s'] / 1e6:.2f} M routes/s); "
          f"segments {res['segment_bytes'] / 1e9:.2f} GB = {res['segment_bytes'] / res['routes']:.2f} B/route", flush=True)
    if args.write_only:
        return
    limit_duckdb_memory(args.memory_gb, args.dir / "spill")
    t0, c0 = time.perf_counter(), time.process_time()
    compact(out)
    res["compact_s"], res["compact_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    info = store_info(out)["runs"][0]
    res["compacted_bytes"] = folder_bytes(out)
    res["routes_files_bytes"] = info["routes_files_bytes"]
    res["token_sets_files_bytes"] = info["token_sets_files_bytes"]
    res["run_duckdb_bytes"] = info["run_duckdb_bytes"]
    res["rows"] = {t: v["compacted_rows"] for t, v in info["tables"].items() if v["compacted_rows"]}
    print(f"compacted in {res['compact_s']:.0f} s ({res['compact_s'] / res['routes'] * 1e6:.2f} us/route, "
          f"{res['compact_cpu_s']:.0f} CPU-s in this process): {res['compacted_bytes'] / 1e9:.2f} GB = "
          f"{res['compacted_bytes'] / res['routes']:.2f} B/route (routes files "
          f"{res['routes_files_bytes'] / res['routes']:.2f}, token_sets files {res['token_sets_files_bytes'] / res['routes']:.2f}, "
          f"run.duckdb {res['run_duckdb_bytes'] / res['routes']:.2f})", flush=True)
    print("rows: " + ", ".join(f"{t} {n:,}" for t, n in res["rows"].items()), flush=True)
    t0 = time.perf_counter()
    con = open_store(out)
    res["open_s"] = time.perf_counter() - t0
    print(f"| query | s (best of 2) |\n|---|---:|\n| open_store | {res['open_s']:.2f} |")
    res["queries"] = {}
    for name, sql in route_queries(con, args.steps, args.route_every):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            con.execute(sql).fetchall()
            best = min(best, time.perf_counter() - t0)
        res["queries"][name] = best
        print(f"| {name} | {best:.3f} |", flush=True)
    con.close()
    (args.dir / f"{out.name}.json").write_text(json.dumps(res, indent=1))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
