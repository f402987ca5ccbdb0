"""`moeviz demo`: train a small MoE on the bundled four-domain corpus, record it (with and without the Switch
auxiliary loss), print what the experts learned, and open the dashboard on the two runs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a small MoE on a real corpus (code, English, Italian, math), record it, open the dashboard",
        description="Train a small decoder-only MoE twice (with and without the Switch aux loss) on Python stdlib "
        "code, Shakespeare, Italian fortunes and arithmetic; record every step into OUT/aux and OUT/noaux; then "
        "serve the dashboard on OUT. Corpus and tokenizer are built offline once and cached.",
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 240: ~3 min on 2 CPU cores)")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts chosen per token (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default cpu)")
    p.add_argument("--no-dashboard", action="store_true", help="record only; do not start the dashboard")
    p.add_argument("--out", default="runs/demo", help="folder for the two runs (default runs/demo)")
    p.add_argument("--port", type=int, default=8501, help="dashboard port (default 8501)")
    p.add_argument("--host", default="127.0.0.1", help="dashboard address (0.0.0.0 inside a container)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and generated math (default 0)")
    p.add_argument("--cache-dir", default=None, help="corpus/tokenizer cache (default ~/.cache/moeviz or $MOEVIZ_CACHE)")
    p.add_argument("--aux-coef", type=float, default=0.01, help="Switch aux-loss weight of the 'aux' run (default 0.01)")
    p.add_argument("--capacity-factor", type=float, default=None, help="drop assignments over capacity (default: no limit)")
    p.add_argument("--noisy-gating", action="store_true", help="Shazeer-style noisy top-k gating while training")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--sequential", action="store_true", help="train the two runs one after the other (default: "
                   "side by side, one process per run, when there is a CPU core for each)")
    p.add_argument("--only", choices=("aux", "noaux"), default=None, help="train just one of the two runs")
    p.add_argument("--json", action="store_true", help="print each run's summary as a JSON line (for scripts)")
    p.set_defaults(func=_handle)


def _handle(args) -> int:
    from moeviz.demo.run import DemoConfig, DemoError, run_demo

    cfg = DemoConfig(
        n_experts=args.experts, top_k=args.top_k, device=args.device, seed=args.seed, cache_dir=args.cache_dir,
        aux_loss_coef=args.aux_coef, capacity_factor=args.capacity_factor, noisy_gating=args.noisy_gating,
        runs=(args.only,) if args.only else ("aux", "noaux"), threads=args.threads, parallel=not args.sequential,
    )
    if args.steps is not None:
        cfg.steps = args.steps
    if args.capacity_factor is not None and args.capacity_factor <= 0:
        raise DemoError(f"--capacity-factor must be positive; got {args.capacity_factor}")
    out = Path(args.out)
    t0 = time.perf_counter()
    print(f"moeviz demo: building/reusing the corpus and tokenizer, then training {len(cfg.runs)} run(s) of "
          f"{cfg.steps} steps into {out.resolve()}", file=sys.stderr)
    results = run_demo(cfg, out)
    total = time.perf_counter() - t0
    for r in results:
        print(json.dumps(r.summary()) if args.json else "\n".join(summary_lines(r.summary())))
    print(f"moeviz demo: done in {total:.0f} s; runs in {out.resolve()}", file=sys.stderr)
    if args.no_dashboard:
        print(f"moeviz demo: open the dashboard with: {dashboard_command_line(out)}", file=sys.stderr)
        return 0
    return _serve(out, args.port, args.host)


def _serve(out: Path, port: int, host: str) -> int:
    """Start the dashboard through moeviz.cli.dashboard.launch when it exists, else say how to start it."""
    try:
        from moeviz.cli.dashboard import launch
    except ImportError:
        print(f"moeviz demo: the dashboard is not installed here; start it with: "
              f"python -m streamlit run app/main.py -- {out}", file=sys.stderr)
        return 0
    shown = "localhost" if host in ("0.0.0.0", "127.0.0.1") else host
    print(f"moeviz demo: dashboard at http://{shown}:{port}  (Ctrl-C to stop)", file=sys.stderr)
    return int(launch(out, port=port, host=host, block=True) or 0)


def summary_lines(summary: dict) -> list[str]:
    """A run's summary (`DemoResult.summary()`) as a few lines a person reads, not a JSON dict."""
    def nums(xs, fmt="{:.2f}"):
        return " ".join(fmt.format(x) for x in xs)

    lines = [f"{summary.get('run')}: {summary.get('wall_s', 0):.0f} s, final training loss "
             f"{summary.get('final_loss', float('nan')):.3f}, Switch aux loss {summary.get('final_aux', float('nan')):.3f} "
             "(1 = balanced)"]
    if summary.get("eval_loss"):
        lines.append("  held-out loss: " + ", ".join(f"{d} {v:.3f}" for d, v in summary["eval_loss"].items()))
    if summary.get("imbalance_max_over_mean"):
        lines.append("  busiest expert / mean, per layer: " + nums(summary["imbalance_max_over_mean"]))
    if summary.get("nmi_expert_domain"):
        lines.append("  expert-domain NMI per layer (0 = ignore the domain, 1 = one expert each): "
                     + nums(summary["nmi_expert_domain"]))
    for key, value in summary.items():  # busiest_of_<G>_gpus: expert parallelism on the held-out batch
        if key.startswith("busiest_of_") and value:
            gpus = key.split("_")[2]
            lines.append(f"  busiest of {gpus} GPUs / mean, per layer: " + "; ".join(
                f"{name.replace('_', ' ')} {nums(v)}" for name, v in value.items()))
    top = summary.get("top_experts_by_domain") or {}
    if top:
        n_layers = max(len(v) for v in top.values())
        last = n_layers - 1
        lines.append(f"  top experts in the last layer ({last}): "
                     + "; ".join(f"{d} -> {', '.join(map(str, v[last]))}" for d, v in top.items() if len(v) > last))
    return lines


def dashboard_command_line(out: Path) -> str:
    """`moeviz dashboard OUT` as a command that runs as printed: the console script beside this interpreter (a
    venv's bin/, which is not on PATH unless the venv is active), else `python -m moeviz.cli`."""
    import shlex

    script = Path(sys.executable).with_name("moeviz")
    prog = shlex.quote(str(script)) if script.is_file() else f"{shlex.quote(sys.executable)} -m moeviz.cli"
    return f"{prog} dashboard {shlex.quote(str(out))}"
