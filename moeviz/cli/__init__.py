"""The `moeviz` command: one subcommand (or group) per module of this package, each registering its own parser.

A subcommand module must stay light at import time (no torch, no streamlit): it imports heavy dependencies
inside its handler, so that `moeviz sql` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys

from moeviz.cli import agree, bound, check, collect, dashboard, demo, export, import_, placement, store
from moeviz.errors import MoevizError

# each holds `register(subparsers)`, which adds parsers whose `func(args) -> int` runs the command
COMMAND_MODULES = (
    store,  # sql, info, compact, schema
    export,  # export
    import_,  # import
    collect,  # collect
    check,  # check
    placement,  # placement
    agree,  # agree
    bound,  # bound
    demo,  # demo
    dashboard,  # dashboard
)


def build_parser() -> argparse.ArgumentParser:
    from moeviz import __version__

    parser = argparse.ArgumentParser(prog="moeviz", description="See where the tokens of a Mixture-of-Experts model go.")
    parser.add_argument("--version", action="version", version=f"moeviz {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `moeviz sql ... | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MoevizError as e:
        print(f"moeviz {args.command}: error: {e}", file=sys.stderr)
        return 2
