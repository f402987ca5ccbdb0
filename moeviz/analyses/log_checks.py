"""Is a routing log fit to be compared? Checks run on each side before `moeviz.agreement` is trusted.

Engine logs (vLLM's and SGLang's routed-experts capture, Megatron's routing replay trace) carry conventions that
are easy to import wrongly: padding slots written as sentinel ids (-1, or 255 in a uint8 buffer), the same
expert twice in one token's set (a padded or clamped top-k), ids past the layer's expert count, the dense
layers of a model (DeepSeek's first layers) recorded as rows of zeros, and positions shifted by one (a log
that counts from the first generated token, or that prepends BOS). Each makes agreement figures wrong without
an error, so they are counted here first.

    log_checks(con, sel)          check, status, count, total, detail: the per-side checks
    alignment(con, a, b)          shift, tokens, set_agreement: b's routes moved by -1, 0, +1 positions
    alignment_check(df)           the one row `log_checks` format that says whether a shift fits better
    checks(con, a, b)             side, check, status, count, total, detail: both sides, then the alignment

`status` is 'ok', 'warn' (some rows affected: the figures include them) or 'fail' (the log is likely read
wrongly: fix the import before trusting the agreement).
"""

from __future__ import annotations

import pandas as pd

from moeviz.analyses.load import run_query
from moeviz.selection import Selection

CHECK_COLUMNS = ["check", "status", "count", "total", "detail"]
ALIGNMENT_COLUMNS = ["shift", "tokens", "set_agreement"]
SENTINELS = (-1, 255)  # 255: a uint8 buffer's padding; only a sentinel where the layer has at most 255 experts
SHIFT_MARGIN = 0.01  # a shift fits "better" when its set agreement beats shift 0 by more than this


def _error():
    from moeviz.analyses.agreement import AgreementError

    return AgreementError


def log_checks(con, sel: Selection) -> pd.DataFrame:
    """The per-side checks of one selection's routes: check, status, count, total, detail.

    - sentinel_ids: routes whose expert is -1, or 255 in a layer of at most 255 experts (padding slots);
    - out_of_range: other routes whose expert is below 0 or at least `layers.n_experts`;
    - duplicate_ids: (token, layer) sets that hold one expert twice;
    - dense_layers: layers where every token's k > 1 experts are all expert 0 (a dense layer logged as rows of
      zeros: fail), and all-zero rows in other layers (warn).
    Reads `token_sets` where it covers the selection (compacted runs whose ids all lie in 0-63) and no id is
    past a layer's n_experts, else the routes of the selection (one pass, grouped per token and layer)."""
    from moeviz.analyses.agreement import _sets_cover

    df = _per_layer_from_sets(con, sel) if _sets_cover(con, (sel,), "auto") else None
    if df is None or df["out_of_range"].sum():  # route-level counts need the routes
        df = _per_layer_from_routes(con, sel)
    return _verdicts(df)


def _semi(sel: Selection, alias: str) -> tuple[str, list]:
    if not sel.needs_sequences:
        return "", []
    swhere, sparams = sel.with_(layers=None).where("s", per_token=True)
    return (f"SEMI JOIN (SELECT run_id, step, rank, seq FROM sequences s WHERE {swhere}) q ON q.run_id = {alias}.run_id "
            f"AND q.step = {alias}.step AND q.rank = {alias}.rank AND q.seq = {alias}.seq"), sparams


def _per_layer_from_sets(con, sel: Selection) -> pd.DataFrame:
    """Per run and layer from token_sets: rows, routes, sentinel (0: every id lies in 0-63), out_of_range (rows
    with a bit at or past n_experts), dup (fewer bits than routes), zero (k > 1 routes, all to expert 0)."""
    where, params = sel.with_(domains=None, tags=None).where("x")
    semi, sparams = _semi(sel, "x")
    return run_query(con, f"""
        SELECT x.run_id, x.layer, count(*) AS rows, sum(x.k) AS routes, 0 AS sentinel,
               count(*) FILTER (WHERE l.n_experts < 64 AND x.experts >= (CAST(1 AS UBIGINT) << l.n_experts))
                   AS out_of_range,
               count(*) FILTER (WHERE bit_count(x.experts) < x.k) AS dup,
               count(*) FILTER (WHERE x.k > 1 AND x.experts = 1) AS zero
        FROM token_sets x {semi} LEFT JOIN layers l ON l.run_id = x.run_id AND l.layer = x.layer
        WHERE {where} GROUP BY x.run_id, x.layer ORDER BY x.run_id, x.layer""", sparams + params, error=_error())


