"""Write throughput and bytes per route of the moeviz store on a realistic recording.

The case: 8 MoE layers of 8 experts, top-2, batches of 8 sequences x 512 positions, token ids drawn from a
32k vocabulary with a Zipf-like law, gate weights = softmax over the top-2 router logits (Mixtral-style), one
flush every 16 steps (~1M routes). Compacts copies of the same segments both ways (routes into zstd Parquet
files, the default, and routes into run.duckdb) and times two queries on each. Prints a Markdown table.

    python bench/bench_store.py [--routes 20000000] [--dir /tmp/moeviz-bench] [--without-margin]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeviz.store import RunWriter, compact, open_store, store_info  # noqa: E402

LAYERS, EXPERTS, TOP_K, BATCH, SEQ_LEN, VOCAB = 8, 8, 2, 8, 512, 32_000
MARGIN_QUANTUM = 1 << 16  # routes.margin is written in steps of 2^-16 (collectors.recorder.MARGIN_QUANTUM)


def zipf_tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    """Token ids with frequency ~ 1/rank^1.07 over a 32k vocabulary; ids shuffled so rank != id."""
    p = 1.0 / (np.arange(VOCAB) + 1.0) ** 1.07
    ids = rng.permutation(VOCAB)
    return ids[rng.choice(VOCAB, size=n, p=p / p.sum())].astype(np.int32)


def flush_tables(rng: np.random.Generator, step0: int, steps: int, margin: bool = True) -> dict:
    """One flush: routes (layer-major, then token, then slot) plus the small per-step tables. With `margin`, also
    `routes.dropped` (false: a router that never drops) and `routes.margin` as the Recorder writes them (float32:
    the full softmax probability of the last chosen expert minus the best unchosen one's, on each slot row)."""
    tokens = steps * BATCH * SEQ_LEN
    token_id = zipf_tokens(rng, tokens)  # [tokens]
    step = np.repeat(np.arange(step0, step0 + steps), BATCH * SEQ_LEN)  # [tokens]
    seq = np.tile(np.repeat(np.arange(BATCH), SEQ_LEN), steps)  # [tokens]
    pos = np.tile(np.arange(SEQ_LEN), steps * BATCH)  # [tokens]
    logits = rng.normal(0.0, 1.5, size=(LAYERS, tokens, EXPERTS)).astype(np.float32)  # [layers, tokens, experts]
    index = np.argpartition(-logits, TOP_K, axis=-1)[..., :TOP_K]  # [layers, tokens, k] unordered top-k
    top = np.take_along_axis(logits, index, -1)
    order = np.argsort(-top, axis=-1)
    index, top = np.take_along_axis(index, order, -1), np.take_along_axis(top, order, -1)  # slot 0 = best
    weight = np.exp(top - top[..., :1])
    weight /= weight.sum(-1, keepdims=True)  # [layers, tokens, k]
    shape = (LAYERS, tokens, TOP_K)
    if margin:
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = -np.sort(-(p / p.sum(-1, keepdims=True)), axis=-1)  # [layers, tokens, experts] descending
        token_margin = (p[..., TOP_K - 1] - p[..., TOP_K]).astype(np.float32)  # [layers, tokens]
        token_margin = np.round(token_margin * MARGIN_QUANTUM) / np.float32(MARGIN_QUANTUM)  # as the Recorder rounds
    routes = {
        "step": np.broadcast_to(step[None, :, None], shape).ravel(),
        "seq": np.broadcast_to(seq[None, :, None], shape).ravel(),
        "pos": np.broadcast_to(pos[None, :, None], shape).ravel(),
        "token_id": np.broadcast_to(token_id[None, :, None], shape).ravel(),
        "layer": np.broadcast_to(np.arange(LAYERS, dtype=np.int16)[:, None, None], shape).ravel(),
        "slot": np.broadcast_to(np.arange(TOP_K, dtype=np.int8)[None, None, :], shape).ravel(),
        "expert": index.astype(np.int16).ravel(),
        "weight": weight.ravel(),
    }
    if margin:
        routes["dropped"] = np.zeros(routes["expert"].shape, dtype=bool)
        routes["margin"] = np.broadcast_to(token_margin[..., None], shape).ravel()
    s, l, e = np.meshgrid(np.arange(step0, step0 + steps), np.arange(LAYERS), np.arange(EXPERTS), indexing="ij")
    step_stats = {"step": s.ravel(), "layer": l.ravel(), "expert": e.ravel(), "tokens": BATCH * SEQ_LEN,
                  "assigned": np.full(s.size, BATCH * SEQ_LEN * TOP_K // EXPERTS), "first_choice": BATCH * SEQ_LEN // 8,
                  "prob_sum": np.full(s.size, BATCH * SEQ_LEN / EXPERTS), "dropped": 0}
    s2, l2 = np.meshgrid(np.arange(step0, step0 + steps), np.arange(LAYERS), indexing="ij")
    layer_stats = {"step": s2.ravel(), "layer": l2.ravel(), "tokens": BATCH * SEQ_LEN, "z_loss_sum": 1.0,
                   "entropy_sum": 2.0, "dropped": 0}
    s3, q3 = np.meshgrid(np.arange(step0, step0 + steps), np.arange(BATCH), indexing="ij")
    sequences = {"step": s3.ravel(), "seq": q3.ravel(), "domain": "prose", "tag": "train", "n_tokens": SEQ_LEN}
    return {"routes": routes, "step_stats": step_stats, "layer_stats": layer_stats, "sequences": sequences}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routes", type=int, default=20_000_000)
    ap.add_argument("--steps-per-flush", type=int, default=16)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--without-margin", action="store_true",
                    help="leave routes.dropped and routes.margin out (NULL), as before schema v3")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="moeviz-bench-"))
    run_dir = root / "bench"
    shutil.rmtree(run_dir, ignore_errors=True)
    rng = np.random.default_rng(0)
    per_step = LAYERS * BATCH * SEQ_LEN * TOP_K
    n_flushes = max(1, round(args.routes / (per_step * args.steps_per_flush)))
    flushes = [flush_tables(rng, i * args.steps_per_flush, args.steps_per_flush, margin=not args.without_margin)
               for i in range(min(n_flushes, 4))]

    writer = RunWriter(run_dir, run_name="bench", compact_on_close=False)
    writer.write_run({"model_class": "Bench", "n_layers": LAYERS, "n_experts": EXPERTS, "top_k": TOP_K})
    routes = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n_flushes):  # reuse 4 generated flushes (generation is not what we measure); steps differ
        f = flushes[i % len(flushes)]
        f["routes"]["step"] = f["routes"]["step"] % args.steps_per_flush + i * args.steps_per_flush
        writer.write_flush(f)
        routes += len(f["routes"]["expert"])
    write_s, write_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    writer.close()
    info = store_info(run_dir)["runs"][0]
    seg_bpr = info["bytes_per_route_segments"]
    probe_step = (n_flushes * args.steps_per_flush) // 2
    seg = queries(run_dir, probe_step)

    compacted = {}
    for fmt in ("parquet", "duckdb"):  # the same segments, compacted each way
        fmt_dir = root / f"bench-{fmt}"
        shutil.rmtree(fmt_dir, ignore_errors=True)
        shutil.copytree(run_dir, fmt_dir)
        t0 = time.perf_counter()
        res = compact(fmt_dir, routes_format=fmt)["runs"][0]
        compact_s = time.perf_counter() - t0
        assert res["rows"]["routes"] == routes
        res["parts"] = store_info(fmt_dir)["runs"][0]  # which files the bytes are in
        compacted[fmt] = (res, compact_s, queries(fmt_dir, probe_step))

    print("| measure | segments | compacted, routes as Parquet (default) | compacted, routes in run.duckdb |")
    print("|---|---|---|---|")
    p, d = compacted["parquet"], compacted["duckdb"]
    print(f"| routes | {routes:,} in {n_flushes} flushes | {p[0]['rows']['routes']:,} | {d[0]['rows']['routes']:,} |")
    print(f"| write throughput | {routes / write_s / 1e6:.2f} M routes/s wall ({write_s:.2f} s), "
          f"{routes / write_cpu_s / 1e6:.2f} M routes/CPU-s | | |")
    print(f"| bytes/route on disk (all files of the run) | {seg_bpr:.3f} | {p[0]['bytes_per_route']:.3f} "
          f"| {d[0]['bytes_per_route']:.3f} |")
    for key, label in (("routes_files_bytes", "routes files"), ("token_sets_files_bytes", "token_sets files"),
                       ("run_duckdb_bytes", "run.duckdb")):
        print(f"| ... of which {label} | | {p[0]['parts'][key] / routes:.3f} | {d[0]['parts'][key] / routes:.3f} |")
    print(f"| compaction time | | {p[1]:.2f} s | {d[1]:.2f} s |")
    for key, label in (("open", "open_store"), ("group", "GROUP BY layer, expert: count(*)"),
                       ("step", f"WHERE step = {probe_step}: count(*), avg(weight)")):
        print(f"| {label} | {fmt_s(seg[key])} | {fmt_s(p[2][key])} | {fmt_s(d[2][key])} |")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


def queries(run_dir: Path, step: int) -> dict[str, float]:
    """Seconds to open the store and run the two reference queries (best of 3 each, after one warm-up)."""
    t0 = time.perf_counter()
    con = open_store(run_dir)
    out = {"open": time.perf_counter() - t0}
    sqls = {"group": "SELECT layer, expert, count(*) FROM routes GROUP BY ALL",
            "step": f"SELECT count(*), avg(weight) FROM routes WHERE step = {step}"}
    for key, sql in sqls.items():
        rows = con.execute(sql).fetchall()
        assert rows and (key != "group" or len(rows) == LAYERS * EXPERTS)
        assert key != "step" or rows[0][0] == LAYERS * BATCH * SEQ_LEN * TOP_K
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            con.execute(sql).fetchall()
            times.append(time.perf_counter() - t0)
        out[key] = min(times)
    con.close()
    return out


def fmt_s(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


if __name__ == "__main__":
    main()
