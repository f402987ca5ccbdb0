"""`moeviz check PATH`: routing health of a run (or a folder of runs) for training scripts and CI.

Prints `moeviz.analyses.health.health_summary` as a table (or JSON), with the store damage found while opening it
(a skipped file, an unreadable run.duckdb) as `store` findings, and exits 1 when anything is flagged, 0 when every
check is ok (2 on a usage or store error, from `moeviz.cli`).
"""

from __future__ import annotations

import argparse
import sys

from moeviz.cli.args import ArgumentError, int_list, step_range


class CheckArgumentError(ArgumentError):
    """A `moeviz check` argument is malformed, or selects nothing."""


def parse_steps(text: str | None) -> tuple[int, int] | None:
    """'A:B' (inclusive), 'A:' or ':B' -> (first, last); None -> every step."""
    return step_range(text, "--steps", CheckArgumentError)


def parse_int_list(text: str | None, what: str) -> tuple[int, ...] | None:
    return int_list(text, what, CheckArgumentError)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check",
        help="flag collapsed/dead experts, growing imbalance and capacity drops; exit 1 if anything is flagged",
        description="Routing health of a run or a folder of runs. Exit status: 0 all ok, 1 something flagged, "
        "2 error.",
    )
    p.add_argument("path", help="a run folder or a folder of runs (as written by the Recorder)")
    p.add_argument("--steps", help="steps to check, A:B inclusive (A: or :B for open ends)")
    p.add_argument("--layers", help="comma-separated MoE layer indices (default: all)")
    p.add_argument("--run", action="append", dest="runs", help="run id to check (repeatable; default: all)")
    p.add_argument("--capacity-factor", type=float, default=1.25,
                   help="capacity factor for the drop check (default 1.25; 0 skips the check)")
    p.add_argument("--dead-threshold", type=float, default=0.1,
                   help="an expert is dead below this fraction of the uniform share (default 0.1)")
    p.add_argument("--collapse-share", type=float, default=0.5,
                   help="collapsed when one expert is the top choice of more than this share of tokens (0.5)")
    p.add_argument("--drop-rate", type=float, default=0.1, help="drop-rate threshold (default 0.1)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON records")
    p.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    import warnings

    import pandas as pd

    from moeviz.analyses.health import health_summary
    from moeviz.selection import Selection
    from moeviz.store import StoreWarning, open_store
    from moeviz.store.reader import UncompactedRunWarning

    sel = Selection(
        run_ids=tuple(args.runs) if args.runs else None,
        steps=parse_steps(args.steps),
        layers=parse_int_list(args.layers, "--layers"),
    )
    with warnings.catch_warnings(record=True) as caught:  # store damage is a finding too
        warnings.simplefilter("always", StoreWarning)
        con = open_store(args.path)
    damage = [str(w.message) for w in caught
              if issubclass(w.category, StoreWarning) and not issubclass(w.category, UncompactedRunWarning)]
    for w in caught:  # not a finding (nothing is wrong with the data), but worth knowing: to stderr
        if issubclass(w.category, UncompactedRunWarning):
            print(f"note: {w.message}", file=sys.stderr)
    try:
        _check_selection(con, sel, args)
        df = health_summary(
            con, sel,
            dead_threshold=args.dead_threshold,
            collapse_share=args.collapse_share,
            drop_rate_threshold=args.drop_rate,
            capacity_factor=args.capacity_factor or None,
        )
    finally:
        con.close()
    if damage:
        store_rows = pd.DataFrame([{"run_id": None, "severity": "error", "check": "store", "message": m}
                                   for m in damage], columns=df.columns)
        df = pd.concat([store_rows, df], ignore_index=True)
    if args.json:
        print(df.to_json(orient="records", indent=1))
    elif df.empty:
        print("no run in the selection")
    else:
        _print_findings(df)
        flagged = df["severity"].ne("ok")
        print(f"\n{int(flagged.sum())} finding(s) in {df['run_id'].nunique()} run(s)"
              if flagged.any() else f"\nall checks ok in {df['run_id'].nunique()} run(s)")
    return 1 if df.empty or df["severity"].ne("ok").any() else 0


def _check_selection(con, sel, args) -> None:
    """Usage errors (exit 2), not findings (exit 1): a --run the store does not hold (the runs it holds are
    listed), or --steps/--layers that select nothing recorded (the recorded range is named)."""
    from moeviz.store.catalog import layer_list, list_runs, step_range

    runs = list_runs(con)["run_id"].tolist()
    missing = [r for r in (sel.run_ids or ()) if r not in runs]
    if missing:
        raise CheckArgumentError(f"no run {', '.join(map(repr, missing))} in {args.path}; its runs: "
                                 f"{', '.join(runs) or 'none'}")
    for run_id in sel.run_ids or runs:
        span = step_range(con, run_id)
        if span is None:
            continue  # nothing recorded yet: health_summary reports that as a finding (no_data)
        if sel.steps is not None and (sel.steps[1] < span[0] or sel.steps[0] > span[1]):
            raise CheckArgumentError(f"--steps {args.steps} selects no recorded step of run {run_id!r}, which "
                                     f"recorded steps {span[0]}-{span[1]}")
        layers = layer_list(con, run_id)["layer"].astype(int).tolist()
        if sel.layers is not None and not set(sel.layers) & set(layers):
            raise CheckArgumentError(f"--layers {args.layers} selects no MoE layer of run {run_id!r}, whose layers "
                                     f"are {', '.join(map(str, layers))}")


def _print_findings(df) -> None:
    """One line per finding, worst first: severity, check, (run,) message. The message names the layer, the expert
    and the value; a table of every column was ~260 characters wide with empty <NA> cells."""
    many_runs = df["run_id"].nunique() > 1
    width = max(len(c) for c in df["check"])
    for r in df.itertuples(index=False):
        run = f"[{r.run_id}] " if many_runs else ""
        print(f"{r.severity:<5}  {r.check:<{width}}  {run}{r.message}")
