"""`moeviz sql`, `moeviz info`, `moeviz compact`, `moeviz schema`: the store from the command line.

    moeviz sql runs/exp1 "SELECT layer, expert, count(*) AS n FROM routes GROUP BY ALL ORDER BY n DESC"
    moeviz info runs/            # runs, status, segments, rows, bytes per route
    moeviz compact runs/exp1     # fold finished runs' segments into run.duckdb (+ Parquet files for routes)
    moeviz schema --markdown     # the public SQL schema (the README's schema section)
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("sql", help="run one read-only SELECT on a run or a folder of runs",
                              description="Run one read-only SELECT over the store's tables (see `moeviz schema`).")
    p.add_argument("path", help="a run folder, or a folder of run folders")
    p.add_argument("query", help='e.g. "SELECT layer, expert, count(*) FROM routes GROUP BY ALL"')
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--max-rows", type=int, default=1000, metavar="N",
                   help="print at most N rows and say when there were more (default 1000; 0 = no limit)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="stop the query after this many seconds (default 60)")
    p.add_argument("--memory", default="4GiB", metavar="SIZE",
                   help="stop the query when it needs more memory than this (default 4GiB; e.g. 512MB, 16GB)")
    p.set_defaults(func=cmd_sql)

    p = subparsers.add_parser("info", help="what a store holds: runs, status, segments, rows, bytes per route")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the full store_info() dictionary as JSON")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("compact", help="fold a run's Parquet segments into its compacted files",
                              description="Fold the segments of a run (or of every run in a folder): small tables "
                                          "into run.duckdb, routes into large zstd Parquet files it names "
                                          "(or into run.duckdb with --routes-format duckdb). Refuses runs whose "
                                          "writer is still alive.")
    p.add_argument("path")
    p.add_argument("--routes-format", choices=("parquet", "duckdb"), default="parquet",
                   help="where compacted routes go: Parquet files (~2 bytes/route, default) or run.duckdb (~8)")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="DuckDB memory limit of the compaction (for example 8GB); past it DuckDB spills to disk. "
                        "Default: $MOEVIZ_COMPACT_MEMORY, else a quarter of this machine's (or container's) memory")
    p.set_defaults(func=cmd_compact)

    p = subparsers.add_parser("schema", help="print the public SQL schema (tables, columns, types, meanings)")
    p.add_argument("--markdown", action="store_true", help="Markdown tables, as in the README")
    p.set_defaults(func=cmd_schema)


def cmd_sql(args) -> int:
    """The query runs in a worker process (moeviz.store.sandbox), as on the dashboard's SQL page: killed at
    --timeout, capped at --memory; Ctrl-C kills it at once (exit 130, one line)."""
    from moeviz.errors import StoreError
    from moeviz.store.sandbox import SqlLimits, SqlSandbox, parse_size
    from moeviz.store.sql import run_sql

    if args.max_rows < 0:
        raise StoreError("--max-rows must be >= 0 (0 = no limit)")
    try:
        memory = parse_size(args.memory)
    except ValueError as e:
        raise StoreError(f"--memory: {e}") from None
    limits = SqlLimits(max_rows=args.max_rows or None, timeout_s=args.timeout, memory_bytes=memory)
    try:
        with SqlSandbox(limits, max_workers=1, spare=0) as sandbox:
            result = run_sql(sandbox, args.path, args.query, as_rows=True)
    except KeyboardInterrupt:
        print("moeviz sql: interrupted; the query was stopped", file=sys.stderr)
        return 130
    for w in result.warnings:
        print(f"moeviz sql: warning: {w}", file=sys.stderr)
    columns, rows, truncated = result.columns, result.rows, result.truncated
    out = sys.stdout
    if args.format == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(columns)
        w.writerows([[_plain(v) for v in r] for r in rows])
    elif args.format == "json":
        json.dump([{c: _plain(v) for c, v in zip(columns, r)} for r in rows], out, indent=1, default=str)
        out.write("\n")
    else:
        out.write(format_table(columns, rows) + "\n")
    if truncated:
        print(f"(showing the first {args.max_rows} rows; there are more: raise --max-rows, or add LIMIT/WHERE)",
              file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from moeviz.store.reader import store_info

    info = store_info(args.path)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    for run in info["runs"]:
        print(f"run {run['run_id']}  [{run['status']}]  {run['run_dir']}")
        print(f"  world_size {run['world_size']}, schema v{run['schema_version']}, started {run['started_at']}, "
              f"ended {run['ended_at']}" + (f", error: {run['error']}" if run["error"] else ""))
        rows = [[t, v["segments"], v["segment_rows"], v["segment_bytes"], v["compacted_rows"]]
                for t, v in run["tables"].items()]
        table = format_table(["table", "segments", "segment rows", "segment bytes", "compacted rows"], rows)
        print("  " + table.replace("\n", "\n  "))
        print(f"  routes {run['routes']:,}; compacted: {run['routes_files']} routes file(s) of "
              f"{run['routes_files_bytes']:,} bytes + token_sets file(s) of {run['token_sets_files_bytes']:,} bytes "
              f"+ run.duckdb of {run['run_duckdb_bytes']:,} bytes (the other tables); bytes/route: segments {_fmt(run['bytes_per_route_segments'])}, compacted routes files "
              f"{_fmt(run['bytes_per_route_compacted'])}, every file of the run {_fmt(run['bytes_per_route'])}")
        if run["damaged"]:
            print(f"  DAMAGED: {run['damaged']}")
        if run["recording_errors"]:
            print(f"  the recording lost data {run['recording_errors']} time(s) (runs.recording_error says what)")
        if run["skipped_files"]:
            print(f"  skipped {len(run['skipped_files'])} damaged Parquet file(s): {run['skipped_files'][:3]}")
        if run["uncommitted_files"]:
            print(f"  {len(run['uncommitted_files'])} segment file(s) no commit names (a flush in progress, or "
                  f"left by a crash: `moeviz compact` removes those)")
    return 0


def cmd_compact(args) -> int:
    import os

    from moeviz.store import compact, memory

    if args.memory_limit is not None:
        memory.parse_bytes(args.memory_limit)  # a bad size: one line before anything is read
        os.environ[memory.ENV] = args.memory_limit
    for r in compact(args.path, routes_format=args.routes_format)["runs"]:
        if "skipped" in r:
            print(f"run {r['run_id']}: skipped: {r['skipped']}")
            continue
        if args.routes_format == "duckdb" and not r["segments_folded"] and r["routes_files"]:
            print(f"run {r['run_id']}: nothing new to fold; its routes were compacted earlier into "
                  f"{r['routes_files']} Parquet file(s), which stay there: --routes-format applies to the segments "
                  f"a compaction folds, not to routes already compacted")
            continue
        print(f"run {r['run_id']}: folded {r['segments_folded']} segment(s) ({r['segment_bytes_folded']:,} bytes), "
              f"{r['compacted_bytes']:,} bytes compacted ({r['routes_files']} routes file(s) + run.duckdb), "
              f"{r['rows'].get('routes', 0):,} routes, "
              f"{_fmt(r['bytes_per_route'])} bytes/route"
              + (f"; removed {r['leftovers_removed']} file(s) no commit named" if r.get("leftovers_removed") else "")
              + (f"; skipped {len(r['skipped_files'])} damaged file(s): {r['skipped_files'][:3]}"
                 if r.get("skipped_files") else ""))
    return 0


def cmd_schema(args) -> int:
    from moeviz.store.schema import TABLES, schema_markdown

    if args.markdown:
        print(schema_markdown())
        return 0
    for t in TABLES.values():
        print(f"{t.name}: {t.doc}")
        print("  " + format_table(["column", "type", "meaning"], [[c.name, c.sql_type, c.doc] for c in t.columns])
              .replace("\n", "\n  "))
        print()
    return 0


def _plain(v):
    """A JSON/CSV-friendly value (timestamps as ISO text, decimals as float)."""
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return float(v)
    return v


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(text: str) -> str:
    """A cell on one line: a newline, tab or other control character (a whitespace token's text) as an escape,
    so that it neither splits the row nor hides."""
    if text.isprintable():
        return text
    return "".join(_ESCAPES.get(ch) or (ch if ch.isprintable() else f"\\x{ord(ch):02x}") for ch in text)


def format_table(columns: list[str], rows: list) -> str:
    """A plain aligned text table (numbers right-aligned, NULL shown as NULL)."""
    def cell(v) -> str:
        if v is None:
            return "NULL"
        if isinstance(v, float):
            return f"{v:.6g}"
        return _visible(str(_plain(v)))

    text = [[cell(v) for v in r] for r in rows]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) and rows != [] for i in range(len(columns))]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in text]
    if not rows:
        out.append("(no rows)")
    return "\n".join(out)

