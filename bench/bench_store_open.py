"""What opening a live store costs per flush: listing a run of many small flushes (the commit records and the
footer checks of its segments) and open_store itself, in one process, repeated.

    python bench/bench_store_open.py [--flushes 300] [--dir /tmp/moeviz-open]

The first scan of a process reads every commit record and checks every segment's size and footer checksum; the
dashboard re-opens the store on every refresh, so later scans are what a live page pays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeviz.store import RunWriter, layout, open_store  # noqa: E402


def write_run(run_dir: Path, flushes: int) -> None:
    """`flushes` flushes of one step each: 8 layers x 512 tokens x top-2 routes plus layer_stats."""
    w = RunWriter(run_dir, compact_on_close=False)
    w.write_run({"model_class": "Bench", "n_layers": 8, "n_experts": 8, "top_k": 2})
    rng = np.random.default_rng(0)
    n = 8 * 512 * 2
    for step in range(flushes):
        w.write_flush({
            "routes": {"step": step, "seq": 0, "pos": np.tile(np.repeat(np.arange(512), 2), 8),
                       "token_id": rng.integers(0, 32000, n), "layer": np.repeat(np.arange(8), 1024),
                       "slot": np.tile([0, 1], n // 2), "expert": rng.integers(0, 8, n), "weight": rng.random(n)},
            "layer_stats": {"step": np.full(8, step), "layer": np.arange(8), "tokens": 512, "z_loss_sum": 1.0,
                            "entropy_sum": 2.0, "dropped": 0}})
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flushes", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="moeviz-open-"))
    run_dir = root / "run"
    if not run_dir.exists():
        write_run(run_dir, args.flushes)
    manifest = layout.read_manifest(run_dir)
    files = sum(len(v) for v in layout.committed_files(run_dir, manifest).tables.values())
    scans, opens = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        layout.committed_files(run_dir, manifest)
        scans.append(time.perf_counter() - t)
        t = time.perf_counter()
        open_store(run_dir).close()
        opens.append(time.perf_counter() - t)
    print(f"| {files} segments ({args.flushes} flushes) | list + check: min {min(scans) * 1e3:.0f} ms, median "
          f"{statistics.median(scans) * 1e3:.0f} ms | open_store: min {min(opens) * 1e3:.0f} ms, median "
          f"{statistics.median(opens) * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
