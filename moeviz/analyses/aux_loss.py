"""Auxiliary router losses recomputed from the exact per-step aggregates: Switch load balancing and z-loss.

Two conventions for the load-balancing loss are in use, and they differ by a factor k and by pooling:
- per layer (Switch Transformer eq. 4, extended to top-k): L = E * sum_i f_i * P_i, with f_i the share of the
  layer's T*k assignments that went to expert i and P_i the mean router probability of expert i. Uniform
  routing gives 1 for every k; all tokens sent with certainty to the same k experts give E/k (E at k=1).
- pooled (transformers' `load_balancing_loss_func` for Mixtral, Qwen-MoE, OLMoE, ...): counts and probability
  sums of ALL layers are pooled before the product, and f counts every slot over T rows, so uniform gives k.
  `pooled_switch_loss` returns it together with the per-layer mean and max: pooling hides a layer whose
  imbalance another layer mirrors.
Router probabilities exist only in the per-step aggregates (routes hold the chosen experts' gate weights), so
these losses cannot be restricted to domains or tags.

Over steps, every function takes `step_bucket=b`: one row per bucket of b steps, `step` its first step, the loss
that of the bucket's steps pooled (summed counts, probability sums and z-loss sums, then the ratio: never a mean
of per-step losses; see moeviz.analyses.step_buckets), None = every step; and `step_tag`: only the steps whose
sequences carry that tag ('train', 'eval', 'probe': catalog.step_tags), whole steps, so that eval passes stay
out of a training curve and the aggregates stay exact.
"""

from __future__ import annotations

import pandas as pd

from moeviz.analyses.load import AnalysisError, expert_counts_sql, run_query
from moeviz.analyses.step_buckets import bucketed_step_sql, check_step_bucket
from moeviz.analyses.step_rows import layer_buckets_sql, pooled_buckets_sql, rollups_available, step_rows_sql
from moeviz.analyses.unknowns import require
from moeviz.selection import Selection

__all__ = ["switch_loss", "pooled_switch_loss", "z_loss", "sequence_balance_loss", "SEQUENCE_CONVENTIONS"]

SEQUENCE_CONVENTIONS = {
    "switch": "Switch Transformers' loss per batch row (transformers' switch_transformers; uniform = k)",
    "deepseek_v3_seq": "DeepSeek-V3's complementary sequence-wise loss without alpha (normalised sigmoid "
                       "affinities; uniform = 1)",
}


def _needs_aggregates(sel: Selection, what: str) -> None:
    if sel.needs_sequences:
        raise AnalysisError(
            f"{what} needs the router's full probabilities, which moeviz keeps only as per-step aggregates "
            "(step_stats/layer_stats), not per token: drop the domains/tags from the selection, or record "
            "each domain as its own steps (tag the steps) and select those steps"
        )


def _per_layer_sql(sel: Selection, by_step: bool, step_bucket: int | None = None,
                   step_tag: str | None = None, rollups: bool = False) -> tuple[str, list]:
    base, params = expert_counts_sql(sel, by_step=by_step, step_bucket=step_bucket, step_tag=step_tag,
                                     rollups=rollups)
    keys = "run_id, step, layer" if by_step else "run_id, layer"
    sql = f"""
        WITH b AS ({base})
        SELECT {keys}, 'layer' AS scope, any_value(tokens) AS tokens, any_value(n_experts) AS n_experts,
               any_value(top_k) AS top_k,
               any_value(n_experts) * sum(assigned * prob_sum)
                   / nullif(sum(assigned) * any_value(tokens), 0) AS aux_loss
        FROM b GROUP BY {keys}"""
    return sql, params


