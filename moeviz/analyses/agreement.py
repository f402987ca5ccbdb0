"""Routing agreement: the same tokens routed twice (rollout engine vs trainer, checkpoint vs checkpoint, bf16 vs
fp32, one prompt in two batches), compared token by token and layer by layer.

`a` and `b` are two `Selection`s over one connection (`open_store` of a folder holding both runs, or two step
windows of one run). A token of `a` is matched with a token of `b` when their sequences carry the same key and
the token sits at the same position (`routes.pos - sequences.pos_offset`: left padding does not count) with the
same token id, whatever its step, rank or batch row. The key of a
sequence is its user key (`sequences.sample_id`) where both sequences have one, else the hash of its token ids
(`sequences.seq_key`, written by the Recorder). A sequence key that occurs more than once on one side (a probe
batch recorded at every checkpoint) is taken once, at its first occurrence (lowest step, rank, seq); the other
occurrences count as `repeated_a` / `repeated_b` and match nothing. Select one window per side to compare
two occurrences.

Every function reads `routes` joined with `sequences` (the per-token detail): only tokens kept by the sampling
policy on both sides can be compared. Sets are compared order-insensitively; `swap_matrix` pairs the experts in
slot order.

    matched(con, a, b)              tokens_a, tokens_b, matched, unmatched_a, unmatched_b (+ repeated, by sample_id)
    layer_agreement(con, a, b)      layer, tokens, set_agreement, overlap, first_choice_agreement
    token_disagreement(con, a, b)   layers_differing, tokens (the histogram, 0 .. number of layers)
    swap_matrix(con, a, b, layer)   expert_a, expert_b, tokens
    summary(con, a, b)              the first three from one pass over the routes (the CLI, the dashboard)
    position_agreement(con, a, b)   layer, pos_bucket, pos_lo, pos_hi, tokens, set_agreement
    domain_agreement(con, a, b)     domain, tokens, set_agreement, tokens_differing
"""

from __future__ import annotations

import pandas as pd

from moeviz.errors import MoevizError
from moeviz.selection import Selection
from moeviz.analyses.load import run_query


class AgreementError(MoevizError, ValueError):
    """The two selections hold no token in common (or cannot be compared): the message says what keys each has."""


MATCHED_COLUMNS = ["tokens_a", "tokens_b", "matched", "unmatched_a", "unmatched_b", "repeated_a", "repeated_b",
                   "matched_by_sample_id"]
LAYER_COLUMNS = ["layer", "tokens", "set_agreement", "overlap", "first_choice_agreement"]
TOKEN_COLUMNS = ["layers_differing", "tokens"]
SWAP_COLUMNS = ["expert_a", "expert_b", "tokens"]
POSITION_COLUMNS = ["layer", "pos_bucket", "pos_lo", "pos_hi", "tokens", "set_agreement"]
DOMAIN_COLUMNS = ["domain", "tokens", "set_agreement", "tokens_differing"]

_SEQ = "run_id, step, rank, seq"


def _side(sel: Selection, name: str, lists: bool) -> tuple[str, list]:
    """CTEs s<name> (the selected sequences, `first` = the first occurrence of its key on this side) and
    t<name> (one row per kept token and layer: its experts in slot order if `lists`, else as a bitmask `mask`
    with its first choice `first` and its number of experts `k`: ~3x faster than lists, for up to 64 experts)."""
    seq_where, seq_params = sel.with_(layers=None).where("s", per_token=True)
    r_where, r_params = sel.with_(domains=None, tags=None).where("r")
    sets = ("list(r.expert ORDER BY r.slot) AS experts" if lists else
            "bit_or(CAST(1 AS UBIGINT) << CAST(r.expert AS INTEGER)) AS mask, arg_min(r.expert, r.slot) AS first, "
            "count(*) AS k")
    # the routes of the selected sequences only: a semi join when domains or tags select them (otherwise the
    # join with the matched pairs below does it, and 80 M routes skip a hash probe)
    semi = (f"SEMI JOIN s{name} q ON q.run_id = r.run_id AND q.step = r.step AND q.rank = r.rank AND q.seq = r.seq"
            if sel.needs_sequences else "")
    sql = f"""
    s{name} AS (
        SELECT {_SEQ}, seq_key, sample_id, domain, coalesce(pos_offset, 0) AS pos_offset,
               (seq_key IS NULL AND sample_id IS NULL) OR row_number() OVER (
                   PARTITION BY coalesce('i:' || sample_id, 'k:' || CAST(seq_key AS VARCHAR))
                   ORDER BY step, rank, seq) = 1 AS first
        FROM sequences s WHERE {seq_where}),
    t{name} AS MATERIALIZED (
        SELECT r.run_id, r.step, r.rank, r.seq, r.pos, r.layer, any_value(r.token_id) AS token_id, {sets}
        FROM routes r {semi}
        WHERE {r_where}
        GROUP BY r.run_id, r.step, r.rank, r.seq, r.pos, r.layer)"""
    return sql, seq_params + r_params


