"""The SQL page's answer time for ordinary queries, before and after the sandbox (issue 14).

before: what run_sql did until issue 14: the query on the dashboard's one shared, already open store connection,
        in a thread, `con.sql(q).limit(max_rows + 1).df()`.
after:  moeviz.store.sql.run_sql through a warm SqlSandbox (a spare worker already started): a worker process
        opens the store afresh (open_store), runs the query, sends the DataFrame back, closes the connection.
cold:   the first query of a new SqlSandbox (the worker's interpreter starts: what a fresh server pays once).

Prints a Markdown table of median and 90th-percentile times per store and query.

    python bench/bench_sql.py --store bench/out/store2m [--store bench/out/store300k] [--repeat 20]

--page: the whole page path instead, in Streamlit's AppTest: type a query in the SQL page's box and time the
rerun until the result table is there (the app's script, the query, the table). It needs only the app, so run it
with this script copied into an older checkout to time the page before the sandbox.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeviz.store import open_store  # noqa: E402
from moeviz.store.sql import EXAMPLE_QUERIES  # noqa: E402

QUERIES = {"Runs (the page's default)": EXAMPLE_QUERIES["Runs"],
           "Load per layer and expert": EXAMPLE_QUERIES["Load per layer and expert"],
           "count(*) FROM routes": "SELECT count(*) AS n FROM routes"}


def before(con, sql: str, max_rows: int = 1000):
    """The pre-sandbox run_sql, as it was: a thread on the shared connection (its time-limit join left out)."""
    box = {}

    def work():
        box["frame"] = con.sql(sql).limit(max_rows + 1).df()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return box["frame"]


def timed(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def page(stores: list[str], repeat: int) -> None:
    """Median / p90 of the SQL page's rerun after the query text changes (two texts alternate, so each rerun
    runs its query: the page caches nothing of users' SQL)."""
    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
    print("| store | query | page rerun (median / p90) |")
    print("|---|---|---|")
    for store in stores:
        at = AppTest.from_file(app, default_timeout=120)
        at.session_state["store_path"] = str(Path(store).resolve())
        at.switch_page("views/sql.py")
        at.run()
        for name, sql in QUERIES.items():
            texts = [sql, sql + "\n"]

            def rerun(i=[0]):
                i[0] += 1
                at.text_area(key="sql_text").set_value(texts[i[0] % 2]).run()
                assert not at.exception and not at.error and at.dataframe, [e.value for e in at.error]

            rerun()
            med, p90 = timed(rerun, repeat)
            print(f"| {Path(store).name} | {name} | {med * 1000:.0f} / {p90 * 1000:.0f} ms |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", action="append", required=True)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--page", action="store_true", help="time the SQL page's rerun in AppTest (see above)")
    args = ap.parse_args()
    if args.page:
        page(args.store, args.repeat)
        return
    from moeviz.store.sandbox import SqlSandbox
    from moeviz.store.sql import run_sql

    print("| store | query | before: shared connection (median / p90) | after: sandbox (median / p90) |")
    print("|---|---|---|---|")
    colds = []
    for store in args.store:
        t0 = time.perf_counter()
        with SqlSandbox() as sandbox:
            run_sql(sandbox, store, QUERIES["Runs (the page's default)"])
            colds.append((store, time.perf_counter() - t0))
            con = open_store(store)
            for name, sql in QUERIES.items():
                a = before(con, sql)
                b = run_sql(sandbox, store, sql).frame
                assert a.shape == b.shape, (name, a.shape, b.shape)
                old = timed(lambda: before(con, sql), args.repeat)
                new = timed(lambda: run_sql(sandbox, store, sql), args.repeat)
                print(f"| {Path(store).name} | {name} | {old[0] * 1000:.0f} / {old[1] * 1000:.0f} ms "
                      f"| {new[0] * 1000:.0f} / {new[1] * 1000:.0f} ms |")
            con.close()
    for store, cold in colds:
        print(f"\ncold (a new sandbox's first query, worker start included) on {Path(store).name}: {cold:.2f} s")


if __name__ == "__main__":
    main()
