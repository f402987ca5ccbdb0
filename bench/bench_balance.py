"""Cost of the per-sequence balance sums (collectors.balance.SequenceBalance) next to the per-step aggregates the
Recorder already computes (collectors.aggregates), per layer and step, on synthetic router outputs.

    python bench/bench_balance.py                                  # the demo's shapes: 16 x 128 tokens, E=8, k=2
    python bench/bench_balance.py --seqs 8 --seq-len 1024 --experts 64 --top-k 8 [--device cuda]

Both are timed on the same tensors, alternating (A B A B ...), median of the repeats; on CUDA each timing ends
with torch.cuda.synchronize().
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    import torch

    from collectors.aggregates import finite_tokens, layer_aggregates, pair_counts, router_lse
    from collectors.balance import SequenceBalance

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    n = a.seqs * a.seq_len
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, a.experts, generator=gen).to(dev)  # [N, E]
    index = logits.topk(a.top_k, -1).indices  # [N, k]
    keep = torch.ones(n, dtype=torch.bool, device=dev)  # [N]
    seq = (torch.arange(n) // a.seq_len).to(dev)  # [N]
    pos = (torch.arange(n) % a.seq_len).to(dev)  # [N]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def aggregates():
        for _ in range(a.layers):
            lse = router_lse(logits)
            fin = finite_tokens(logits, None, lse=lse)
            layer_aggregates(logits, index, None, keep, seq, pos, finite=fin, lse=lse)
            pair_counts(index, keep, a.experts)

    lse_step = router_lse(logits)  # step() hands the layer's logsumexp, which the aggregates take too

    def balance():
        sb = SequenceBalance()
        for _ in range(a.layers):
            sb.layer(0, logits, index, keep, seq, a.seqs, lse_step)

    times = {"aggregates": [], "balance": []}
    for fn in (aggregates, balance):
        fn()
    for _ in range(a.repeats):
        for name, fn in (("aggregates", aggregates), ("balance", balance)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    agg, bal = (statistics.median(times[k]) * 1e3 for k in ("aggregates", "balance"))
    print(f"{a.seqs} x {a.seq_len} tokens, E={a.experts}, k={a.top_k}, {a.layers} layers, {a.device}, "
          f"{a.threads} thread(s): aggregates {agg:.2f} ms, balance sums {bal:.2f} ms per step "
          f"({bal / agg:.2f}x the aggregates)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
