"""Curves over the steps of a long run, before and after step buckets: figure size, points and time per chart.

    python bench/bench_long_run.py [--steps 20000] [--layers 8] [--experts 8] [--dir bench/out/long-run]

Writes a run of `--steps` steps of exact aggregates (step_stats, layer_stats; no routes) through RunWriter
(moeviz.testing.write_aggregates, compacted on close), then times every chart over steps of the Overview, Load
balance and Aux loss pages the way the pages build them: the analysis on the store's connection, the chart
function, and Plotly's JSON (what Streamlit sends to the browser). "before" = every step (`step_bucket=None`,
what the pages asked for until now and still the library's default); "after" = the bucket the pages now pass
(`step_bucket_for(first, last)`, at most 1,500 points per trace). Each timing is the best of --repeat runs.
The browser side is bench/bench_dashboard.py --pages overview,load,aux_loss on the same store.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeviz import charts  # noqa: E402
from moeviz.analyses.aux_loss import pooled_switch_loss, switch_loss, z_loss  # noqa: E402
from moeviz.analyses.load import expert_load, imbalance  # noqa: E402
from moeviz.analyses.step_buckets import step_bucket_for  # noqa: E402
from moeviz.store import open_store  # noqa: E402
from moeviz.testing import long_run_aggregates, write_aggregates  # noqa: E402

# (page, chart, analysis, its kwargs, chart function): as app/views/overview.py, load.py and aux_loss.py call them
CHARTS = [
    ("Overview", "load per expert", expert_load, {}, charts.load_small_multiples),
    ("Overview", "Switch loss panels", switch_loss, {}, charts.aux_loss_small_multiples),
    ("Load balance", "imbalance (MaxVio)", imbalance, {}, charts.imbalance_lines),
    ("Aux loss", "Switch loss per layer", switch_loss, {}, charts.aux_loss_lines),
    ("Aux loss", "pooled Switch loss", pooled_switch_loss, {},
     lambda df: charts.aux_loss_lines(df, value="aux_loss_per_slot", color=None)),
    ("Aux loss", "z-loss", z_loss, {}, charts.z_loss_lines),
    ("Aux loss", "router entropy", z_loss, {}, charts.entropy_lines),
]


def measure(con, fn, kwargs, chart, bucket, repeat: int) -> dict:
    best = {"query": float("inf"), "figure": float("inf"), "json": float("inf")}
    for _ in range(repeat):
        t0 = time.perf_counter()
        df = fn(con, by_step=True, step_bucket=bucket, **kwargs)
        t1 = time.perf_counter()
        fig = chart(df)
        t2 = time.perf_counter()
        body = fig.to_json()
        t3 = time.perf_counter()
        for k, v in (("query", t1 - t0), ("figure", t2 - t1), ("json", t3 - t2)):
            best[k] = min(best[k], v)
    points = max((len(t.x) for t in fig.data if getattr(t, "x", None) is not None), default=0)
    return {**best, "bytes": len(body), "traces": len(fig.data), "points": points}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=str(ROOT / "bench" / "out" / "long-run"))
    args = ap.parse_args()
    run_dir = Path(args.dir) / f"steps-{args.steps}"
    if not (run_dir / "run.duckdb").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        agg = long_run_aggregates(n_steps=args.steps, n_layers=args.layers, n_experts=args.experts, top_k=2)
        write_aggregates(run_dir, agg, run_id=f"long-{args.steps}")
        print(f"wrote {run_dir} in {time.perf_counter() - t0:.1f} s", flush=True)
    bucket = step_bucket_for(0, args.steps - 1)
    con = open_store(run_dir)
    print(f"{args.steps:,} steps x {args.layers} layers x {args.experts} experts; bucket after: {bucket} steps")
    print("| page | chart | | traces | points / trace | figure JSON | query s | figure s | to_json s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for page, name, fn, kwargs, chart in CHARTS:
        for label, b in (("before", None), ("after", bucket)):
            m = measure(con, fn, kwargs, chart, b, args.repeat)
            print(f"| {page} | {name} | {label} | {m['traces']} | {m['points']:,} | {m['bytes'] / 1e6:.2f} MB | "
                  f"{m['query']:.2f} | {m['figure']:.2f} | {m['json']:.2f} |", flush=True)
    con.close()


if __name__ == "__main__":
    main()
