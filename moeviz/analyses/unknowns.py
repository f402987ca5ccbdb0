"""Saying why an analysis cannot answer: the quantities a run may not hold (runs imported from engine logs).

An SGLang, vLLM or Megatron-LM log has no gate weights, no router probabilities or logits, no slot order by score,
and SGLang's count dumps no token counts (moeviz.importers). Those columns are NULL in the run, and an analysis
that needs one must not answer with the zeros or NaN that SQL would make of them: `require` raises
UnknownQuantityError, which says what the analysis needs, which runs lack it and why. Pages show the message in
place of the chart (app.components.guarded).
"""

from __future__ import annotations

import json

from moeviz.analyses.load import AnalysisError
from moeviz.selection import Selection
from moeviz.store.reader import column_names

# quantity -> (table, column, what it is)
QUANTITIES = {
    "prob_sum": ("step_stats", "prob_sum", "the router's probabilities over every expert (step_stats.prob_sum)"),
    "first_choice": ("step_stats", "first_choice", "each token's top choice, i.e. slots ordered by router score "
                                                   "(step_stats.first_choice)"),
    "tokens": ("step_stats", "tokens", "the number of tokens that reached each layer (step_stats.tokens)"),
    "z_loss": ("layer_stats", "z_loss_sum", "the router's logits (layer_stats.z_loss_sum)"),
    "entropy": ("layer_stats", "entropy_sum", "the router's logits (layer_stats.entropy_sum)"),
    "weight": ("routes", "weight", "the gate weights of the chosen experts (routes.weight)"),
}
ENGINES = {"sglang": "SGLang expert-distribution dumps", "vllm": "vLLM routed experts",
           "megatron": "a Megatron-LM routing trace"}


class UnknownQuantityError(AnalysisError):
    """The selected runs do not hold a quantity the analysis needs (it is NULL: the source did not record it)."""


def require(con, sel: Selection, quantity: str, what: str) -> None:
    """Raise UnknownQuantityError when a selected run holds rows of the quantity's table but none with a value."""
    table, column, meaning = QUANTITIES[quantity]
    missing = _runs_without(con, sel, table, column)
    if not missing:
        return
    names = ", ".join(repr(r) for r in missing[:3]) + (", ..." if len(missing) > 3 else "")
    sources = sorted({_source(con, r) for r in missing} - {None})
    why = (f"it was imported from {' and '.join(ENGINES.get(s, s) for s in sources)}, which do not record it"
           if sources else "its recorder did not record it")
    raise UnknownQuantityError(f"{what} needs {meaning}, which run {names} does not hold: {why}. Analyses of "
                               f"expert counts (load, imbalance, placement) still work on it.")


def summed_ranks(con, sel: Selection) -> dict | None:
    """Where the selection's step aggregates are sums over several ranks (`layer_stats.ranks_summed`, written by
    `Recorder(reduce_ranks=...)`): {'run_id', 'ranks', 'first_step', 'last_step', 'steps', 'writers'} of the first
    such run (`writers`: the ranks whose rows hold the sums, each group's first), or None. Such a row's `rank` is the writing rank, not the one that routed, so one rank's counts are unknown
    there. The rank filter is left out on purpose: filtering rank 1 of a summed run finds no rows instead of the
    sums that hold its tokens."""
    if "ranks_summed" not in column_names(con, "layer_stats"):
        return None
    where, params = sel.with_(domains=None, tags=None, ranks=None).where("l")
    row = con.execute(f"""
        SELECT run_id, max(ranks_summed), min(step), max(step), count(DISTINCT step),
               list(DISTINCT rank ORDER BY rank) FROM layer_stats l
        WHERE {where} AND ranks_summed > 1 GROUP BY run_id ORDER BY run_id LIMIT 1""", params).fetchone()
    if row is None:
        return None
    return dict(zip(("run_id", "ranks", "first_step", "last_step", "steps"), (row[0], *map(int, row[1:5]))),
                writers=[int(r) for r in row[5]])


def require_per_rank(con, sel: Selection, what: str) -> None:
    """Raise UnknownQuantityError when `what` needs one rank's step aggregates and the selection holds steps whose
    aggregates were summed over ranks at recording (see `summed_ranks`)."""
    found = summed_ranks(con, sel)
    if found is None:
        return
    raise UnknownQuantityError(
        f"{what} needs each rank's own counts per step, but run {found['run_id']!r} summed the step aggregates of "
        f"{found['ranks']} ranks at recording (Recorder(reduce_ranks=...), on by default past 8 ranks) for "
        f"{found['steps']} steps ({found['first_step']}-{found['last_step']}). Choose other steps, use "
        f"group='sequence' (it reads each rank's routes), or record with reduce_ranks=False.")


def _runs_without(con, sel: Selection, table: str, column: str) -> list[str]:
    ids = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall()]
    if sel.run_ids is not None:
        ids = [r for r in ids if r in set(sel.run_ids)]
    out = []
    for run_id in ids:
        # LIMIT 1 twice: a recorded run answers at its first row; only a run without the values is read through
        has_rows = con.execute(f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE run_id = ? LIMIT 1)",
                               [run_id]).fetchone()[0]
        if has_rows and not con.execute(f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE run_id = ? AND "
                                        f"{column} IS NOT NULL LIMIT 1)", [run_id]).fetchone()[0]:
            out.append(run_id)
    return out


def _source(con, run_id: str) -> str | None:
    row = con.execute("SELECT config FROM runs WHERE run_id = ?", [run_id]).fetchone()
    try:
        return (json.loads(row[0]) or {}).get("source") if row and row[0] else None
    except (ValueError, AttributeError):
        return None


def steps_with_sequences(con, run_id: str) -> list[int]:
    """The steps that hold `sequences` rows, ascending: the steps that kept per-token detail (the Recorder and the
    importers write a sequence's row with its routes). A run that samples routes every N steps holds none at
    most steps; the per-token window counts these steps, not every step (its default was the run's last step,
    which a run sampled every 1,000 steps never kept: every per-token page said the run kept no detail)."""
    rows = con.execute("SELECT DISTINCT step FROM sequences WHERE run_id = ? ORDER BY step", [run_id]).fetchall()
    return [int(r[0]) for r in rows]
