"""Routing health checks: collapsed experts, dead experts, growing imbalance, capacity drops, NaN/inf router
outputs, and recordings that lost data.

`health_summary` is what `moeviz check` prints and what a training script or CI can assert on: one row per
finding (severity 'warn' or 'error') and one 'ok' row per check and run that found nothing, so the table also
says what was checked. Collapse and dead experts are judged on the most recent window of the selected steps
(the state the model is in now, not diluted by a healthy start); imbalance growth compares the first window
with the last. All numbers come from the functions of `moeviz.analyses.load` and `moeviz.analyses.capacity`.
"""

from __future__ import annotations

import math

import pandas as pd

from moeviz.analyses.capacity import capacity_drops
from moeviz.analyses.load import AnalysisError, expert_load, imbalance, run_query
from moeviz.analyses.step_rows import rollups_available, step_rows_sql
from moeviz.analyses.step_rows import buckets_available
from moeviz.analyses.unknowns import UnknownQuantityError
from moeviz.selection import Selection
from moeviz.store.reader import column_names
from moeviz.store.rollups import RESOLUTIONS
from moeviz.text import steps_text

__all__ = ["health_summary", "COLUMNS", "SEVERITIES"]

COLUMNS = ["run_id", "severity", "check", "layer", "expert", "value", "threshold", "message"]
SEVERITIES = ("error", "warn", "ok")
_MAX_VIO_FLOOR = 0.05  # imbalance "grows" only from at least this MaxVio: 0.001 -> 0.003 is noise, not a trend


def _max_vio_noise(imb: pd.DataFrame) -> float:
    """MaxVio that perfectly uniform random routing shows by chance at this layer's step size:
    counts per expert ~ T*k/E +- sqrt(T*k/E), and the busiest of E is ~sqrt(2 ln E) deviations high, so
    MaxVio ~ sqrt(2 ln E * E / (T * k)). Growth is judged from at least this level (and _MAX_VIO_FLOOR)."""
    if imb[["n_experts", "top_k", "tokens"]].isna().any().any():  # token counts unknown (an engine's count dump)
        return _MAX_VIO_FLOOR
    e, k, t = float(imb["n_experts"].iloc[0]), float(imb["top_k"].iloc[0]), float(imb["tokens"].mean())
    if e < 2 or not t:
        return _MAX_VIO_FLOOR
    return max(_MAX_VIO_FLOOR, math.sqrt(2 * math.log(e) * e / (t * k)))


def _row(run_id, severity, check, message, layer=None, expert=None, value=None, threshold=None) -> dict:
    return dict(run_id=run_id, severity=severity, check=check, layer=layer, expert=expert, value=value,
                threshold=threshold, message=message)


def _selected_runs(con, sel: Selection) -> list[str]:
    where, params = Selection(run_ids=sel.run_ids).where("ru")
    return run_query(con, f"SELECT run_id FROM runs ru WHERE {where} ORDER BY run_id", params)["run_id"].tolist()


def _steps(con, sel: Selection, run_id: str) -> list[int]:
    """The distinct selected steps of one run, in order."""
    one = sel.with_(run_ids=(run_id,))
    if one.needs_sequences:
        where, params = one.with_(layers=None).where("q", per_token=True)
        sql = f"SELECT DISTINCT step FROM sequences q WHERE {where} ORDER BY step"
    else:  # layer_stats holds the same steps as step_stats in E times fewer rows
        where, params = one.where("s")
        sql = f"SELECT DISTINCT step FROM layer_stats s WHERE {where} ORDER BY step"
    return [int(s) for s in run_query(con, sql, params)["step"]]