def _lists_needed(con, lists: bool) -> bool:
    """Expert sets as lists when asked, or when a layer has more than 64 experts (a bitmask holds 64)."""
    if lists:
        return True
    n = run_query(con, "SELECT max(n_experts) AS n FROM layers", [], error=AgreementError)["n"].iloc[0]
    return n is None or pd.isna(n) or int(n) > 64


def _matched_ctes(con, a: Selection, b: Selection, *, lists: bool = False) -> tuple[str, list]:
    """WITH ... ending in `m`: one row per matched token and layer: a's run_id, step, rank, seq, pos, layer and
    domain; same (the two sets are equal), inter (|A ∩ B|), k (the larger set size), first_same (slot 0 equal);
    with `lists`, also ea, eb: the experts of each side in slot order."""
    lists = _lists_needed(con, lists)
    sa, pa_ = _side(a, "a", lists)
    sb, pb = _side(b, "b", lists)
    if lists:
        cmp = ("list_sort(a.experts) = list_sort(b.experts) AS same, len(list_intersect(a.experts, b.experts)) AS "
               "inter, greatest(len(a.experts), len(b.experts)) AS k, a.experts[1] = b.experts[1] AS first_same, "
               "a.experts AS ea, b.experts AS eb")
    else:
        cmp = ("a.mask = b.mask AS same, bit_count(a.mask & b.mask) AS inter, greatest(a.k, b.k) AS k, "
               "a.first = b.first AS first_same")
    cols = ("a.run_id AS a_run, a.step AS a_step, a.rank AS a_rank, a.seq AS a_seq, a.domain, "
            "a.pos_offset AS a_off, b.run_id AS b_run, b.step AS b_step, b.rank AS b_rank, b.seq AS b_seq, "
            "b.pos_offset AS b_off")
    sql = f"""WITH {sa}, {sb},
    pairs0 AS (
        SELECT {cols}, 0 AS by_key FROM sa a JOIN sb b ON a.sample_id = b.sample_id WHERE a.first AND b.first
        UNION ALL
        SELECT {cols}, 1 AS by_key FROM sa a JOIN sb b ON a.seq_key = b.seq_key
        WHERE a.first AND b.first AND (a.sample_id IS NULL OR b.sample_id IS NULL)),
    pairs1 AS (SELECT * FROM pairs0 QUALIFY row_number() OVER (
        PARTITION BY a_run, a_step, a_rank, a_seq ORDER BY by_key, b_run, b_step, b_rank, b_seq) = 1),
    pairs AS (SELECT * FROM pairs1 QUALIFY row_number() OVER (
        PARTITION BY b_run, b_step, b_rank, b_seq ORDER BY by_key, a_run, a_step, a_rank, a_seq) = 1),
    m AS MATERIALIZED (
        SELECT a.step, a.rank, a.seq, a.run_id, a.pos - p.a_off AS pos, a.layer, p.domain,
               p.by_key = 0 AS by_sample_id, {cmp}
        FROM ta a
        JOIN pairs p ON p.a_run = a.run_id AND p.a_step = a.step AND p.a_rank = a.rank AND p.a_seq = a.seq
        JOIN tb b ON b.run_id = p.b_run AND b.step = p.b_step AND b.rank = p.b_rank AND b.seq = p.b_seq
                 AND b.pos - p.b_off = a.pos - p.a_off AND b.layer = a.layer AND b.token_id = a.token_id)"""
    return sql, pa_ + pb


