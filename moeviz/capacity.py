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
WHICH ones, so breakdowns by layer/expert/step/rank are computed from counts (the exact `step_stats` for
group='step'), and only breakdowns by slot, domain or tag within a step group rank each assignment (a window
over `routes`). Computed from `routes`, results cover the tokens the run kept (all, unless it sampled).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import pandas as pd

from moeviz.load import AnalysisError, run_query
from moeviz.selection import Selection

__all__ = ["capacity_drops", "drop_curve", "expert_capacity"]

BY_DIMS = ("layer", "expert", "step", "rank", "seq", "pos", "slot", "domain", "tag")
_GROUP_KEYS = {"step": ("run_id", "step", "rank", "layer"), "sequence": ("run_id", "step", "rank", "seq", "layer")}
_PRIORITY = {"position": "slot, seq, pos", "probability": "weight DESC, slot, seq, pos"}
# C = ceil(CF * T * k / E); rounding to 9 decimals first keeps 1.25 * 64 * 2 / 8 from becoming 20.000000001
_CAPACITY = "CAST(ceil(round(CAST(? AS DOUBLE) * {t} * {k} / {e}, 9)) AS BIGINT)"


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


def _needs_ranking(sel: Selection, group: str, by: tuple[str, ...], with_weight: bool) -> bool:
    """Whether the answer depends on which assignments are dropped, not only on how many per expert."""
    group_level = {"layer", "expert", "step", "rank"} | ({"seq", "domain", "tag"} if group == "sequence" else set())
    per_token_filter = sel.needs_sequences and group == "step"
    return with_weight or per_token_filter or not set(by) <= group_level


def _shape_sql(sel: Selection) -> tuple[str, list]:
    where, params = Selection(run_ids=sel.run_ids, layers=sel.layers).where("l")
    return (
        f"""SELECT l.run_id, l.layer, coalesce(l.n_experts, ru.n_experts) AS n_experts,
                  coalesce(l.top_k, ru.top_k) AS top_k
           FROM layers l LEFT JOIN runs ru ON ru.run_id = l.run_id WHERE {where}""",
        params,
    )


def _cells_sql(sel: Selection, group: str) -> tuple[str, list]:
    """Assignments per group, layer and expert (n) with the group's tokens (group_tokens), and group labels."""
    if group == "step" and not sel.needs_sequences:
        where, params = sel.where("s")
        return (
            f"""SELECT s.run_id, s.step, s.rank, s.layer, s.expert, s.assigned AS n, s.tokens AS group_tokens
                FROM step_stats s WHERE {where} AND s.assigned > 0""",  # rows like the routes path's
            params,
        )
    # per-sequence groups (labels are constant in a group, so a domain filter can apply before counting)
    where, params = sel.where("r", per_token=True, seq_alias="q")
    return (
        f"""SELECT *, sum(n_first) OVER (PARTITION BY run_id, step, rank, seq, layer) AS group_tokens
            FROM (SELECT r.run_id, r.step, r.rank, r.seq, r.layer, r.expert, count(*) AS n,
                         count(*) FILTER (WHERE r.slot = 0) AS n_first,
                         any_value(q.domain) AS domain, any_value(q.tag) AS tag
                  FROM routes r LEFT JOIN sequences q
                       ON q.run_id = r.run_id AND q.step = r.step AND q.rank = r.rank AND q.seq = r.seq
                  WHERE {where} GROUP BY r.run_id, r.step, r.rank, r.seq, r.layer, r.expert)""",
        params,
    )


