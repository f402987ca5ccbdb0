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

Every function reads the per-token detail joined with `sequences`: only tokens kept by the sampling policy on
both sides can be compared. Where both sides are compacted runs, that detail is `token_sets` (one row per token
and layer, built at compaction: 80 M routes per side compare in 2.5-5.5 s on 2 cores instead of ~20 s); a live
run's (or, with `source="routes"`, any run's) is the routes, grouped per token and layer at query time. Sets are
compared order-insensitively; `swap_matrix` pairs the experts in slot order. Before trusting an engine log, see
`moeviz.analyses.log_checks` (sentinel ids, ids out of range, duplicates, dense layers, positions off by one).

    matched(con, a, b)              tokens_a, tokens_b, matched, unmatched_a, unmatched_b (+ repeated, by sample_id)
    layer_agreement(con, a, b)      layer, tokens, set_agreement, overlap, first_choice_agreement
    token_disagreement(con, a, b)   layers_differing, tokens (the histogram, 0 .. number of layers)
    swap_matrix(con, a, b, layer)   expert_a, expert_b, tokens
    summary(con, a, b)              the first three from one pass over the matched tokens (the CLI, the dashboard)
    position_agreement(con, a, b)   layer, pos_bucket, pos_lo, pos_hi, tokens, set_agreement
    domain_agreement(con, a, b)     domain, tokens, set_agreement, tokens_differing
    phase_agreement(con, a, b)      phase (prompt | generated | unknown), tokens, set_agreement, tokens_differing
    margin_agreement(con, a, b)     margin_side, margin_lo, margin_hi, decisions, set_agreement
    sequence_disagreement(con, a, b)  run_id, step, rank, seq, tokens, tokens_differing (most differing first)
    token_view(con, a, b, ...)      one sequence: pos, token_id, text, layers, layers_differing
