"""What Recorder(reduce_ranks=True) costs at a flush: its two all_reduces, with W real gloo processes on this machine.

At each flush a reducing Recorder sums a 7-number head (what each rank would sum, and whether it is closing; read
on the host, so every rank takes the same path) and then the flush's step aggregates, one buffer per dtype: per
step and MoE layer 9 + 4E float64 (`layer_aggregates`); with pair_stats E(E-1)/2 int32 more, with flow_stats
(adjacent layers) 2E^2 int32 per pair of consecutive layers. This times the collectives as
`Recorder._reduced_flush` calls them (`torch.distributed.all_reduce`, SUM, gloo, CPU tensors), median of --repeat
after 2 warm-ups, wall time of rank 0 (every rank waits for the slowest), for a DeepSeek-V3-shaped model (58 layers
x 256 experts) by default, for each world size and each choice of counts. The sizes printed are what each rank
sends.

    python bench/bench_reduce_ranks.py [--world 2 4] [--layers 58] [--experts 256] [--flush-every 10] [--repeat 5]

Memory: each process holds its buffers (58 x 256, 10 steps with pair_stats: ~80 MB); flow_stats is timed for one
step (38 MB), as 10 steps of it would hold ~0.4 GB per process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COUNTS = {  # name -> (float64, int32) numbers per step as a function of (layers, experts)
    "aggregates": lambda L, E: (L * (9 + 4 * E), 0),
    "aggregates+pairs": lambda L, E: (L * (9 + 4 * E), L * (E * (E - 1) // 2)),
    "aggregates+pairs+flow": lambda L, E: (L * (9 + 4 * E), L * (E * (E - 1) // 2) + (L - 1) * 2 * E * E),
}


def _worker(rank: int, world: int, init: str, sizes: list[tuple[str, int, int]], repeat: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    rows = []
    try:
        for name, steps, (n_float, n_int) in sizes:
            head = torch.ones(7, dtype=torch.float64)
            bufs = [torch.ones(n_float, dtype=torch.float64)] + ([torch.ones(n_int, dtype=torch.int32)] if n_int else [])
            head_t, data_t = [], []
            for i in range(repeat + 2):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(head)
                head.cpu().numpy()
                t1 = time.perf_counter()
                for buf in bufs:
                    dist.all_reduce(buf)
                t2 = time.perf_counter()
                if i >= 2:
                    head_t.append(t1 - t0)
                    data_t.append(t2 - t1)
            rows.append((name, steps, n_float * 8 + n_int * 4, statistics.median(head_t), statistics.median(data_t)))
            del bufs
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(repr(rows))


def main() -> None:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--flush-every", type=int, default=10, help="steps summed in one flush")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    L, E, F = args.layers, args.experts, args.flush_every
    sizes = [(name, steps, tuple(steps * x for x in COUNTS[name](L, E)))
             for name, steps in (("aggregates", F), ("aggregates+pairs", F), ("aggregates+pairs+flow", 1))]
    print(f"# {L} layers x {E} experts, gloo on CPU, {os.cpu_count()} cores, median of {args.repeat}")
    print("| ranks | counts summed | steps per flush | MB per rank | head all_reduce ms | data all_reduce ms | "
          "ms per step |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for world in args.world:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows")
            mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), sizes, args.repeat, out), nprocs=world,
                     join=True)
            for name, steps, nbytes, head_s, data_s in eval(Path(out).read_text()):
                print(f"| {world} | {name} | {steps} | {nbytes / 1e6:.1f} | {head_s * 1e3:.2f} | "
                      f"{data_s * 1e3:.1f} | {(head_s + data_s) * 1e3 / steps:.1f} |")


if __name__ == "__main__":
    main()
