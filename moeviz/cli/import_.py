"""`moeviz import FORMAT SOURCE --out RUN`: a routing log of SGLang, vLLM or Megatron-LM as a moeviz run.

    moeviz import sglang /tmp/sglang_dumps --out runs/sglang-serve
    moeviz import vllm responses.jsonl --out runs/vllm-eval
    moeviz import megatron /ckpt/routing_trace --out runs/megatron-train --num-experts 64

A bad source (truncated, inconsistent shapes, another format) gives exit status 2 and one line naming the file and
what was wrong; nothing is left at RUN. See `moeviz.importers` for what each format holds.
"""

from __future__ import annotations

import argparse
import sys
import time

from moeviz.cli.args import ArgumentError, int_at_least

FORMATS = ("sglang", "vllm", "megatron")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import", help="turn an SGLang, vLLM or Megatron-LM routing log into a run",
        description="Read SGLang expert-distribution dumps (a folder of .pt), a JSONL of vLLM responses with routed "
                    "experts, or a Megatron-LM routing trace (a folder of router_trace_rank*.jsonl) and write a new "
                    "run at RUN. What the source does not hold (gate weights, probabilities, slot order, token "
                    "counts) stays NULL. Exit status 2 on a bad source, with nothing left at RUN.")
    p.add_argument("format", choices=FORMATS, metavar="FORMAT", help="the engine that wrote SOURCE: "
                                                                     + ", ".join(FORMATS))
    p.add_argument("source", metavar="SOURCE", help="the dump folder or file (sglang), the JSONL (vllm), the trace folder or file (megatron)")
    p.add_argument("--out", required=True, metavar="RUN", help="the run folder to create (must not exist)")
    p.add_argument("--run-name", metavar="NAME", help="the run's name (default: the folder's name)")
    p.add_argument("--num-experts", metavar="N", help="routed experts per layer (default: from the source; Megatron and vLLM: "
                                         "the largest id + 1)")
    p.add_argument("--micro-batch-size", metavar="B", help="megatron: sequences per micro-batch, to split rows into sequences")
    p.add_argument("--sample-ids", metavar="FILE", help="megatron, sglang (per_token): one id per line for each "
                   "sequence of the import, in (step, rank, seq) order, stored as sequences.sample_id: the key "
                   "`moeviz agree` matches on (these logs have no request ids; without keys they pair only by order)")
    p.add_argument("--token-ids", metavar="FILE", help="megatron: one line per sequence, in (step, rank, seq) order, "
                   "of its token ids in position order (space- or comma-separated): stored as routes.token_id, and "
                   "hashed as sequences.seq_key")
    p.add_argument("--progress", action="store_true", help="draw a progress bar on stderr even when it is not a terminal")
    p.set_defaults(func=run_import)


class _Bar:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, label: str):
        self.label, self.last, self.shown = label, 0.0, False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last, self.shown = now, True
        share = done / total if total else 1.0
        filled = int(share * 30)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {share:6.1%}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def run_import(args: argparse.Namespace) -> int:
    from moeviz import importers

    num_experts = int_at_least(args.num_experts, "--num-experts", 1)
    mbs = int_at_least(args.micro_batch_size, "--micro-batch-size", 1)
    if mbs is not None and args.format != "megatron":
        raise ArgumentError("--micro-batch-size applies to megatron traces only")
    bar = _Bar(f"importing {args.source}") if args.progress or sys.stderr.isatty() else None
    kwargs = {"run_name": args.run_name, "num_experts": num_experts, "progress": bar}
    if mbs is not None:
        kwargs["micro_batch_size"] = mbs
    if args.sample_ids is not None:
        if args.format == "vllm":
            raise ArgumentError("--sample-ids applies to megatron and sglang: vLLM responses carry their own ids")
        kwargs["sample_ids"] = args.sample_ids
    if args.token_ids is not None:
        if args.format != "megatron":
            raise ArgumentError("--token-ids applies to megatron traces only: the other formats carry token ids")
        kwargs["token_ids"] = args.token_ids
    fn = {"sglang": importers.import_sglang, "vllm": importers.import_vllm, "megatron": importers.import_megatron}
    try:
        s = fn[args.format](args.source, args.out, **kwargs)
    finally:
        if bar:
            bar.close()
    for w in s.warnings:
        print(f"moeviz import: warning: {w}", file=sys.stderr)
    what = f"{s.routes:,} routes of {s.sequences:,} sequences" if s.routes else "expert counts only (no routes)"
    print(f"imported {s.format} ({s.files} file(s)) into {s.run_dir}: {what}, {s.steps:,} step(s), "
          f"{s.assigned:,} assignments, {len(s.layers)} MoE layers (hidden layers {_ranges(s.layers)}"
          + (f"; dense placeholders {_ranges(s.skipped_layers)} left out" if s.skipped_layers else "")
          + f"), {s.n_experts} experts" + (f", top-{s.top_k}" if s.top_k else ""))
    print(f"unknown in this source (stored NULL or absent): {', '.join(s.unknown)}")
    return 0


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)