def _per_layer_from_routes(con, sel: Selection) -> pd.DataFrame:
    where, params = sel.with_(domains=None, tags=None).where("r")
    semi, sparams = _semi(sel, "r")
    params = sparams + params
    return run_query(con, f"""
        WITH t AS (
            SELECT r.run_id, r.layer, any_value(l.n_experts) AS n_experts, count(*) AS k,
                   count(DISTINCT r.expert) AS distinct_e, min(r.expert) AS lo, max(r.expert) AS hi,
                   count(*) FILTER (WHERE r.expert = -1 OR (r.expert = 255 AND l.n_experts <= 255)) AS sentinel,
                   count(*) FILTER (WHERE NOT (r.expert = -1 OR (r.expert = 255 AND l.n_experts <= 255))
                                    AND (r.expert < 0 OR r.expert >= l.n_experts)) AS out_of_range
            FROM routes r {semi} LEFT JOIN layers l ON l.run_id = r.run_id AND l.layer = r.layer
            WHERE {where}
            GROUP BY r.run_id, r.step, r.rank, r.seq, r.pos, r.layer),
        per_layer AS (
            SELECT run_id, layer, count(*) AS rows, sum(k) AS routes, sum(sentinel) AS sentinel,
                   sum(out_of_range) AS out_of_range, count(*) FILTER (WHERE distinct_e < k) AS dup,
                   count(*) FILTER (WHERE k > 1 AND lo = 0 AND hi = 0) AS zero
            FROM t GROUP BY run_id, layer)
        SELECT * FROM per_layer ORDER BY run_id, layer""", params, error=_error())


def _verdicts(df: pd.DataFrame) -> pd.DataFrame:
    """The check table from the per-layer counts."""
    rows = int(df["rows"].sum()) if len(df) else 0
    routes = int(df["routes"].sum()) if len(df) else 0

    def layers_of(mask) -> str:
        sub = df[mask]
        names = [f"{r.run_id}:{int(r.layer)}" if df["run_id"].nunique() > 1 else str(int(r.layer))
                 for r in sub.itertuples()]
        return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")

    out = []
    n = int(df["sentinel"].sum()) if len(df) else 0
    out.append(["sentinel_ids", "fail" if n else "ok", n, routes,
                f"{n} route(s) with expert -1 or 255 (padding slots) in layer(s) {layers_of(df['sentinel'] > 0)}: "
                "drop them at import (their tokens' sets are compared with a padding id in them)" if n else
                "no expert -1 or 255"])
    n = int(df["out_of_range"].sum()) if len(df) else 0
    out.append(["out_of_range", "fail" if n else "ok", n, routes,
                f"{n} route(s) with an expert outside 0 .. layers.n_experts - 1 in layer(s) "
                f"{layers_of(df['out_of_range'] > 0)}: a wrong n_experts or a wrong layer mapping" if n else
                "every expert id below the layer's n_experts"])
    dense = df[(df["zero"] == df["rows"]) & (df["rows"] > 0)]
    zero_other = int(df.loc[~df.index.isin(dense.index), "zero"].sum()) if len(df) else 0
    n_dense = int(dense["zero"].sum())
    if len(dense):
        detail = (f"layer(s) {layers_of((df['zero'] == df['rows']) & (df['rows'] > 0))} route every token to expert "
                  "0 only: a dense layer logged as rows of zeros; leave it out (--layers) or fix the layer mapping")
        if zero_other:
            detail += f"; {zero_other} more all-zero row(s) in other layers"
        status = "fail"
    elif zero_other:
        detail, status = (f"{zero_other} (token, layer) row(s) whose experts are all 0 in layer(s) "
                          f"{layers_of(df['zero'] > 0)}: unfilled rows of a log?"), "warn"
    else:
        detail, status = "no all-zero rows", "ok"
    out.append(["dense_layers", status, n_dense + zero_other, rows, detail])
    dup = df["dup"] - df["zero"]  # all-zero rows are counted above
    n = int(dup.sum()) if len(df) else 0
    out.append(["duplicate_ids", "warn" if n else "ok", n, rows,
                f"{n} (token, layer) set(s) hold one expert twice, in layer(s) {layers_of(dup > 0)}: a padded or "
                "clamped top-k; sets are compared as sets, so the duplicate counts once" if n else
                "no expert twice in one token's set"])
    if not rows:
        out = [[c, "ok", 0, 0, "no routes selected"] for c, *_ in out]
    return pd.DataFrame(out, columns=CHECK_COLUMNS).astype({"count": "int64", "total": "int64"})