def _ranked_sql(sel: Selection, group: str, policy: str, labels: bool) -> tuple[str, list]:
    """Every selected assignment with its rank among its expert's assignments in its group (1 = first served)
    and its group's token count. Domain/tag filters are NOT applied here: other domains' tokens compete for
    the same slots when groups are steps."""
    pre, params = sel.with_(domains=None, tags=None).where("r")
    gkeys = ", ".join(_GROUP_KEYS[group])
    label_cols = "q.domain, q.tag" if labels else "CAST(NULL AS VARCHAR) AS domain, CAST(NULL AS VARCHAR) AS tag"
    label_join = (
        "LEFT JOIN sequences q ON q.run_id = r.run_id AND q.step = r.step AND q.rank = r.rank AND q.seq = r.seq"
        if labels else ""
    )
    sql = f"""
        WITH a AS (
            SELECT r.run_id, r.step, r.rank, r.seq, r.pos, r.layer, r.slot, r.expert, r.weight, {label_cols}
            FROM routes r {label_join}
            WHERE {pre}),
        gt AS (SELECT {gkeys}, count(*) FILTER (WHERE slot = 0) AS group_tokens FROM a GROUP BY {gkeys})
        SELECT a.*, gt.group_tokens,
               row_number() OVER (PARTITION BY {', '.join('a.' + c for c in _GROUP_KEYS[group])}, a.expert
                                  ORDER BY {', '.join('a.' + c for c in _PRIORITY[policy].split(', '))}) AS rnk
        FROM a JOIN gt USING ({gkeys})"""
    return sql, params


def _needs_labels(sel: Selection, by: tuple[str, ...]) -> bool:
    return sel.needs_sequences or "domain" in by or "tag" in by


def _post_filter(sel: Selection, alias: str) -> tuple[str, list]:
    """Domain/tag predicate applied after ranking."""
    if not sel.needs_sequences:
        return "TRUE", []
    return Selection(domains=sel.domains, tags=sel.tags).where(alias, per_token=True, seq_alias=alias)


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
) -> pd.DataFrame:
    """Assignments a capacity-limited router would drop at `capacity_factor` (or a fixed `capacity` per expert
    and group, as Switch Transformers' `expert_capacity`), broken down by any of `BY_DIMS`.

    Columns: run_id, *by, assigned, dropped, drop_rate, and with `with_weight` dropped_weight (sum of the
    dropped gate weights) and weight_drop_rate (its share of all gate weight): the 'probability' policy
    trades the same number of drops for less lost weight.
    """
    by = _check(policy, group, by)
    if (capacity_factor is None) == (capacity is None):
        raise AnalysisError("give exactly one of capacity_factor (C = ceil(CF * tokens * k / E)) or capacity (C)")
    if capacity is not None and int(capacity) < 0:
        raise AnalysisError(f"capacity must be >= 0 assignments per expert; got {capacity}")
    cap_param = float(capacity) if capacity is not None else _check_factor(capacity_factor)
    # with a fixed capacity, the formula degenerates to C = capacity (t * k / e replaced by 1)
    cap_sql = _CAPACITY.format(t="1", k="1", e="1") if capacity is not None else None
    by_cols = "".join(f", {d}" for d in by)
    shape, sparams = _shape_sql(sel)

    if not _needs_ranking(sel, group, by, with_weight):
        cells, params = _cells_sql(sel, group)
        cap = cap_sql or _CAPACITY.format(t="c.group_tokens", k="sh.top_k", e="sh.n_experts")
        sql = f"""
            WITH c AS ({cells}), sh AS ({shape}),
            capped AS (
                SELECT c.*, greatest(c.n - {cap}, 0) AS n_dropped
                FROM c JOIN sh ON sh.run_id = c.run_id AND sh.layer = c.layer)
            SELECT run_id{by_cols}, CAST(sum(n) AS BIGINT) AS assigned, CAST(sum(n_dropped) AS BIGINT) AS dropped,
                   sum(n_dropped) / nullif(sum(n), 0) AS drop_rate
            FROM capped GROUP BY run_id{by_cols} ORDER BY run_id{by_cols}"""
        return run_query(con, sql, params + sparams + [cap_param])

    ranked, params = _ranked_sql(sel, group, policy, _needs_labels(sel, by))
    post, pparams = _post_filter(sel, "x")
    cap = cap_sql or _CAPACITY.format(t="x.group_tokens", k="sh.top_k", e="sh.n_experts")
    weight = (
        ", sum(weight) FILTER (WHERE is_dropped) AS dropped_weight,"
        " sum(weight) FILTER (WHERE is_dropped) / nullif(sum(weight), 0) AS weight_drop_rate"
        if with_weight else ""
    )
    sql = f"""
        WITH x AS ({ranked}), sh AS ({shape}),
        flagged AS (
            SELECT x.*, x.rnk > {cap} AS is_dropped
            FROM x JOIN sh ON sh.run_id = x.run_id AND sh.layer = x.layer
            WHERE {post})
        SELECT run_id{by_cols}, count(*) AS assigned, count(*) FILTER (WHERE is_dropped) AS dropped,
               count(*) FILTER (WHERE is_dropped) / nullif(count(*), 0) AS drop_rate{weight}
        FROM flagged GROUP BY run_id{by_cols} ORDER BY run_id{by_cols}"""
    return run_query(con, sql, params + sparams + [cap_param] + pparams)