"""

from __future__ import annotations

import contextlib
import uuid

import numpy as np
import pandas as pd

from moeviz.errors import MoevizError
from moeviz.selection import Selection
from moeviz.analyses.load import run_query
from moeviz.store.reader import route_stats_complete, table_names


class AgreementError(MoevizError, ValueError):
    """The two selections hold no token in common (or cannot be compared): the message says what keys each has."""


MATCHED_COLUMNS = ["tokens_a", "tokens_b", "matched", "unmatched_a", "unmatched_b", "repeated_a", "repeated_b",
                   "matched_by_sample_id", "matched_by", "ids_compared", "length_mismatches"]
LAYER_COLUMNS = ["layer", "tokens", "set_agreement", "overlap", "first_choice_agreement"]
TOKEN_COLUMNS = ["layers_differing", "tokens"]
SWAP_COLUMNS = ["expert_a", "expert_b", "tokens"]
POSITION_COLUMNS = ["layer", "pos_bucket", "pos_lo", "pos_hi", "tokens", "set_agreement"]
DOMAIN_COLUMNS = ["domain", "tokens", "set_agreement", "tokens_differing"]
PHASE_COLUMNS = ["phase", "tokens", "set_agreement", "tokens_differing"]
PHASES = ("prompt", "generated", "unknown")
SEQUENCE_COLUMNS = ["run_id", "step", "rank", "seq", "tokens", "tokens_differing"]
TOKEN_VIEW_COLUMNS = ["pos", "token_id", "text", "layers", "layers_differing"]
MARGIN_COLUMNS = ["margin_side", "margin_lo", "margin_hi", "decisions", "set_agreement"]
# Margin bucket edges: a softmax probability difference; near-ties (below 1e-3) are what bf16 flips.
MARGIN_EDGES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)

_SEQ = "run_id, step, rank, seq"


def _side(sel: Selection, name: str, lists: bool, sets: bool, extra: tuple[str, ...] = (),
          tokens_only: bool = False, match_by: str = "auto", token_sel: Selection | None = None) -> tuple[str, list]:
    """CTEs s<name> (the selected sequences, `first` = the first occurrence of its key on this side) and
    t<name> (one row per kept token and layer: its experts in slot order if `lists`, else as a bitmask `mask`
    with its first choice `first` and its number of experts `k`: ~3x faster than lists, for up to 64 experts).

    `sets`: t<name> reads `token_sets` (those rows, built once at compaction: the 80 M-route case went from 20 s
    to the figure in docs/benchmarks.md) instead of grouping the routes. `extra`: more per-token columns of the
    sequences (`prompt_tokens`) or of the token (`margin`). s<name> also numbers the sequences in (step, rank,
    seq, run_id) order from 1 (`ord`, what match_by='order' pairs); `first` follows the key `match_by` matches
    on (every sequence is first for 'order')."""
    alias = "x" if sets else "r"
    # token_sel: the tokens of fewer sequences than s<name> numbers (token_view by order)
    r_where, r_params = (token_sel or sel).with_(domains=None, tags=None).where(alias)
    # the routes of the selected sequences only: a semi join when domains or tags select them (otherwise the
    # join with the matched pairs below does it, and 80 M routes skip a hash probe)
    semi = (f"SEMI JOIN s{name} q ON q.run_id = {alias}.run_id AND q.step = {alias}.step AND q.rank = {alias}.rank "
            f"AND q.seq = {alias}.seq" if sel.needs_sequences else "")
    seq_extra = "".join(f", {c}" for c in extra if c == "prompt_tokens")
    margin = "margin" in extra
    if tokens_only:  # the side's distinct tokens (their counts): no expert set to build
        table = "token_sets" if sets else "routes"
        body = f"""SELECT DISTINCT {alias}.run_id, {alias}.step, {alias}.rank, {alias}.seq, {alias}.pos
            FROM {table} {alias} {semi} WHERE {r_where}"""
    elif sets:
        body = f"""SELECT x.run_id, x.step, x.rank, x.seq, x.pos, x.layer, x.token_id, x.experts AS mask,
                   x.first_expert AS first, x.k{', x.margin' if margin else ''}
            FROM token_sets x {semi} WHERE {r_where}"""
    else:
        cols = ("list(r.expert ORDER BY r.slot) AS experts" if lists else
                "bit_or(CAST(1 AS UBIGINT) << CAST(r.expert AS INTEGER)) AS mask, arg_min(r.expert, r.slot) AS first, "
                "count(*) AS k")
        body = f"""SELECT r.run_id, r.step, r.rank, r.seq, r.pos, r.layer, any_value(r.token_id) AS token_id, {cols}
                   {', any_value(r.margin) AS margin' if margin else ''}
            FROM routes r {semi}
            WHERE {r_where}
            GROUP BY r.run_id, r.step, r.rank, r.seq, r.pos, r.layer"""
    seq_sql, seq_params = _seq_cte(sel, name, match_by, seq_extra)
    return f"{seq_sql},\n    t{name} AS MATERIALIZED ({body})", seq_params + r_params


def _seq_cte(sel: Selection, name: str, match_by: str, seq_extra: str = "") -> tuple[str, list]:
    """CTE s<name>: the selected sequences with their keys, n_tokens, `first` and `ord` (see `_side`)."""
    seq_where, seq_params = sel.with_(layers=None).where("s", per_token=True)
    return f"""
    s{name} AS (
        SELECT {_SEQ}, seq_key, sample_id, domain, n_tokens, coalesce(pos_offset, 0) AS pos_offset{seq_extra},
               {_first(match_by)} AS first,
               row_number() OVER (ORDER BY step, rank, seq, run_id) AS ord
        FROM sequences s WHERE {seq_where})""", seq_params


SOURCES = ("auto", "token_sets", "routes")
MATCH_BY = ("auto", "sample_id", "seq_key", "order")


def _first(match_by: str) -> str:
    """SQL of `sequences` s: whether the sequence is the first occurrence (lowest step, rank, seq) of the key that
    `match_by` matches on; a sequence without that key is first (it matches nothing anyway)."""
    key = {"auto": "coalesce('i:' || sample_id, 'k:' || CAST(seq_key AS VARCHAR))", "sample_id": "sample_id",
           "seq_key": "seq_key", "order": None}[match_by]
    if key is None:
        return "TRUE"
    return f"{key} IS NULL OR row_number() OVER (PARTITION BY {key} ORDER BY step, rank, seq) = 1"


def _check_match_by(match_by: str) -> str:
    if match_by not in MATCH_BY:
        raise AgreementError(f"match_by must be one of {', '.join(MATCH_BY)}; got {match_by!r}")
    return match_by


def _lists_needed(con, lists: bool, sels: tuple[Selection, ...] = ()) -> bool:
    """Expert sets as lists when asked, when a layer has more than 64 experts (a bitmask holds 64), or when the
    routes of `sels` hold an id outside 0-63 (an engine log's sentinel -1 or 255: log_checks says so; a bitmask
    cannot shift by it)."""
    if lists:
        return True
    n = run_query(con, "SELECT max(n_experts) AS n FROM layers", [], error=AgreementError)["n"].iloc[0]
    if n is None or pd.isna(n) or int(n) > 64:
        return True
    for sel in sels:
        where, params = sel.with_(domains=None, tags=None).where("r")
        bad = run_query(con, f"SELECT count(*) AS n FROM routes r WHERE {where} AND (r.expert < 0 OR r.expert > 63)",
                        params, error=AgreementError)["n"].iloc[0]
        if bad:
            return True
    return False


def _sets_cover(con, sels: tuple[Selection, ...], source: str) -> bool:
    """Whether `token_sets` holds every token of the selections: each of their runs is compacted with no routes
    written since (`runs.route_stats_complete`), its run.duckdb has token_sets rows (one compacted before the
    table existed has none until `moeviz compact` builds it), and no layer has more than 64 experts. `source`:
    'routes' never, 'token_sets' always or AgreementError saying why not, 'auto' when it covers."""
    if source not in SOURCES:
        raise AgreementError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
    if source == "routes":
        return False
    why = ""
    if "token_sets" not in table_names(con):
        why = "the connection has no token_sets table"
    else:
        complete = route_stats_complete(con, table="token_sets")  # False also where a token_sets file was skipped
        runs = sorted({r for sel in sels for r in (sel.run_ids if sel.run_ids is not None else complete)})
        for run_id in runs:
            if not complete.get(str(run_id)):
                why = f"run {run_id!r} is not compacted, or routes were written since its last compaction"
            else:
                rows, wide = con.execute("SELECT count(*), count(*) FILTER (WHERE experts IS NULL) FROM token_sets "
                                         "WHERE run_id = ?", [str(run_id)]).fetchone()
                if not rows:
                    why = f"run {run_id!r} has no token_sets rows (compacted by an older moeviz: run `moeviz compact`)"
                elif wide:
                    why = f"run {run_id!r} has {wide} token set(s) with an expert id outside 0-63 (see log_checks)"
            if why:
                break
        if not why and _lists_needed(con, False):
            why = "a layer has more than 64 experts"
    if why and source == "token_sets":
        raise AgreementError(f"token_sets does not cover the selections: {why}; use source='auto' or 'routes'")
    return not why


def _matched_ctes(con, a: Selection, b: Selection, *, lists: bool = False, source: str = "auto",
                  extra: tuple[str, ...] = (), shift: int = 0, same_token: bool = True,
                  match_by: str = "auto", compare_ids: bool | None = None,
                  a_tokens: Selection | None = None) -> tuple[str, list]:
    """WITH ... ending in `m`: one row per matched token and layer: a's run_id, step, rank, seq, pos, layer and
    domain; same (the two sets are equal), inter (|A ∩ B|), k (the larger set size), first_same (slot 0 equal);
    with `lists`, also ea, eb: the experts of each side in slot order. `extra`: 'margin' adds margin_a, margin_b;
    'prompt_tokens' adds prompt_tokens (of a's sequence, else b's). `shift`: a's position p is paired with b's
    p + shift; `same_token=False` drops the token-id condition (log_checks.alignment); 'ids' adds ids_known (both
    sides have the token's id: -1 or NULL is none, as in a Megatron trace).

    `match_by` (every public function here): which sequences are the same. 'auto': sample_id where both have one,
    else seq_key; 'sample_id' or 'seq_key': that key only; 'order': the i-th sequence of a in (step, rank, seq)
    order with the i-th of b (for logs without keys: a Megatron trace), token ids compared only where both sides
    have them. 'auto' never falls back to order.

    `compare_ids`: whether both sides have token ids (None: `sides_without_token_ids` says). Where a side has none
    (-1 everywhere: a Megatron trace imported with --sample-ids only), tokens match by key and position alone,
    in every mode: comparing ids there would match nothing. `a_tokens`: read only these tokens of a (a narrower
    selection: a's sequences are still numbered over `a`)."""
    match_by = _check_match_by(match_by)
    if compare_ids is None and same_token:
        compare_ids = not sides_without_token_ids(con, a, b)
    sets = not lists and _sets_cover(con, (a, b), source)
    lists = not sets and _lists_needed(con, lists, (a, b))
    sa, pa_ = _side(a, "a", lists, sets, extra, match_by=match_by, token_sel=a_tokens)
    sb, pb = _side(b, "b", lists, sets, extra, match_by=match_by)
    if lists:
        cmp = ("list_sort(a.experts) = list_sort(b.experts) AS same, len(list_intersect(a.experts, b.experts)) AS "
               "inter, greatest(len(a.experts), len(b.experts)) AS k, a.experts[1] = b.experts[1] AS first_same, "
               "a.experts AS ea, b.experts AS eb")
    else:
        cmp = ("a.mask = b.mask AS same, bit_count(a.mask & b.mask) AS inter, greatest(a.k, b.k) AS k, "
               "a.first = b.first AS first_same")
    if "margin" in extra:
        cmp += ", a.margin AS margin_a, b.margin AS margin_b"
    if "prompt_tokens" in extra:
        cmp += ", coalesce(a.a_prompt, a.b_prompt) AS prompt_tokens"
    if "ids" in extra:
        cmp += ", coalesce(a.token_id >= 0 AND b.token_id >= 0, FALSE) AS ids_known"
    if "keys" in extra:  # both sides' own row keys (swap_matrix reads their routes)
        cmp += (", a.a_run, a.a_step, a.a_rank, a.a_seq, a.pos AS a_pos, a.b_run, a.b_step, a.b_rank, a.b_seq, "
                "b.pos AS b_pos")
    cols = ("a.run_id AS a_run, a.step AS a_step, a.rank AS a_rank, a.seq AS a_seq, a.domain, "
            "a.pos_offset AS a_off, b.run_id AS b_run, b.step AS b_step, b.rank AS b_rank, b.seq AS b_seq, "
            "b.pos_offset AS b_off")
    if "prompt_tokens" in extra:
        cols += ", a.prompt_tokens AS a_prompt, b.prompt_tokens AS b_prompt"
    ids = ("none" if not compare_ids else "where_known" if match_by == "order" else "equal")
    sql = f"""WITH {sa}, {sb}, {_pair_ctes(cols, match_by)},
    m AS MATERIALIZED ({_m_body(cmp, shift, same_token, ids)})"""
    return sql, pa_ + pb


def _pair_ctes(cols: str, match_by: str) -> str:
    """CTEs pairs0, pairs1, pairs: the matched sequence pairs (`cols` of sa a and sb b, by_key), each sequence of
    either side in at most one pair (its best key, then the lowest (run, step, rank, seq) of the other side)."""
    return f"""pairs0 AS ({_pairs(cols, match_by)}),
    pairs1 AS (SELECT * FROM pairs0 QUALIFY row_number() OVER (
        PARTITION BY a_run, a_step, a_rank, a_seq ORDER BY by_key, b_run, b_step, b_rank, b_seq) = 1),
    pairs AS (SELECT * FROM pairs1 QUALIFY row_number() OVER (
        PARTITION BY b_run, b_step, b_rank, b_seq ORDER BY by_key, a_run, a_step, a_rank, a_seq) = 1)"""


def length_mismatches(con, a: Selection, b: Selection, *, match_by: str = "auto") -> int:
    """The matched sequence pairs whose `sequences.n_tokens` differ (NULL on either side: not counted). Why: by
    order, one extra or missing sequence on one side shifts every later pair, and where a side has no token ids
    nothing else notices; by key, a wrong keys file does the same."""
    match_by = _check_match_by(match_by)
    sa, pa_ = _seq_cte(a, "a", match_by)
    sb, pb = _seq_cte(b, "b", match_by)
    cols = ("a.run_id AS a_run, a.step AS a_step, a.rank AS a_rank, a.seq AS a_seq, a.n_tokens AS a_n, "
            "b.run_id AS b_run, b.step AS b_step, b.rank AS b_rank, b.seq AS b_seq, b.n_tokens AS b_n")
    df = run_query(con, f"WITH {sa}, {sb}, {_pair_ctes(cols, match_by)} SELECT count(*) FILTER (WHERE a_n <> b_n) "
                        "AS n FROM pairs", pa_ + pb, error=AgreementError)
    return int(df["n"].iloc[0] or 0)


def _pairs(cols: str, match_by: str) -> str:
    """SQL: the candidate pairs of a's and b's sequences, by_key 0 (sample_id), 1 (seq_key) or 2 (order)."""
    by_id = f"SELECT {cols}, 0 AS by_key FROM sa a JOIN sb b ON a.sample_id = b.sample_id WHERE a.first AND b.first"
    by_hash = f"SELECT {cols}, 1 AS by_key FROM sa a JOIN sb b ON a.seq_key = b.seq_key WHERE a.first AND b.first"
    if match_by == "sample_id":
        return by_id
    if match_by == "seq_key":
        return by_hash
    if match_by == "order":
        return f"SELECT {cols}, 2 AS by_key FROM sa a JOIN sb b ON a.ord = b.ord"
    return f"{by_id} UNION ALL {by_hash} AND (a.sample_id IS NULL OR b.sample_id IS NULL)"


def _m_body(cmp: str, shift: int, same_token: bool, ids: str = "equal") -> str:
    """The join of the two sides through the matched pairs: a's tokens joined to their pairs first (`ap`,
    materialized: a's token columns and the pair's a_*, b_*, domain, by_key), then to b's tokens on every key.

    Why in that order, fenced by MATERIALIZED: DuckDB cannot estimate the size of a scan of Parquet files through
    pyarrow (token_sets as files: it assumes one row), and with ta, pairs and tb in one join it joined ta to tb
    first on the only keys they share (layer and token id), ~380 M rows per layer at 10 M token-layers a side,
    which spilled 23 GB and ran for minutes; two joins of two inputs each have no such order to get wrong.
    With the token-id key, b's position is compared in the join condition (what DuckDB plans fastest; computing
    it in a CTE first made the summary take minutes). Without it (log_checks.alignment), that condition mixes b
    with the pairs and is no hash key, so the join grew 512x per sequence: b's position within its sequence is
    computed first. `ids`: 'equal' (the token ids must be equal), 'where_known' (match_by='order': equal only
    where both sides have one, >= 0) or 'none' (a side has no token ids: not compared, so the join keeps its hash
    keys). `cmp` reads a's and the pair's columns as `a.`, b's as `b.`."""
    ap = """WITH ap AS MATERIALIZED (
            SELECT x.*, p.* FROM ta x
            JOIN pairs p ON p.a_run = x.run_id AND p.a_step = x.step AND p.a_rank = x.rank AND p.a_seq = x.seq)"""
    head = f"""{ap}
        SELECT a.step, a.rank, a.seq, a.run_id, a.pos - a.a_off AS pos, a.layer, a.domain,
               a.by_key = 0 AS by_sample_id, {cmp}
        FROM ap a"""
    if same_token:
        ids = {"equal": "AND b.token_id = a.token_id", "none": "",
               "where_known": "AND (a.token_id = b.token_id OR coalesce(a.token_id, -1) < 0 "
                              "OR coalesce(b.token_id, -1) < 0)"}[ids]
        return f"""{head}
        JOIN tb b ON b.run_id = a.b_run AND b.step = a.b_step AND b.rank = a.b_rank AND b.seq = a.b_seq
                 AND b.pos - a.b_off = a.pos - a.a_off + {int(shift)} AND b.layer = a.layer
                 {ids}"""
    return f"""{head}
        JOIN (SELECT b.*, b.pos - q.b_off AS qpos FROM tb b
              JOIN (SELECT DISTINCT b_run, b_step, b_rank, b_seq, b_off FROM pairs) q
                ON q.b_run = b.run_id AND q.b_step = b.step AND q.b_rank = b.rank AND q.b_seq = b.seq) b
          ON b.run_id = a.b_run AND b.step = a.b_step AND b.rank = a.b_rank AND b.seq = a.b_seq
         AND b.qpos = a.pos - a.a_off + {int(shift)} AND b.layer = a.layer"""


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


def _check_matched(con, a: Selection, b: Selection, n: int, match_by: str = "auto") -> None:
    """AgreementError when nothing matched, saying what keys each side has and, where a side has none, that
    match_by='order' or keys given at import are the ways on (auto never pairs by order by itself)."""
    if n:
        return
    sides = {"a": _key_summary(con, a), "b": _key_summary(con, b)}
    if match_by == "order":
        raise AgreementError(
            "no token of selection a matches a token of selection b by order (the i-th sequence of each in (step, "
            "rank, seq) order, the same position, the same token id where both sides have one). a: " + sides["a"]
            + "; b: " + sides["b"] + ". Check that both selections hold the same sequences in the same order")
    rule = {"auto": "sample_id where both have one, else seq_key, the hash of the token ids",
            "sample_id": "sample_id", "seq_key": "seq_key, the hash of the token ids"}[match_by]
    keyless = [k for k in ("a", "b") if _keyless(con, a if k == "a" else b)]
    hint = (". Runs recorded before seq_key existed have none: record both executions with this moeviz, or give the "
            "same sample_ids to Recorder.step() on both sides")
    if keyless:
        hint = (f". Side {' and '.join(keyless)} has no sequence key (no token ids and no sample_id: a Megatron "
                "trace, or an SGLang per-token dump, whose sequences are not requests): pass --match-by order "
                "(match_by='order': the i-th sequence of a with the i-th of b) if both hold the same sequences in "
                "the same order, or give keys at import (moeviz import ... --sample-ids FILE, or --token-ids FILE "
                "for megatron)")
    raise AgreementError(f"no token of selection a matches a token of selection b (same sequence key — {rule} — "
                         f"same position and token id). a: {sides['a']}; b: {sides['b']}{hint}")


def _keyless(con, sel: Selection) -> bool:
    """Whether no selected sequence has a seq_key or a sample_id."""
    where, params = sel.with_(layers=None).where("s", per_token=True)
    return not run_query(con, f"SELECT count(seq_key) + count(sample_id) AS n FROM sequences s WHERE {where}",
                         params, error=AgreementError)["n"].iloc[0]


def sides_without_token_ids(con, a: Selection, b: Selection) -> list[str]:
    """'a', 'b' or both: the sides none of whose selected routes has a token id (-1 or NULL: a Megatron trace).
    Paired by order, such a side's tokens are vouched for by the order alone (what `moeviz agree` says).

    A selected sequence with a seq_key (a hash of its token ids, NULL where they were not known) answers from
    `sequences` alone: the scan of the routes took 0.6-0.9 s per call at 8 M routes per side (every agreement
    function asks)."""
    out = []
    for name, sel in (("a", a), ("b", b)):
        where, params = sel.with_(layers=None).where("s", per_token=True)
        if run_query(con, f"SELECT EXISTS (SELECT 1 FROM sequences s WHERE {where} AND s.seq_key IS NOT NULL) AS x",
                     params, error=AgreementError)["x"].iloc[0]:
            continue
        where, params = sel.with_(domains=None, tags=None).where("r")
        found = run_query(con, f"SELECT EXISTS (SELECT 1 FROM routes r WHERE {where} AND r.token_id >= 0) AS x",
                          params, error=AgreementError)["x"].iloc[0]
        if not found:
            out.append(name)
    return out


def matched_by_line(c, blind_sides: list[str]) -> str:
    """The headline's line on what paired the tokens (`c`: the one row of agreement.matched); by order it says
    which side has no token ids, or how many tokens had none on one side: only the order vouches for those."""
    n = int(c["matched"])
    if c["matched_by"] == "order":
        blind = n - int(c["ids_compared"])
        if blind_sides:
            return (f"matched by order: no token ids on side {' and '.join(blind_sides)} — a wrong order gives "
                    f"wrong agreement (the i-th sequence of a with the i-th of b, in (step, rank, seq) order)")
        if not blind:
            return (f"matched by order (the i-th sequence of a with the i-th of b, in (step, rank, seq) order), "
                    f"and the token ids of all {n} tokens agree")
        return (f"matched by order: {blind} of {n} tokens without a token id on one side (paired by order and "
                f"position alone) — a wrong order gives wrong agreement")
    by_id, by_hash = int(c["matched_by_sample_id"]), n - int(c["matched_by_sample_id"])
    how = [f"sample_id ({by_id} tokens)" if by_id else "",
           f"the token-id hash, seq_key ({by_hash} tokens)" if by_hash else ""]
    line = "matched by: " + " and ".join(x for x in how if x)
    blind = n - int(c["ids_compared"])
    if blind:
        who = f"no token ids on side {' and '.join(blind_sides)}" if blind_sides else "no token id on one side"
        line += (f"; token ids compared for {n - blind} of {n} tokens ({who}: the others are paired by key and "
                 f"position alone — a wrong keys file gives wrong agreement)")
    return line


def length_warning(c) -> str | None:
    """The headline's warning (`c`: the one row of agreement.matched) when matched sequence pairs differ in length
    and token ids do not vouch for every matched token (paired by order, or a side without ids): then the pairing
    is probably off (one extra sequence shifts every later pair by order). None when there is nothing to warn of;
    `moeviz agree --strict` exits 1 when there is."""
    n_bad = int(c["length_mismatches"])
    if not n_bad or (c["matched_by"] != "order" and int(c["ids_compared"]) == int(c["matched"])):
        return None
    by = ("the i-th sequence of a with the i-th of b: an extra or missing sequence on one side shifts every later "
          "pair" if c["matched_by"] == "order" else "by key, token ids not compared: check the keys files")
    return (f"warning: {n_bad} matched sequence pair(s) have a different number of tokens on each side "
            f"(sequences.n_tokens) — the pairing is probably wrong ({by}), and so is the agreement")


def matched_by(match_by: str, matched: int, by_sample_id: int) -> str | None:
    """What paired the matched tokens: 'order', 'sample_id', 'seq_key', 'sample_id and seq_key' (auto, some tokens
    by each), None when nothing matched."""
    if not matched:
        return None
    if match_by == "order":
        return "order"
    if by_sample_id == matched:
        return "sample_id"
    return "seq_key" if not by_sample_id else "sample_id and seq_key"


def _side_counts(con, a: Selection, b: Selection, sets: bool, match_by: str = "auto") -> tuple[int, int, int, int]:
    """(first_a, repeated_a, first_b, repeated_b): the kept tokens of each side whose sequence is the first
    occurrence of its key, and the others. A query of its own: DuckDB 1.5 planned it together with the matched
    pairs at ~10x the time of the two queries apart (80 M routes per side: 19 s against 2 + 0.9 s)."""
    sa, pa_ = _side(a, "a", False, sets, tokens_only=True, match_by=match_by)
    sb, pb = _side(b, "b", False, sets, tokens_only=True, match_by=match_by)

    def tokens(side: str) -> str:
        return (f"SELECT count(*) FILTER (WHERE s.first) AS n, count(*) FILTER (WHERE NOT s.first) AS rep FROM "
                f"t{side} t JOIN s{side} s USING ({_SEQ})")

    df = run_query(con, f"WITH {sa}, {sb}, ca AS ({tokens('a')}), cb AS ({tokens('b')}) SELECT * FROM ca, cb",
                   pa_ + pb, error=AgreementError)
    return tuple(int(x or 0) for x in df.iloc[0].tolist())


def matched(con, a: Selection, b: Selection, *, source: str = "auto", match_by: str = "auto") -> pd.DataFrame:
    """One row: tokens_a, tokens_b (kept tokens of each selection), matched (tokens found on both sides),
    unmatched_a, unmatched_b (tokens_x - matched), repeated_a, repeated_b (of the unmatched, those whose sequence
    key occurred earlier on the same side), matched_by_sample_id (of the matched, those whose sequences matched by
    the users' sample_id; the others by seq_key, the hash of their token ids), matched_by (what paired them:
    'sample_id', 'seq_key', 'sample_id and seq_key', 'order'; None when nothing matched), ids_compared (of the
    matched, those whose token id both sides have: the others were paired by their sequence's key or order and
    position alone, so a wrong keys file or order gives wrong agreement), length_mismatches (the matched sequence
    pairs whose n_tokens differ: `length_mismatches`; see `length_warning`). Never raises for zero matches: see
    `layer_agreement`. `source` (every function here): 'auto' reads `token_sets` where it covers both selections
    (compacted runs), else the routes; 'token_sets' or 'routes' forces one."""
    ctes, params = _matched_ctes(con, a, b, source=source, match_by=match_by, extra=("ids",))
    df = run_query(con, f"""{ctes}
        SELECT count(*) AS n, count(*) FILTER (WHERE bs) AS bs, count(*) FILTER (WHERE ids) AS ids
        FROM (SELECT bool_or(by_sample_id) AS bs, bool_and(ids_known) AS ids FROM m
              GROUP BY run_id, step, rank, seq, pos)""", params, error=AgreementError)
    n, by_id, ids = (int(x or 0) for x in df.iloc[0].tolist())
    first_a, rep_a, first_b, rep_b = _side_counts(con, a, b, _sets_cover(con, (a, b), source), match_by)
    ta, tb = first_a + rep_a, first_b + rep_b
    return pd.DataFrame([[ta, tb, n, ta - n, tb - n, rep_a, rep_b, by_id, matched_by(match_by, n, by_id), ids,
                          length_mismatches(con, a, b, match_by=match_by)]], columns=MATCHED_COLUMNS)


def layer_agreement(con, a: Selection, b: Selection, *, source: str = "auto", match_by: str = "auto") -> pd.DataFrame:
    """Per layer, over the matched tokens: tokens, set_agreement (share whose top-k sets are equal, in any order),
    overlap (mean |A ∩ B| / k, k the larger of the two set sizes), first_choice_agreement (share whose slot-0
    experts are equal). Raises AgreementError when nothing matches."""
    ctes, params = _matched_ctes(con, a, b, source=source, match_by=match_by)
    df = run_query(con, f"""{ctes}
        SELECT layer, count(*) AS tokens, avg(CAST(same AS DOUBLE)) AS set_agreement, avg(inter / k) AS overlap,
               avg(CAST(first_same AS DOUBLE)) AS first_choice_agreement
        FROM m GROUP BY layer ORDER BY layer""", params, error=AgreementError)
    _check_matched(con, a, b, len(df), match_by)
    df["layer"] = df["layer"].astype(int)
    df["tokens"] = df["tokens"].astype("int64")
    return df[LAYER_COLUMNS]


def token_disagreement(con, a: Selection, b: Selection, *, source: str = "auto", match_by: str = "auto") -> pd.DataFrame:
    """The histogram over matched tokens of how many of their layers route them to a different set of experts:
    layers_differing (0 .. the number of layers compared), tokens. Raises AgreementError when nothing matches."""
    ctes, params = _matched_ctes(con, a, b, source=source, match_by=match_by)
    df = run_query(con, f"""{ctes},
        per_token AS (SELECT count(*) FILTER (WHERE NOT same) AS d FROM m
                      GROUP BY run_id, step, rank, seq, pos),
        layers AS (SELECT count(DISTINCT layer) AS n FROM m)
        SELECT g.x AS layers_differing, count(p.d) AS tokens
        FROM layers, range(0, layers.n + 1) g(x) LEFT JOIN per_token p ON p.d = g.x
        GROUP BY g.x ORDER BY g.x""", params, error=AgreementError)
    _check_matched(con, a, b, int(df["tokens"].sum()) if len(df) else 0, match_by)
    return df.astype({"layers_differing": int, "tokens": "int64"})[TOKEN_COLUMNS]


def swap_matrix(con, a: Selection, b: Selection, layer: int, *, source: str = "auto", match_by: str = "auto") -> pd.DataFrame:
    """For one layer, over the matched tokens: the experts only `a` chose (in a's slot order) paired with the
    experts only `b` chose (in b's slot order), counted: expert_a, expert_b, tokens. A token whose sets agree adds
    nothing; one that swapped two experts adds two cells. Raises AgreementError when nothing matches.

    Where `token_sets` covers both sides, the matched tokens are found there and only the routes of the tokens
    whose sets differ are read for their slot order (80 M routes per side: ~25 s to group every route of the layer
    into lists, against the figure in docs/benchmarks.md)."""
    la, lb = a.with_(layers=(int(layer),)), b.with_(layers=(int(layer),))
    if _sets_cover(con, (la, lb), source):
        ctes, params = _matched_ctes(con, la, lb, source="token_sets", extra=("keys",), match_by=match_by)
        wa, pwa = la.with_(domains=None, tags=None).where("r")
        wb, pwb = lb.with_(domains=None, tags=None).where("r")

        def slots(side: str, where: str) -> str:
            return f"""SELECT r.run_id, r.step, r.rank, r.seq, r.pos, list(r.expert ORDER BY r.slot) AS e
                FROM routes r SEMI JOIN d ON d.{side}_run = r.run_id AND d.{side}_step = r.step
                    AND d.{side}_rank = r.rank AND d.{side}_seq = r.seq AND d.{side}_pos = r.pos
                WHERE {where} GROUP BY ALL"""

        ctes += f""",
        d AS MATERIALIZED (SELECT * FROM m WHERE NOT same),
        la AS ({slots('a', wa)}), lb AS ({slots('b', wb)}),
        m2 AS (SELECT la.e AS ea, lb.e AS eb FROM d
               JOIN la ON la.run_id = d.a_run AND la.step = d.a_step AND la.rank = d.a_rank AND la.seq = d.a_seq
                      AND la.pos = d.a_pos
               JOIN lb ON lb.run_id = d.b_run AND lb.step = d.b_step AND lb.rank = d.b_rank AND lb.seq = d.b_seq
                      AND lb.pos = d.b_pos)"""
        params = params + pwa + pwb
    else:
        ctes, params = _matched_ctes(con, la, lb, lists=True, match_by=match_by)
        ctes += ", m2 AS (SELECT ea, eb FROM m)"
    df = run_query(con, f"""{ctes},
        diffs AS (SELECT list_filter(ea, x -> NOT list_contains(eb, x)) AS oa,
                        list_filter(eb, x -> NOT list_contains(ea, x)) AS ob FROM m2),
        swaps AS (SELECT unnest(oa) AS expert_a, unnest(ob) AS expert_b FROM diffs),
        n AS (SELECT count(*) AS n FROM m)
        SELECT expert_a, expert_b, count(*) AS tokens, any_value(n.n) AS matched
        FROM n LEFT JOIN swaps ON TRUE
        GROUP BY expert_a, expert_b ORDER BY expert_a, expert_b""", params, error=AgreementError)
    _check_matched(con, la, lb, int(df["matched"].max()) if len(df) else 0, match_by)
    df = df.dropna(subset=["expert_a", "expert_b"])
    return df.astype({"expert_a": int, "expert_b": int, "tokens": "int64"})[SWAP_COLUMNS].reset_index(drop=True)


def position_agreement(con, a: Selection, b: Selection, *, bucket: int = 16, source: str = "auto", match_by: str = "auto") -> pd.DataFrame:
    """Per layer and position bucket (positions [pos_lo, pos_hi] of `bucket` tokens each): tokens and
    set_agreement over the matched tokens (the layer x position heat map). Raises AgreementError when nothing
    matches."""
    bucket = max(1, int(bucket))
    ctes, params = _matched_ctes(con, a, b, source=source, match_by=match_by)
    df = run_query(con, f"""{ctes}
        SELECT layer, pos // ? AS pos_bucket, count(*) AS tokens, avg(CAST(same AS DOUBLE)) AS set_agreement
        FROM m GROUP BY ALL ORDER BY layer, pos_bucket""", params + [bucket], error=AgreementError)
    _check_matched(con, a, b, len(df), match_by)
    df = df.astype({"layer": int, "pos_bucket": int, "tokens": "int64"})
    df["pos_lo"] = df["pos_bucket"] * bucket
    df["pos_hi"] = df["pos_lo"] + bucket - 1
    return df[POSITION_COLUMNS]


def domain_agreement(con, a: Selection, b: Selection, *, source: str = "auto", match_by: str = "auto") -> pd.DataFrame:
    """Per domain of a's sequences (NULL: none given): matched tokens, set_agreement over their (token, layer)
    pairs, tokens_differing (share of tokens with at least one layer whose set differs). Raises AgreementError
    when nothing matches."""
    ctes, params = _matched_ctes(con, a, b, source=source, match_by=match_by)
    df = run_query(con, f"""{ctes},
        per_token AS (SELECT domain, count(*) AS layers, count(*) FILTER (WHERE same) AS same
                      FROM m GROUP BY run_id, step, rank, seq, pos, domain)
        SELECT domain, count(*) AS tokens, sum(same) / sum(layers) AS set_agreement,
               avg(CAST(same < layers AS DOUBLE)) AS tokens_differing
        FROM per_token GROUP BY domain ORDER BY domain NULLS LAST""", params, error=AgreementError)
    _check_matched(con, a, b, len(df), match_by)
    return df.astype({"tokens": "int64"})[DOMAIN_COLUMNS]


def phase_agreement(con, a: Selection, b: Selection, *, source: str = "auto", match_by: str = "auto") -> pd.DataFrame:
    """Prompt against generated tokens: phase ('prompt', 'generated', or 'unknown' where neither side's sequence
    has `sequences.prompt_tokens`), tokens (matched), set_agreement (over their token-layer decisions),
    tokens_differing (share with at least one layer whose set differs). A token is generated when its position
    within the sequence is at or past prompt_tokens (a's sequence's, else b's). Rollout engines sample the
    generated part in decode batches of other shapes than the prompt's prefill, so the two phases can differ.
    Raises AgreementError when nothing matches."""
    ctes, params = _matched_ctes(con, a, b, source=source, extra=("prompt_tokens",), match_by=match_by)
    df = run_query(con, f"""{ctes},
        per_token AS (SELECT CASE WHEN any_value(prompt_tokens) IS NULL THEN 'unknown'
                                  WHEN pos < any_value(prompt_tokens) THEN 'prompt' ELSE 'generated' END AS phase,
                             count(*) AS layers, count(*) FILTER (WHERE same) AS same
                      FROM m GROUP BY run_id, step, rank, seq, pos)
        SELECT phase, count(*) AS tokens, sum(same) / sum(layers) AS set_agreement,
               avg(CAST(same < layers AS DOUBLE)) AS tokens_differing
        FROM per_token GROUP BY phase""", params, error=AgreementError)
    _check_matched(con, a, b, len(df), match_by)
    order = {p: i for i, p in enumerate(PHASES)}
    df = df.sort_values("phase", key=lambda c: c.map(order)).reset_index(drop=True)
    return df.astype({"tokens": "int64", "set_agreement": float, "tokens_differing": float})[PHASE_COLUMNS]


def margin_agreement(con, a: Selection, b: Selection, *, edges: tuple[float, ...] = MARGIN_EDGES,
                     source: str = "auto", match_by: str = "auto") -> pd.DataFrame:
    """Disagreement against how close the call was: the matched token-layer decisions in buckets of
    `routes.margin` (the chosen side's softmax probability of the last chosen expert minus the best unchosen one):
    margin_side ('a' where a's routes have margins, else 'b'; None when neither side has any: every decision is
    then in the one 'unknown' row), margin_lo, margin_hi (bucket [lo, hi); NaN for the decisions whose margin is
    unknown), decisions, set_agreement. Near-ties (small margins) are where bf16 against fp32 or two kernels flip
    an expert. Raises AgreementError when nothing matches."""
    edges = tuple(sorted(float(e) for e in edges))

    def bucket(col: str) -> str:
        cases = " ".join(f"WHEN {col} < {e!r} THEN {i}" for i, e in enumerate(edges))
        return f"CASE WHEN {col} IS NULL THEN NULL {cases} ELSE {len(edges)} END"

    ctes, params = _matched_ctes(con, a, b, source=source, extra=("margin",), match_by=match_by)
    df = run_query(con, f"""{ctes}
        SELECT {bucket('margin_a')} AS ba, {bucket('margin_b')} AS bb, count(*) AS n,
               count(*) FILTER (WHERE same) AS same
        FROM m GROUP BY ALL""", params, error=AgreementError)
    _check_matched(con, a, b, int(df["n"].sum()) if len(df) else 0, match_by)
    side = "a" if df["ba"].notna().any() else ("b" if df["bb"].notna().any() else None)
    col = {"a": "ba", "b": "bb", None: "ba"}[side]
    g = df.assign(bk=df[col].fillna(-1).astype(int)).groupby("bk")[["n", "same"]].sum().reset_index()
    lo = [-np.inf] + list(edges)
    hi = list(edges) + [np.inf]
    out = pd.DataFrame({
        "margin_side": side,
        "margin_lo": [np.nan if k < 0 else lo[k] for k in g["bk"]],
        "margin_hi": [np.nan if k < 0 else hi[k] for k in g["bk"]],
        "decisions": g["n"].astype("int64"), "set_agreement": g["same"] / g["n"]})
    known = out[out["margin_lo"].notna()].sort_values("margin_lo")
    return pd.concat([known, out[out["margin_lo"].isna()]], ignore_index=True)[MARGIN_COLUMNS]


def sequence_disagreement(con, a: Selection, b: Selection, *, limit: int = 100,
                          source: str = "auto", match_by: str = "auto") -> pd.DataFrame:
    """a's sequences that have matched tokens, most disagreeing first (the token view's choice): run_id, step,
    rank, seq, tokens (matched), tokens_differing (share with at least one layer whose set differs), at most
    `limit` rows. Raises AgreementError when nothing matches."""
    ctes, params = _matched_ctes(con, a, b, source=source, match_by=match_by)
    df = run_query(con, f"""{ctes},
        per_token AS (SELECT run_id, step, rank, seq, bool_and(same) AS all_same FROM m
                      GROUP BY run_id, step, rank, seq, pos)
        SELECT run_id, step, rank, seq, count(*) AS tokens, avg(CAST(NOT all_same AS DOUBLE)) AS tokens_differing
        FROM per_token GROUP BY ALL ORDER BY tokens_differing DESC, run_id, step, rank, seq LIMIT ?""",
                   params + [max(1, int(limit))], error=AgreementError)
    _check_matched(con, a, b, len(df), match_by)
    return df.astype({"step": "int64", "rank": int, "seq": int, "tokens": "int64"})[SEQUENCE_COLUMNS]


def token_view(con, a: Selection, b: Selection, *, run_id: str, step: int, rank: int, seq: int,
               source: str = "auto", match_by: str = "auto") -> pd.DataFrame:
    """One of a's sequences (run_id, step, rank, seq), token by token, for the text coloured by disagreement:
    pos (within the sequence), token_id, text (`vocab`, NULL when the run has no tokenizer), layers (compared),
    layers_differing. Tokens of the sequence that b does not hold are left out. Raises AgreementError when no
    token of that sequence matches (naming the sequence: the rest of the selection may match).

    With match_by='order' a's sequences are numbered over all of a (their pairs depend on it), but only the
    tokens of the sequence's step and rank are read; b's tokens are all read, as by key."""
    one = a.with_(run_ids=(str(run_id),), steps=(int(step), int(step)), ranks=(int(rank),))
    if match_by == "order":
        ctes, params = _matched_ctes(con, a, b, source=source, match_by=match_by, a_tokens=one)
    else:
        ctes, params = _matched_ctes(con, one, b, source=source, match_by=match_by)
    df = run_query(con, f"""{ctes},
        per_token AS (SELECT pos, count(*) AS layers, count(*) FILTER (WHERE NOT same) AS layers_differing
                      FROM m WHERE run_id = ? AND step = ? AND rank = ? AND seq = ? GROUP BY pos),
        ids AS (SELECT t.pos - s.pos_offset AS pos, any_value(t.token_id) AS token_id FROM ta t
                JOIN sa s USING ({_SEQ}) WHERE t.run_id = ? AND t.step = ? AND t.rank = ? AND t.seq = ? GROUP BY ALL)
        SELECT p.pos, i.token_id, v.text, p.layers, p.layers_differing
        FROM per_token p JOIN ids i USING (pos)
        LEFT JOIN vocab v ON v.run_id = ? AND v.token_id = i.token_id
        ORDER BY p.pos""", params + [str(run_id), int(step), int(rank), int(seq)] * 2 + [str(run_id)],
                   error=AgreementError)
    if not len(df):
        how = ("by order (its place in a's (step, rank, seq) order against b's)" if match_by == "order" else
               "by its sequence key and position")
        raise AgreementError(f"no token of sequence (run {run_id}, step {int(step)}, rank {int(rank)}, seq "
                             f"{int(seq)}) of selection a matches a token of selection b {how}: pick a sequence "
                             f"listed by sequence_disagreement")
    return df.astype({"pos": int, "token_id": "int64", "layers": int, "layers_differing": int})[TOKEN_VIEW_COLUMNS]


# summary's one table: per layer (kind 'layer': x = layer, n = tokens, sa, ov, fc) and the histogram of differing
# layers per token (kind 'hist': x = layers differing, n = tokens, sa = of them matched by sample_id, ov = of them
# with token ids on both sides), from {m}: the matched token-layers
_SUMMARY_ROWS = """
        lay AS (SELECT layer, count(*) AS tokens, avg(CAST(same AS DOUBLE)) AS sa, avg(inter / k) AS ov,
                       avg(CAST(first_same AS DOUBLE)) AS fc FROM {m} GROUP BY layer),
        pt AS (SELECT count(*) FILTER (WHERE NOT same) AS d, bool_or(by_sample_id) AS bs,
                      bool_and(ids_known) AS ids FROM {m}
               GROUP BY run_id, step, rank, seq, pos),
        hist AS (SELECT d, count(*) AS n, count(*) FILTER (WHERE bs) AS bs, count(*) FILTER (WHERE ids) AS ids
                 FROM pt GROUP BY d)
        SELECT 'layer' AS kind, layer AS x, tokens AS n, sa, ov, fc FROM lay
        UNION ALL SELECT 'hist', d, n, bs, ids, NULL FROM hist"""


@contextlib.contextmanager
def _matched_by_layer(con, a: Selection, b: Selection, match_by: str):
    """A TEMP table (its name) of the matched token-layers (m's run_id, step, rank, seq, pos, layer, same, inter, k,
    first_same, by_sample_id, ids_known), filled one layer at a time from the routes; dropped on leaving.

    Why: grouping the routes of both sides per token and layer and joining them in one query held ~1.7 GB per 8 M
    routes per side (80 M: 17.9 GB, killed by the kernel). One layer at a time groups an eighth of the routes; each
    pass reads the routes again (every row group holds every layer), which costs time, not memory. See
    docs/benchmarks.md for what one layer still holds."""
    table = f"_agreement_{uuid.uuid4().hex}"
    cols = "run_id, step, rank, seq, pos, layer, same, inter, k, first_same, by_sample_id, ids_known"
    ids = not sides_without_token_ids(con, a, b)
    try:
        for i, layer in enumerate(_layers_of(con, a, b)):
            la, lb = a.with_(layers=(layer,)), b.with_(layers=(layer,))
            ctes, params = _matched_ctes(con, la, lb, source="routes", match_by=match_by, extra=("ids",),
                                         compare_ids=ids)
            head = f"CREATE TEMP TABLE {table} AS" if i == 0 else f"INSERT INTO {table}"
            run_query(con, f"{head} {ctes} SELECT {cols} FROM m", params, error=AgreementError)
        if not _exists(con, table):  # no layer selected: an empty table of m's columns
            ctes, params = _matched_ctes(con, a, b, source="routes", match_by=match_by, extra=("ids",),
                                         compare_ids=ids)
            run_query(con, f"CREATE TEMP TABLE {table} AS {ctes} SELECT {cols} FROM m LIMIT 0", params,
                      error=AgreementError)
        yield table
    finally:
        con.execute(f"DROP TABLE IF EXISTS {table}")


def _exists(con, table: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [table]).fetchone()[0])


def _layers_of(con, a: Selection, b: Selection) -> list[int]:
    """The MoE layers both selections may hold: their `layers` if given, else those of their runs."""
    def of(sel: Selection) -> set[int]:
        if sel.layers is not None:
            return {int(x) for x in sel.layers}
        where, params = Selection(run_ids=sel.run_ids).where("l")
        return {int(x) for x in run_query(con, f"SELECT DISTINCT layer FROM layers l WHERE {where}", params,
                                          error=AgreementError)["layer"]}
    return sorted(of(a) & of(b))


def summary(con, a: Selection, b: Selection, *, source: str = "auto",
            match_by: str = "auto") -> dict[str, pd.DataFrame]:
    """`matched`, `layer_agreement` and `token_disagreement` from one pass over the matched tokens (and one count
    of each side's tokens): what `moeviz agree` and the dashboard show, at about a third of the time of the three
    calls: {"matched", "layers", "tokens"}. Raises AgreementError when nothing matches.

    From the routes (a live run, `source="routes"`) the matched tokens are found one layer at a time and kept in
    a TEMP table (see `_matched_by_layer`)."""
    if _sets_cover(con, (a, b), source):
        ctes, params = _matched_ctes(con, a, b, source=source, match_by=match_by, extra=("ids",))
        df = run_query(con, f"{ctes}, {_SUMMARY_ROWS.format(m='m')}", params, error=AgreementError)
    else:
        with _matched_by_layer(con, a, b, match_by) as table:
            df = run_query(con, f"WITH {_SUMMARY_ROWS.format(m=table)}", [], error=AgreementError)
    lay = df[df["kind"] == "layer"].sort_values("x")
    _check_matched(con, a, b, len(lay), match_by)
    layers = pd.DataFrame({"layer": lay["x"].astype(int).to_numpy(), "tokens": lay["n"].astype("int64").to_numpy(),
                           "set_agreement": lay["sa"].to_numpy(float), "overlap": lay["ov"].to_numpy(float),
                           "first_choice_agreement": lay["fc"].to_numpy(float)})
    got = df[df["kind"] == "hist"]
    counts = dict(zip(got["x"].astype(int), got["n"].astype("int64")))
    hist = pd.DataFrame({"layers_differing": np.arange(len(layers) + 1),
                         "tokens": [int(counts.get(d, 0)) for d in range(len(layers) + 1)]})
    hist = hist.astype({"layers_differing": int, "tokens": "int64"})
    by_id, ids = int(got["sa"].fillna(0).sum()), int(got["ov"].fillna(0).sum())
    first_a, rep_a, first_b, rep_b = _side_counts(con, a, b, _sets_cover(con, (a, b), source), match_by)
    n = int(hist["tokens"].sum())
    ta, tb = first_a + rep_a, first_b + rep_b
    counts = pd.DataFrame([[ta, tb, n, ta - n, tb - n, rep_a, rep_b, by_id, matched_by(match_by, n, by_id), ids,
                            length_mismatches(con, a, b, match_by=match_by)]], columns=MATCHED_COLUMNS)
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
