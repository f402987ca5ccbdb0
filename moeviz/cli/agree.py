"""`moeviz agree RUN_A RUN_B`: how often two executions of the same tokens route them to the same experts.

RUN_A and RUN_B are run folders (two folders are opened side by side; a folder holding several runs is refused:
name the runs with --store), or, with `--store PATH`, run ids of the store at PATH. The same run twice with
`--steps-a` / `--steps-b` compares two step windows of one run (two checkpoints of a fixed probe batch).

    moeviz agree runs/rollout runs/trainer
    moeviz agree --store runs/ bf16 fp32 --layers 0,1 --format csv
    moeviz agree runs/exp runs/exp --steps-a 100:100 --steps-b 249:249
    moeviz agree runs/trainer runs/megatron-trace --match-by order

`--match-by` says which sequences are the same: auto (sample_id where both have one, else seq_key), sample_id,
seq_key, or order (the i-th sequence of each side in (step, rank, seq) order: for logs without token ids or
request ids, e.g. a Megatron trace; the headline then says so, since a wrong order gives wrong agreement).

Prints the matched tokens, the share of (token, layer) decisions whose expert sets differ, the share of tokens
with at least one differing layer, then `moeviz.agreement.layer_agreement` per layer; `--format csv` prints the
table alone. Before the comparison is trusted, each side's log is checked (`moeviz.analyses.log_checks`: sentinel
ids, ids out of range, duplicate ids, dense layers logged as zeros, positions off by one) and what fails or
warns is printed (to stderr with --format csv); --strict exits 1 when a check fails, or when matched sequences
differ in length where token ids do not vouch for the pairing (`agreement.length_warning`: by order, one extra
sequence shifts every later pair). With --format csv, how the tokens were paired goes to stderr when by order or
when some tokens' ids were not compared. Exit status 2, with one
message saying what keys each side has, when no token matches.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moeviz.cli.args import ArgumentError, int_list, step_range

# moeviz.analyses.agreement.MATCH_BY, without importing pandas to build the parser (tests/test_agreement.py checks
# that the two are equal)
MATCH_BY = ("auto", "sample_id", "seq_key", "order")


class AgreeArgumentError(ArgumentError):
    """A `moeviz agree` argument is malformed or names no run."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "agree",
        help="routing agreement of two executions of the same tokens (two runs, or two step windows of one)",
        description="Match the tokens of two runs by sequence key (sample_id where both have one, else the hash "
        "of the token ids) and position, whatever their step, rank or batch row, and compare their top-k expert "
        "sets per layer. Exit status 2 when nothing matches or on bad input.",
    )
    p.add_argument("run_a", metavar="RUN_A", help="a run folder (or, with --store, a run id)")
    p.add_argument("run_b", metavar="RUN_B", help="a run folder (or, with --store, a run id); may equal RUN_A")
    p.add_argument("--store", help="a folder of runs holding both RUN_A and RUN_B, given as run ids")
    p.add_argument("--steps-a", help="steps A:B of RUN_A (inclusive; A: or :B open; default all)")
    p.add_argument("--steps-b", help="steps C:D of RUN_B (default all)")
    p.add_argument("--layers", help="comma-separated MoE layers (default: all)")
    p.add_argument("--format", choices=("table", "csv"), default="table",
                   help="table (headline numbers, then the per-layer table; default) or csv (the table alone)")
    p.add_argument("--no-checks", action="store_true",
                   help="skip the log checks (sentinel ids, ids out of range, duplicate ids, dense layers logged as "
                   "zeros, positions off by one) that run before the comparison")
    p.add_argument("--breakdowns", action="store_true",
                   help="also print agreement for prompt against generated tokens and by margin bucket (table format)")
    p.add_argument("--match-by", choices=MATCH_BY, default="auto",
                   help="which sequences are the same: auto (sample_id where both have one, else seq_key, the hash "
                   "of the token ids; default), sample_id, seq_key, or order (the i-th sequence of a with the i-th "
                   "of b in (step, rank, seq) order, token ids compared where both have them: for logs without "
                   "keys, such as a Megatron trace)")
    p.add_argument("--memory-limit", metavar="GB", help="DuckDB's memory limit for the comparison, in GB (default: "
                   "DuckDB's, 80%% of the RAM); past it intermediate results spill to a private temp folder. Two live "
                   "(uncompacted) runs of 80 M routes each need several GB: give a limit on a shared machine")
    p.add_argument("--strict", action="store_true",
                   help="exit status 1 (after printing) when a log check fails, or when matched sequences differ "
                   "in length and token ids do not vouch for the pairing (by order: a shifted order)")
    p.set_defaults(func=run_agree)


def _run_of_folder(path: str) -> tuple[Path, str]:
    from moeviz.store import layout

    dirs = layout.find_runs(path)
    if len(dirs) != 1:
        raise AgreeArgumentError(
            f"{path} holds {len(dirs)} runs; give the folder with --store and the two run ids: "
            f"moeviz agree --store {path} RUN_A RUN_B")
    return dirs[0], layout.run_id_of(dirs[0])