def _tag_covers_every_step(con, sel: Selection, step_tag: str) -> bool:
    """Whether every recorded step of the selection holds a sequence tagged `step_tag`: then the tag filter
    (whole steps holding such a sequence) keeps every step, and the bucket tables, which mix every kind, give
    the same curve. Why: the Overview asks for 'train' on any run that tags two kinds, also over a range of
    training steps only, and the per-step path then reads E rows per step and layer instead of one."""
    where, params = sel.with_(domains=None, tags=None, layers=None, ranks=None).where()
    return not con.execute(f"""
        SELECT EXISTS (
            SELECT 1 FROM (SELECT DISTINCT run_id, step FROM layer_stats WHERE {where}) s
            ANTI JOIN (SELECT DISTINCT run_id, step FROM sequences WHERE tag = ?) t
                 ON t.run_id = s.run_id AND t.step = s.step)""", params + [str(step_tag)]).fetchone()[0]


def _buckets(con, sel: Selection, by_step: bool, step_bucket: int | None, step_tag: str | None):
    """layer_buckets rows for a curve over steps (step_rows.layer_buckets_sql), or None where they cannot answer:
    not over steps, or only the steps of one tag where some selected step holds none of it (a bucket's stored
    statistics mix every kind of step)."""
    if not by_step:
        return None
    buckets = layer_buckets_sql(con, sel, check_step_bucket(step_bucket, by_step))
    if buckets is None or (step_tag is not None and not _tag_covers_every_step(con, sel, step_tag)):
        return None
    return buckets


def _per_layer_from_buckets(buckets: str) -> str:
    """`_per_layer_sql`'s rows from layer_buckets: E * sum_i a_i p_i / (sum_i a_i * T), the sum of products stored
    per bucket (prob_dot); the product in DOUBLE (a 10,000-step block of a wide layer overflows BIGINT)."""
    return f"""
        SELECT run_id, step, layer, 'layer' AS scope, tokens, n_experts, top_k,
               n_experts * prob_dot / nullif(CAST(assigned AS DOUBLE) * tokens, 0) AS aux_loss
        FROM {buckets} lb"""


def switch_loss(con, sel: Selection = Selection(), *, by_step: bool = True, step_bucket: int | None = None,
                step_tag: str | None = None) -> pd.DataFrame:
    """Switch load-balancing loss per layer (and step): E * sum_i f_i P_i, 1 for uniform routing at any k.

    f_i = assigned_i / (T*k) over every token of the step (all selected ranks), P_i = prob_sum_i / T.
    Columns: run_id, [step,] layer, scope ('layer'), tokens, n_experts, top_k, aux_loss.
    `step_bucket`, `step_tag`: see the module docstring.
    """
    _needs_aggregates(sel, "the load-balancing loss")
    require(con, sel, "prob_sum", "the load-balancing loss")
    buckets = _buckets(con, sel, by_step, step_bucket, step_tag)
    if buckets is not None:  # one row per bucket and layer instead of E (moeviz.store.rollups)
        return run_query(con, f"SELECT * FROM ({_per_layer_from_buckets(buckets[0])}) ORDER BY run_id, step, layer",
                         buckets[1])
    sql, params = _per_layer_sql(sel, by_step, step_bucket, step_tag, rollups_available(con))
    order = "run_id, step, layer" if by_step else "run_id, layer"
    return run_query(con, f"SELECT * FROM ({sql}) ORDER BY {order}", params)


