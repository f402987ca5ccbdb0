"""`moeviz bound`: the true infimum of the Switch load-balancing loss for E experts, top-k, T tokens.

The first line of the output is the bare number (scripts can `head -1`); then the construction that reaches it.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bound",
        help="infimum of the Switch auxiliary loss (it is below 1, and below the blog's 1/2 for E >= 7)",
        description="Print the infimum of L = E * sum_i f_i P_i over all routers, then a batch that reaches it.",
    )
    p.add_argument("--experts", "-E", type=int, required=True, help="number of experts E (>= 1)")
    p.add_argument("--top-k", "-k", type=int, default=1, help="experts per token k (1 <= k <= E; default 1)")
    p.add_argument("--tokens", "-T", type=int, default=None, help="batch size T (default: any batch size)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_bound)


def _compact(values, digits=4) -> str:
    """Run-length text of a vector: '0.25 x3, 0 x5'."""
    out, prev, n = [], None, 0
    for v in list(values) + [object()]:
        if prev is not None and v == prev:
            n += 1
            continue
        if prev is not None:
            text = f"{prev:.{digits}g}" if isinstance(prev, float) else str(prev)
            out.append(text if n == 1 else f"{text} x{n}")
        prev, n = v, 1
    return ", ".join(out)


def run_bound(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from moeviz.analyses.bounds import aux_loss_infimum

    r = aux_loss_infimum(args.experts, args.top_k, args.tokens)
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    print(repr(r.value))
    reach = "attained" if r.attained else "not attained: approached as eps -> 0 (ties at the k-th place)"
    batch = "any batch size" if r.tokens is None else f"T={r.tokens}"
    print(f"infimum {r.fraction} = {r.value:.6g} for E={r.experts}, k={r.top_k}, {batch}; {reach}")
    print(f"construction ({r.family}, T={r.tokens_used} tokens): {r.description}")
    print(f"counts: {_compact([int(c) for c in r.counts])}")
    print(f"f:      {_compact([float(x) for x in np.round(r.f, 6)])}")
    print(f"P:      {_compact([float(x) for x in np.round(r.P, 6)])}")
    rows, mult = np.unique(np.round(r.weights, 6), axis=0, return_counts=True)
    print(f"weights ({r.tokens_used} x {r.experts}, eps={r.eps:g}, {len(rows)} distinct rows):")
    for row, m in list(zip(rows, mult))[:8]:
        print(f"  {m} x [{_compact([float(x) for x in row])}]")
    if len(rows) > 8:
        print(f"  ... {len(rows) - 8} more distinct rows")
    print(f"loss recomputed from these weights with their own top-k: {r.loss_of_weights:.9g}")
    return 0
