"""Time moeviz.importers.tokens.apply_keys(token_ids=FILE) over N one-sequence chunks of 8 tokens (a Megatron
trace of micro-batch 1), and the duplicate-sample-id error over N ids whose duplicate is last.
    python bench/bench_apply_keys.py 20000

Before the fix (line numbers rebuilt per chunk, list.count per id) 73.4 s and 10.0 s at 20,000; after 1.3 s and
0.11 s (docs/benchmarks.md, "Routing agreement")."""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moeviz.importers.source import SourceError
from moeviz.importers.tokens import Chunk, apply_keys

n = int(sys.argv[1])
L = 8
chunks = [Chunk(step=np.zeros(L, np.int64), rank=np.zeros(L, np.int32), seq=np.full(L, i, np.int32),
                pos=np.arange(L, dtype=np.int32), token_id=np.full(L, -1, np.int32), ids=np.zeros((L, 1, 2), np.int16),
                sequences=[{"step": 0, "rank": 0, "seq": i, "n_tokens": L, "pos_offset": 0}]) for i in range(n)]
d = Path(tempfile.mkdtemp())
(d / "ids.txt").write_text("".join(" ".join(str(i + p) for p in range(L)) + "\n" for i in range(n)))
t = time.perf_counter()
apply_keys(chunks, token_ids=d / "ids.txt")
print(f"apply_keys token_ids, {n} sequences in {n} chunks: {time.perf_counter() - t:.2f} s")
assert chunks[-1].token_id.tolist() == [n - 1 + p for p in range(L)]
(d / "sid.txt").write_text("".join(f"s{i}\n" for i in range(n - 1)) + f"s{n - 2}\n")
t = time.perf_counter()
try:
    apply_keys(chunks, sample_ids=d / "sid.txt")
except SourceError as e:
    print(f"duplicate sample id error, {n} ids: {time.perf_counter() - t:.2f} s ({str(e)[-60:]})")
