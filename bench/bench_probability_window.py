"""The probability capacity policy per assignment over a window of steps of a compacted run (issue #19's
weight_hist merged groups): capacity_drops at CF 1.0 from weight_hist, four shapes of the pass, best of 2 calls.

`--as-version-4 OUT` first copies the run folder to OUT with weight_hist rebuilt one row per bin (what a
version-4 compaction wrote; manifest version 4), so that an older moeviz can be timed on the same routes:

    python bench/bench_probability_window.py --run bench/out/billion/s500-e18 --as-version-4 bench/out/v4copy
    python bench/bench_probability_window.py --run bench/out/billion/s500-e18            # this code
    PYTHONPATH=<older checkout> python bench/bench_probability_window.py --run bench/out/v4copy/s500-e18
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def as_version_4(run: Path, out: Path) -> Path:
    """A copy of the run folder with weight_hist per bin (above by a window), manifest schema_version 4."""
    import duckdb

    target = out / run.name
    shutil.copytree(run, target)
    con = duckdb.connect(str(target / "run.duckdb"))
    con.execute("SET memory_limit = '3GB'")
    files = [str(target / f) for (f,) in con.execute("SELECT file FROM _routes_files").fetchall()]
    con.execute("DELETE FROM weight_hist")
    con.execute("""
        INSERT INTO weight_hist SELECT run_id, step, rank, layer, expert, bin, assigned, first_choice, weight_q_sum,
            coalesce(sum(assigned) OVER (PARTITION BY run_id, step, rank, layer, expert ORDER BY bin DESC
                                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
        FROM (SELECT run_id, step, rank, layer, expert, CAST(weight_q >> 8 AS SMALLINT) AS bin, count(*) AS assigned,
                     count(*) FILTER (WHERE slot = 0) AS first_choice, sum(weight_q) AS weight_q_sum
              FROM read_parquet(?) WHERE weight_q IS NOT NULL GROUP BY ALL)""", [files])
    print("weight_hist per bin:", con.execute("SELECT count(*), sum(assigned) FROM weight_hist").fetchone())
    con.execute("CHECKPOINT")
    con.close()
    manifest = json.loads((target / "moeviz.json").read_text())
    (target / "moeviz.json").write_text(json.dumps(dict(manifest, schema_version=4)))
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a compacted run folder")
    ap.add_argument("--first-step", type=int, default=0)
    ap.add_argument("--last-step", type=int, default=179, help="default: 10 sampled steps of bench_billion's run")
    ap.add_argument("--as-version-4", type=Path, help="only write the per-bin copy into this folder")
    args = ap.parse_args()
    if args.as_version_4:
        as_version_4(args.run, args.as_version_4)
        return
    from moeviz.analyses.capacity import capacity_drops
    from moeviz.selection import Selection
    from moeviz.store import open_store

    con = open_store(args.run)
    sel = Selection(steps=(args.first_step, args.last_step))
    for name, kw in (("with_weight", {"with_weight": True}), ("by domain", {"by": ("domain",)}),
                     ("by pos", {"by": ("pos",)}), ("with_weight by slot", {"by": ("slot",), "with_weight": True})):
        times = []
        for _ in range(2):
            t = time.perf_counter()
            df = capacity_drops(con, sel, 1.0, policy="probability", source="aggregates", **kw)
            times.append(time.perf_counter() - t)
        weight = f"{df['dropped_weight'].sum():.6f}" if "dropped_weight" in df else "-"
        print(f"{name}: {min(times):.2f} s (first {times[0]:.2f}); assigned {int(df['assigned'].sum())}, "
              f"dropped {int(df['dropped'].sum())}, dropped_weight {weight}", flush=True)


if __name__ == "__main__":
    main()
