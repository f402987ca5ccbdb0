"""Router saturation: how much the experts chosen for the same tokens overlap between two checkpoints
(OLMoE §5), from `probe_sets` or the routes.

See `moeviz.analyses.specialization` for how these read the store.
"""

from __future__ import annotations

import pandas as pd

from moeviz.analyses.specialization._shared import (
    SpecializationError,
    _df,
    _dims_sql,
    _from_aggregates,
    _per_run,
    _routes,
    _RunId,
    _typed,
)
from moeviz.selection import Selection
from moeviz.analyses.unknowns import require

_SAT_COLUMNS = ["run_id", "step", "ref_step", "layer", "tokens", "overlap", "saturation", "top1_agreement"]


def router_saturation(con, sel: Selection, step_a: int, step_b: int, *, source: str = "auto") -> pd.DataFrame:
    """OLMoE's router saturation between two checkpoints: for the same tokens (same run, rank, seq and pos, e.g. a
    fixed probe batch recorded with tag='probe' at steps a and b), the mean of |topk_a ∩ topk_b| / k, per layer;
    `top1_agreement` is the fraction whose first choice is the same.

    Columns: run_id, step (= step_a), ref_step (= step_b), layer, tokens (matched tokens), overlap (Σ |∩|),
    saturation, top1_agreement. The selection's `steps` are ignored (the two steps are given); restrict it to the
    probe batch with `tags=('probe',)`. Raises if the two steps hold different token ids at the same positions.
    Reads `probe_sets` (the probe tokens' expert sets, built at compaction) when both steps are probe steps of a
    compacted run and the selection has no domains; otherwise the routes.
    """
    return _saturation(con, sel, int(step_b), steps_a=[int(step_a)], source=source)


def saturation_curve(con, sel: Selection, ref_step: int | None = None, *, source: str = "auto") -> pd.DataFrame:
    """Router saturation of every selected step against `ref_step` (default: the last selected step of each run),
    as OLMoE plots it against the final checkpoint. Same columns as `router_saturation`, one row per step and
    layer (the reference step itself included, at saturation 1). Reads `probe_sets` for a selection of the probe
    batch (`tags=('probe',)`, no domains) of a compacted run; otherwise the routes."""
    return _saturation(con, sel, None if ref_step is None else int(ref_step), steps_a=None, source=source)


def _saturation(con, sel: Selection, ref_step: int | None, steps_a: list[int] | None, source: str) -> pd.DataFrame:
    require(con, sel, "first_choice", "router saturation (the same first choice at two steps)")
    def one(run_id: str) -> pd.DataFrame:
        ref = ref_step
        probe = _probe_sets_cover(con, sel, run_id, ref, steps_a)
        if ref is None:
            if probe:
                where, params = sel.with_(run_ids=None, layers=None, tags=None).where("x")
                src = f"SELECT max(x.step) FROM probe_sets x WHERE x.run_id = ? AND {where}"
                params = [str(run_id), *params]
            else:
                src, params = _routes(sel, run_id, "max(r.step)")
            ref = con.execute(src, params).fetchone()[0]
            if ref is None:
                return pd.DataFrame()
        pairs, params = (_saturation_from_probe_sets if probe else _saturation_from_routes)(sel, run_id, ref, steps_a)
        sql = f"""
            WITH {pairs},
            d AS ({_dims_sql()})
            SELECT p.step, p.layer, p.tokens, p.overlap, p.overlap / (p.tokens * d.top_k) AS saturation,
                   p.top1 / p.tokens AS top1_agreement, p.mismatched
            FROM p JOIN d ON d.layer = p.layer
            ORDER BY p.step, p.layer"""
        df = _df(con, sql, params + [run_id])
        bad = df[df["mismatched"] > 0]
        if len(bad):
            raise SpecializationError(
                f"run {run_id!r}: step(s) {sorted(set(bad['step'].astype(int)))} and step {ref} hold different token "
                "ids at the same (rank, seq, pos), so their routing cannot be compared token by token; record a "
                "fixed probe batch (tag='probe') at each checkpoint and select it with Selection(tags=('probe',))"
            )
        if steps_a is not None and df.empty:
            raise SpecializationError(
                f"run {run_id!r}: no token is recorded at both step {steps_a[0]} and step {ref} (same rank, seq, pos) "
                "in this selection; router saturation compares the same tokens at two checkpoints — record a fixed "
                "probe batch (tag='probe') at both"
            )
        df.insert(1, "ref_step", ref)
        return _typed(df, ints=("step", "ref_step", "layer", "tokens", "overlap"))

    return _per_run(con, sel, _SAT_COLUMNS, one, source)