def alignment(con, a: Selection, b: Selection, *, shifts: tuple[int, ...] = (-1, 0, 1),
              source: str = "auto", match_by: str = "auto") -> pd.DataFrame:
    """Set agreement of a's token at position p with b's token at p + shift, over every layer, for each shift:
    shift, tokens (matched token-layers), set_agreement. The token ids are not required to match here (a
    shifted log moves routes against ids), only the sequences (by key) and the positions. When agreement at +1
    or -1 is higher than at 0, b's positions are likely off by one. `match_by`: how sequences pair (see
    moeviz.analyses.agreement)."""
    from moeviz.analyses.agreement import _matched_ctes

    out = []
    for s in shifts:
        ctes, params = _matched_ctes(con, a, b, source=source, shift=int(s), same_token=False,
                                      match_by=match_by)
        df = run_query(con, f"{ctes} SELECT count(*) AS n, avg(CAST(same AS DOUBLE)) AS sa FROM m", params,
                       error=_error())
        out.append([int(s), int(df["n"].iloc[0]), float(df["sa"].iloc[0]) if df["n"].iloc[0] else float("nan")])
    return pd.DataFrame(out, columns=ALIGNMENT_COLUMNS).astype({"tokens": "int64"})


def alignment_check(df: pd.DataFrame) -> list:
    """One `log_checks` row (check, status, count, total, detail) from an `alignment` table: fail when a shift of
    ±1 agrees better than shift 0 by more than SHIFT_MARGIN."""
    at = {int(r.shift): (r.set_agreement, int(r.tokens)) for r in df.itertuples()}
    zero, n0 = at.get(0, (float("nan"), 0))
    if not n0:
        return ["position_shift", "ok", 0, 0, "no matched token to compare"]
    best = max((s for s in at if s != 0 and at[s][1]), key=lambda s: at[s][0], default=None)
    text = ", ".join(f"{s:+d}: {v:.3f}" for s, (v, n) in sorted(at.items()) if n)
    if best is not None and at[best][0] > zero + SHIFT_MARGIN:
        return ["position_shift", "fail", n0, n0,
                f"set agreement by shift of b's positions ({text}) is highest at {best:+d}: b's positions are likely "
                f"off by {best:+d} (a log counting from the first generated token, or a BOS added or dropped)"]
    return ["position_shift", "ok", n0, n0, f"set agreement by shift of b's positions: {text}"]


def checks(con, a: Selection, b: Selection, *, source: str = "auto", match_by: str = "auto") -> pd.DataFrame:
    """Every check of both sides (log_checks of a and of b) and the alignment of b against a: side, check,
    status, count, total, detail. The alignment is measured on one layer (the middle one of a's selection: a
    shift moves every layer alike, and one layer costs an eighth of eight), so `moeviz agree` pays ~0.5 s for it
    at 80 M routes per side."""
    frames = []
    for side, sel in (("a", a), ("b", b)):
        df = log_checks(con, sel)
        df.insert(0, "side", side)
        frames.append(df)
    layers = sorted(a.layers) if a.layers is not None else [int(x) for x in run_query(
        con, "SELECT DISTINCT layer FROM layers l WHERE " + Selection(run_ids=a.run_ids).where("l")[0]
        + " ORDER BY layer", Selection(run_ids=a.run_ids).where("l")[1], error=_error())["layer"]]
    if layers:
        mid = (layers[len(layers) // 2],)
        a, b = a.with_(layers=mid), b.with_(layers=mid)
    row = alignment_check(alignment(con, a, b, source=source, match_by=match_by))
    frames.append(pd.DataFrame([["a-b", *row]], columns=["side", *CHECK_COLUMNS]))
    return pd.concat(frames, ignore_index=True)