def pooled_switch_loss(con, sel: Selection = Selection(), *, by_step: bool = True, step_bucket: int | None = None,
                       step_tag: str | None = None) -> pd.DataFrame:
    """The load-balancing loss as transformers reports it, per step, pooled over the selected layers.

    transformers' `load_balancing_loss_func` sums assignment counts (all k slots) and router probabilities
    over layers and divides both by the pooled rows N = sum_l T_l: L = E * sum_i (A_i / N) * (P_i / N).
    That is k times the per-layer definition applied to the pooled data (uniform routing gives k).
    Columns: run_id, [step,] scope ('pooled'), n_layers, tokens (N), n_experts, top_k,
    aux_loss (transformers' value), aux_loss_per_slot (aux_loss / k: 1 = uniform, comparable with
    `switch_loss`), mean_layer_loss and max_layer_loss (per-layer `switch_loss` over the same layers),
    worst_layer. aux_loss is NULL when the pooled layers differ in their number of experts.
    `step_bucket`, `step_tag`: see the module docstring.
    """
    _needs_aggregates(sel, "the load-balancing loss")
    require(con, sel, "prob_sum", "the load-balancing loss")
    buckets = _buckets(con, sel, by_step, step_bucket, step_tag)
    pooled = None if buckets is None else pooled_buckets_sql(con, sel, check_step_bucket(step_bucket, by_step))
    if pooled is not None:  # every layer pooled: the stored numerator per bucket, the per-layer losses as above
        return run_query(con, _pooled_from_buckets(buckets[0], pooled[0]), buckets[1] + pooled[1])
    rollups = rollups_available(con)
    base, params = expert_counts_sql(sel, by_step=by_step, step_bucket=step_bucket, step_tag=step_tag,
                                     rollups=rollups)
    per_layer, lparams = _per_layer_sql(sel, by_step, step_bucket, step_tag, rollups)
    keys = "run_id, step" if by_step else "run_id"
    pkeys = "p.run_id, p.step" if by_step else "p.run_id"
    join = "p.run_id = l.run_id AND p.step = l.step" if by_step else "p.run_id = l.run_id"
    sql = f"""
        WITH b AS ({base}),
        per_expert AS (
            SELECT {keys}, expert, sum(assigned) AS a, sum(prob_sum) AS p
            FROM b GROUP BY {keys}, expert),
        rows_ AS (
            SELECT {keys}, count(*) AS n_layers, CAST(sum(tokens) AS BIGINT) AS n_rows,
                   min(n_experts) AS e_min, max(n_experts) AS e_max, max(top_k) AS top_k
            FROM (SELECT {keys}, layer, any_value(tokens) AS tokens, any_value(n_experts) AS n_experts,
                         any_value(top_k) AS top_k FROM b GROUP BY {keys}, layer)
            GROUP BY {keys}),
        pooled AS (
            SELECT {keys}, sum(a * p) AS ap FROM per_expert GROUP BY {keys}),
        layers_ AS ({per_layer}),
        layer_summary AS (
            SELECT {keys}, avg(aux_loss) AS mean_layer_loss, max(aux_loss) AS max_layer_loss,
                   arg_max(layer, aux_loss) AS worst_layer
            FROM layers_ GROUP BY {keys})
        SELECT {pkeys}, 'pooled' AS scope, r.n_layers, r.n_rows AS tokens,
               r.e_max AS n_experts, r.top_k,
               CASE WHEN r.e_min = r.e_max THEN r.e_max * p.ap / nullif(r.n_rows::DOUBLE * r.n_rows, 0) END
                   AS aux_loss,
               CASE WHEN r.e_min = r.e_max THEN r.e_max * p.ap / nullif(r.n_rows::DOUBLE * r.n_rows, 0) / r.top_k END
                   AS aux_loss_per_slot,
               l.mean_layer_loss, l.max_layer_loss, l.worst_layer
        FROM pooled p
        JOIN rows_ r ON {join.replace('l.', 'r.')}
        JOIN layer_summary l ON {join}
        ORDER BY {keys}"""
    return run_query(con, sql, params + lparams)


def _pooled_from_buckets(buckets: str, pooled: str) -> str:
    """`pooled_switch_loss`'s rows from layer_buckets (each layer's tokens, shape and Switch loss) and
    pooled_buckets (sum over experts of the layers' summed assignments x summed probabilities)."""
    return f"""
        WITH per_layer AS ({_per_layer_from_buckets(buckets)}),
        r AS (
            SELECT run_id, step, count(*) AS n_layers, CAST(sum(tokens) AS BIGINT) AS n_rows,
                   min(n_experts) AS e_min, max(n_experts) AS e_max, max(top_k) AS top_k,
                   avg(aux_loss) AS mean_layer_loss, max(aux_loss) AS max_layer_loss,
                   arg_max(layer, aux_loss) AS worst_layer
            FROM per_layer GROUP BY run_id, step)
        SELECT p.run_id, p.step, 'pooled' AS scope, r.n_layers, r.n_rows AS tokens, r.e_max AS n_experts, r.top_k,
               CASE WHEN r.e_min = r.e_max THEN r.e_max * p.prob_dot / nullif(r.n_rows::DOUBLE * r.n_rows, 0) END
                   AS aux_loss,
               CASE WHEN r.e_min = r.e_max THEN r.e_max * p.prob_dot / nullif(r.n_rows::DOUBLE * r.n_rows, 0)
                   / r.top_k END AS aux_loss_per_slot,
               r.mean_layer_loss, r.max_layer_loss, r.worst_layer
        FROM {pooled} p JOIN r ON r.run_id = p.run_id AND r.step = p.step
        ORDER BY p.run_id, p.step"""


