"""Timings of moeviz.analyses.placement: gpu_load from the aggregates, balanced_placement at DeepSeek-V3 scale
(58 MoE layers x 256 experts over 64 GPUs with 32 redundant replicas, a Zipf-like load), dispatch_traffic from
the routes. Prints a Markdown table (first call, then the median of --repeats calls).

    python bench/bench_placement.py --store bench/out/store2m [--gpus 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeviz.analyses.placement import (  # noqa: E402
    balanced_placement,
    dispatch_traffic,
    fixed_placement,
    gpu_load,
    placement_comparison,
    placement_staleness,
    placement_summary,
)
from moeviz.selection import Selection  # noqa: E402
from moeviz.store import open_store  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float, object]:
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times) if times else first, out


def zipf_load(layers: int, experts: int, seed: int = 0) -> np.ndarray:
    """A Zipf-like load [L, E]: expert popularity ~ 1 / rank^1.1 in a random order per layer, times 1e6 tokens."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, experts + 1) ** 1.1
    return np.stack([rng.permutation(base) for _ in range(layers)]) * 1e6 / base.sum()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []

    load = zipf_load(58, 256)
    for nodes in (1, 8):
        first, med, table = timed(lambda: balanced_placement(load, 64, redundant=32, nodes=nodes), args.repeats)
        per = np.zeros((58, 64))
        np.add.at(per, (table.layer, table.gpu), load[table.layer, table.expert] * table.share)
        contiguous = np.stack([np.bincount(fixed_placement(256, 64), weights=load[i], minlength=64) for i in range(58)])
        mean = load.sum(1) / 64
        rows.append((f"balanced_placement 58 x 256 x 64 GPUs, R=32, nodes={nodes} (Zipf 1.1)", first, med,
                     f"max/mean {np.mean(per.max(1) / mean):.3f} (contiguous {np.mean(contiguous.max(1) / mean):.3f}),"
                     f" mean over layers"))

    con = open_store(args.store)
    n_routes = con.execute("SELECT count(*) FROM routes").fetchone()[0]
    n_stats = con.execute("SELECT count(*) FROM step_stats").fetchone()[0]
    sel, g = Selection(), args.gpus
    cases = [
        (f"gpu_load contiguous, pooled ({n_stats:,} step_stats rows)", lambda: gpu_load(con, sel, g)),
        ("gpu_load balanced R=2, by step", lambda: gpu_load(con, sel, g, placement="balanced", redundant=2, by_step=True)),
        ("placement_comparison by step (4 placements)",
         lambda: placement_comparison(con, sel, g, redundant=2, by_step=True)),
        ("placement_staleness (fit on the first 2 steps)", lambda: placement_staleness(con, sel, g, (0, 1), redundant=2)),
        ("dispatch_traffic contiguous, source=sequence, from sequence_stats (compacted run)",
         lambda: dispatch_traffic(con, sel, g, source="sequence")),
        (f"dispatch_traffic contiguous, source=sequence, from_routes=True ({n_routes:,} routes)",
         lambda: dispatch_traffic(con, sel, g, source="sequence", from_routes=True)),
        ("dispatch_traffic balanced R=2, source=rank, from_routes=True",
         lambda: dispatch_traffic(con, sel, g, placement="balanced", redundant=2, source="rank", from_routes=True)),
        ("placement_summary R=2 (`moeviz placement`: 4 placements, one scan of the routes)",
         lambda: placement_summary(con, sel, g, redundant=2)),
    ]
    for name, fn in cases:
        first, med, out = timed(fn, args.repeats)
        rows.append((name, first, med, f"{len(out):,} rows"))
    print(f"store {args.store}: {n_routes:,} routes; G={g}\n")
    print("| call | first (s) | median (s) | result |\n|---|---|---|---|")
    for name, first, med, note in rows:
        print(f"| {name} | {first:.3f} | {med:.3f} | {note} |")


if __name__ == "__main__":
    main()