def _key_summary(con, sel: Selection) -> str:
    where, params = sel.with_(layers=None).where("s", per_token=True)
    row = run_query(con, f"""
        SELECT count(*) AS seqs, count(seq_key) AS keyed, count(sample_id) AS with_id,
               count(DISTINCT seq_key) AS keys, count(DISTINCT sample_id) AS ids,
               list(DISTINCT sample_id ORDER BY sample_id)[1:3] AS some_ids,
               list(DISTINCT run_id ORDER BY run_id) AS runs, min(step) AS lo, max(step) AS hi
        FROM sequences s WHERE {where}""", params, error=AgreementError).iloc[0]
    if not row["seqs"]:
        return "no sequence (check the run ids, steps, domains and tags)"
    runs = ", ".join(map(str, row["runs"]))
    text = (f"{int(row['seqs'])} sequence(s) of run(s) {runs}, steps {int(row['lo'])}-{int(row['hi'])}: "
            f"{int(row['keys'])} distinct seq_key(s) ({int(row['seqs'] - row['keyed'])} sequence(s) without one)")
    if row["with_id"]:
        text += f", {int(row['ids'])} distinct sample_id(s) (e.g. {', '.join(map(repr, row['some_ids']))})"
    else:
        text += ", no sample_id"
    return text


def _check_matched(con, a: Selection, b: Selection, n: int) -> None:
    if n:
        return
    raise AgreementError(
        "no token of selection a matches a token of selection b (same sequence key — sample_id where both have "
        "one, else seq_key, the hash of the token ids — same position and token id). a: " + _key_summary(con, a)
        + "; b: " + _key_summary(con, b) + ". Runs recorded before seq_key existed have none: record both "
        "executions with this moeviz, or give the same sample_ids to Recorder.step() on both sides")


def matched(con, a: Selection, b: Selection) -> pd.DataFrame:
    """One row: tokens_a, tokens_b (kept tokens of each selection), matched (tokens found on both sides),
    unmatched_a, unmatched_b (tokens_x - matched), repeated_a, repeated_b (of the unmatched, those whose sequence
    key occurred earlier on the same side), matched_by_sample_id (of the matched, those whose sequences matched by
    the users' sample_id; the others by seq_key, the hash of their token ids). Never raises for zero matches: see
    `layer_agreement`."""
    ctes, params = _matched_ctes(con, a, b)

    def tokens(side: str) -> str:
        return (f"(SELECT count(*) FILTER (WHERE s.first), count(*) FILTER (WHERE NOT s.first) FROM "
                f"(SELECT DISTINCT run_id, step, rank, seq, pos FROM t{side}) t JOIN s{side} s USING ({_SEQ}))")

    df = run_query(con, f"""{ctes},
        ca AS {tokens('a')}, cb AS {tokens('b')},
        mm AS (SELECT count(*) AS n, count(*) FILTER (WHERE bs) AS bs
               FROM (SELECT bool_or(by_sample_id) AS bs FROM m GROUP BY run_id, step, rank, seq, pos))
        SELECT ca.* , cb.*, mm.n, mm.bs FROM ca, cb, mm""", params, error=AgreementError)
    first_a, rep_a, first_b, rep_b, n, by_id = (int(x or 0) for x in df.iloc[0].tolist())
    ta, tb = first_a + rep_a, first_b + rep_b
    return pd.DataFrame([[ta, tb, n, ta - n, tb - n, rep_a, rep_b, by_id]], columns=MATCHED_COLUMNS)


def layer_agreement(con, a: Selection, b: Selection) -> pd.DataFrame:
    """Per layer, over the matched tokens: tokens, set_agreement (share whose top-k sets are equal, in any order),
    overlap (mean |A ∩ B| / k, k the larger of the two set sizes), first_choice_agreement (share whose slot-0
    experts are equal). Raises AgreementError when nothing matches."""
    ctes, params = _matched_ctes(con, a, b)
    df = run_query(con, f"""{ctes}
        SELECT layer, count(*) AS tokens, avg(CAST(same AS DOUBLE)) AS set_agreement, avg(inter / k) AS overlap,
               avg(CAST(first_same AS DOUBLE)) AS first_choice_agreement
        FROM m GROUP BY layer ORDER BY layer""", params, error=AgreementError)
    _check_matched(con, a, b, len(df))
    df["layer"] = df["layer"].astype(int)
    df["tokens"] = df["tokens"].astype("int64")
    return df[LAYER_COLUMNS]


