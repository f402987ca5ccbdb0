"""Layer flow: how the tokens of each expert of one layer spread over the experts of another, from
`flow_stats` or the routes.

See `moeviz.analyses.specialization` for how these read the store.
"""

from __future__ import annotations

import pandas as pd

from moeviz.analyses.specialization._shared import (
    _df,
    _from_aggregates,
    _per_run,
    _routes,
    _RunId,
    _typed,
)
from moeviz.selection import Selection
from moeviz.analyses.unknowns import require

_FLOW_COLUMNS = ["run_id", "layer_a", "expert_a", "layer_b", "expert_b", "tokens", "share_of_a"]


def layer_flow(con, sel: Selection, layer_a: int, layer_b: int, *, slot0_only: bool = True,
               source: str = "auto") -> pd.DataFrame:
    """Tokens going from expert i of `layer_a` to expert j of `layer_b` (the links of a Sankey diagram).

    With `slot0_only` a token counts once, for its first choices in both layers; otherwise once for every pair
    (i among its k experts in layer_a, j among its k in layer_b), so a token adds k_a * k_b links. Only tokens
    recorded in both layers count. `share_of_a` = tokens / all links leaving expert i of layer_a. The selection's
    `layers` are ignored (the two layers are given); only pairs with tokens > 0 are listed.

    Reads `flow_stats` (every token, counted on the device) when it holds layer_a -> layer_b for every selected
    step (by default the Recorder counts each layer and the next) and the selection has no domains or tags;
    otherwise pairs each token's routes in the two layers (the sampled tokens).
    """
    if slot0_only:
        require(con, sel, "first_choice", "the flow of first choices between layers")
    layer_a, layer_b = int(layer_a), int(layer_b)

    def one(run_id: str) -> pd.DataFrame:
        if _flow_stats_cover(con, sel, run_id, layer_a, layer_b):
            where, params = sel.with_(run_ids=None, layers=None).where("x")
            sql = f"""
                SELECT expert_a, expert_b, sum({'first_tokens' if slot0_only else 'topk_pairs'}) AS tokens
                FROM flow_stats x WHERE x.run_id = ? AND x.layer_a = ? AND x.layer_b = ? AND {where}
                GROUP BY ALL HAVING sum({'first_tokens' if slot0_only else 'topk_pairs'}) > 0"""
            df = _df(con, sql, [str(run_id), layer_a, layer_b, *params])
        else:
            # a join of the two layers' routes on the token's own keys: no pass over the routes for the extents a
            # packed key needs (_TokenKey), and no GROUP BY into one group per token (100M routes: 5.0-5.4 s ->
            # 3.0-3.5 s)
            slot = "r.slot = 0" if slot0_only else ""
            cols = "r.step, r.rank, r.seq, r.pos, r.expert"
            src_a, pa = _routes(sel.with_(layers=(layer_a,)), run_id, cols, extra=slot)
            src_b, pb = _routes(sel.with_(layers=(layer_b,)), run_id, cols, extra=slot)
            sql = f"""
                SELECT a.expert AS expert_a, b.expert AS expert_b, count(*) AS tokens
                FROM ({src_a}) a JOIN ({src_b}) b USING (step, rank, seq, pos) GROUP BY ALL"""
            df = _df(con, sql, pa + pb)
        df.insert(0, "layer_a", layer_a)
        df.insert(2, "layer_b", layer_b)
        df["share_of_a"] = df["tokens"] / df.groupby("expert_a")["tokens"].transform("sum")
        df = df.sort_values(["expert_a", "expert_b"], ignore_index=True)
        return _typed(df, ints=("expert_a", "expert_b", "tokens"))

    return _per_run(con, sel, _FLOW_COLUMNS, one, source)


def _flow_stats_cover(con, sel: Selection, run_id: "_RunId", layer_a: int, layer_b: int) -> bool:
    """Whether flow_stats holds layer_a -> layer_b for every selected step and rank in which layer_a routed
    tokens. Domains and tags select tokens, which flow_stats does not break down."""
    if run_id.source == "routes":
        return False
    usable = not sel.needs_sequences and "flow_stats" in run_id.tables
    if usable:
        where, params = sel.with_(run_ids=None, layers=None).where("x")
        have, want = con.execute(
            f"""SELECT (SELECT count(*) FROM (SELECT DISTINCT step, rank FROM flow_stats x
                        WHERE x.run_id = ? AND x.layer_a = ? AND x.layer_b = ? AND {where})),
                       (SELECT count(*) FROM layer_stats x WHERE x.run_id = ? AND x.layer = ? AND x.tokens > 0
                        AND {where})""",
            [str(run_id), layer_a, layer_b, *params, str(run_id), layer_a, *params]).fetchone()
        usable = want > 0 and have == want
    return _from_aggregates(run_id, usable, f"flow_stats does not hold layers {layer_a} -> {layer_b} for every "
                            "selected step (the Recorder counts each layer and the next, every pair with "
                            "flow_stats='all'; older stores have none) or the selection has domains or tags")


# ---------------------------------------------------------------------------------------------------------------
# router saturation
# ---------------------------------------------------------------------------------------------------------------
