"""Capacity drops: which assignments a capacity-limited MoE layer would drop at a given capacity factor.

Capacity-limited routers (GShard, Switch, Megatron with `moe_expert_capacity_factor`) give each expert at most
C = ceil(CF * tokens * k / E) slots per group of tokens; the assignments beyond C are dropped (the token skips
that expert). moeviz replays this on recorded routing, for any CF, without the model:
- group: 'step' = the tokens one rank routed in one step and layer (what each rank sees before dispatch);
  'sequence' = each batch row on its own (GShard groups; Switch Transformers in transformers caps per row).
- policy: 'position' = first come first served in token order, every slot-0 choice before any slot-1 choice
  (GShard/Switch priority slot * T + token index, token index = (seq, pos)); 'probability' = the highest gate
  weights are kept (Megatron `moe_token_drop_policy="probs"`), ties broken by position.

How many assignments an expert drops in a group is max(0, n - C) whatever the policy; the policy only decides
WHICH ones. So every answer is computed from the coarsest units whose drops follow from counts (see
`_granularity`): per expert (breakdowns by layer/expert/step/rank; the exact `step_stats` for group='step'),
per expert and slot, or per expert, slot and sequence (position policy: a unit served after `before` others
drops clamp(before + n - C, 0, n)); only the probability policy broken down below the expert, by='pos' and
with_weight need each assignment's place in its expert's queue. For compacted runs at group='step' that comes
from `weight_hist` and one pass over the routes (moeviz.analyses.probability_drops: 2.5-4.3 s over 100 M routes);
otherwise a window ranks every route (a sort: over 100 M routes > 60 s and ~17 GB on 2 cores: select a step
window). Computed from `routes`, results cover the tokens the run kept (all, unless it sampled).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import pandas as pd

from moeviz.analyses import probability_drops
from moeviz.analyses.load import AnalysisError, run_query
from moeviz.analyses.step_rows import buckets_available, expert_drops_available, pieces, range_clauses
from moeviz.store.rollups import DROP_FACTORS, EXPERT_DROP_RESOLUTIONS, capacity as _capacity_sql, known_sum, \
    row_drops
from moeviz.selection import Selection
from moeviz.analyses.unknowns import require, require_per_rank

__all__ = ["capacity_drops", "drop_curve", "expert_capacity"]

BY_DIMS = ("layer", "expert", "step", "rank", "seq", "pos", "slot", "domain", "tag")
_GROUP_KEYS = {"step": ("run_id", "step", "rank", "layer"), "sequence": ("run_id", "step", "rank", "seq", "layer")}
_PRIORITY = {"position": "slot, seq, pos", "probability": "weight DESC, slot, seq, pos"}
# C = ceil(CF * T * k / E) with CF a parameter: the store's formula (step_drops must equal capacity_drops)
_CAPACITY = _capacity_sql("?", "{t}", "{k}", "{e}")


def model_capacity(config, capacity_factor: float | None = None) -> dict:
    """How the recorded model itself limits capacity, from its run row: `capacity` (a fixed number of slots per
    expert and group: Switch Transformers' `expert_capacity`, found in runs.config), `capacity_factor` (runs'
    column), and `group`, the model's own grouping: 'sequence' for a fixed expert_capacity (Switch routes each
    batch row on its own), else 'step'. What the Capacity page starts on, so that the model's own drops can be
    reproduced there. `config` is the runs.config JSON (text or dict); anything unreadable counts as absent."""
    import json

    cfg = config
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except ValueError:
            cfg = None
    cap = cfg.get("expert_capacity") if isinstance(cfg, dict) else None
    try:
        cap = int(cap) if cap is not None and int(cap) > 0 else None
    except (TypeError, ValueError):
        cap = None
    cf = float(capacity_factor) if capacity_factor is not None and capacity_factor == capacity_factor else None
    return {"capacity": cap, "capacity_factor": cf, "group": "sequence" if cap is not None else "step"}


def expert_capacity(capacity_factor: float, tokens: int, top_k: int, n_experts: int) -> int:
    """C = ceil(CF * tokens * k / E): the slots each expert gets in a group (the formula the SQL uses)."""
    import math

    return int(math.ceil(round(capacity_factor * tokens * top_k / n_experts, 9)))


def _check(policy: str, group: str, by: Sequence[str]) -> tuple[str, ...]:
    if policy not in _PRIORITY:
        raise AnalysisError(f"policy must be 'position' or 'probability'; got {policy!r}")
    if group not in _GROUP_KEYS:
        raise AnalysisError(f"group must be 'step' (one rank's tokens of a step) or 'sequence'; got {group!r}")
    by = (by,) if isinstance(by, str) else tuple(by)
    bad = [d for d in by if d not in BY_DIMS]
    if bad or len(set(by)) != len(by):
        raise AnalysisError(f"by takes distinct names among {BY_DIMS}; got {by}")
    return by


def _check_factor(cf: float) -> float:
    cf = float(cf)
    if not cf > 0:
        raise AnalysisError(f"capacity factors must be > 0 (1.0 = exactly the uniform share); got {cf}")
    return cf


def _granularity(sel: Selection, group: str, policy: str, by: tuple[str, ...], with_weight: bool) -> str:
    """The coarsest unit of assignments whose drops follow from counts alone (see the module docstring).

    'expert': one unit per group, layer and expert (drops = max(0, n - C), whatever the policy);
    'slot':   per expert and slot (position policy: slot 0 claims are served first);
    'seq':    per expert, slot and sequence (position policy: sequences are served in order; one sequence
              has one domain and tag, so breakdowns by them need no per-token order);
    'assignment': every assignment ranked by a window (probability policy, by='pos', with_weight).
    """
    per_token_filter = sel.needs_sequences and group == "step"
    seq_level = {"seq", "domain", "tag"}
    group_level = {"layer", "expert", "step", "rank"} | (seq_level if group == "sequence" else set())
    if with_weight or "pos" in by:
        return "assignment"
    if set(by) <= group_level and not per_token_filter:
        return "expert"
    if policy == "probability":
        return "assignment"
    if per_token_filter or (set(by) & seq_level and group == "step"):
        return "seq"
    return "slot"


def _refuse_summed_ranks(con, sel: Selection, group: str, unit: str) -> None:
    """The per-expert unit at group='step' reads `step_stats`, one rank's counts per step: on steps whose
    aggregates were summed over ranks at recording those counts are the group's, and C(group's tokens) is not any
    rank's capacity, so refuse (the other units read each rank's routes and stay right)."""
    if group == "step" and unit == "expert":
        require_per_rank(con, sel, "capacity drops per rank and step (group='step', from the step aggregates)")


def _shape_sql(sel: Selection) -> tuple[str, list]:
    """Experts and k of every selected layer: from `layers`, else (a run whose writer wrote no layers) `runs`."""
    part = Selection(run_ids=sel.run_ids, layers=sel.layers)
    where, params = part.where("l")
    fwhere, fparams = part.where("f")
    return (
        f"""SELECT l.run_id, l.layer, coalesce(l.n_experts, ru.n_experts) AS n_experts,
                  coalesce(l.top_k, ru.top_k) AS top_k
           FROM layers l LEFT JOIN runs ru ON ru.run_id = l.run_id WHERE {where}
           UNION ALL
           SELECT * FROM (
               SELECT ru.run_id, CAST(unnest(range(ru.n_layers)) AS INTEGER) AS layer, ru.n_experts, ru.top_k
               FROM runs ru WHERE NOT EXISTS (SELECT 1 FROM layers l WHERE l.run_id = ru.run_id)) f
           WHERE {fwhere}""",
        params + fparams,
    )


_SEQ_JOIN = "LEFT JOIN sequences q ON q.run_id = u.run_id AND q.step = u.step AND q.rank = u.rank AND q.seq = u.seq"
_NO_LABELS = "CAST(NULL AS VARCHAR) AS domain, CAST(NULL AS VARCHAR) AS tag"


def _units_sql(sel: Selection, group: str, policy: str, unit: str, labels: bool) -> tuple[str, list]:
    """Units of assignments: run_id, step, rank, layer, expert, [slot, seq, pos,] domain, tag, n (assignments),
    before (assignments of the same expert and group served before the unit), weight (unit 'assignment'),
    group_tokens. An assignment of the unit is dropped at capacity C when its rank before + i > C, so the unit
    drops clamp(before + n - C, 0, n). Domain/tag filters are NOT applied here (see `_post_filter`): at
    group='step' other domains' tokens compete for the same slots."""
    gkeys = _GROUP_KEYS[group]
    if unit == "expert" and group == "step":
        where, params = sel.where("s")
        sql = f"""
            SELECT s.run_id, s.step, s.rank, s.layer, s.expert, {_NO_LABELS},
                   s.assigned AS n, 0 AS before, s.tokens AS group_tokens
            FROM step_stats s WHERE {where} AND s.assigned > 0"""  # expert rows like the routes paths'
        return sql, params

    pre, params = sel.with_(domains=None, tags=None).where("r")
    g = ", ".join(gkeys)
    label_cols = "q.domain, q.tag" if labels else _NO_LABELS
    label_join = _SEQ_JOIN if labels else ""
    if unit == "assignment":
        order = ", ".join("u." + c.replace(" DESC", "") + (" DESC" if "DESC" in c else "")
                          for c in _PRIORITY[policy].split(", "))
        sql = f"""
            WITH u AS (
                SELECT r.run_id, r.step, r.rank, r.seq, r.pos, r.layer, r.slot, r.expert, r.weight
                FROM routes r WHERE {pre}),
            gt AS (SELECT {g}, count(*) FILTER (WHERE slot = 0) AS group_tokens FROM u GROUP BY {g})
            SELECT u.*, {label_cols}, 1 AS n, gt.group_tokens,
                   row_number() OVER (PARTITION BY {', '.join('u.' + c for c in gkeys)}, u.expert ORDER BY {order})
                       - 1 AS before
            FROM u JOIN gt ON {' AND '.join(f'gt.{c} = u.{c}' for c in gkeys)} {label_join}"""
        return sql, params

    # counts per expert[, slot[, seq]]: a window over the (much smaller) counts, not over the routes
    cols = {"expert": [], "slot": ["slot"], "seq": ["slot", "seq"]}[unit]
    keys = list(dict.fromkeys(list(gkeys) + ["expert"] + cols))
    cols = [c for c in cols if c not in gkeys]  # the serving order within an expert and group
    before = "0" if unit == "expert" else (
        f"coalesce(sum(c.n) OVER (PARTITION BY {', '.join('c.' + k for k in gkeys)}, c.expert ORDER BY "
        f"{', '.join('c.' + k for k in cols)} ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)")
    sql = f"""
        WITH c AS (
            SELECT r.run_id, r.step, r.rank, {'r.seq, ' if 'seq' in keys else ''}r.layer, r.expert,
                   {'r.slot, ' if 'slot' in keys else ''}count(*) AS n,
                   count(*) FILTER (WHERE r.slot = 0) AS n_first
            FROM routes r WHERE {pre} GROUP BY ALL),
        gt AS (SELECT {g}, sum(n_first) AS group_tokens FROM c GROUP BY {g}),
        u AS (
            SELECT c.*, gt.group_tokens, {before} AS before
            FROM c JOIN gt ON {' AND '.join(f'gt.{k} = c.{k}' for k in gkeys)})
        SELECT u.*, {label_cols} FROM u {label_join}"""
    return sql, params