def _windows(steps: list[int], window: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """First and last windows (inclusive step ranges) of `window` x the selected steps, at least one step."""
    n = max(1, math.ceil(len(steps) * window))
    return (steps[0], steps[n - 1]), (steps[-n], steps[-1])


def _collapse_rows(load: pd.DataFrame, run_id: str, collapse_share: float, span: str) -> list[dict]:
    rows = []
    for layer, g in load.groupby("layer", sort=True):
        tokens = g["tokens"].iloc[0]
        if pd.isna(tokens) or not tokens or g["first_choice"].isna().any():  # unknown in engine logs: no check
            continue
        top = g.loc[g["first_choice"].idxmax()]
        share = float(top["first_choice"]) / float(tokens)
        threshold = max(collapse_share, min(1.0, 2.0 / float(top["n_experts"])))
        if share > threshold:
            rows.append(_row(
                run_id, "error", "collapsed_expert",
                f"expert {int(top['expert'])} is the top choice of {share:.0%} of layer {int(layer)}'s tokens "
                f"({span}); the router has collapsed onto it: raise the balancing loss/bias update rate or lower "
                "the router learning rate",
                layer=int(layer), expert=int(top["expert"]), value=share, threshold=threshold))
    return rows


def _ratio(v: float) -> str:
    """0.05x, 0.00034x: two significant digits below 0.1 (not "0.00x" for 0.000341)."""
    return f"{v:.2f}x" if v >= 0.1 else f"{v:.2g}x"


def _dead_rows(load: pd.DataFrame, run_id: str, dead_threshold: float, span: str) -> list[dict]:
    dead = load[load["relative_load"].notna() & (load["relative_load"] < dead_threshold)]
    rows = []
    for r in dead.itertuples(index=False):  # one row per dead expert: a handful, not per token
        never = int(r.assigned) == 0
        rows.append(_row(
            run_id, "error" if never else "warn", "dead_expert",
            f"expert {int(r.expert)} of layer {int(r.layer)} "
            + ("received no token" if never else f"received {_ratio(r.relative_load)} its uniform share")
            + f" ({span}); its parameters are wasted: check the balancing loss, or re-initialise it",
            layer=int(r.layer), expert=int(r.expert), value=float(r.relative_load), threshold=dead_threshold))
    return rows


def _window_max_vio(con, sel: Selection, windows: list[tuple[int, int]]) -> pd.DataFrame:
    """Per-step MaxVio of every layer in the given step windows (rank counts summed), as `imbalance` computes it:
    (max - mean) / mean over the layer's E experts, an expert with no row counting 0 (so the mean is sum / E).
    One GROUP BY over the windows' step_stats rows instead of `imbalance`'s expert grid and window functions:
    at 100,000 steps the two quarter-windows are 50,000 steps, and the grid made this check 3.8 s of the
    Overview's 4.6 s. Each step's MaxVio is its own, so roll-ups cannot give it; layer_buckets holds each step's
    busiest expert (resolution 1), one row per step and layer instead of E (58 x 256: 5.9 s -> well under 1 s
    at 10,000 steps)."""
    where, params = sel.with_(steps=None).where("s")
    span = " OR ".join("s.step BETWEEN ? AND ?" for _ in windows)
    params = params + [int(x) for w in windows for x in w]
    if sel.ranks is None and buckets_available(con):  # each step's busiest expert, stored at compaction
        return run_query(con, f"""
            SELECT s.step, s.layer, s.n_experts, s.top_k, s.tokens,
                   (s.assigned_max - s.assigned / s.n_experts) / nullif(s.assigned / s.n_experts, 0) AS max_vio
            FROM layer_buckets s WHERE s.resolution = 1 AND {where} AND ({span})
            ORDER BY s.layer, s.step""", params)
    # summed per (step, layer, expert): a step's rows may be split over ranks, over flushes (an import's large
    # step) or over two step() calls of one step number, and the schema adds them up
    c = ("SELECT s.run_id, s.step, s.layer, s.expert, sum(s.assigned) AS n, sum(s.tokens) AS tokens "
         f"FROM step_stats s WHERE {where} AND ({span}) GROUP BY ALL")
    return run_query(con, f"""
        WITH c AS ({c}),
        per AS (
            SELECT run_id, step, layer, max(n) AS top, sum(n) AS total, max(tokens) AS tokens FROM c GROUP BY ALL)
        SELECT per.step, per.layer, coalesce(l.n_experts, ru.n_experts) AS n_experts,
               coalesce(l.top_k, ru.top_k) AS top_k, per.tokens,
               (per.top - per.total / coalesce(l.n_experts, ru.n_experts))
                   / nullif(per.total / coalesce(l.n_experts, ru.n_experts), 0) AS max_vio
        FROM per LEFT JOIN layers l ON l.run_id = per.run_id AND l.layer = per.layer
             LEFT JOIN runs ru ON ru.run_id = per.run_id
        ORDER BY per.layer, per.step""", params)


def _growth_rows(con, sel: Selection, run_id: str, first: tuple[int, int], last: tuple[int, int],
                 growth: float) -> list[dict]:
    # the two windows only, never the steps between them: per-step MaxVio over the whole run cost 12 s at 100,000
    # steps x 64 experts and layers, and the check reads only the windows' means (each step's MaxVio is its own)
    one = sel.with_(run_ids=(run_id,))
    windows = [(first[0], last[1])] if last[0] <= first[1] + 1 else [first, last]  # touching windows: one range
    if one.needs_sequences:  # domains/tags: the per-token detail, through imbalance
        imb = pd.concat([imbalance(con, one.with_(steps=w), by_step=True) for w in windows], ignore_index=True)
    else:
        if one.steps is not None:  # the windows lie inside the selected steps already
            one = one.with_(steps=None)
        imb = _window_max_vio(con, one, windows)
    rows = []
    for layer, g in imb.groupby("layer", sort=True):
        early = g.loc[g["step"].between(*first), "max_vio"].mean()
        late = g.loc[g["step"].between(*last), "max_vio"].mean()
        threshold = growth * max(float(early), _max_vio_noise(g))
        if pd.notna(late) and late > threshold:
            rows.append(_row(
                run_id, "warn", "growing_imbalance",
                f"layer {int(layer)}: MaxVio rose from {early:.3f} (steps {first[0]}-{first[1]}) to {late:.3f} "
                f"(steps {last[0]}-{last[1]}), more than {growth:g}x: the balancing is losing ground",
                layer=int(layer), value=float(late), threshold=threshold))
    return rows


def _drop_rows(con, sel: Selection, run_id: str, capacity_factor: float, threshold: float) -> list[dict]:
    try:
        drops = capacity_drops(con, sel.with_(run_ids=(run_id,)), capacity_factor, by=("layer",))
    except UnknownQuantityError as e:  # no token counts (an engine's count dump): say so, not "nothing flagged"
        return [_row(run_id, "ok", "capacity_drops", f"not checked: {e}")]
    rows = []
    for r in drops.itertuples(index=False):
        if pd.notna(r.drop_rate) and r.drop_rate > threshold:
            rows.append(_row(
                run_id, "warn", "capacity_drops",
                f"layer {int(r.layer)}: at capacity factor {capacity_factor:g} a capacity-limited router would "
                f"drop {r.drop_rate:.1%} of assignments ({int(r.dropped)} of {int(r.assigned)})",
                layer=int(r.layer), value=float(r.drop_rate), threshold=threshold))
    return rows


def _model_drop_rows(con, sel: Selection, run_id: str, threshold: float) -> list[dict]:
    """The drops the model itself made (capacity-limited models record them in layer_stats); sums over the
    selected steps, so the step roll-ups answer for whole blocks (moeviz.analyses.step_rows)."""
    rows_sql, params = step_rows_sql(con, "layer_stats", sel.with_(run_ids=(run_id,)),
                                     ("run_id", "layer", "tokens", "dropped"), by_step=False)
    df = run_query(con, f"""
        SELECT s.layer, sum(s.dropped) AS dropped,
               sum(s.tokens) * any_value(coalesce(l.top_k, ru.top_k)) AS assignments
        FROM {rows_sql} s LEFT JOIN layers l ON l.run_id = s.run_id AND l.layer = s.layer
             LEFT JOIN runs ru ON ru.run_id = s.run_id
        GROUP BY s.layer ORDER BY s.layer""", params)
    if len(df) and df["dropped"].isna().all():  # the source cannot say what the model dropped (Megatron's trace)
        return [_row(run_id, "ok", "model_drops", "not checked: the run's source does not record the drops the "
                     "model itself made (a Megatron-LM routing trace is taken before the capacity drop)")]
    rows = []
    for r in df.itertuples(index=False):
        if pd.isna(r.dropped) or pd.isna(r.assignments):
            continue
        rate = float(r.dropped) / float(r.assignments) if r.assignments else 0.0
        if rate > threshold:
            rows.append(_row(
                run_id, "warn", "model_drops",
                f"layer {int(r.layer)}: the model itself dropped {rate:.1%} of assignments "
                f"({int(r.dropped)}); raise its capacity factor or improve balance",
                layer=int(r.layer), value=rate, threshold=threshold))
    return rows


def _nonfinite_rows(con, sel: Selection, run_id: str) -> list[dict]:
    """Tokens whose router logits or gate weights were NaN or infinite (layer_stats.nonfinite_tokens): the
    recorded sums leave them out, so without this check a diverging router would look healthy. Per-step
    aggregates hold no domain or tag, so those parts of the selection do not apply here."""
    if "nonfinite_tokens" not in column_names(con, "layer_stats"):
        return []
    one = sel.with_(run_ids=(run_id,), domains=None, tags=None)
    if rollups_available(con) and one.ranks is None:  # none in the run's roll-up: none in any of its steps
        lwhere, lparams = one.with_(steps=None).where()
        if run_query(con, f"SELECT count(*) AS n FROM layer_rollups WHERE resolution = {max(RESOLUTIONS)} "
                          f"AND nonfinite_tokens > 0 AND {lwhere}", lparams)["n"].iloc[0] == 0:
            return []
    where, params = one.where("s")
    df = run_query(con, f"""
        SELECT s.layer, s.step, sum(s.nonfinite_tokens) AS bad, sum(s.tokens) AS good
        FROM layer_stats s WHERE {where} AND s.nonfinite_tokens > 0 GROUP BY s.layer, s.step
        ORDER BY s.layer, s.step""", params)
    rows = []
    for layer, g in df.groupby("layer", sort=True):
        bad, total = int(g["bad"].sum()), int(g["bad"].sum() + g["good"].sum())
        steps = [int(x) for x in g["step"]]
        rows.append(_row(
            run_id, "error", "nonfinite_router",
            f"layer {int(layer)}: {bad} token(s) had NaN or infinite router logits or gate weights, in "
            f"{steps_text(steps, most=6)}; they are left out of every recorded aggregate and route. Look for a "
            "diverging loss, too high a learning rate, or bf16/fp16 overflow in the router's input",
            layer=int(layer), value=bad / total if total else 1.0, threshold=0.0))
    return rows


def _recording_rows(con, run_id: str) -> list[dict]:
    """A run whose recording lost data (runs.recording_errors > 0): training went on, some steps are missing."""
    if "recording_errors" not in column_names(con, "runs"):
        return []
    df = run_query(con, "SELECT recording_errors, recording_error FROM runs WHERE run_id = ? AND recording_errors > 0",
                   [run_id])
    return [_row(run_id, "warn", "recording_errors",
                 f"the recording lost data ({int(r.recording_errors)} recording error(s)); the first: "
                 f"{r.recording_error}. The analyses cover what was written", value=float(r.recording_errors),
                 threshold=0.0)
            for r in df.itertuples(index=False)]


def health_summary(
    con,
    sel: Selection = Selection(),
    *,
    dead_threshold: float = 0.1,
    collapse_share: float = 0.5,
    imbalance_growth: float = 2.0,
    drop_rate_threshold: float = 0.1,
    capacity_factor: float | None = 1.25,
    window: float = 0.25,
) -> pd.DataFrame:
    """Findings about the routing of every selected run, worst first (see `_worst_first`).

    Checks (the `check` column):
    - collapsed_expert (error): in the last window, one expert is the top choice of more than
      max(collapse_share, 2/E) of a layer's tokens;
    - dead_expert (warn; error if it got nothing): in the last window, an expert's share of the layer's
      assignments is below dead_threshold x the uniform share;
    - growing_imbalance (warn): mean MaxVio of the last window > imbalance_growth x that of the first window
      (or than the MaxVio uniform random routing shows by chance at this step size, if larger), for runs
      with two or more selected steps;
    - capacity_drops (warn): at capacity_factor (None skips it), a layer would drop more than
      drop_rate_threshold of its assignments (see `moeviz.analyses.capacity`);
    - model_drops (warn): the model's own recorded drops exceed drop_rate_threshold;
    - nonfinite_router (error): tokens whose router logits or gate weights were NaN or infinite in the selected
      steps (layer_stats.nonfinite_tokens), per layer, with the steps; value = their share of the layer's tokens;
    - recording_errors (warn): the Recorder lost data (a flush it could not write) and training went on;
    - no_data (error): the run has no recorded step in the selection.
    `window` is the share of the selected steps in the first/last windows (at least one step each).
    Columns: run_id, severity ('error' | 'warn' | 'ok'), check, layer, expert, value, threshold, message.
    """
    if not 0 < window <= 1:
        raise AnalysisError(f"window is a share of the selected steps, in (0, 1]; got {window}")
    if not 0 < collapse_share <= 1:
        raise AnalysisError(f"collapse_share is a share of a layer's tokens, in (0, 1]; got {collapse_share}")
    if imbalance_growth <= 0:
        raise AnalysisError(f"imbalance_growth is a ratio of MaxVio, > 0; got {imbalance_growth}")
    rows: list[dict] = []
    for run_id in _selected_runs(con, sel):
        steps = _steps(con, sel, run_id)
        if not steps:
            rows.append(_row(run_id, "error", "no_data", "no recorded step in the selection: is the Recorder "
                             "stepping (rec.step(...)), and do --steps/--layers match the run?"))
            rows += _recording_rows(con, run_id)  # every flush may have been lost: say why
            continue
        first, last = _windows(steps, window)
        span = f"steps {last[0]}-{last[1]}"
        recent = expert_load(con, sel.with_(run_ids=(run_id,), steps=last), by_step=False)
        found = {
            "collapsed_expert": _collapse_rows(recent, run_id, collapse_share, span) if recent["first_choice"].notna().any()
            else [_row(run_id, "ok", "collapsed_expert", "not checked: the run holds no top choices (slot order by "
                       "score), e.g. it was imported from an engine log")],
            "dead_expert": _dead_rows(recent, run_id, dead_threshold, span),
        }
        if len(steps) >= 2:
            found["growing_imbalance"] = _growth_rows(con, sel, run_id, first, last, imbalance_growth)
        if capacity_factor is not None:
            found["capacity_drops"] = _drop_rows(con, sel, run_id, capacity_factor, drop_rate_threshold)
        if not sel.needs_sequences:
            found["model_drops"] = _model_drop_rows(con, sel, run_id, drop_rate_threshold)
        found["nonfinite_router"] = _nonfinite_rows(con, sel, run_id)
        found["recording_errors"] = _recording_rows(con, run_id)
        n_layers = recent["layer"].nunique()
        for check, found_rows in found.items():
            rows += found_rows or [_row(run_id, "ok", check, f"nothing flagged in {n_layers} layers, {len(steps)} steps")]
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["layer"] = df["layer"].astype("Int64")
    df["expert"] = df["expert"].astype("Int64")
    df["value"] = df["value"].astype("float64")
    df["threshold"] = df["threshold"].astype("float64")
    return _worst_first(df)


# Within a severity, which check is worse: a run with no data, then a collapsed router, dead experts (wasted
# parameters), the drops the model itself made, imbalance that grows, and last the drops a capacity-limited router
# would make (a what-if).
CHECK_ORDER = ("no_data", "collapsed_expert", "dead_expert", "model_drops", "growing_imbalance", "capacity_drops")


def _worst_first(df: pd.DataFrame) -> pd.DataFrame:
    """Errors, then warnings, then ok rows; within a severity by CHECK_ORDER, and within a check by how far past
    its threshold (the largest share or drop first; for dead experts the smallest load first); then by run,
    layer and expert so that the order is stable."""
    sev = df["severity"].map({s: i for i, s in enumerate(SEVERITIES)})
    check = df["check"].map({c: i for i, c in enumerate(CHECK_ORDER)}).fillna(len(CHECK_ORDER))
    badness = df["value"].where(df["check"] != "dead_expert", -df["value"]).fillna(float("-inf"))
    return (df.assign(_s=sev, _c=check, _b=-badness)
            .sort_values(["_s", "_c", "_b", "run_id", "layer", "expert"], kind="stable")
            .drop(columns=["_s", "_c", "_b"]).reset_index(drop=True))
