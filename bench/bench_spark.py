"""Spark (docs/spark.md's recipe, local mode) against DuckDB (moeviz's analyses) on the same `moeviz export`-shaped
Parquet, at growing sizes of step_stats: where, on one machine, does Spark start to pay?

    python bench/bench_spark.py [--rows 1e6 1e7] [--cores 2] [--dir /tmp/moeviz-spark-bench]

The tables are generated directly in the export layout (<dir>/<table>/part-*.parquet, the files `moeviz export`
writes): a 58-layer x 256-expert, top-8 model, step_stats rows per (step, rank, layer, expert) with random counts.
Both engines read the same files: DuckDB through views over read_parquet (moeviz's analyses take any connection
that exposes the public tables), Spark through the recipe's `views_from_export`. Times are wall-clock, each query
run once after a warm-up query per engine; Spark's session start is reported apart.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeviz.analyses.aux_loss import switch_loss  # noqa: E402
from moeviz.analyses.capacity import capacity_drops  # noqa: E402
from moeviz.analyses.load import expert_load, imbalance  # noqa: E402

LAYERS, EXPERTS, TOP_K, RANKS, TOKENS = 58, 256, 8, 64, 4096  # tokens per rank, step and layer
ROWS_PER_FILE = 1 << 24


def recipe() -> dict:
    text = (ROOT / "docs" / "spark.md").read_text(encoding="utf-8")
    block = text.split("<!-- recipe:start -->", 1)[1].split("<!-- recipe:end -->", 1)[0]
    ns: dict = {}
    exec(compile(re.search(r"```python\n(.*?)```", block, re.S).group(1), "docs/spark.md", "exec"), ns)
    return ns


def write_export(folder: Path, rows: int, seed: int = 0) -> tuple[int, int]:
    """An export-shaped store of about `rows` step_stats rows: (rows written, bytes of step_stats)."""
    rng = np.random.default_rng(seed)
    per_step_rank = LAYERS * EXPERTS
    groups = max(1, rows // per_step_rank)  # (step, rank) pairs
    (folder / "step_stats").mkdir(parents=True)
    written, part, g0 = 0, 0, 0
    bias = rng.gamma(2.0, size=(LAYERS, EXPERTS))
    share = (bias / bias.sum(1, keepdims=True)).ravel()  # [L*E] each layer's expected share per expert
    while g0 < groups:
        g = min(groups - g0, max(1, ROWS_PER_FILE // per_step_rank))
        n = g * per_step_rank
        gi = np.repeat(np.arange(g0, g0 + g), per_step_rank)
        assigned = rng.poisson(np.tile(share, g) * TOKENS * TOP_K).astype(np.int64)
        t = pa.table({
            "run_id": pa.array(["big"] * n), "step": gi // RANKS, "rank": (gi % RANKS).astype(np.int32),
            "layer": np.tile(np.repeat(np.arange(LAYERS, dtype=np.int32), EXPERTS), g),
            "expert": np.tile(np.arange(EXPERTS, dtype=np.int32), LAYERS * g),
            "tokens": np.full(n, TOKENS, dtype=np.int64), "assigned": assigned, "first_choice": assigned // TOP_K,
            "prob_sum": assigned / TOP_K + rng.random(n), "dropped": np.zeros(n, dtype=np.int64)})
        pq.write_table(t, folder / "step_stats" / f"part-{part:05d}.parquet", compression="zstd")
        written, part, g0 = written + n, part + 1, g0 + g
    (folder / "layers").mkdir()
    pq.write_table(pa.table({"run_id": ["big"] * LAYERS, "layer": np.arange(LAYERS, dtype=np.int32),
                             "module_name": [f"l{i}" for i in range(LAYERS)],
                             "n_experts": np.full(LAYERS, EXPERTS, dtype=np.int32),
                             "top_k": np.full(LAYERS, TOP_K, dtype=np.int32)}), folder / "layers" / "part-00000.parquet")
    (folder / "runs").mkdir()
    pq.write_table(pa.table({"run_id": ["big"], "n_layers": pa.array([LAYERS], pa.int32()),
                             "n_experts": pa.array([EXPERTS], pa.int32()), "top_k": pa.array([TOP_K], pa.int32())}),
                   folder / "runs" / "part-00000.parquet")
    size = sum(p.stat().st_size for p in (folder / "step_stats").glob("*.parquet"))
    return written, size


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=float, nargs="+", default=[1e6, 1e7])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/moeviz-spark-bench")
    args = ap.parse_args()
    import shutil

    import duckdb

    r = recipe()
    t0 = time.perf_counter()
    spark = r["spark_session"](args.cores)
    spark.sparkContext.setLogLevel("ERROR")
    spark.range(1).count()
    print(f"spark session start: {time.perf_counter() - t0:.1f} s", flush=True)
    queries = {
        "expert_load (pooled)": (lambda con: expert_load(con, by_step=False), lambda: r["expert_load"](spark)),
        "MaxVio per step, layer": (lambda con: imbalance(con, by_step=True), lambda: r["max_vio"](spark, True)),
        "Switch loss per step, layer": (lambda con: switch_loss(con, by_step=True), lambda: r["switch_loss"](spark, True)),
        "capacity drops at CF 1.0": (lambda con: capacity_drops(con, capacity_factor=1.0),
                                     lambda: r["capacity_drops"](spark, 1.0)),
    }
    print("| step_stats rows | Parquet | query | DuckDB (moeviz) | Spark local[%d] |" % args.cores)
    print("|---:|---:|---|---:|---:|")
    for rows in args.rows:
        folder = Path(args.dir) / f"rows-{int(rows)}"
        shutil.rmtree(folder, ignore_errors=True)
        n, size = write_export(folder, int(rows))
        con = duckdb.connect()
        con.execute(f"SET threads = {args.cores}")
        for t in ("runs", "layers", "step_stats"):
            con.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{folder / t}/*.parquet')")
        r["views_from_export"](spark, folder)
        con.execute("SELECT count(*) FROM step_stats").fetchall()  # warm the file cache for both
        spark.sql("SELECT count(*) FROM step_stats").collect()
        for name, (duck, sprk) in queries.items():
            d = timed(lambda: duck(con))
            s = timed(lambda: sprk().collect())
            print(f"| {n:,} | {size / 1e6:.0f} MB | {name} | {d:.2f} s | {s:.2f} s |", flush=True)
        con.close()
        shutil.rmtree(folder, ignore_errors=True)
    spark.stop()


if __name__ == "__main__":
    main()