def _from_weight_hist(con, sel: Selection, group: str, policy: str, unit: str, source: str) -> bool:
    """Whether the probability policy per assignment is computed from weight_hist (moeviz.analyses.probability_drops)."""
    wanted = unit == "assignment" and policy == "probability" and group == "step"
    if not wanted or source == "routes":
        return False
    if probability_drops.covers(con, sel):
        return True
    if source == "aggregates":
        raise AnalysisError("weight_hist does not cover this selection: it holds compacted runs with no live routes "
                            "(run `moeviz compact`, which also adds it to a run compacted by an older moeviz); "
                            "use source='auto' or 'routes'")
    return False


def _needs_labels(sel: Selection, by: tuple[str, ...]) -> bool:
    return sel.needs_sequences or "domain" in by or "tag" in by


def _post_filter(sel: Selection, alias: str) -> tuple[str, list]:
    """Domain/tag predicate applied after ranking."""
    if not sel.needs_sequences:
        return "TRUE", []
    return Selection(domains=sel.domains, tags=sel.tags).where(alias, per_token=True, seq_alias=alias)


def _dropped(cap: str, unit: str = "x", known: str = "TRUE") -> str:
    """SQL: assignments of a unit beyond capacity `cap`; NULL unless `known` (the group's tokens are known: a NULL
    capacity would count every assignment as dropped, since DuckDB's greatest/least skip a NULL argument)."""
    return f"CASE WHEN {known} THEN greatest(0, least({unit}.n, {unit}.before + {unit}.n - {cap})) END"


