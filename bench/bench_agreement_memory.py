"""Memory of `moeviz.agreement` from the routes (issue 22): one call, its time, the process's peak RSS and the peak
size of the connection's spill folder (sampled every 0.2 s).

Reads the runs A and B that `bench/bench_agreement.py --dir DIR` wrote (compacted; `source="routes"` reads their
routes as a live run's would be read).

    python bench/bench_agreement_memory.py DIR [--memory-limit GB] [--what summary|side|one-layer]

--what: summary (`agreement.summary(source="routes")`, what `moeviz agree` calls), side (one side's routes grouped
per token and layer, one layer), one-layer (the matched token-layers of one layer: one pass of summary's loop).
Run it under a watchdog on a shared machine: at 80 M routes per side and DuckDB's default memory limit (80% of
the RAM) it grows past 8 GB.
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeviz.analyses import agreement as ag
from moeviz.selection import Selection
from moeviz.store import open_store


def spill_bytes() -> int:
    """Bytes in this process's spill folders now."""
    return sum(os.path.getsize(f) for d in glob.glob(f"/tmp/moeviz-spill-*-{os.getpid()}-*")
               for f in glob.glob(d + "/*") if os.path.exists(f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--memory-limit", type=float, default=None, help="DuckDB memory_limit in GB (default: DuckDB's)")
    ap.add_argument("--what", choices=("summary", "side", "one-layer"), default="summary")
    args = ap.parse_args()
    limit = None if args.memory_limit is None else int(args.memory_limit * (1 << 30))
    con = open_store(args.dir, memory_limit=limit, spill=True)
    a, b = Selection(run_ids=("A",)), Selection(run_ids=("B",))
    peak = [0]

    def watch() -> None:
        while True:
            peak[0] = max(peak[0], spill_bytes())
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    t = time.perf_counter()
    if args.what == "summary":
        out = ag.summary(con, a, b, source="routes")["layers"].to_string(index=False)
    elif args.what == "side":
        sa, params = ag._side(a.with_(layers=(0,)), "a", False, False)
        out = con.execute(f"WITH {sa} SELECT count(*) AS token_layers FROM ta", params).fetchall()
    else:
        ctes, params = ag._matched_ctes(con, a.with_(layers=(0,)), b.with_(layers=(0,)), source="routes")
        out = con.execute(f"{ctes} SELECT count(*) AS matched FROM m", params).fetchall()
    took = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux
    print(f"{args.what}: {took:.2f} s, peak RSS {rss:.2f} GB, peak spill {peak[0] / (1 << 30):.2f} GB, memory_limit "
          f"{args.memory_limit or 'default'} GB, load {os.getloadavg()[0]:.1f}")
    print(out)
    con.close()


if __name__ == "__main__":
    main()
