"""Time each statement of moeviz.store.rollups.build_buckets on one compacted store's tables, in memory (the store
is attached read-only and left as it is):

    python bench/bench_bucket_build.py bench/out/dsv3/reduced-r64-s1000-routes100/run.duckdb
"""
import sys
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moeviz.store import layout, rollups  # noqa: E402

if len(sys.argv) not in (2, 3) or not Path(sys.argv[1]).is_file():
    sys.exit("usage: python bench/bench_bucket_build.py PATH/run.duckdb [N]  (a compacted run's database file; N: statements listed, 12)")
src = sys.argv[1]
con = duckdb.connect()
con.execute("SET threads = 2")
con.execute(f"ATTACH '{src}' AS src (READ_ONLY)")
for t in ("step_stats", "layers", "runs", "step_rollups"):
    con.execute(f"CREATE VIEW {t} AS SELECT * FROM src.main.{t}")
for t in layout.BUCKET_TABLES:
    cols = ", ".join(f'"{f.name}" {layout.duckdb_type(f.type)}' for f in layout.DISK_SCHEMAS[t])
    con.execute(f"CREATE TABLE {t} ({cols})")
class Timed:
    def __init__(self, c): self.c = c; self.log = {}
    def execute(self, sql, *a):
        t0 = time.perf_counter(); r = self.c.execute(sql, *a)
        key = " ".join(sql.split())[:60]
        self.log[key] = self.log.get(key, 0) + time.perf_counter() - t0
        return r
tc = Timed(con)
t0 = time.perf_counter()
rollups.build_buckets(tc, None)
print(f"build_buckets {time.perf_counter() - t0:.1f} s")
for k, v in sorted(tc.log.items(), key=lambda x: -x[1])[:int(sys.argv[2]) if len(sys.argv) > 2 else 12]:
    print(f"{v:7.2f}  {k}")
import resource; print("max RSS GB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
