"""`moeviz export PATH OUT`: a store as plain Parquet for Spark, Polars, pandas or pyarrow (one folder per table).

    moeviz export runs/exp1 exports/exp1      # then spark.read.parquet("exports/exp1/routes")
"""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write every table as plain Parquet that other engines read",
                              description="Write the store's tables, as moeviz's SQL shows them, into OUT/<table>/"
                                          "part-*.parquet (no partition keys, run_id a column), for Spark, Polars, "
                                          "pandas and pyarrow. OUT must be new or empty.")
    p.add_argument("path", help="a run folder, or a folder of run folders")
    p.add_argument("out", help="the folder to create")
    p.add_argument("--table", action="append", dest="tables", help="export only this table (repeatable)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from moeviz.store.export import export

    rows = export(args.path, args.out, tables=args.tables)
    for table, n in rows.items():
        print(f"{table:<16}{n:>14,} rows")
    print(f"written to {args.out}")
    return 0
