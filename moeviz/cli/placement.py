"""`moeviz placement PATH --gpus G`: what expert parallelism over G GPUs would make of a recorded run.

Per run and layer: the busiest GPU over the mean GPU (max/mean, 1 = an even spread) under the contiguous,
round-robin and balanced placements (and balanced with R redundant replicas), and the share of token copies that
stays on the GPU it starts on. See `moeviz.analyses.placement` for the definitions.

    moeviz placement runs/exp1 --gpus 8 --redundant 2 --fit 0:99 --eval 100:
    moeviz placement runs/exp1 --gpus 8 --hidden-size 4096      # + the bytes that cross GPUs per placement
"""

from __future__ import annotations

import argparse

from moeviz.cli.args import ArgumentError, int_at_least, int_list, step_range


class PlacementArgumentError(ArgumentError):
    """A `moeviz placement` argument is malformed."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "placement",
        help="busiest GPU and local traffic of expert-parallel placements over G GPUs",
        description="Per layer: max/mean GPU load (1 = even) of the contiguous (expert e on GPU floor(e*G/E)), "
        "round-robin (e mod G) and balanced placements, and the share of token copies that stays on its GPU. "
        "Exit status 2 on bad input.",
    )
    p.add_argument("path", help="a run folder or a folder of runs")
    p.add_argument("--gpus", required=True, help="expert-parallel GPUs G")
    p.add_argument("--redundant", default="0", help="extra expert replicas for the balanced placement (default 0)")
    p.add_argument("--nodes", default="1", help="nodes the GPUs sit in (G/N per node; default 1)")
    p.add_argument("--fit", help="steps A:B the balanced placement is computed from (default: --eval's steps)")
    p.add_argument("--eval", dest="eval_steps", help="steps C:D every placement is evaluated on (default: all)")
    p.add_argument("--source", choices=("sequence", "rank"), default="sequence",
                   help="where tokens start: sequence seq on GPU seq mod G (default), or the recording rank mod G")
    p.add_argument("--hidden-size", help="hidden size H of a token: adds the bytes each placement sends between GPUs "
                   "(token copies whose expert is on another GPU x H x --bytes-per-value, one way, dispatch only)")
    p.add_argument("--bytes-per-value", default="2", help="bytes per activation value (default 2: bf16)")
    p.add_argument("--layers", help="comma-separated MoE layers (default: all)")
    p.add_argument("--run", action="append", dest="runs", help="run id (repeatable; default: all)")
    p.set_defaults(func=run_placement)


def run_placement(args: argparse.Namespace) -> int:
    import pandas as pd

    from moeviz.analyses.placement import placement_summary
    from moeviz.selection import Selection
    from moeviz.store import open_store

    gpus = int_at_least(args.gpus, "--gpus", 1, PlacementArgumentError)
    redundant = int_at_least(args.redundant, "--redundant", 0, PlacementArgumentError)
    nodes = int_at_least(args.nodes, "--nodes", 1, PlacementArgumentError)
    fit = step_range(args.fit, "--fit", PlacementArgumentError)
    evaluate = step_range(args.eval_steps, "--eval", PlacementArgumentError)
    hidden = int_at_least(args.hidden_size, "--hidden-size", 1, PlacementArgumentError)
    per_value = int_at_least(args.bytes_per_value, "--bytes-per-value", 1, PlacementArgumentError)
    layers = int_list(args.layers or None, "--layers", PlacementArgumentError)
    sel = Selection(run_ids=tuple(args.runs) if args.runs else None, layers=layers, steps=evaluate)
    con = open_store(args.path)
    try:
        df = placement_summary(con, sel, gpus, redundant=redundant, nodes=nodes,
                               fit_steps=fit if fit is not None else evaluate, source=args.source,
                               hidden_size=hidden, bytes_per_value=per_value)
    finally:
        con.close()
    if df.empty:
        print("no run in the selection")
        return 0
    label = df["placement"].where(df["redundant"] == 0, df["placement"] + "+" + df["redundant"].astype(str))
    df = df.assign(placement=label)
    order = list(dict.fromkeys(label))
    load = df.pivot(index=["run_id", "layer"], columns="placement", values="max_over_mean")[order]
    local = df.pivot(index=["run_id", "layer"], columns="placement", values="local_share")[order]
    local.columns = [f"local:{c}" for c in local.columns]
    parts = [load, local]
    if hidden is not None:
        remote = df.pivot(index=["run_id", "layer"], columns="placement", values="remote_bytes")[order]
        remote.columns = [f"sent:{c}" for c in remote.columns]
        parts.append(remote.map(_bytes_text))
    table = pd.concat(parts, axis=1).reset_index()
    steps = "all steps" if evaluate is None else f"steps {args.eval_steps}"
    fitted = f"fitted on steps {args.fit}" if args.fit else "fitted on the same steps"
    print(f"max/mean GPU load over {gpus} GPUs ({nodes} node(s)), {steps}; balanced {fitted}. "
          f"local: share of token copies that stay on their GPU (source: {args.source}).")
    if hidden is not None:
        total = df.groupby(["run_id", "layer"])["bytes"].first().sum()
        print(f"sent: bytes of token copies dispatched to another GPU (hidden size {hidden} x {per_value} bytes, "
              f"one way, the combine sends as much back); every copy of the selection: {_bytes_text(total)}.")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def _bytes_text(n: float) -> str:
    """A byte count for a table cell: 0 B, 512 B, 12.3 KiB, 4.56 GiB."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"