def _from_step_drops(con, sel: Selection, capacity_factor: float, by: tuple[str, ...]) -> pd.DataFrame:
    """capacity_drops(group='step') by layer and/or step from step_drops, the drops per step and layer compaction
    computed from the same step_stats rows with the same formula at DROP_FACTORS (moeviz.store.rollups): one row
    per step and layer instead of one per rank, step, layer and expert (148 M rows at 10,000 steps of a
    58 x 256 model). Drops need each step's per-expert count, so no roll-up of counts could give them."""
    where, params = sel.where("s")
    by_cols = "".join(f", {d}" for d in by)
    return run_query(con, f"""
        SELECT run_id{by_cols}, CAST(sum(assigned) AS BIGINT) AS assigned,
               CAST({known_sum("dropped")} AS BIGINT) AS dropped,
               {known_sum("dropped")} / nullif(sum(assigned), 0) AS drop_rate
        FROM step_drops s WHERE {where} AND s.capacity_factor = ?
        GROUP BY run_id{by_cols} ORDER BY run_id{by_cols}""", params + [capacity_factor])


def _from_expert_drops(con, sel: Selection, capacity_factor: float, by: tuple[str, ...]) -> pd.DataFrame:
    """capacity_drops(group='step') by layer and/or expert (and no other dimension) from expert_drops, the drops
    per block of 100 or 1,000 steps, layer and expert that compaction computed from step_stats at DROP_FACTORS
    (moeviz.store.rollups), for the whole blocks inside the selected steps; the steps of the range outside whole
    blocks are replayed from their step_stats rows with the same formula. At 10,000 steps of a 58 x 256 model:
    10 blocks of 14,848 experts instead of 149 M step_stats rows."""
    rest, rest_params = sel.with_(steps=None).where("s")
    lo, hi = (None, None) if sel.steps is None else (int(sel.steps[0]), int(sel.steps[1]))
    shape, sparams = _shape_sql(sel)
    keys = "".join(f", {d}" for d in by)
    parts, params = [], []
    for r, a, z in pieces(lo, hi, EXPERT_DROP_RESOLUTIONS if lo is None or lo >= 0 else ()):
        within, p = range_clauses(a, z, "s.step")
        where, p = " AND ".join([rest, *within]), list(rest_params) + p
        if r > 1:
            parts.append(f"""SELECT run_id{keys}, assigned, dropped FROM expert_drops s
                             WHERE resolution = {int(r)} AND capacity_factor = ? AND {where}""")
            params += [capacity_factor] + p
        else:  # the edge steps: each step_stats row's drops, NULL where its tokens are unknown
            parts.append(f"""SELECT s.run_id{''.join(f', s.{d}' for d in by)}, s.assigned, {row_drops("?")} AS dropped
                             FROM step_stats s JOIN ({shape}) sh ON sh.run_id = s.run_id AND sh.layer = s.layer
                             WHERE s.assigned > 0 AND {where}""")
            params += [capacity_factor] + sparams + p  # in the order of their ? in the text
    dropped = known_sum("dropped")
    return run_query(con, f"""
        SELECT run_id{keys}, CAST(sum(assigned) AS BIGINT) AS assigned, CAST({dropped} AS BIGINT) AS dropped,
               {dropped} / nullif(sum(assigned), 0) AS drop_rate
        FROM ({" UNION ALL ".join(parts)}) GROUP BY run_id{keys} ORDER BY run_id{keys}""", params)


