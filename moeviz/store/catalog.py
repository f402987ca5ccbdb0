"""What a store holds, for the dashboard's lists and notebooks: which runs exist, their steps, layers, ranks,
domains and sequences, one sequence's routes, and how far a live run has been written.

Every function takes a DuckDB connection exposing the public schema (`moeviz.store.schema`) and returns plain Python
values or a pandas DataFrame. User values always travel as SQL parameters (a user's own SQL is `moeviz.store.sql`'s).
"""

from __future__ import annotations

import pandas as pd

from moeviz.errors import MoevizError, StaleStoreError
from moeviz.store.reader import STALE_MESSAGE, column_names, holds_one_run, is_stale, route_stats_complete


class RunNotFoundError(MoevizError, LookupError):
    """The run id is not in the store."""


def _df(con, sql: str, params: list | tuple | dict = ()) -> pd.DataFrame:
    import duckdb

    try:
        return con.execute(sql, params if isinstance(params, dict) else list(params)).df()
    except duckdb.Error as e:
        if is_stale(e):
            raise StaleStoreError(STALE_MESSAGE) from e
        raise


def list_runs(con) -> pd.DataFrame:
    """One row per run, newest first, with what a run picker needs to label it."""
    return _df(
        con,
        "SELECT run_id, run_name, model_class, n_layers, n_experts, top_k, capacity_factor, world_size, "
        "status, started_at, ended_at, schema_version FROM runs ORDER BY started_at DESC NULLS LAST, run_id",
    )


def _check_run(con, run_id: str) -> None:
    if con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0] == 0:
        known = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY run_id LIMIT 20").fetchall()]
        raise RunNotFoundError(
            f"no run {run_id!r} in this store; runs here: {', '.join(known) or '(none)'}. "
            "Pick one of those, or point moeviz at the folder that holds the run."
        )


def run_overview(con, run_id: str, *, count_routes: bool = True) -> pd.DataFrame:
    """One row: the run's metadata plus what was recorded (steps, tokens, sampled routes, sequences).

    `tokens` counts every token that reached the first MoE layer, summed over steps and ranks (exact, from
    `layer_stats`); `routed_tokens` counts the tokens kept with per-token detail (from `routes`).
    Counting routes scans the whole routes table (seconds at 100 M routes): with `count_routes=False` the two
    route columns are NULL and only the run row and the aggregates are read (what a page header needs at once;
    `route_counts` gives them later).
    """
    _check_run(con, run_id)
    if count_routes:
        counts = route_counts(con, run_id)
        routed, rows = f"{counts['routed_tokens']} AS routed_tokens", f"{counts['route_rows']} AS route_rows"
    else:
        routed, rows = "CAST(NULL AS BIGINT) AS routed_tokens", "CAST(NULL AS BIGINT) AS route_rows"
    # what the Recorder lost (runs.recording_errors); NULL on a connection built before the column existed
    recording = ("r.recording_errors, r.recording_error" if "recording_errors" in column_names(con, "runs")
                 else "CAST(NULL AS BIGINT) AS recording_errors, CAST(NULL AS VARCHAR) AS recording_error")
    return _df(
        con,
        f"""
        WITH ls AS (
            SELECT count(DISTINCT step) AS steps, min(step) AS first_step, max(step) AS last_step,
                   sum(tokens) FILTER (WHERE layer = (SELECT min(layer) FROM layer_stats WHERE run_id = $1))
                       AS tokens,
                   sum(dropped) AS dropped
            FROM layer_stats WHERE run_id = $1
        ),
        sq AS (SELECT count(*) AS sequences, count(DISTINCT domain) AS domains FROM sequences WHERE run_id = $1)
        SELECT r.run_id, r.run_name, r.model_class, r.n_layers, r.n_experts, r.top_k, r.capacity_factor,
               r.world_size, r.sample_every, r.max_tokens_per_step, r.status, r.error, r.started_at, r.ended_at,
               r.schema_version, CAST(r.config AS VARCHAR) AS config,
               coalesce(ls.steps, 0) AS steps, ls.first_step, ls.last_step,
               -- NULL, not 0, where a run has steps but its source did not count them (engine logs)
               CASE WHEN coalesce(ls.steps, 0) = 0 THEN 0 ELSE ls.tokens END AS tokens,
               CASE WHEN coalesce(ls.steps, 0) = 0 THEN 0 ELSE ls.dropped END AS dropped,
               {routed}, {rows},
               coalesce(sq.sequences, 0) AS sequences, coalesce(sq.domains, 0) AS domains,
               {recording}
        FROM runs r, ls, sq WHERE r.run_id = $1
        """,
        [run_id],
    )