def _memory_limit(text: str | None) -> int | None:
    """--memory-limit GB as bytes (None: DuckDB's default)."""
    if text is None:
        return None
    try:
        gb = float(text)
    except ValueError:
        gb = float("nan")
    if not gb >= 0.1:
        raise AgreeArgumentError(f"--memory-limit must be a number of GB, at least 0.1; got {text!r}")
    return int(gb * (1 << 30))


def run_agree(args: argparse.Namespace) -> int:
    import pandas as pd

    from moeviz.analyses.agreement import (headline, length_warning, margin_agreement, phase_agreement,
                                           matched_by_line, sides_without_token_ids, summary)
    from moeviz.analyses.log_checks import checks
    from moeviz.selection import Selection
    from moeviz.store import open_store

    steps_a = step_range(args.steps_a, "--steps-a", AgreeArgumentError)
    steps_b = step_range(args.steps_b, "--steps-b", AgreeArgumentError)
    layers = int_list(args.layers or None, "--layers", AgreeArgumentError)
    limit = _memory_limit(args.memory_limit)
    if args.store:
        con = open_store(args.store, memory_limit=limit, spill=True)  # no user SQL runs on it
        id_a, id_b = args.run_a, args.run_b
        known = {r[0] for r in con.execute("SELECT run_id FROM runs").fetchall()}
        for rid in (id_a, id_b):
            if rid not in known:
                con.close()
                raise AgreeArgumentError(f"{args.store} holds no run {rid!r}; its runs: {', '.join(sorted(known))}")
    else:
        (dir_a, id_a), (dir_b, id_b) = _run_of_folder(args.run_a), _run_of_folder(args.run_b)
        con = open_store([dir_a] if dir_a == dir_b else [dir_a, dir_b], memory_limit=limit, spill=True)
    a = Selection(run_ids=(id_a,), steps=steps_a, layers=layers)
    b = Selection(run_ids=(id_b,), steps=steps_b, layers=layers)
    import sys

    failed = False
    try:  # raises AgreementError (exit 2, one message) when nothing matches
        got = summary(con, a, b, match_by=args.match_by)  # one pass over the matched tokens for the three tables
        table, counts, hist = got["layers"], got["matched"], got["tokens"]
        c = counts.iloc[0]
        blind_sides = sides_without_token_ids(con, a, b) if int(c["ids_compared"]) < int(c["matched"]) else []
        warning = length_warning(c)
        phase = margins = None
        if args.breakdowns and args.format == "table":
            phase = phase_agreement(con, a, b, match_by=args.match_by)
            margins = margin_agreement(con, a, b, match_by=args.match_by)
        if not args.no_checks:  # after the comparison: a selection that matches nothing exits 2 first
            found = checks(con, a, b, match_by=args.match_by)
            bad = found[found["status"] != "ok"]
            failed = bool((found["status"] == "fail").any())
            out = sys.stderr if args.format == "csv" else sys.stdout
            if len(bad):
                for r in bad.itertuples():
                    print(f"log check {r.status}: {r.side} {r.check}: {r.detail}", file=out)
            elif args.format == "table":
                print("log checks: ok (no sentinel, out-of-range or duplicate ids, no all-zero rows, positions "
                      "aligned)")
    finally:
        con.close()
    failed = failed or warning is not None
    if args.format == "csv":  # the table alone on stdout; how the tokens were paired, where unsure, on stderr
        if args.match_by == "order" or int(c["ids_compared"]) < int(c["matched"]):
            print(matched_by_line(c, blind_sides), file=sys.stderr)
        if warning:
            print(warning, file=sys.stderr)
        print(table.to_csv(index=False), end="")
        return 1 if failed and args.strict else 0
    h = headline(table, hist, counts)

    def side(name: str, rid: str, steps) -> str:
        return f"{name} = {rid}" + ("" if steps is None else f" steps {args.steps_a if name == 'a' else args.steps_b}")

    print(f"{side('a', id_a, steps_a)}; {side('b', id_b, steps_b)}")
    print(f"matched tokens: {h['matched']} (a has {h['tokens_a']}: {int(c['unmatched_a'])} unmatched, "
          f"{int(c['repeated_a'])} of them a repeated sequence; b has {h['tokens_b']}: {int(c['unmatched_b'])} "
          f"unmatched, {int(c['repeated_b'])} repeated)")
    print(matched_by_line(c, blind_sides))
    if warning:
        print(warning)
    print(f"(token, layer) decisions with a different expert set: {100 * h['decisions_differing']:.2f}%")
    print(f"tokens with at least one differing layer: {100 * h['tokens_differing']:.2f}% "
          f"(of {len(table)} layer(s))")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if phase is not None:
        print("\nprompt against generated tokens (sequences.prompt_tokens; 'unknown' where neither side has it):")
        print(phase.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        side = margins["margin_side"].iloc[0] if len(margins) else None
        if side is None or pd.isna(side):
            print("\nby margin: neither side has margins (routes.margin is NULL: engine logs carry none)")
        else:
            print(f"\nby margin ({side}'s routes.margin: p(last chosen) - p(best unchosen)):")
            print(margins.drop(columns="margin_side").to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 1 if failed and args.strict else 0