def token_disagreement(con, a: Selection, b: Selection) -> pd.DataFrame:
    """The histogram over matched tokens of how many of their layers route them to a different set of experts:
    layers_differing (0 .. the number of layers compared), tokens. Raises AgreementError when nothing matches."""
    ctes, params = _matched_ctes(con, a, b)
    df = run_query(con, f"""{ctes},
        per_token AS (SELECT count(*) FILTER (WHERE NOT same) AS d FROM m
                      GROUP BY run_id, step, rank, seq, pos),
        layers AS (SELECT count(DISTINCT layer) AS n FROM m)
        SELECT g.x AS layers_differing, count(p.d) AS tokens
        FROM layers, range(0, layers.n + 1) g(x) LEFT JOIN per_token p ON p.d = g.x
        GROUP BY g.x ORDER BY g.x""", params, error=AgreementError)
    _check_matched(con, a, b, int(df["tokens"].sum()) if len(df) else 0)
    return df.astype({"layers_differing": int, "tokens": "int64"})[TOKEN_COLUMNS]


def swap_matrix(con, a: Selection, b: Selection, layer: int) -> pd.DataFrame:
    """For one layer, over the matched tokens: the experts only `a` chose (in a's slot order) paired with the
    experts only `b` chose (in b's slot order), counted: expert_a, expert_b, tokens. A token whose sets agree adds
    nothing; one that swapped two experts adds two cells. Raises AgreementError when nothing matches."""
    ctes, params = _matched_ctes(con, a.with_(layers=(int(layer),)), b.with_(layers=(int(layer),)), lists=True)
    df = run_query(con, f"""{ctes},
        diffs AS (SELECT list_filter(ea, x -> NOT list_contains(eb, x)) AS oa,
                        list_filter(eb, x -> NOT list_contains(ea, x)) AS ob FROM m),
        swaps AS (SELECT unnest(oa) AS expert_a, unnest(ob) AS expert_b FROM diffs),
        n AS (SELECT count(*) AS n FROM m)
        SELECT expert_a, expert_b, count(*) AS tokens, any_value(n.n) AS matched
        FROM n LEFT JOIN swaps ON TRUE
        GROUP BY expert_a, expert_b ORDER BY expert_a, expert_b""", params, error=AgreementError)
    _check_matched(con, a.with_(layers=(int(layer),)), b.with_(layers=(int(layer),)),
                   int(df["matched"].max()) if len(df) else 0)
    df = df.dropna(subset=["expert_a", "expert_b"])
    return df.astype({"expert_a": int, "expert_b": int, "tokens": "int64"})[SWAP_COLUMNS].reset_index(drop=True)


def position_agreement(con, a: Selection, b: Selection, *, bucket: int = 16) -> pd.DataFrame:
    """Per layer and position bucket (positions [pos_lo, pos_hi] of `bucket` tokens each): tokens and
    set_agreement over the matched tokens (the layer x position heat map). Raises AgreementError when nothing
    matches."""
    bucket = max(1, int(bucket))
    ctes, params = _matched_ctes(con, a, b)
    df = run_query(con, f"""{ctes}
        SELECT layer, pos // ? AS pos_bucket, count(*) AS tokens, avg(CAST(same AS DOUBLE)) AS set_agreement
        FROM m GROUP BY ALL ORDER BY layer, pos_bucket""", params + [bucket], error=AgreementError)
    _check_matched(con, a, b, len(df))
    df = df.astype({"layer": int, "pos_bucket": int, "tokens": "int64"})
    df["pos_lo"] = df["pos_bucket"] * bucket
    df["pos_hi"] = df["pos_lo"] + bucket - 1
    return df[POSITION_COLUMNS]


def domain_agreement(con, a: Selection, b: Selection) -> pd.DataFrame:
    """Per domain of a's sequences (NULL: none given): matched tokens, set_agreement over their (token, layer)
    pairs, tokens_differing (share of tokens with at least one layer whose set differs). Raises AgreementError
    when nothing matches."""
    ctes, params = _matched_ctes(con, a, b)
    df = run_query(con, f"""{ctes},
        per_token AS (SELECT domain, count(*) AS layers, count(*) FILTER (WHERE same) AS same
                      FROM m GROUP BY run_id, step, rank, seq, pos, domain)
        SELECT domain, count(*) AS tokens, sum(same) / sum(layers) AS set_agreement,
               avg(CAST(same < layers AS DOUBLE)) AS tokens_differing
        FROM per_token GROUP BY domain ORDER BY domain NULLS LAST""", params, error=AgreementError)
    _check_matched(con, a, b, len(df))
    return df.astype({"tokens": "int64"})[DOMAIN_COLUMNS]