def route_counts(con, run_id: str) -> dict:
    """{'routed_tokens', 'route_rows'}: tokens kept with per-token detail (slot-0 rows of the first layer that has
    routes) and all route rows of the run. From `position_stats` when it covers the run (milliseconds), else a scan
    of the routes (1-2 s at 100 M routes, so pages ask for it after their charts)."""
    if route_stats_complete(con).get(run_id):
        routed, rows = con.execute(
            "SELECT sum(first_choice) FILTER (WHERE layer = (SELECT min(layer) FROM position_stats WHERE run_id = ?)),"
            " sum(assigned) FROM position_stats WHERE run_id = ?", [run_id, run_id]).fetchone()
        return {"routed_tokens": int(routed or 0), "route_rows": int(rows or 0)}
    first = con.execute("SELECT min(layer) FROM layers WHERE run_id = ?", [run_id]).fetchone()[0]
    if first is not None and con.execute(
        "SELECT count(*) FROM (SELECT 1 FROM routes WHERE run_id = ? AND layer = ? LIMIT 1)", [run_id, first]
    ).fetchone()[0] == 0:
        first = None  # the first declared layer kept no detail: find the first one that did
    if first is None:
        first = con.execute("SELECT min(layer) FROM routes WHERE run_id = ?", [run_id]).fetchone()[0]
    # one scan reading two narrow columns (a bare count(*) took 2.3 s over 100 M routes, this 0.45 s)
    alone = holds_one_run(con)
    routed, rows = con.execute(
        "SELECT count(*) FILTER (WHERE slot = 0 AND layer = ?), count(*) FROM routes"
        + ("" if alone else " WHERE run_id = ?"),
        [first] if alone else [first, run_id],
    ).fetchone()
    return {"routed_tokens": int(routed or 0), "route_rows": int(rows or 0)}


def has_routes(con, run_id: str) -> bool:
    """Whether the run kept any per-token detail (stops at the first route row)."""
    return con.execute("SELECT count(*) FROM (SELECT 1 FROM routes WHERE run_id = ? LIMIT 1)", [run_id]).fetchone()[0] > 0


def routes_per_step(con, run_id: str) -> int:
    """An upper bound of the route rows one step holds: the largest step's tokens summed over MoE layers (and
    ranks), times each layer's top-k, from the exact aggregates in `layer_stats` (milliseconds, whatever the size
    of `routes`). Sampling (sample_every, max_tokens_per_step) only keeps fewer. 0 for a run with no steps."""
    row = con.execute(
        """
        SELECT max(n) FROM (
            SELECT ls.step, sum(ls.tokens * coalesce(l.top_k, r.top_k, 1)) AS n
            FROM layer_stats ls
                 JOIN runs r ON r.run_id = ls.run_id
                 LEFT JOIN layers l ON l.run_id = ls.run_id AND l.layer = ls.layer
            WHERE ls.run_id = ? GROUP BY ls.step)
        """,
        [run_id],
    ).fetchone()
    return int(row[0] or 0)


