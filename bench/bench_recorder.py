"""Recorder overhead: training-step time of a real HF MoE with and without full per-token recording.

The model is a transformers `MixtralForCausalLM` (hidden 512, 8 experts, top-2) built from a config, trained
with AdamW on random tokens. Baseline and recorded blocks alternate (A B A B ...) so that drift in this noisy
machine's speed hits both alike; the figure is the ratio of median step times, measured in one run.
Recording is the default policy: every token of every step, per-token routes plus exact aggregates, a flush
(one device-to-host copy, writer thread) every 10 steps. Start-up and the final close/compaction are timed
separately, since they happen once per run, not per step.

    python bench/bench_recorder.py                       # CPU, the README figure
    python bench/bench_recorder.py --device cuda         # on a GPU machine
    python bench/bench_recorder.py --compile inductor    # the model under torch.compile (baseline compiled too)

With --compile, the Recorder attaches its hooks to the compiled model (start() resets torch.compile's caches so
that the hooks are traced, close() again to drop them): each start and close is followed by one untimed step,
the recompilation, which is reported separately as the recompile time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def build_model(args):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=args.seq_len,
        output_router_logits=False,
    )
    return MixtralForCausalLM(config).to(args.device).train()


def timed_steps(model, opt, batches, device: str, rec=None, start_step=0) -> list[float]:
    """Seconds per training step (forward, backward, optimizer, and rec.step when recording)."""
    import torch

    times = []
    for i, ids in enumerate(batches):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rec is not None:
            rec.step(start_step + i, token_ids=ids)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(args) -> None:
    import torch

    from collectors import Recorder

    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if args.compile != "none":
        model = torch.compile(model, backend=args.compile)
    gen = torch.Generator().manual_seed(0)

    def batches(n):
        return [torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen).to(args.device) for _ in range(n)]

    timed_steps(model, opt, batches(args.warmup), args.device)  # warm-up: allocator, kernels
    base, rec_times, setup, close, recompile = [], [], [], [], []

    def recompiled(rec=None) -> None:  # one step after the hooks changed, timed apart: torch.compile retraces
        if args.compile != "none":
            recompile.append(sum(timed_steps(model, opt, batches(1), args.device)))
            if rec is not None:
                rec.discard()  # its routing belongs to no step

    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            base += timed_steps(model, opt, batches(args.block), args.device)
            t0 = time.perf_counter()
            rec = Recorder(model, Path(tmp) / f"run{r}", run_name=f"bench{r}", flush_every=10,
                           flow_stats=None if args.flow_stats == "none" else args.flow_stats,
                           pair_stats=not args.no_pair_stats).start()
            setup.append(time.perf_counter() - t0)
            recompiled(rec)
            rec_times += timed_steps(model, opt, batches(args.block), args.device, rec=rec, start_step=r * args.block)
            t0 = time.perf_counter()
            rec.close()
            close.append(time.perf_counter() - t0)
            recompiled()
    tokens = args.batch * args.seq_len
    routes = tokens * args.layers * args.top_k
    b, rc = statistics.median(base), statistics.median(rec_times)
    print("| device | compile | hidden | layers | E/k | tokens/step | routes/step | step (no rec) | step (rec) "
          "| overhead | start | close | recompile |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.device} ({torch.get_num_threads()} threads) | {args.compile} | {args.hidden} | {args.layers} "
        f"| {args.experts}/{args.top_k} | {tokens} | {routes} | {b * 1e3:.1f} ms | {rc * 1e3:.1f} ms "
        f"| {100 * (rc / b - 1):+.1f}% | {statistics.median(setup) * 1e3:.0f} ms "
        f"| {statistics.median(close) * 1e3:.0f} ms "
        f"| {statistics.median(recompile) if recompile else 0:.1f} s |"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--flow-stats", choices=("adjacent", "all", "none"), default="adjacent",
                   help="Recorder(flow_stats=...): the layer-to-layer flow counts (default: the Recorder's)")
    p.add_argument("--no-pair-stats", action="store_true", help="Recorder(pair_stats=False)")
    p.add_argument("--compile", choices=("none", "aot_eager", "inductor"), default="none",
                   help="torch.compile the model with this backend (baseline and recorded alike)")
    args = p.parse_args()
    main(args)