def summary(con, a: Selection, b: Selection) -> dict[str, pd.DataFrame]:
    """`matched`, `layer_agreement` and `token_disagreement` from one pass over the routes (what `moeviz agree`
    and the dashboard show: about a third of the time of the three calls): {"matched", "layers", "tokens"}.
    Raises AgreementError when nothing matches."""
    ctes, params = _matched_ctes(con, a, b)

    def tokens(side: str) -> str:
        return (f"SELECT count(*) FILTER (WHERE s.first) AS n, count(*) FILTER (WHERE NOT s.first) AS rep FROM "
                f"(SELECT DISTINCT run_id, step, rank, seq, pos FROM t{side}) t JOIN s{side} s USING ({_SEQ})")

    df = run_query(con, f"""{ctes},
        lay AS (SELECT layer, count(*) AS tokens, avg(CAST(same AS DOUBLE)) AS sa, avg(inter / k) AS ov,
                       avg(CAST(first_same AS DOUBLE)) AS fc FROM m GROUP BY layer),
        pt AS (SELECT count(*) FILTER (WHERE NOT same) AS d, bool_or(by_sample_id) AS bs FROM m
               GROUP BY run_id, step, rank, seq, pos),
        hist AS (SELECT g.x AS d, count(pt.d) AS n
                 FROM (SELECT count(*) AS n FROM lay) l, range(0, l.n + 1) g(x) LEFT JOIN pt ON pt.d = g.x
                 GROUP BY g.x),
        ca AS ({tokens('a')}), cb AS ({tokens('b')})
        SELECT 'layer' AS kind, layer AS x, tokens AS n, sa, ov, fc FROM lay
        UNION ALL SELECT 'hist', d, n, NULL, NULL, NULL FROM hist
        UNION ALL SELECT 'count', (SELECT count(*) FILTER (WHERE bs) FROM pt), ca.n, ca.rep, cb.n, cb.rep
        FROM ca, cb""", params, error=AgreementError)
    lay = df[df["kind"] == "layer"].sort_values("x")
    _check_matched(con, a, b, len(lay))
    layers = pd.DataFrame({"layer": lay["x"].astype(int).to_numpy(), "tokens": lay["n"].astype("int64").to_numpy(),
                           "set_agreement": lay["sa"].to_numpy(float), "overlap": lay["ov"].to_numpy(float),
                           "first_choice_agreement": lay["fc"].to_numpy(float)})
    hist = df[df["kind"] == "hist"].sort_values("x")
    hist = pd.DataFrame({"layers_differing": hist["x"].astype(int).to_numpy(),
                         "tokens": hist["n"].astype("int64").to_numpy()})
    c = df[df["kind"] == "count"].iloc[0]
    first_a, rep_a, first_b, rep_b = (int(c[k]) for k in ("n", "sa", "ov", "fc"))
    n = int(hist["tokens"].sum())
    ta, tb = first_a + rep_a, first_b + rep_b
    counts = pd.DataFrame([[ta, tb, n, ta - n, tb - n, rep_a, rep_b, int(c["x"])]], columns=MATCHED_COLUMNS)
    return {"matched": counts, "layers": layers, "tokens": hist}


def headline(layers: pd.DataFrame, tokens: pd.DataFrame, counts: pd.DataFrame) -> dict:
    """The headline numbers from the three tables above: matched tokens, the share of (token, layer) decisions
    whose sets differ, the share of tokens with at least one differing layer."""
    n = int(tokens["tokens"].sum())
    decisions = int(layers["tokens"].sum())
    differ = float(((1 - layers["set_agreement"]) * layers["tokens"]).sum() / decisions) if decisions else float("nan")
    some = float(tokens.loc[tokens["layers_differing"] > 0, "tokens"].sum() / n) if n else float("nan")
    c = counts.iloc[0]
    return {"tokens_a": int(c["tokens_a"]), "tokens_b": int(c["tokens_b"]), "matched": int(c["matched"]),
            "decisions_differing": differ, "tokens_differing": some}