def z_loss(con, sel: Selection = Selection(), *, by_step: bool = True, pooled: bool = False,
           step_bucket: int | None = None, step_tag: str | None = None) -> pd.DataFrame:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(router logits)^2.

    Per layer (and step), or `pooled` over the selected layers, which is what Switch Transformers in
    transformers computes (`router_z_loss_func` on the router logits of all sparse layers concatenated).
    Also mean_entropy: mean entropy (nats) of the router's softmax, log E when the router is undecided.
    Columns: run_id, [step,] [layer,] scope, tokens, z_loss, mean_entropy.
    `step_bucket`, `step_tag`: see the module docstring.
    """
    _needs_aggregates(sel, "the router z-loss")
    require(con, sel, "z_loss", "the router z-loss")
    step_bucket = check_step_bucket(step_bucket, by_step)
    rows, params = step_rows_sql(con, "layer_stats", sel, ("run_id", "step", "layer", "tokens", "z_loss_sum",
                                                          "entropy_sum"), step_bucket=step_bucket, by_step=by_step,
                                 use_rollups=None if step_tag is None else False)
    where = "TRUE"
    if step_tag is not None:
        where += " AND s.step IN (SELECT t.step FROM sequences t WHERE t.run_id = s.run_id AND t.tag = ?)"
        params = params + [str(step_tag)]
    keys = ["run_id"] + (["step"] if by_step else []) + ([] if pooled else ["layer"])
    k = ", ".join(keys)
    select = ", ".join(f"{bucketed_step_sql('s.step', step_bucket)} AS step" if c == "step" else c for c in keys)
    sql = f"""
        SELECT {select}, '{'pooled' if pooled else 'layer'}' AS scope, CAST(sum(tokens) AS BIGINT) AS tokens,
               sum(z_loss_sum) / nullif(sum(tokens), 0) AS z_loss,
               sum(entropy_sum) / nullif(sum(tokens), 0) AS mean_entropy
        FROM {rows} s WHERE {where} GROUP BY ALL ORDER BY {k}"""
    return run_query(con, sql, params)


def sequence_balance_loss(con, sel: Selection = Selection(), *, pooled: bool = False, by_step: bool = True,
                          step_bucket: int | None = None) -> pd.DataFrame:
    """The balance losses the families compute per sequence (batch row), from `balance_stats` (recorded on the
    device; empty for runs recorded before it existed, and for engine logs).

    Today's `switch_loss` pools a step's tokens before the product f_i * P_i; the families take the product per
    sequence and then the mean over sequences, which differs once a step has several sequences. Conventions:
    'switch' (transformers' `switch_transformers.load_balancing_loss_func` of a batch row: E * sum_i f_i P_i, f_i
    the share of the row's tokens that chose i in any slot: uniform routing gives k, 1 for Switch's top-1) and
    'deepseek_v3_seq' (DeepSeek-V3's complementary sequence-wise loss without alpha: sum_i f_i P_i with
    f_i = E / (k T) * tokens that chose i and P_i the mean normalised sigmoid affinity; uniform gives 1). Each value
    is the mean over the selected sequences (all ranks; over every selected step when not `by_step`).

    pooled=False: per layer. pooled=True: as the family's own training code pools layers, per stack (`stack`:
    'encoder', 'decoder', or NULL for a decoder-only model): 'switch' pools f and P over the stack's layers from its
    first layer through the last selected one (`first_layer`, `last_layer`), as transformers concatenates a stack's
    router logits, so over a whole stack it equals the model's `encoder_aux_loss` / `decoder_aux_loss`;
    'deepseek_v3_seq' is the mean over the selected layers of their per-layer value (each MoE layer adds its own
    loss; its training code logs the mean).
    Columns: run_id, [step,] [layer,] scope ('layer' or 'pooled'), [stack, first_layer, last_layer,] convention,
    sequences, aux_loss. `step_bucket=b` (with by_step): one row per bucket of b steps, `step` its first step, the
    mean over the bucket's sequences.
    """
    _needs_aggregates(sel, "the per-sequence balance losses")
    step_bucket = check_step_bucket(step_bucket, by_step)
    where, params = sel.where("s")
    base = f"""
        SELECT s.run_id, {bucketed_step_sql('s.step', step_bucket)} AS step, s.layer, l.stack, s.sequences, s.switch_sum, s.switch_stack_sum, s.seq_aux_sum
        FROM balance_stats s LEFT JOIN layers l ON l.run_id = s.run_id AND l.layer = s.layer
        WHERE {where}"""
    step = "step, " if by_step else ""
    if not pooled:
        keys = f"run_id, {step}layer"
        sql = f"""
            WITH b AS ({base})
            SELECT {keys}, 'layer' AS scope, convention, CAST(sum(sequences) AS BIGINT) AS sequences,
                   sum(total) / nullif(sum(sequences), 0) AS aux_loss
            FROM (SELECT *, 'switch' AS convention, switch_sum AS total FROM b
                  UNION ALL SELECT *, 'deepseek_v3_seq', seq_aux_sum FROM b)
            GROUP BY {keys}, convention ORDER BY {keys}, convention"""
        return run_query(con, sql, params)
    bstep = "b.step, " if by_step else ""
    sql = f"""
        WITH b AS ({base}),
        last_ AS (SELECT run_id, stack, max(layer) AS last_layer FROM b GROUP BY run_id, stack),
        first_ AS (SELECT run_id, stack, min(layer) AS first_layer FROM layers GROUP BY run_id, stack),
        switch AS (
            SELECT b.run_id, {bstep}b.stack, any_value(f.first_layer) AS first_layer,
                   any_value(t.last_layer) AS last_layer, 'switch' AS convention,
                   CAST(sum(b.sequences) AS BIGINT) AS sequences,
                   sum(b.switch_stack_sum) / nullif(sum(b.sequences), 0) AS aux_loss
            FROM b JOIN last_ t ON t.run_id = b.run_id AND t.stack IS NOT DISTINCT FROM b.stack
                                  AND t.last_layer = b.layer
                   LEFT JOIN first_ f ON f.run_id = b.run_id AND f.stack IS NOT DISTINCT FROM b.stack
            GROUP BY b.run_id, {bstep}b.stack),
        per_layer AS (
            SELECT run_id, {step}stack, layer, sum(sequences) AS sequences,
                   sum(seq_aux_sum) / nullif(sum(sequences), 0) AS loss
            FROM b GROUP BY run_id, {step}stack, layer),
        deepseek AS (
            SELECT run_id, {step}stack, min(layer) AS first_layer, max(layer) AS last_layer,
                   'deepseek_v3_seq' AS convention, CAST(max(sequences) AS BIGINT) AS sequences, avg(loss) AS aux_loss
            FROM per_layer GROUP BY run_id, {step}stack)
        SELECT run_id, {step}'pooled' AS scope, stack, first_layer, last_layer, convention, sequences, aux_loss
        FROM (SELECT * FROM switch UNION ALL BY NAME SELECT * FROM deepseek)
        ORDER BY run_id, {step}stack NULLS FIRST, convention"""
    return run_query(con, sql, params)