def _saturation_from_routes(sel: Selection, run_id: "_RunId", ref: int, steps_a: list[int] | None) -> tuple[str, list]:
    """CTEs ending in p(step, layer, tokens, top1, mismatched, overlap) from the routes of the compared steps."""
    sel_a = sel if steps_a is None else sel.with_(steps=None)
    src_a, pa = _routes(sel_a, run_id, "r.step, r.rank, r.seq, r.pos, r.layer, r.slot, r.expert, r.token_id",
                        extra=(f"r.step IN ({', '.join('?' for _ in steps_a)})" if steps_a is not None else ""))
    pa = pa + (steps_a or [])
    src_b, pb = _routes(sel.with_(steps=(ref, ref)), run_id,
                        "r.rank, r.seq, r.pos, r.layer, r.slot, r.expert, r.token_id")
    ctes = f"""a AS ({src_a}), b AS ({src_b}),
        top AS (
            SELECT a.step, a.layer, count(*) AS tokens, count(*) FILTER (WHERE a.expert = b.expert) AS top1,
                   count(*) FILTER (WHERE a.token_id <> b.token_id) AS mismatched
            FROM a JOIN b ON a.rank = b.rank AND a.seq = b.seq AND a.pos = b.pos AND a.layer = b.layer
            WHERE a.slot = 0 AND b.slot = 0 GROUP BY ALL),
        ov AS (
            SELECT a.step, a.layer, count(*) AS overlap
            FROM a JOIN b ON a.rank = b.rank AND a.seq = b.seq AND a.pos = b.pos AND a.layer = b.layer
                         AND a.expert = b.expert
            GROUP BY ALL),
        p AS (SELECT top.*, coalesce(ov.overlap, 0) AS overlap FROM top
              LEFT JOIN ov ON ov.step = top.step AND ov.layer = top.layer)"""
    return ctes, pa + pb


def _saturation_from_probe_sets(sel: Selection, run_id: "_RunId", ref: int,
                                steps_a: list[int] | None) -> tuple[str, list]:
    """The same p from probe_sets: one row per token and layer, its experts as a bitmask, so a token's overlap
    is bit_count(a & b) and no routes are read (100 M routes: 12 probe steps of 2,048 tokens)."""
    base = sel.with_(run_ids=None, tags=None)
    wa, pa = (base if steps_a is None else base.with_(steps=None)).where("x")
    wb, pb = base.with_(steps=(ref, ref)).where("x")
    in_a = f" AND x.step IN ({', '.join('?' for _ in steps_a)})" if steps_a is not None else ""
    cols = "x.step, x.rank, x.seq, x.pos, x.layer, x.token_id, x.first_expert, x.experts"
    ctes = f"""a AS (SELECT {cols} FROM probe_sets x WHERE x.run_id = ? AND {wa}{in_a}),
        b AS (SELECT {cols} FROM probe_sets x WHERE x.run_id = ? AND {wb}),
        p AS (
            SELECT a.step, a.layer,
                   count(*) FILTER (WHERE a.first_expert IS NOT NULL AND b.first_expert IS NOT NULL) AS tokens,
                   count(*) FILTER (WHERE a.first_expert = b.first_expert) AS top1,
                   count(*) FILTER (WHERE a.first_expert IS NOT NULL AND b.first_expert IS NOT NULL
                                    AND a.token_id <> b.token_id) AS mismatched,
                   sum(bit_count(a.experts & b.experts)) AS overlap
            FROM a JOIN b ON a.rank = b.rank AND a.seq = b.seq AND a.pos = b.pos AND a.layer = b.layer
            GROUP BY ALL HAVING tokens > 0)"""
    return ctes, [str(run_id), *pa, *(steps_a or []), str(run_id), *pb]


def _probe_sets_cover(con, sel: Selection, run_id: "_RunId", ref: int | None, steps_a: list[int] | None) -> bool:
    """Whether probe_sets holds every token the routes version would compare: the run is compacted (no live
    routes), the selection has no domains, the layers have at most 64 experts, and either the selection is the
    probe batch (tags = ('probe',)) or every sequence of the two given steps is a probe sequence."""
    if run_id.source == "routes":
        return False
    only_probe = sel.tags is not None and set(sel.tags) == {"probe"}
    usable = (run_id.route_stats and "probe_sets" in run_id.tables and sel.domains is None
              and (only_probe or (steps_a is not None and ref is not None)))
    if usable:
        steps = None if steps_a is None else sorted({*steps_a, ref})
        step_in = f" AND {{a}}.step IN ({', '.join('?' for _ in steps)})" if steps is not None else ""
        rwhere, rparams = Selection(ranks=sel.ranks).where("q")
        non_probe, nparams = ("0", []) if only_probe else (  # sequences the routes version would compare too
            f"(SELECT count(*) FROM sequences q WHERE q.run_id = ? AND {rwhere}{step_in.format(a='q')} "
            "AND q.tag IS DISTINCT FROM 'probe')", [str(run_id), *rparams, *(steps or [])])
        xwhere, xparams = sel.with_(run_ids=None, tags=None, steps=None if steps is not None else sel.steps).where("x")
        non_probe, have, wide = con.execute(
            f"SELECT {non_probe}, count(DISTINCT x.step), count(*) FILTER (WHERE x.experts IS NULL) FROM probe_sets x "
            f"WHERE x.run_id = ? AND {xwhere}{step_in.format(a='x')}",
            [*nparams, str(run_id), *xparams, *(steps or [])]).fetchone()
        usable = non_probe == 0 and wide == 0 and have == (len(steps) if steps is not None else have) and have > 0
    return _from_aggregates(run_id, usable, "probe_sets holds the probe steps of compacted runs with at most 64 "
                            "experts per layer: select the probe batch (tags=('probe',)) or two steps whose sequences "
                            "are all probe sequences, without domains")


# ---------------------------------------------------------------------------------------------------------------
# mutual information
# ---------------------------------------------------------------------------------------------------------------