def _reads_drop_tables(con, sel: Selection, group: str, unit: str, factors: Iterable[float]) -> bool:
    """Whether drops at `factors` can be read from step_drops/expert_drops: what they hold (group='step', one
    rank's step_stats row per group, whatever the policy at the expert unit; every rank summed; no sequence
    filter; the stored factors) and cover (every run compacted with them, nothing live)."""
    return (unit == "expert" and group == "step" and sel.ranks is None and not sel.needs_sequences
            and all(float(f) in DROP_FACTORS for f in factors) and buckets_available(con))


def capacity_drops(
    con,
    sel: Selection = Selection(),
    capacity_factor: float | None = None,
    *,
    capacity: int | None = None,
    policy: str = "position",
    group: str = "step",
    by: Sequence[str] = ("layer", "expert"),
    with_weight: bool = False,
    source: str = "auto",
) -> pd.DataFrame:
    """Assignments a capacity-limited router would drop at `capacity_factor` (or a fixed `capacity` per expert
    and group, as Switch Transformers' `expert_capacity`), broken down by any of `BY_DIMS`.

    Columns: run_id, *by, assigned, dropped, drop_rate, and with `with_weight` dropped_weight (sum of the
    dropped gate weights) and weight_drop_rate (its share of all gate weight): the 'probability' policy
    trades the same number of drops for less lost weight.

    `source`: 'auto' ranks the probability policy's assignments (with_weight, or by below the expert) from
    `weight_hist` and one pass over `routes` when the runs are compacted (see moeviz.analyses.probability_drops),
    else with a window over every route; 'routes' forces the window; 'aggregates' raises if weight_hist does
    not cover the selection.
    """
    require(con, sel, "tokens", "capacity drops (C = capacity factor x tokens x k / E)")
    if policy == "probability" or with_weight:
        require(con, sel, "weight", "the probability capacity policy (and the dropped gate weight)")
    if "slot" in tuple(by):
        require(con, sel, "first_choice", "drops by slot")
    by = _check(policy, group, by)
    if source not in ("auto", "aggregates", "routes"):
        raise AnalysisError(f"source must be 'auto', 'aggregates' or 'routes'; got {source!r}")
    if (capacity_factor is None) == (capacity is None):
        raise AnalysisError("give exactly one of capacity_factor (C = ceil(CF * tokens * k / E)) or capacity (C)")
    if capacity is not None and int(capacity) < 0:
        raise AnalysisError(f"capacity must be >= 0 assignments per expert; got {capacity}")
    cap_param = float(capacity) if capacity is not None else _check_factor(capacity_factor)
    # with a fixed capacity, the formula degenerates to C = capacity (t * k / e replaced by 1)
    cap_sql = _CAPACITY.format(t="1", k="1", e="1") if capacity is not None else None
    by_cols = "".join(f", {d}" for d in by)
    shape, sparams = _shape_sql(sel)
    unit = _granularity(sel, group, policy, by, with_weight)
    _refuse_summed_ranks(con, sel, group, unit)
    if capacity is None and not with_weight and _reads_drop_tables(con, sel, group, unit, [capacity_factor]):
        if set(by) <= {"layer", "step"}:
            return _from_step_drops(con, sel, float(capacity_factor), by)
        # expert_drops may be missing where the other drop tables are not (a store compacted before it existed)
        if set(by) <= {"layer", "expert"} and expert_drops_available(con):
            return _from_expert_drops(con, sel, float(capacity_factor), by)
    if _from_weight_hist(con, sel, group, policy, unit, source):
        cap = cap_sql or _CAPACITY.format(t="g.group_tokens", k="sh.top_k", e="sh.n_experts")
        weight = (", sum(dropped_weight) FILTER (WHERE n_dropped > 0) AS dropped_weight,"
                  " sum(dropped_weight) FILTER (WHERE n_dropped > 0) / nullif(sum(weight), 0) AS weight_drop_rate"
                  if with_weight else "")
        return probability_drops.drops(con, sel, by, with_weight, (shape, sparams), cap, cap_param,
                                       labels=_needs_labels(sel, by), aggregate=f"""
            SELECT run_id{by_cols}, CAST(sum(n) AS BIGINT) AS assigned, CAST(sum(n_dropped) AS BIGINT) AS dropped,
                   sum(n_dropped) / nullif(sum(n), 0) AS drop_rate{weight}
            FROM flagged GROUP BY run_id{by_cols} ORDER BY run_id{by_cols}""")
    units, params = _units_sql(sel, group, policy, unit, labels=_needs_labels(sel, by))
    post, pparams = _post_filter(sel, "x")
    cap = cap_sql or _CAPACITY.format(t="x.group_tokens", k="sh.top_k", e="sh.n_experts")
    known = "TRUE" if cap_sql else "x.group_tokens IS NOT NULL"
    weight = (
        ", sum(weight) FILTER (WHERE n_dropped > 0) AS dropped_weight,"
        " sum(weight) FILTER (WHERE n_dropped > 0) / nullif(sum(weight), 0) AS weight_drop_rate"
        if with_weight else ""
    )
    sql = f"""
        WITH x AS ({units}), sh AS ({shape}),
        flagged AS (
            SELECT x.*, {_dropped(cap, 'x', known)} AS n_dropped
            FROM x JOIN sh ON sh.run_id = x.run_id AND sh.layer = x.layer
            WHERE {post})
        SELECT run_id{by_cols}, CAST(sum(n) AS BIGINT) AS assigned, CAST({known_sum("n_dropped")} AS BIGINT) AS dropped,
               {known_sum("n_dropped")} / nullif(sum(n), 0) AS drop_rate{weight}
        FROM flagged GROUP BY run_id{by_cols} ORDER BY run_id{by_cols}"""
    return run_query(con, sql, params + sparams + [cap_param] + pparams)