def route_window(steps: list[int] | tuple[int, ...], per_step: int, budget: int = 2_000_000) -> tuple[int, int] | None:
    """The last steps of `steps` (ascending) whose routes fit in `budget` rows at `per_step` rows a step, at least
    one step: the default window of the per-token analyses, so that they read a few million routes whatever the
    size of the store. None when there are no steps."""
    if not steps:
        return None
    n = len(steps) if per_step <= 0 else max(1, min(len(steps), budget // per_step))
    return (int(steps[-n]), int(steps[-1]))


def step_range(con, run_id: str) -> tuple[int, int] | None:
    """First and last recorded step of a run (from the exact aggregates), or None when nothing is recorded."""
    lo, hi = con.execute(
        "SELECT min(step), max(step) FROM (SELECT step FROM layer_stats WHERE run_id = ? "
        "UNION ALL SELECT step FROM sequences WHERE run_id = ?)",
        [run_id, run_id],
    ).fetchone()
    return None if lo is None else (int(lo), int(hi))


def steps_list(con, run_id: str) -> list[int]:
    """Every recorded step of a run, ascending (for step pickers that must land on a real step)."""
    rows = con.execute(
        "SELECT DISTINCT step FROM layer_stats WHERE run_id = ? ORDER BY step", [run_id]
    ).fetchall()
    return [int(r[0]) for r in rows]


def layer_list(con, run_id: str) -> pd.DataFrame:
    """The run's MoE layers (layer, module_name, n_experts, top_k, block_index, stack), by layer."""
    return _df(
        con,
        "SELECT layer, module_name, n_experts, top_k, block_index, stack FROM layers WHERE run_id = ? ORDER BY layer",
        [run_id],
    )


def rank_list(con, run_id: str) -> list[int]:
    """Ranks that wrote aggregates for the run."""
    rows = con.execute("SELECT DISTINCT rank FROM layer_stats WHERE run_id = ? ORDER BY rank", [run_id]).fetchall()
    return [int(r[0]) for r in rows]


def domain_list(con, run_id: str) -> list[str]:
    """Domain labels of the run's recorded sequences (NULL domains left out), sorted."""
    rows = con.execute(
        "SELECT DISTINCT domain FROM sequences WHERE run_id = ? AND domain IS NOT NULL ORDER BY domain", [run_id]
    ).fetchall()
    return [r[0] for r in rows]


def tag_list(con, run_id: str) -> list[str]:
    """Step tags of the run's sequences ('train', 'eval', 'probe', ...), sorted."""
    rows = con.execute(
        "SELECT DISTINCT tag FROM sequences WHERE run_id = ? AND tag IS NOT NULL ORDER BY tag", [run_id]
    ).fetchall()
    return [r[0] for r in rows]


def step_tags(con, run_id: str) -> pd.DataFrame:
    """The tag of each recorded step's sequences ('train', 'eval', 'probe', ...): columns step, tag, one row per
    step and tag, by step. Steps whose sequences carry no tag (or that recorded no sequences) are left out.
    What the dashboard offers for router saturation (the probe steps) and for the train/eval/probe filter."""
    return _df(
        con,
        "SELECT DISTINCT step, tag FROM sequences WHERE run_id = ? AND tag IS NOT NULL ORDER BY step, tag",
        [run_id],
    )


def sequence_list(con, run_id: str, *, step: int | None = None, steps: tuple[int, int] | None = None,
                  limit: int = 500, preview_tokens: int = 12) -> pd.DataFrame:
    """Sequences that have per-token detail, newest step first: step, rank, seq, domain, tag, n_tokens,
    kept_tokens, preview (the first tokens' text, when the run has a vocabulary).

    `step` keeps one step, `steps` an inclusive (first, last) range: on a large store give one, since listing
    every sequence scans the whole routes table."""
    clauses, params = ["run_id = $run"], {"run": run_id, "preview": int(preview_tokens), "limit": int(limit)}
    if step is not None:
        clauses.append("step = $step")
        params["step"] = int(step)
    if steps is not None:
        clauses.append("step BETWEEN $lo AND $hi")  # constant bounds, so the scan skips other steps' row groups
        params["lo"], params["hi"] = int(steps[0]), int(steps[1])
    where = " AND ".join(clauses)
    return _df(
        con,
        f"""
        WITH r AS (SELECT * FROM routes WHERE {where}),
        first_layer AS (SELECT min(layer) AS layer FROM r),
        kept AS (
            SELECT r.step, r.rank, r.seq, count(*) AS kept_tokens,
                   string_agg(coalesce(v.text, CAST(r.token_id AS VARCHAR)), '' ORDER BY r.pos)
                       FILTER (WHERE r.pos < $preview) AS preview
            FROM r JOIN first_layer f ON r.layer = f.layer
                 LEFT JOIN vocab v ON v.run_id = r.run_id AND v.token_id = r.token_id
            WHERE r.slot = 0
            GROUP BY ALL
        )
        SELECT k.step, k.rank, k.seq, s.domain, s.tag, s.n_tokens, k.kept_tokens, k.preview
        FROM kept k LEFT JOIN sequences s ON s.run_id = $run AND s.step = k.step AND s.rank = k.rank AND s.seq = k.seq
        ORDER BY k.step DESC, k.rank, k.seq
        LIMIT $limit
        """,
        params,
    )


def sequence_routes(con, run_id: str, step: int, rank: int, seq: int) -> pd.DataFrame:
    """Every kept token of one sequence with its routing, one row per token, layer and slot.

    Columns: pos, token_id, text (the vocabulary text, or the id when the run has no vocabulary), layer, slot,
    expert, weight; ordered by pos, layer, slot. Empty when the sequence has no per-token detail.
    """
    return _df(
        con,
        """
        SELECT r.pos, r.token_id, coalesce(v.text, CAST(r.token_id AS VARCHAR)) AS text,
               r.layer, r.slot, r.expert, r.weight
        FROM routes r LEFT JOIN vocab v ON v.run_id = r.run_id AND v.token_id = r.token_id
        WHERE r.run_id = ? AND r.step = ? AND r.rank = ? AND r.seq = ?
        ORDER BY r.pos, r.layer, r.slot
        """,
        [run_id, int(step), int(rank), int(seq)],
    )


def run_progress(con, run_id: str) -> dict:
    """A cheap fingerprint of how far a run has been written (status, steps, last step, tokens), read from the
    run row and the per-layer aggregates only: live refresh compares it between polls to know when to reload."""
    row = con.execute(
        """
        SELECT (SELECT status FROM runs WHERE run_id = $1),
               count(DISTINCT step), max(step), sum(tokens), count(*)
        FROM layer_stats WHERE run_id = $1
        """,
        [run_id],
    ).fetchone()
    return {"status": row[0], "steps": int(row[1]), "last_step": row[2], "tokens": int(row[3] or 0), "rows": int(row[4])}
