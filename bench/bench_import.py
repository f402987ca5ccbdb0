"""Import rate of `moeviz import` (issue 18): routes per second for a per-token SGLang dump and a vLLM JSONL.

The cases: a DeepSeek-like model of 24 hidden layers (layer 0 dense), 64 logical experts on 72 physical slots
(redundant experts), top-8. SGLang `per_token`: 2 ranks of forward passes of 1,024 tokens (-1 padded dense layer,
physical ids, torch.save'd). vLLM: responses of 512 tokens (400 prompt + 112 generated) in the base64 `.npy`
layout over every hidden layer (the dense one all zero), one response body per JSONL line. Sources are written
first (not timed); each import is timed end to end (read, map, write the run through RunWriter, compaction at
close, rename), and the share of it spent compacting the run at close (the store's own cost, the same as for a
recorded run's close: folding the segments and building token/position/sequence stats) is reported beside it.
Prints a Markdown table.

    python bench/bench_import.py [--sglang-routes 5e6] [--vllm-routes 1e7] [--dir /tmp/moeviz-bench-import]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moeviz.store.writer as writer_module  # noqa: E402
from moeviz.importers import import_sglang, import_vllm  # noqa: E402

COMPACTION = []  # seconds of each compaction at close


def _timed_compact(real):
    def compact(*a, **kw):
        t = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            COMPACTION.append(time.perf_counter() - t)
    return compact

HIDDEN, EXPERTS, PHYSICAL, TOP_K, PASS_TOKENS, SEQ_LEN, PROMPT = 24, 64, 72, 8, 1024, 512, 400
MOE_LAYERS = HIDDEN - 1


def write_sglang(folder: Path, routes: int, rng) -> int:
    import torch

    folder.mkdir(parents=True)
    passes = max(2, int(routes // (PASS_TOKENS * MOE_LAYERS * TOP_K)))
    mapping = np.stack([np.concatenate([rng.permutation(EXPERTS), rng.integers(0, EXPERTS, PHYSICAL - EXPERTS)])
                        for _ in range(HIDDEN)]).astype(np.int64)
    for rank in range(2):
        records = []
        for p in range(rank, passes, 2):
            topk = rng.integers(0, PHYSICAL, (HIDDEN, PASS_TOKENS, TOP_K), dtype=np.int32)  # [layers, tokens, 8]
            topk[0] = -1  # the dense layer
            records.append({"forward_pass_id": p // 2, "rank": rank, "gatherer_key": "primary",
                            "input_ids": rng.integers(0, 32000, PASS_TOKENS).tolist(),
                            "positions": np.arange(PASS_TOKENS).tolist(), "extend_seq_lens": [512, 512],
                            "forward_mode": 1, "topk_ids_of_layer": torch.from_numpy(topk), "misc_objects": []})
        torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(mapping)},
                   folder / f"expert_distribution_recorder_0.{rank}_{rank}.pt")
    return passes * PASS_TOKENS * MOE_LAYERS * TOP_K


def write_vllm(path: Path, routes: int, rng) -> int:
    rows = SEQ_LEN - 1
    responses = max(1, int(np.ceil(routes / (rows * MOE_LAYERS * TOP_K))))
    with open(path, "w") as f:
        for r in range(responses):
            ids = rng.integers(0, EXPERTS, (rows, HIDDEN, TOP_K), dtype=np.uint8)  # [tokens - 1, layers, k]
            ids[:, 0, :] = 0  # the dense layer's placeholder rows
            buf = io.BytesIO()
            np.save(buf, ids)
            tokens = rng.integers(0, 32000, SEQ_LEN).tolist()
            f.write(json.dumps({"id": f"cmpl-{r}", "prompt_token_ids": tokens[:PROMPT], "choices": [
                {"index": 0, "token_ids": tokens[PROMPT:], "routed_experts": base64.b64encode(buf.getvalue()).decode()}]}))
            f.write("\n")
    return responses * rows * MOE_LAYERS * TOP_K


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sglang-routes", type=float, default=5e6)
    ap.add_argument("--vllm-routes", type=float, default=1e7)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    root = Path(a.dir or tempfile.mkdtemp(prefix="moeviz-bench-import-"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    writer_module.compact = _timed_compact(writer_module.compact)
    rows = []
    try:
        n = write_sglang(root / "sglang", a.sglang_routes, rng)
        size = sum(p.stat().st_size for p in (root / "sglang").iterdir())
        t = time.perf_counter()
        s = import_sglang(root / "sglang", root / "run-sglang")
        dt = time.perf_counter() - t
        assert s.routes == n, (s.routes, n)
        rows.append(("SGLang per_token (2 ranks, .pt)", n, size, dt, sum(COMPACTION)))
        COMPACTION.clear()
        n = write_vllm(root / "vllm.jsonl", a.vllm_routes, rng)
        size = (root / "vllm.jsonl").stat().st_size
        t = time.perf_counter()
        s = import_vllm(root / "vllm.jsonl", root / "run-vllm")
        dt = time.perf_counter() - t
        assert s.routes == n, (s.routes, n)
        rows.append(("vLLM JSONL (base64 .npy)", n, size, dt, sum(COMPACTION)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| source | routes | source size | import time | routes/s | of which compaction | routes/s before compaction |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, size, dt, comp in rows:
        print(f"| {name} | {n:,} | {size / 2**20:,.0f} MiB | {dt:.1f} s | {n / dt / 1e6:.2f} M | {comp:.1f} s | "
              f"{n / (dt - comp) / 1e6:.2f} M |")


if __name__ == "__main__":
    main()
