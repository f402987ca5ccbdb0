"""What routes.margin costs the Recorder per layer and step, against the router's own matmul (CPU, one process).

Times, for T tokens, E experts, top-k: the margin of softmax routers as step() takes it (`kept_margin`: softmax
of the kept tokens' logits, then the weakest chosen minus the best unchosen), the margin of sigmoid(+bias)
routers as the hook takes it (`routing_margin` of the router's scores), `layer_aggregates` (what step() already
computed per layer before margins existed) and the router matmul at hidden sizes 512 / 1024 / 2048. Median of 20
runs after 3 warm-ups, in milliseconds of CPU time of this process (one torch thread by default), so that other
processes on a shared machine slow it less than they slow wall time.

    python bench/bench_margin.py [--tokens 4096] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    import torch

    from collectors.aggregates import kept_margin, kept_token_slots, layer_aggregates, routing_margin

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.tokens
    print("| tokens | E | k | `kept_margin` (softmax, step()) | `routing_margin` (scores, hook) | "
          "`layer_aggregates` | router matmul (hidden 512/1024/2048) |")
    print("|---|---|---|---|---|---|---|")
    for e, k in ((8, 2), (64, 8), (256, 8)):
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(n, e, generator=gen)
        index = logits.topk(k, -1).indices
        mask = torch.ones(n, dtype=torch.bool)
        sel, _ = kept_token_slots(mask, None)
        scores = logits.sigmoid() + 0.01
        lse = torch.logsumexp(logits, -1)  # step() has it already (router_lse)
        t_kept = median_ms(lambda: kept_margin(logits, index, sel, lse=lse))
        t_hook = median_ms(lambda: routing_margin(scores, index))
        t_agg = median_ms(lambda: layer_aggregates(logits, index, None, mask))
        mm = []
        for h in (512, 1024, 2048):
            x, w = torch.randn(n, h, generator=gen), torch.randn(e, h, generator=gen)
            mm.append(median_ms(lambda: x @ w.T))
        print(f"| {n} | {e} | {k} | {t_kept:.2f} | {t_hook:.2f} | {t_agg:.2f} | "
              + " / ".join(f"{m:.2f}" for m in mm) + " |")


if __name__ == "__main__":
    main()
