"""Step roll-ups (#19): the analyses over a long run's steps with and without the roll-ups, on one store.

    python bench/bench_rollups.py [--steps 100000] [--layers 8] [--experts 8] [--live]

Writes (once) a run of `--steps` steps of aggregates through RunWriter (moeviz.testing.write_aggregates), compacted
(`--live`: left as segments, as a run still being written is), then times the Overview's, Load balance's and Aux
loss's analyses the way the pages call them (the page's step bucket, and totals over the whole run), and
`health_summary`, first as they run (reading `step_rollups`/`layer_rollups` where exact), then with the roll-ups
switched off (every per-step row read). Best of --repeat runs, in one process, so both sides share the machine's
load.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moeviz.analyses.aux_loss as aux_mod  # noqa: E402
import moeviz.analyses.health as health_mod  # noqa: E402
import moeviz.analyses.load as load_mod  # noqa: E402
import moeviz.analyses.top_experts as top_mod  # noqa: E402
from moeviz.analyses.step_buckets import step_bucket_for  # noqa: E402
from moeviz.selection import Selection  # noqa: E402
from moeviz.store import open_store  # noqa: E402
from moeviz.testing import long_run_aggregates, write_aggregates  # noqa: E402


def cases(con, steps: int):
    b = step_bucket_for(0, steps - 1)
    sel = Selection()
    mid = Selection(steps=(steps // 10 + 3, steps - steps // 10 - 7))  # a range that starts and ends mid-block
    return [
        (f"expert_load, bucket {b} (Overview)", lambda: load_mod.expert_load(con, sel, by_step=True, step_bucket=b)),
        (f"expert_load, bucket {b}, steps {mid.steps[0]}-{mid.steps[1]}",
         lambda: load_mod.expert_load(con, mid, by_step=True, step_bucket=b)),
        (f"switch_loss, bucket {b} (Overview, Aux loss)", lambda: aux_mod.switch_loss(con, sel, by_step=True, step_bucket=b)),
        (f"pooled_switch_loss, bucket {b} (Aux loss)",
         lambda: aux_mod.pooled_switch_loss(con, sel, by_step=True, step_bucket=b)),
        (f"imbalance, bucket {b} (Load balance)", lambda: load_mod.imbalance(con, sel, by_step=True, step_bucket=b)),
        (f"z_loss, bucket {b} (Aux loss)", lambda: aux_mod.z_loss(con, sel, by_step=True, step_bucket=b)),
        ("load_matrix, whole run (Load balance)", lambda: load_mod.load_matrix(con, sel)),
        ("imbalance, whole run (Load balance table)", lambda: load_mod.imbalance(con, sel, by_step=False)),
        ("health_summary (Overview)", lambda: health_mod.health_summary(con, sel)),
    ]


def best(fn, repeat: int) -> float:
    out = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--live", action="store_true", help="leave the run as segments (not compacted)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=ROOT / "bench" / "out" / "rollups")
    args = ap.parse_args()
    run_dir = args.dir / f"{'live' if args.live else 'compacted'}-{args.steps}-{args.layers}x{args.experts}"
    if not (run_dir / "moeviz.json").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        agg = long_run_aggregates(n_steps=args.steps, n_layers=args.layers, n_experts=args.experts, top_k=2)
        write_aggregates(run_dir, agg, run_id=run_dir.name, compact_on_close=not args.live)
    con = open_store(run_dir)
    rows = []
    for name, fn in cases(con, args.steps):
        rows.append([name, best(fn, args.repeat)])
    for m in (aux_mod, health_mod, load_mod, top_mod):
        m.rollups_available = lambda con: False
    for row, (_, fn) in zip(rows, cases(con, args.steps)):
        row.append(best(fn, args.repeat))
    print(f"{args.steps:,} steps x {args.layers} layers x {args.experts} experts, "
          f"{'live segments' if args.live else 'compacted'}; best of {args.repeat}")
    print("| analysis | with roll-ups s | per-step rows s |\n|---|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:.3f} | {b:.3f} |")


if __name__ == "__main__":
    main()
