"""Time of `moeviz.agreement` on two recorded runs of the same tokens (issue 22).

The case: two runs A and B of the same sequences (512 tokens each, random token ids from a 32k vocabulary), B in
reverse order and at other step numbers; 8 MoE layers of 64 experts, top-8; B swaps the last chosen expert of 10%
of (token, layer) decisions. Both runs are written with RunWriter (a flush per 16 sequences) and compacted, as a
recording leaves them (compaction builds `token_sets`, which the queries read). Then, on one `open_store` of the
folder: matched, layer_agreement and token_disagreement, swap_matrix of one layer, summary (the first three in one
pass, as `moeviz agree` and the dashboard call it; also forced onto the routes, as for a live run), the log checks,
and the margin and prompt/generated breakdowns. Prints a Markdown table.

    python bench/bench_agreement.py [--token-layers 1000000] [--dir /tmp/moeviz-bench-agree] [--threads N]
                                    [--reuse] [--only NAME] [--skip NAME] [--memory-limit GB] [--no-spill]

--memory-limit sets DuckDB's memory_limit of the connection (default: DuckDB's, 80% of the RAM); past it the
connection spills to a private temp folder (`open_store(spill=True)`), or with --no-spill fails with DuckDB's
out-of-memory error, as every connection did before spilling was enabled. The peak RSS of the process is printed.

--token-layers is per side (tokens x layers); routes per side = that x 8.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeviz.analyses.agreement import (  # noqa: E402
    layer_agreement, margin_agreement, matched, phase_agreement, summary, swap_matrix, token_disagreement)
from moeviz.analyses.log_checks import checks  # noqa: E402
from moeviz.selection import Selection  # noqa: E402
from moeviz.store import RunWriter, open_store, sequence_key  # noqa: E402

LAYERS, EXPERTS, TOP_K, SEQ_LEN, SEQS_PER_FLUSH = 8, 64, 8, 512, 16


def write_run(path: Path, run_id: str, ids: np.ndarray, experts: np.ndarray, order: np.ndarray, step0: int) -> None:
    """ids [S, L] token ids, experts [S, L_tok, layers, k]; sequences written in `order`, 16 per step."""
    w = RunWriter(path, run_id=run_id, run_name=run_id)
    w.write_run({"model_class": "Bench", "n_layers": LAYERS, "n_experts": EXPERTS, "top_k": TOP_K})
    w.write_layers([{"layer": i, "module_name": f"l{i}", "n_experts": EXPERTS, "top_k": TOP_K} for i in range(LAYERS)])
    for f, lo in enumerate(range(0, len(order), SEQS_PER_FLUSH)):
        rows = order[lo:lo + SEQS_PER_FLUSH]
        n_seq = len(rows)
        tok = ids[rows]  # [n, L]
        e = experts[rows]  # [n, L, layers, k]
        step = step0 + f
        # routes layer-major, then sequence, position, slot
        e_l = e.transpose(2, 0, 1, 3)  # [layers, n, L, k]
        n_routes = e_l.size
        per_layer = n_seq * SEQ_LEN * TOP_K
        routes = {
            "step": np.full(n_routes, step), "seq": np.tile(np.repeat(np.arange(n_seq), SEQ_LEN * TOP_K), LAYERS),
            "pos": np.tile(np.repeat(np.arange(SEQ_LEN), TOP_K), n_seq * LAYERS),
            "token_id": np.tile(np.repeat(tok.reshape(-1), TOP_K), LAYERS),
            "layer": np.repeat(np.arange(LAYERS), per_layer), "slot": np.tile(np.arange(TOP_K), n_routes // TOP_K),
            "expert": e_l.reshape(-1), "weight": np.full(n_routes, 1.0 / TOP_K),
        }
        seqs = {"step": np.full(n_seq, step), "seq": np.arange(n_seq), "domain": np.full(n_seq, None, object),
                "tag": "train", "n_tokens": np.full(n_seq, SEQ_LEN),
                "seq_key": np.array([sequence_key(t) for t in tok], dtype=object)}
        w.write_flush({"routes": routes, "sequences": seqs})
    w.close()  # compacts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--token-layers", type=int, default=1_000_000, help="tokens x layers per side")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: one per core)")
    ap.add_argument("--reuse", action="store_true", help="query the runs already in --dir (written by an earlier "
                    "call with the same --token-layers) instead of writing them again")
    ap.add_argument("--only", default=None, help="time only the queries whose name contains this text")
    ap.add_argument("--skip", default=None, help="leave out the queries whose name contains this text")
    ap.add_argument("--memory-limit", type=float, default=None, help="DuckDB memory_limit in GB (default: DuckDB's)")
    ap.add_argument("--no-spill", action="store_true", help="open the store without a spill folder")
    args = ap.parse_args()
    n_seqs = max(1, args.token_layers // (LAYERS * SEQ_LEN))
    root = Path(args.dir or tempfile.mkdtemp(prefix="moeviz-bench-agree-"))
    reuse = args.reuse and args.dir and (root / "A").is_dir() and (root / "B").is_dir()
    if not reuse:
        shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32_000, (n_seqs, SEQ_LEN), dtype=np.int64)
    t0 = time.perf_counter()
    base = rng.integers(0, EXPERTS, (n_seqs, SEQ_LEN, LAYERS, 1), dtype=np.int16)
    experts = ((base + np.arange(TOP_K + 1, dtype=np.int16)) % EXPERTS).astype(np.int16)  # k+1 distinct experts
    a = experts[..., :TOP_K]
    b = a.copy()
    swap = rng.random(a.shape[:3]) < 0.10
    b[..., TOP_K - 1][swap] = experts[..., TOP_K][swap]  # the (k+1)-th expert replaces the last chosen one
    if not reuse:
        write_run(root / "A", "A", ids, a, np.arange(n_seqs), 0)
        write_run(root / "B", "B", ids, b, np.arange(n_seqs)[::-1], 1000)
    built = time.perf_counter() - t0
    limit = None if args.memory_limit is None else int(args.memory_limit * (1 << 30))
    con = open_store(root, threads=args.threads, memory_limit=limit, spill=not args.no_spill)
    sa, sb = Selection(run_ids=("A",)), Selection(run_ids=("B",))
    rows = []
    for name, fn in (("matched", lambda: matched(con, sa, sb)), ("layer_agreement", lambda: layer_agreement(con, sa, sb)),
                     ("token_disagreement", lambda: token_disagreement(con, sa, sb)),
                     ("swap_matrix (one layer)", lambda: swap_matrix(con, sa, sb, 0)),
                     ("summary (the three in one pass: `moeviz agree`, the dashboard)", lambda: summary(con, sa, sb)),
                     ("summary from the routes (`source='routes'`: a live run)",
                      lambda: summary(con, sa, sb, source="routes")),
                     ("log checks (both sides, and the ±1 shift on one layer)", lambda: checks(con, sa, sb)),
                     ("margin_agreement", lambda: margin_agreement(con, sa, sb)),
                     ("phase_agreement", lambda: phase_agreement(con, sa, sb))):
        if (args.only and args.only not in name) or (args.skip and args.skip in name):
            continue
        t = time.perf_counter()
        out = fn()
        cold = time.perf_counter() - t
        t = time.perf_counter()
        fn()
        rows.append((name, cold, time.perf_counter() - t, out))
    lay = summary(con, sa, sb)["layers"] if args.only or args.skip else rows[1][3]
    routes = n_seqs * SEQ_LEN * LAYERS * TOP_K
    how = "reused the runs of --dir" if reuse else f"written and compacted in {built:.1f} s"
    print(f"{n_seqs * SEQ_LEN * LAYERS:,} token-layers ({routes:,} routes) per side, {LAYERS} layers x {EXPERTS} "
          f"experts, top-{TOP_K}; {how}; DuckDB threads: {args.threads or 'default'}, memory_limit: "
          f"{args.memory_limit or 'default'} GB, spill: {not args.no_spill}")
    print(f"set_agreement per layer (expected ~0.90): {', '.join(f'{v:.3f}' for v in lay['set_agreement'])}; "
          f"matched {int(lay['tokens'].iloc[0]):,} tokens")
    print("\n| query | first call (s) | second call (s) |\n|---|---|---|")
    for name, cold, warm, _ in rows:
        print(f"| {name} | {cold:.2f} | {warm:.2f} |")
    con.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux
    print(f"\npeak RSS of this process: {peak:.2f} GB")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