def drop_curve(
    con,
    sel: Selection = Selection(),
    factors: Iterable[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0),
    *,
    policy: str = "position",
    group: str = "step",
    by: Sequence[str] = (),
) -> pd.DataFrame:
    """Drop rate for every capacity factor in `factors`, in one query.

    Each assignment's rank within its expert and group (or each expert's count n per group) is computed once;
    at a factor CF the drops are the ranks above C(CF) (or max(0, n - C(CF))).
    Columns: run_id, capacity_factor, *by, assigned, dropped, drop_rate.
    """
    by = _check(policy, group, by)
    cfs = sorted({_check_factor(f) for f in factors})
    if not cfs:
        raise AnalysisError("give at least one capacity factor")
    by_cols = "".join(f", {d}" for d in by)
    shape, sparams = _shape_sql(sel)
    cap = _CAPACITY.replace("CAST(? AS DOUBLE)", "f.cf")

    if not _needs_ranking(sel, group, by, False):
        cells, params = _cells_sql(sel, group)
        # histogram first: how many cells share (labels, group size, shape, n); then one row per factor
        sql = f"""
            WITH c AS ({cells}), sh AS ({shape}),
            hist AS (
                SELECT c.run_id{''.join(f', c.{d}' for d in by)}, c.group_tokens, sh.top_k, sh.n_experts, c.n,
                       count(*) AS cells
                FROM c JOIN sh ON sh.run_id = c.run_id AND sh.layer = c.layer GROUP BY ALL),
            f AS (SELECT unnest(CAST(? AS DOUBLE[])) AS cf)
            SELECT run_id, f.cf AS capacity_factor{by_cols},
                   CAST(sum(n * cells) AS BIGINT) AS assigned,
                   CAST(sum(greatest(n - {cap.format(t='group_tokens', k='top_k', e='n_experts')}, 0) * cells)
                        AS BIGINT) AS dropped,
                   sum(greatest(n - {cap.format(t='group_tokens', k='top_k', e='n_experts')}, 0) * cells)
                       / nullif(sum(n * cells), 0) AS drop_rate
            FROM hist CROSS JOIN f GROUP BY ALL ORDER BY run_id, capacity_factor{by_cols}"""
        return run_query(con, sql, params + sparams + [cfs])

    ranked, params = _ranked_sql(sel, group, policy, _needs_labels(sel, by))
    post, pparams = _post_filter(sel, "x")
    sql = f"""
        WITH x AS ({ranked}), sh AS ({shape}),
        hist AS (
            SELECT x.run_id{''.join(f', x.{d}' for d in by)}, x.group_tokens, sh.top_k, sh.n_experts, x.rnk,
                   count(*) AS cnt
            FROM x JOIN sh ON sh.run_id = x.run_id AND sh.layer = x.layer WHERE {post} GROUP BY ALL),
        f AS (SELECT unnest(CAST(? AS DOUBLE[])) AS cf)
        SELECT run_id, f.cf AS capacity_factor{by_cols}, CAST(sum(cnt) AS BIGINT) AS assigned,
               CAST(coalesce(sum(cnt) FILTER (WHERE rnk > {cap.format(t='group_tokens', k='top_k', e='n_experts')}), 0)
                    AS BIGINT) AS dropped,
               coalesce(sum(cnt) FILTER (WHERE rnk > {cap.format(t='group_tokens', k='top_k', e='n_experts')}), 0)
                   / nullif(sum(cnt), 0) AS drop_rate
        FROM hist CROSS JOIN f GROUP BY ALL ORDER BY run_id, capacity_factor{by_cols}"""
    return run_query(con, sql, params + sparams + pparams + [cfs])