def _curve_from_step_drops(con, sel: Selection, cfs: list[float], by: tuple[str, ...]) -> pd.DataFrame:
    """drop_curve(group='step') by nothing, layer and/or step at stored factors from step_drops: one row per step,
    layer and factor instead of a histogram over every step_stats row (149 M at 10,000 steps of 58 x 256)."""
    where, params = sel.where("s")
    keys = "".join(f", {d}" for d in by)
    dropped = known_sum("dropped")
    return run_query(con, f"""
        SELECT run_id, capacity_factor{keys}, CAST(sum(assigned) AS BIGINT) AS assigned,
               CAST({dropped} AS BIGINT) AS dropped, {dropped} / nullif(sum(assigned), 0) AS drop_rate
        FROM step_drops s WHERE {where} AND capacity_factor IN ({", ".join("?" for _ in cfs)})
        GROUP BY run_id, capacity_factor{keys} ORDER BY run_id, capacity_factor{keys}""", params + list(cfs))


def drop_curve(
    con,
    sel: Selection = Selection(),
    factors: Iterable[float] = DROP_FACTORS,
    *,
    policy: str = "position",
    group: str = "step",
    by: Sequence[str] = (),
) -> pd.DataFrame:
    """Drop rate for every capacity factor in `factors`, in one query.

    Each assignment's rank within its expert and group (or each expert's count n per group) is computed once;
    at a factor CF the drops are the ranks above C(CF) (or max(0, n - C(CF))). Where every factor is one of
    DROP_FACTORS and the breakdown is by layer and/or step at group='step', compaction's step_drops answer
    (one row per step, layer and factor; see `_reads_drop_tables`).
    Columns: run_id, capacity_factor, *by, assigned, dropped, drop_rate.
    """
    by = _check(policy, group, by)
    cfs = sorted({_check_factor(f) for f in factors})
    if not cfs:
        raise AnalysisError("give at least one capacity factor")
    by_cols = "".join(f", {d}" for d in by)
    shape, sparams = _shape_sql(sel)
    unit = _granularity(sel, group, policy, by, False)
    _refuse_summed_ranks(con, sel, group, unit)
    if set(by) <= {"layer", "step"} and _reads_drop_tables(con, sel, group, unit, cfs):
        return _curve_from_step_drops(con, sel, cfs, by)
    units, params = _units_sql(sel, group, policy, unit, labels=_needs_labels(sel, by))
    post, pparams = _post_filter(sel, "x")
    cap = _CAPACITY.replace("CAST(? AS DOUBLE)", "f.cf").format(t="h.group_tokens", k="h.top_k", e="h.n_experts")
    dropped = known_sum(f"{_dropped(cap, 'h', 'h.group_tokens IS NOT NULL')} * h.units")
    # histogram first: how many units share (labels, group size, shape, before, n); then one row per factor
    sql = f"""
        WITH x AS ({units}), sh AS ({shape}),
        hist AS (
            SELECT x.run_id{''.join(f', x.{d}' for d in by)}, x.group_tokens, sh.top_k, sh.n_experts,
                   x.n, x.before, count(*) AS units
            FROM x JOIN sh ON sh.run_id = x.run_id AND sh.layer = x.layer WHERE {post} GROUP BY ALL),
        f AS (SELECT unnest(CAST(? AS DOUBLE[])) AS cf)
        SELECT run_id, f.cf AS capacity_factor{by_cols}, CAST(sum(h.n * h.units) AS BIGINT) AS assigned,
               CAST({dropped} AS BIGINT) AS dropped, {dropped} / nullif(sum(h.n * h.units), 0) AS drop_rate
        FROM hist h CROSS JOIN f GROUP BY ALL ORDER BY run_id, capacity_factor{by_cols}"""
    return run_query(con, sql, params + sparams + pparams + [cfs])
