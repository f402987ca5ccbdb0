"""`moeviz collect`: record a saved Hugging Face MoE model reading text files (one domain per file)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "collect",
        help="record a saved HF MoE model reading text files",
        description=(
            "Load a model saved with save_pretrained (and its tokenizer) from a local folder, cut each text file "
            "into sequences, run eval forwards and record the routing into a run folder. Each file is one "
            "domain: its file stem, or the --domain given for it."
        ),
    )
    p.add_argument("--hf-model", required=True, metavar="DIR", help="folder with config.json, weights and tokenizer")
    p.add_argument("--text", required=True, nargs="+", metavar="FILE", help="text files, one domain each")
    p.add_argument("--out", required=True, metavar="PATH", help="run folder to write")
    p.add_argument("--domain", action="append", metavar="NAME", help="domain name, once per --text file, in order")
    p.add_argument("--seq-len", type=int, default=128, metavar="N", help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences per forward (default 8)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="read at most N tokens of each file")
    p.add_argument(
        "--max-tokens-per-step", type=int, default=None, metavar="N",
        help="keep per-token routes for at most N tokens per step (aggregates always count every token)",
    )
    p.add_argument("--run-name", default=None, metavar="X", help="human name of the run")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run the model (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_collect)


def run_collect(args: argparse.Namespace) -> int:
    from collectors.collect import collect

    summary = collect(
        args.hf_model,
        args.text,
        args.out,
        domains=args.domain,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        max_tokens_per_step=args.max_tokens_per_step,
        run_name=args.run_name,
        device=args.device,
        progress=not args.no_progress,
    )
    per_domain = ", ".join(f"{d}: {n} tokens" for d, n in summary.tokens_per_domain.items())
    print(f"recorded {summary.steps} steps, {summary.sequences} sequences ({per_domain}) into {summary.run_dir}")
    return 0
