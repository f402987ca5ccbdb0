"""CPU time of the Recorder's token layout (`collectors.recorder._Stream`) for one generate() step: a prefill forward
and one decode forward per new token, each a `_Segment` (built at step() from shapes and the captured ids/masks).

    python bench/bench_recorder_stream.py [--batch 4] [--prompt 32] [--new-tokens 256]

Median of 15 builds after 3 warm-ups, `time.process_time()`, one torch thread, CPU tensors: on a GPU each of the
small ops is a kernel launch instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from collectors.recorder import _Segment, _Stream

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    b, p, t = args.batch, args.prompt, args.new_tokens
    gen = torch.Generator().manual_seed(0)
    segs = [_Segment(torch.randint(0, 1000, (b, p), generator=gen), torch.ones(b, p, dtype=torch.long), b, p,
                     past=0, cached=True)]
    segs += [_Segment(torch.randint(0, 1000, (b, 1), generator=gen), torch.ones(b, 1, dtype=torch.long), b, 1,
                      past=p + i, cached=True) for i in range(t)]
    dev = torch.device("cpu")

    def build():
        s = _Stream(segs, dev)
        s.on(dev)
        s.kept(dev, None)

    for _ in range(3):
        build()
    times = []
    for _ in range(15):
        t0 = time.process_time()
        build()
        times.append(time.process_time() - t0)
    print(f"_Stream of 1 prefill ({b} x {p}) + {t} decode forwards: {1e3 * statistics.median(times):.2f} ms CPU")


if __name__ == "__main__":
    main()
