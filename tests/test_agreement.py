"""moeviz.agreement (issue 22): every figure against a numpy loop over the raw routing arrays of both sides
(sets compared as sorted tuples), a run against itself, a hand-built pair with known swaps, matching by sample_id,
the error when nothing matches, and two real recordings of a tiny model whose sequences sit in other rows and
steps (matched by the key the Recorder wrote, which equals the hash recomputed here from the token ids)."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import pytest

from moeviz.analyses import agreement as ag
from moeviz.selection import Selection
from moeviz.testing import store_from_routing, synthetic_routing

A, B = Selection(run_ids=("A",)), Selection(run_ids=("B",))


def blake_key(ids) -> int:
    """sequences.seq_key recomputed from its definition (not via moeviz.store.sequence_key)."""
    return int.from_bytes(hashlib.blake2b(np.asarray(ids, dtype="<i8").tobytes(), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------------- reference


def side_tokens(r: dict, sample_ids=None) -> tuple[dict, int, int]:
    """{(identity, pos, token_id): {layer: experts in slot order}} of the first occurrence of each sequence
    identity (sample_id, else the tuple of its token ids), plus (tokens, repeated tokens)."""
    steps, ranks, seqs, pos, tok = (np.asarray(r[c]) for c in ("steps", "ranks", "seqs", "pos", "token_ids"))
    keep = np.asarray(r.get("keep", np.ones(len(steps), bool)))
    by_seq = defaultdict(list)
    for t in range(len(steps)):
        by_seq[(steps[t], ranks[t], seqs[t])].append(t)
    seen, out, n, repeated = set(), {}, 0, 0
    for s in sorted(by_seq):
        ts = sorted(by_seq[s], key=lambda t: pos[t])
        sid = None if sample_ids is None else sample_ids[ts[0]]
        ident = ("id", sid) if sid is not None else ("key", tuple(int(tok[t]) for t in ts))
        first = ident not in seen
        seen.add(ident)
        for t in ts:
            if not keep[t]:
                continue
            n += 1
            if not first:
                repeated += 1
                continue
            out[(ident, int(pos[t]), int(tok[t]))] = {l: tuple(int(e) for e in r["index"][t, l]) for l in
                                                      range(r["index"].shape[1])}
    return out, n, repeated


def side_tokens_in_order(r: dict) -> tuple[dict, int, int]:
    """{(("ord", i), pos): {layer: experts, "tok": token id}} of the i-th sequence in (step, rank, seq) order,
    every sequence (none is a repeat when pairing by order), plus (tokens, 0)."""
    steps, ranks, seqs, pos, tok = (np.asarray(r[c]) for c in ("steps", "ranks", "seqs", "pos", "token_ids"))
    keep = np.asarray(r.get("keep", np.ones(len(steps), bool)))
    idents = sorted({(int(steps[t]), int(ranks[t]), int(seqs[t])) for t in range(len(steps))})
    number = {ident: i for i, ident in enumerate(idents)}
    out = {}
    for t in np.flatnonzero(keep):
        cell = {l: tuple(int(e) for e in r["index"][t, l]) for l in range(r["index"].shape[1])}
        out[(("ord", number[(int(steps[t]), int(ranks[t]), int(seqs[t]))]), int(pos[t]))] = {**cell,
                                                                                               "tok": int(tok[t])}
    return out, len(out), 0


def sequence_lengths(r: dict, sample_ids=None, order: bool = False) -> dict:
    """{identity: number of tokens} of the first occurrence of each sequence identity (as side_tokens, or
    ("ord", i) as side_tokens_in_order), counted over every token, kept or not (sequences.n_tokens)."""
    steps, ranks, seqs, tok = (np.asarray(r[c]) for c in ("steps", "ranks", "seqs", "token_ids"))
    pos = np.asarray(r["pos"])
    by_seq = defaultdict(list)
    for t in range(len(steps)):
        by_seq[(int(steps[t]), int(ranks[t]), int(seqs[t]))].append(t)
    out = {}
    for i, s in enumerate(sorted(by_seq)):
        ts = sorted(by_seq[s], key=lambda t: pos[t])
        sid = None if sample_ids is None else sample_ids[ts[0]]
        ident = (("ord", i) if order else ("id", sid) if sid is not None else
                 ("key", tuple(int(tok[t]) for t in ts)))
        out.setdefault(ident, len(ts))
    return out


def reference(ra: dict, rb: dict, sid_a=None, sid_b=None, order: bool = False) -> dict:
    """Every figure by brute force. `order`: sequences paired by their rank in (step, rank, seq) order, a token by
    position, where the token ids agree or either side has none (< 0)."""
    if order:
        ta, na, rep_a = side_tokens_in_order(ra)
        tb, nb, rep_b = side_tokens_in_order(rb)
        both = sorted(t for t in set(ta) & set(tb)
                      if ta[t]["tok"] < 0 or tb[t]["tok"] < 0 or ta[t]["tok"] == tb[t]["tok"])
    else:
        ta, na, rep_a = side_tokens(ra, sid_a)
        tb, nb, rep_b = side_tokens(rb, sid_b)
        ta = {t: {**v, "tok": t[2]} for t, v in ta.items()}
        tb = {t: {**v, "tok": t[2]} for t, v in tb.items()}
        both = sorted(set(ta) & set(tb))
    layers = sorted({l for t in both for l in ta[t] if l != "tok"})
    rows = []
    for l in layers:
        same = [tuple(sorted(ta[t][l])) == tuple(sorted(tb[t][l])) for t in both]
        ov = [len(set(ta[t][l]) & set(tb[t][l])) / max(len(ta[t][l]), len(tb[t][l])) for t in both]
        first = [ta[t][l][0] == tb[t][l][0] for t in both]
        rows.append([l, len(both), np.mean(same), np.mean(ov), np.mean(first)])
    differing = Counter(sum(tuple(sorted(ta[t][l])) != tuple(sorted(tb[t][l])) for l in layers) for t in both)
    swaps = {}
    for l in layers:
        c = Counter()
        for t in both:
            oa = [e for e in ta[t][l] if e not in tb[t][l]]
            ob = [e for e in tb[t][l] if e not in ta[t][l]]
            c.update(zip(oa, ob))
        swaps[l] = c
    by_id = sum(1 for t in both if t[0][0] == "id")
    how = None if not both else "order" if both[0][0][0] == "ord" else (
        "sample_id" if by_id == len(both) else "seq_key" if not by_id else "sample_id and seq_key")
    ids = sum(1 for t in both if ta[t]["tok"] >= 0 and tb[t]["tok"] >= 0)
    ta = {t: {l: e for l, e in v.items() if l != "tok"} for t, v in ta.items()}
    tb = {t: {l: e for l, e in v.items() if l != "tok"} for t, v in tb.items()}
    la, lb = sequence_lengths(ra, sid_a, order), sequence_lengths(rb, sid_b, order)
    lengths = sum(1 for ident in set(la) & set(lb) if la[ident] != lb[ident])
    return {"matched": [na, nb, len(both), na - len(both), nb - len(both), rep_a, rep_b, by_id, how, ids, lengths],
            "layers": pd.DataFrame(rows, columns=ag.LAYER_COLUMNS),
            "hist": [differing.get(i, 0) for i in range(len(layers) + 1)], "swaps": swaps, "both": both,
            "ta": ta, "tb": tb}


def two_runs(seed: int = 0, noise: float = 0.6):
    """Run A (2 steps x 4 sequences, one sequence repeated at a later step, a few tokens not kept) and run B: the
    same sequences in another order and steps, routed from perturbed logits, plus one sequence only B has."""
    rng = np.random.default_rng(seed)
    ra = synthetic_routing(n_steps=3, n_layers=3, n_experts=8, top_k=2, seqs_per_step=4, seq_len=8, seed=seed)
    n = len(ra["steps"])
    ra["token_ids"] = rng.integers(0, 40, n)
    ra["token_ids"][ra["steps"] == 2] = ra["token_ids"][ra["steps"] == 0]  # step 2 repeats step 0's sequences
    ra["keep"] = rng.random(n) > 0.1
    # B: sequence j of A (steps 0-1) goes to step 7 + j // 3, row 2 - j % 3; routing from perturbed logits
    first = ra["steps"] < 2
    seq_of = ra["steps"] * 4 + ra["seqs"]
    rb = {k: (v[first] if isinstance(v, np.ndarray) and len(v) == n else v) for k, v in ra.items()}
    j = seq_of[first]
    rb["steps"], rb["seqs"] = 7 + j // 3, 2 - j % 3
    rb["logits"] = rb["logits"] + rng.normal(0, noise, rb["logits"].shape)
    order = np.argsort(-rb["logits"], axis=-1, kind="stable")[..., :2]
    rb["index"] = order
    rb["weights"] = np.full(order.shape, 0.5)
    rb["keep"] = rng.random(len(rb["steps"])) > 0.1
    extra = rb["steps"] == 7  # one sequence of B has other tokens: only B has it
    rb["token_ids"] = np.where(extra & (rb["seqs"] == 0), rb["token_ids"] + 100, rb["token_ids"])
    con = store_from_routing(**{k: v for k, v in ra.items() if k != "logits"}, run_id="A")
    store_from_routing(**{k: v for k, v in rb.items() if k != "logits"}, run_id="B", con=con)
    return con, ra, rb


def check_against_reference(con, a, b, ref, layer=1, **kw):
    """Every figure from both sources: `token_sets` (built as compaction builds it) and the routes."""
    for source in ("token_sets", "routes"):
        kw["source"] = source
        m = ag.matched(con, a, b, **kw)
        assert list(m.columns) == ag.MATCHED_COLUMNS
        assert m.iloc[0].tolist() == ref["matched"]
        got = ag.layer_agreement(con, a, b, **kw)
        assert list(got.columns) == ag.LAYER_COLUMNS
        pd.testing.assert_frame_equal(got.reset_index(drop=True), ref["layers"], check_dtype=False, atol=1e-12)
        hist = ag.token_disagreement(con, a, b, **kw)
        assert list(hist.columns) == ag.TOKEN_COLUMNS
        assert hist["layers_differing"].tolist() == list(range(len(ref["hist"])))
        assert hist["tokens"].tolist() == ref["hist"]
        got = ag.summary(con, a, b, **kw)  # the three tables again, from one pass
        pd.testing.assert_frame_equal(got["matched"], m)
        pd.testing.assert_frame_equal(got["layers"], ag.layer_agreement(con, a, b, **kw))
        pd.testing.assert_frame_equal(got["tokens"], hist)
        sw = ag.swap_matrix(con, a, b, layer, **kw)
        assert list(sw.columns) == ag.SWAP_COLUMNS
        assert {(r.expert_a, r.expert_b): r.tokens for r in sw.itertuples()} == dict(ref["swaps"][layer])


def test_every_figure_against_a_numpy_loop():
    con, ra, rb = two_runs()
    ref = reference(ra, rb)
    assert ref["matched"][2] > 30 and ref["matched"][5] > 0  # the fixture matches many tokens and repeats some
    assert 0 < ref["layers"]["set_agreement"].min() < 1
    check_against_reference(con, A, B, ref)
    check_against_reference(con, B, A, reference(rb, ra), layer=2)


def test_position_and_domain_breakdowns_against_a_numpy_loop():
    con, ra, rb = two_runs(seed=3)
    ref = reference(ra, rb)
    pos = ag.position_agreement(con, A, B, bucket=3)
    assert list(pos.columns) == ag.POSITION_COLUMNS
    exp = defaultdict(list)
    for t in ref["both"]:
        for l in ref["ta"][t]:
            exp[(l, t[1] // 3)].append(sorted(ref["ta"][t][l]) == sorted(ref["tb"][t][l]))
    assert {(r.layer, r.pos_bucket): (r.tokens, pytest.approx(r.set_agreement)) for r in pos.itertuples()} == \
        {k: (len(v), np.mean(v)) for k, v in exp.items()}
    assert (pos["pos_lo"] == pos["pos_bucket"] * 3).all() and (pos["pos_hi"] == pos["pos_lo"] + 2).all()
    dom = ag.domain_agreement(con, A, B)
    # domains of A's sequences: first token of each (step, rank, seq)
    dom_of = {}
    for t in range(len(ra["steps"])):
        ids = tuple(int(x) for x in ra["token_ids"][(ra["steps"] == ra["steps"][t]) & (ra["seqs"] == ra["seqs"][t])])
        dom_of.setdefault(("key", ids), ra["domains"][t])
    per = defaultdict(list)
    for t in ref["both"]:
        same = [sorted(ref["ta"][t][l]) == sorted(ref["tb"][t][l]) for l in ref["ta"][t]]
        per[dom_of[t[0]]].append(same)
    for r in dom.itertuples():
        v = per[r.domain]
        assert r.tokens == len(v)
        assert r.set_agreement == pytest.approx(np.mean([x for s in v for x in s]))
        assert r.tokens_differing == pytest.approx(np.mean([not all(s) for s in v]))
    assert set(dom["domain"]) == set(per)


def test_a_run_against_itself_agrees_everywhere():
    con, ra, _ = two_runs()
    m = ag.matched(con, A, A).iloc[0]
    assert m["matched"] == m["tokens_a"] - m["repeated_a"] and m["unmatched_a"] == m["repeated_a"] > 0
    lay = ag.layer_agreement(con, A, A)
    assert (lay[["set_agreement", "overlap", "first_choice_agreement"]] == 1.0).all().all()
    hist = ag.token_disagreement(con, A, A)
    assert hist["tokens"].iloc[0] == m["matched"] and (hist["tokens"].iloc[1:] == 0).all()
    assert ag.swap_matrix(con, A, A, 0).empty
    # two step windows of one run: step 2 repeats step 0's sequences with the same routing arrays? No: other
    # logits. Windows [0, 0] and [2, 2] hold the same tokens, so every kept token of both is matched
    w0, w2 = A.with_(steps=(0, 0)), A.with_(steps=(2, 2))
    ref = reference({k: (v[ra["steps"] == 0] if isinstance(v, np.ndarray) and len(v) == len(ra["steps"]) else v)
                     for k, v in ra.items()},
                    {k: (v[ra["steps"] == 2] if isinstance(v, np.ndarray) and len(v) == len(ra["steps"]) else v)
                     for k, v in ra.items()})
    check_against_reference(con, w0, w2, ref)


def test_the_short_import_path_is_the_same_module():
    import importlib

    assert importlib.import_module("moeviz.agreement") is ag  # the name users' scripts call (issue 22)


def test_known_swaps():
    # one layer, k=2, four tokens of one sequence; B routes them:
    # t0 the same, t1 the same set in the other order, t2 swaps 3 -> 5, t3 swaps 4 -> 7 and 6 -> 5
    ia = np.array([[0, 1], [0, 1], [2, 3], [4, 6]])[:, None, :]
    ib = np.array([[0, 1], [1, 0], [2, 5], [7, 5]])[:, None, :]
    tok = np.array([5, 6, 7, 8])
    con = store_from_routing(ia, n_experts=8, token_ids=tok, run_id="A")
    store_from_routing(ib, n_experts=8, token_ids=tok, steps=np.full(4, 3), run_id="B", con=con)
    sw = ag.swap_matrix(con, A, B, 0)
    assert sw.values.tolist() == [[3, 5, 1], [4, 7, 1], [6, 5, 1]]
    lay = ag.layer_agreement(con, A, B).iloc[0]
    assert lay["tokens"] == 4 and lay["set_agreement"] == 0.5
    assert lay["overlap"] == pytest.approx((2 + 2 + 1 + 0) / 2 / 4) and lay["first_choice_agreement"] == 0.5
    assert ag.token_disagreement(con, A, B).values.tolist() == [[0, 2], [1, 2]]
    assert ag.swap_matrix(con, B, A, 0).values.tolist() == [[5, 3, 1], [5, 6, 1], [7, 4, 1]]
    assert ag.swap_matrix(con, B, A, 0, source="routes").values.tolist() == [[5, 3, 1], [5, 6, 1], [7, 4, 1]]


def test_more_than_64_experts_compare_lists_not_bitmasks():
    # the known swaps again, with experts above 64 (sets as lists): the same figures
    ia = np.array([[0, 1], [0, 1], [2, 3], [4, 6]])[:, None, :] + 70
    ib = np.array([[0, 1], [1, 0], [2, 5], [7, 5]])[:, None, :] + 70
    tok = np.array([5, 6, 7, 8])
    con = store_from_routing(ia, n_experts=80, token_ids=tok, run_id="A")
    store_from_routing(ib, n_experts=80, token_ids=tok, steps=np.full(4, 3), run_id="B", con=con)
    assert ag._lists_needed(con, False)
    lay = ag.layer_agreement(con, A, B).iloc[0]
    assert lay["tokens"] == 4 and lay["set_agreement"] == 0.5
    assert lay["overlap"] == pytest.approx(5 / 8) and lay["first_choice_agreement"] == 0.5
    assert ag.summary(con, A, B)["tokens"].values.tolist() == [[0, 2], [1, 2]]
    assert ag.swap_matrix(con, A, B, 0).values.tolist() == [[73, 75, 1], [74, 77, 1], [76, 75, 1]]


def test_auto_reads_the_routes_where_token_sets_does_not_cover_the_runs():
    con, ra, rb = two_runs()
    assert ag._sets_cover(con, (A, B), "auto")
    # run C is stored as a moeviz without compaction tables wrote it: its token_sets rows do not exist
    rc = {k: v for k, v in rb.items() if k != "logits"}
    store_from_routing(**rc, run_id="C", con=con, extra_stats=False)
    C = Selection(run_ids=("C",))
    assert not ag._sets_cover(con, (A, C), "auto")
    with pytest.raises(ag.AgreementError, match="token_sets does not cover.*'C' is not compacted"):
        ag.layer_agreement(con, A, C, source="token_sets")
    check_only = reference(ra, rb)
    pd.testing.assert_frame_equal(ag.layer_agreement(con, A, C), check_only["layers"], check_dtype=False, atol=1e-12)
    with pytest.raises(ag.AgreementError, match="source must be one of"):
        ag.matched(con, A, B, source="parquet")


def test_sample_ids_match_where_the_token_keys_differ():
    # B's sequence lost its last token (another length: another seq_key) but carries the same sample id
    ia = np.array([[0, 1], [2, 3], [4, 5]])[:, None, :]
    con = store_from_routing(ia, n_experts=8, token_ids=[1, 2, 3], sample_ids=["req-7"] * 3, run_id="A")
    store_from_routing(ia[:2], n_experts=8, token_ids=[1, 2], sample_ids=["req-7"] * 2, run_id="B", con=con)
    assert ag.matched(con, A, B).iloc[0].tolist() == [3, 2, 2, 1, 0, 0, 0, 2, "sample_id", 2, 1]  # by sample_id; lengths 3, 2
    pd.testing.assert_frame_equal(ag.summary(con, A, B)["matched"], ag.matched(con, A, B))
    keys = con.execute("SELECT run_id, seq_key FROM sequences ORDER BY run_id").fetchall()
    assert keys == [("A", blake_key([1, 2, 3])), ("B", blake_key([1, 2]))]
    # without sample ids on one side, the token keys decide: nothing matches
    con2 = store_from_routing(ia, n_experts=8, token_ids=[1, 2, 3], sample_ids=["req-7"] * 3, run_id="A")
    store_from_routing(ia[:2], n_experts=8, token_ids=[1, 2], run_id="B", con=con2)
    assert ag.matched(con2, A, B)["matched"].item() == 0


def test_nothing_matches_says_what_keys_each_side_has():
    ia = np.array([[0, 1], [2, 3]])[:, None, :]
    con = store_from_routing(ia, n_experts=8, token_ids=[1, 2], run_id="A")
    store_from_routing(ia, n_experts=8, token_ids=[3, 4], sample_ids=["x", "x"], run_id="B", con=con)
    for f in (ag.layer_agreement, ag.token_disagreement, ag.position_agreement, ag.domain_agreement, ag.summary):
        with pytest.raises(ag.AgreementError) as e:
            f(con, A, B)
        text = str(e.value)
        assert "a: 1 sequence(s) of run(s) A" in text and "1 distinct seq_key" in text and "'x'" in text, text
    with pytest.raises(ag.AgreementError, match="b: no sequence"):
        ag.swap_matrix(con, A, Selection(run_ids=("C",)), 0)
    # a run written before seq_key existed (no token ids here): no key, said so
    con3 = store_from_routing(ia, n_experts=8, run_id="A")
    store_from_routing(ia, n_experts=8, run_id="B", con=con3)
    with pytest.raises(ag.AgreementError, match=r"0 distinct seq_key\(s\) \(1 sequence\(s\) without one\)"):
        ag.layer_agreement(con3, A, B)


# ---------------------------------------------------------------------------------------------------- recorder


def record(run_dir, model, batches, sample_ids=None):
    import torch

    from collectors import Recorder

    with Recorder(model, run_dir, run_id=run_dir.name, flush_every=2) as rec:
        for i, (step, ids, mask) in enumerate(batches):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            rec.step(step, sample_ids=None if sample_ids is None else sample_ids[i])


def test_two_recordings_match_by_the_key_the_recorder_wrote(tmp_path):
    torch = pytest.importorskip("torch")
    from collectors.testing import tiny_model
    from moeviz.store import open_store

    model, _ = tiny_model("mixtral")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (6, 10), generator=g)
    mask = torch.ones(6, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding: the key covers the 7 tokens inside the mask
    mask[4, 5:] = 0
    # run A: rows 0-2 at step 0, 3-5 at step 1; run B: the same sequences in reverse order, at steps 10 and 11
    # (batch of three rows each time, so that every row sees the same batch shape)
    record(tmp_path / "A", model, [(0, ids[:3], mask[:3]), (1, ids[3:], mask[3:])],
           sample_ids=[["s0", "s1", "s2"], ["s3", "s4", "s5"]])
    rev = torch.arange(5, -1, -1)
    record(tmp_path / "B", model, [(10, ids[rev[:3]], mask[rev[:3]]), (11, ids[rev[3:]], mask[rev[3:]])])
    con = open_store(tmp_path)
    seqs = con.execute("SELECT run_id, step, seq, seq_key, sample_id FROM sequences ORDER BY run_id, step, seq") \
        .fetchall()
    expect_a = [("A", i // 3, i % 3, blake_key(ids[i][mask[i] > 0].numpy()), f"s{i}") for i in range(6)]
    expect_b = [("B", 10 + i // 3, i % 3, blake_key(ids[5 - i][mask[5 - i] > 0].numpy()), None) for i in range(6)]
    assert seqs == expect_a + expect_b
    n_tokens = int(mask.sum())
    assert ag.matched(con, A, B).iloc[0].tolist() == [n_tokens, n_tokens, n_tokens, 0, 0, 0, 0, 0, "seq_key", n_tokens, 0]
    lay = ag.layer_agreement(con, A, B)
    assert len(lay) == 2 and (lay["tokens"] == n_tokens).all()
    # both runs were compacted by the Recorder's close: 'auto' reads token_sets, and the routes agree with it
    assert ag._sets_cover(con, (A, B), "auto")
    pd.testing.assert_frame_equal(ag.layer_agreement(con, A, B, source="routes"), lay)
    # the same model on the same tokens: the routes themselves, compared as sorted tuples, are the same
    routes = con.execute("SELECT run_id, step, seq, pos, layer, list(expert ORDER BY slot) AS e FROM routes "
                         "GROUP BY ALL").df()
    row_of = {("A", s, q): 3 * s + q for s in (0, 1) for q in range(3)}
    row_of.update({("B", 10 + s, q): 5 - (3 * s + q) for s in (0, 1) for q in range(3)})
    sets = {}
    for r in routes.itertuples():
        sets.setdefault((row_of[(r.run_id, r.step, r.seq)], r.pos, r.layer), {})[r.run_id] = tuple(sorted(r.e))
    same = np.mean([v["A"] == v["B"] for v in sets.values()])
    assert lay["set_agreement"].mean() == pytest.approx(same) and same > 0.95


# ---------------------------------------------------------------------------------------------------- CLI


def write_run_folder(run_dir, mem, run_id: str) -> None:
    """A real run folder (RunWriter, one flush) holding run `run_id` of the in-memory store `mem`."""
    from moeviz.store import RunWriter

    w = RunWriter(run_dir, run_id=run_id, run_name=run_id)
    w.write_run({"model_class": "Synthetic", "n_layers": 3, "n_experts": 8, "top_k": 2})
    w.write_layers(mem.execute("SELECT * EXCLUDE (run_id) FROM layers WHERE run_id = ?", [run_id]).df()
                   .to_dict("records"))
    tables = {}
    for t in ("routes", "step_stats", "layer_stats", "sequences"):
        tbl = mem.execute(f"SELECT * EXCLUDE (run_id) FROM {t} WHERE run_id = ?", [run_id]).to_arrow_table()
        tables[t] = {c: (np.array(tbl.column(c).to_pylist(), dtype=object) if c in ("seq_key", "sample_id", "domain",
                                                                                    "tag")
                         else tbl.column(c).to_numpy()) for c in tbl.column_names}
    w.write_flush(tables)
    w.close()


def moeviz(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "moeviz.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=root)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    con, ra, rb = two_runs(seed=5)
    root = tmp_path_factory.mktemp("agree")
    write_run_folder(root / "A", con, "A")
    write_run_folder(root / "B", con, "B")
    return root, con, reference(ra, rb)


def test_cli_table_gives_the_headline_numbers_and_the_layer_table(folders):
    root, con, ref = folders
    p = moeviz("agree", root / "A", root / "B")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    n = ref["matched"][2]
    assert f"matched tokens: {n} (a has {ref['matched'][0]}" in out
    assert f"matched by: the token-id hash, seq_key ({n} tokens)\n" in out
    lay = ref["layers"]
    differ = float(((1 - lay["set_agreement"]) * lay["tokens"]).sum() / lay["tokens"].sum())
    assert f"decisions with a different expert set: {100 * differ:.2f}%" in out
    assert f"tokens with at least one differing layer: {100 * (1 - ref['hist'][0] / n):.2f}%" in out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "tokens"])
    got = [line.split() for line in lines[head + 1:]]
    assert [[int(r[0]), int(r[1])] + [float(x) for x in r[2:]] for r in got] == \
        [[int(r.layer), int(r.tokens), pytest.approx(r.set_agreement, abs=5e-5), pytest.approx(r.overlap, abs=5e-5),
          pytest.approx(r.first_choice_agreement, abs=5e-5)] for r in lay.itertuples()]


def test_cli_csv_is_the_table_alone_and_store_run_ids_work(folders):
    import io

    root, con, ref = folders
    p = moeviz("agree", "--store", root, "A", "B", "--format", "csv", "--layers", "0,2")
    assert p.returncode == 0, p.stderr
    got = pd.read_csv(io.StringIO(p.stdout))
    want = ref["layers"][ref["layers"]["layer"].isin([0, 2])].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_dtype=False, atol=1e-9)
    # one run against itself, two step windows: step 2 holds step 0's sequences again
    p = moeviz("agree", root / "A", root / "A", "--steps-a", "0:0", "--steps-b", "2:", "--format", "csv")
    assert p.returncode == 0, p.stderr
    assert pd.read_csv(io.StringIO(p.stdout))["tokens"].min() > 0


def test_cli_exits_2_with_one_message_when_nothing_matches(folders):
    root, _, _ = folders
    p = moeviz("agree", root / "A", root / "B", "--steps-a", "1:1", "--steps-b", "7:7")
    assert p.returncode == 2
    assert p.stdout == ""
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeviz agree: error: no token of selection a matches")
    assert "a: 4 sequence(s) of run(s) A, steps 1-1" in err[0] and "b: 3 sequence(s) of run(s) B" in err[0]
    p = moeviz("agree", "--store", root, "A", "nope")
    assert p.returncode == 2 and "holds no run 'nope'" in p.stderr
    p = moeviz("agree", root, root / "B")
    assert p.returncode == 2 and "holds 2 runs" in p.stderr


def test_sample_ids_must_give_one_id_per_sequence(tmp_path):
    torch = pytest.importorskip("torch")
    from collectors import Recorder, RecorderError
    from collectors.testing import tiny_model
    from moeviz.store import open_store

    model, _ = tiny_model("mixtral")
    ids = torch.arange(12).reshape(3, 4)
    with Recorder(model, tmp_path / "r", run_id="r") as rec:
        with torch.no_grad():
            model(input_ids=ids)
        with pytest.raises(RecorderError, match="sample_ids has 2 ids but the step has 3 sequences"):
            rec.step(0, sample_ids=["a", "b"])
        with pytest.raises(RecorderError, match="one id per sequence"):
            rec.step(0, sample_ids="abc")
        rec.step(0, sample_ids=["a", 7, None])  # the buffered forward is kept for the corrected call
    con = open_store(tmp_path / "r")
    assert con.execute("SELECT seq, sample_id, seq_key FROM sequences ORDER BY seq").fetchall() == \
        [(i, s, blake_key(ids[i].numpy())) for i, s in enumerate(["a", "7", None])]


def test_left_padding_does_not_move_positions(tmp_path):
    torch = pytest.importorskip("torch")
    from collectors.testing import tiny_model
    from moeviz.store import open_store

    model, _ = tiny_model("mixtral")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, 8), generator=g)
    right = torch.ones(3, 8, dtype=torch.long)
    right[0, 5:] = 0
    right[2, 6:] = 0
    # the same sequences left-padded: row 0's 5 tokens in columns 3-7, row 2's 6 tokens in columns 2-7
    left_ids, left = torch.zeros_like(ids), torch.zeros_like(right)
    for i in range(3):
        n = int(right[i].sum())
        left_ids[i, 8 - n:] = ids[i, :n]
        left[i, 8 - n:] = 1
    record(tmp_path / "A", model, [(0, ids, right)])
    record(tmp_path / "B", model, [(5, left_ids, left)])
    con = open_store(tmp_path)
    got = con.execute("SELECT run_id, seq, seq_key, pos_offset FROM sequences ORDER BY run_id, seq").fetchall()
    keys = [blake_key(ids[i][right[i] > 0].numpy()) for i in range(3)]
    assert got == [("A", i, keys[i], 0) for i in range(3)] + [("B", 0, keys[0], 3), ("B", 1, keys[1], 0),
                                                               ("B", 2, keys[2], 2)]
    n = int(right.sum())
    assert ag.matched(con, A, B).iloc[0].tolist() == [n, n, n, 0, 0, 0, 0, 0, "seq_key", n, 0]
    pos = ag.position_agreement(con, A, B, bucket=1)  # positions within the sequence, 0 .. 7
    assert sorted(pos["pos_lo"].unique()) == list(range(8))
    assert pos.groupby("pos_lo")["tokens"].max().tolist() == [3, 3, 3, 3, 3, 2, 1, 1]


def test_a_version_2_store_gets_token_sets_on_compact_and_they_match_the_routes(tmp_path):
    """A run compacted by the previous version (routes files without `margin`, no token_sets) reads its routes
    until `moeviz compact` builds token_sets from those files; then both sources give the same figures."""
    import tarfile
    from pathlib import Path

    from moeviz.store import compact, open_store

    with tarfile.open(Path(__file__).parent / "data" / "store_v2.tar.gz") as tar:
        tar.extractall(tmp_path / "store", filter="data")
    sel = Selection(run_ids=("v2comp",))
    con = open_store(tmp_path / "store")
    assert not ag._sets_cover(con, (sel,), "auto")
    before = ag.summary(con, sel, sel)
    con.close()
    compact(tmp_path / "store")
    con = open_store(tmp_path / "store")
    assert ag._sets_cover(con, (sel,), "auto")
    n = con.execute("SELECT count(*) FROM (SELECT DISTINCT step, rank, seq, pos, layer FROM routes "
                    "WHERE run_id = 'v2comp')").fetchone()[0]
    assert con.execute("SELECT count(*), count(margin) FROM token_sets WHERE run_id = 'v2comp'").fetchone() == (n, 0)
    after = ag.summary(con, sel, sel)
    for k in before:
        pd.testing.assert_frame_equal(after[k], before[k])


# ---------------------------------------------------------------------------------------------------- breakdowns


def row_index(r: dict) -> dict:
    """{(identity, pos, token_id): row t of the arrays} of each side's first occurrences (as side_tokens)."""
    steps, ranks, seqs, pos, tok = (np.asarray(r[c]) for c in ("steps", "ranks", "seqs", "pos", "token_ids"))
    keep = np.asarray(r.get("keep", np.ones(len(steps), bool)))
    by_seq = defaultdict(list)
    for t in range(len(steps)):
        by_seq[(steps[t], ranks[t], seqs[t])].append(t)
    seen, out = set(), {}
    for s in sorted(by_seq):
        ts = sorted(by_seq[s], key=lambda t: pos[t])
        ident = ("key", tuple(int(tok[t]) for t in ts))
        if ident in seen:
            continue
        seen.add(ident)
        out.update({(ident, int(pos[t]), int(tok[t])): t for t in ts if keep[t]})
    return out


def set_margins(con, run_id: str, r: dict, margin: np.ndarray) -> None:
    """routes.margin of every token and layer of the run (margin [T, L], NaN = NULL), then its token_sets rebuilt
    from the routes as compaction builds them."""
    from moeviz.store.compaction import token_sets_sql

    n_tok, n_lay = margin.shape
    m = pd.DataFrame({"step": np.repeat(r["steps"], n_lay), "rank": np.repeat(r["ranks"], n_lay),
                      "seq": np.repeat(r["seqs"], n_lay), "pos": np.repeat(r["pos"], n_lay),
                      "layer": np.tile(np.arange(n_lay), n_tok), "margin": margin.reshape(-1)})
    con.register("_margins", m)
    con.execute("""UPDATE routes SET margin = x.margin FROM _margins x WHERE routes.run_id = ? AND x.step = routes.step
                   AND x.rank = routes.rank AND x.seq = routes.seq AND x.pos = routes.pos AND x.layer = routes.layer""",
                [run_id])
    con.unregister("_margins")
    con.execute("DELETE FROM token_sets WHERE run_id = ?", [run_id])
    con.execute(f"INSERT INTO token_sets {token_sets_sql('SELECT * FROM routes WHERE run_id = ?', True)}", [run_id])


def margins_of(r: dict) -> np.ndarray:
    """The softmax margin of each token and layer from the side's own logits: probability of the last chosen
    expert minus the best unchosen one (k = 2 here)."""
    logits = r["logits"]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    srt = np.sort(p, axis=-1)[..., ::-1]
    return srt[..., 1] - srt[..., 2]


@pytest.mark.parametrize("side", ["a", "b", "neither"])
def test_margin_buckets_against_a_numpy_loop(side):
    con, ra, rb = two_runs(seed=2)
    # A's index is top-2 of its own logits (synthetic_routing) and B's too (two_runs): margins from those logits
    if side == "a":
        set_margins(con, "A", ra, margins_of(ra))
    elif side == "b":
        set_margins(con, "B", rb, margins_of(rb))
    ref = reference(ra, rb)
    ia, ib = row_index(ra), row_index(rb)
    edges = (0.02, 0.05, 0.1, 0.2)
    for source in ("token_sets", "routes"):
        got = ag.margin_agreement(con, A, B, edges=edges, source=source)
        assert list(got.columns) == ag.MARGIN_COLUMNS
        if side == "neither":
            assert got["margin_side"].isna().all() and len(got) == 1 and np.isnan(got["margin_lo"].item())
            assert got["decisions"].item() == sum(ref["layers"]["tokens"])
            continue
        r, idx = (ra, ia) if side == "a" else (rb, ib)
        mg = margins_of(r)
        cells = defaultdict(list)
        for t in ref["both"]:
            for l in ref["ta"][t]:
                m = mg[idx[t], l]
                k = int(np.searchsorted(edges, m, side="right"))
                cells[k].append(sorted(ref["ta"][t][l]) == sorted(ref["tb"][t][l]))
        lo = [-np.inf, *edges]
        want = {lo[k]: (len(v), pytest.approx(np.mean(v))) for k, v in cells.items()}
        assert (got["margin_side"] == side).all()
        assert {x.margin_lo: (x.decisions, x.set_agreement) for x in got.itertuples()} == want
        hi = [*edges, np.inf]
        assert {x.margin_lo: x.margin_hi for x in got.itertuples()} == {lo[k]: hi[k] for k in cells}
        assert got["margin_lo"].is_monotonic_increasing
    # near-ties flip more often than clear calls in this fixture (perturbed logits)
    if side != "neither":
        assert got["set_agreement"].iloc[0] < got["set_agreement"].iloc[-1]


def test_prompt_and_generated_against_a_numpy_loop():
    con, ra, rb = two_runs(seed=4)
    ref = reference(ra, rb)
    # A's sequences of step 0 have a prompt of 3 tokens; step 1's have none known, but B knows 5 for two of them
    con.execute("UPDATE sequences SET prompt_tokens = 3 WHERE run_id = 'A' AND step = 0")
    con.execute("UPDATE sequences SET prompt_tokens = 5 WHERE run_id = 'B' AND seq = 0")
    prompt_of = {}
    for run, r in (("A", ra), ("B", rb)):
        pt = dict(((s, q), p) for s, q, p in con.execute(
            "SELECT step, seq, prompt_tokens FROM sequences WHERE run_id = ?", [run]).fetchall())
        for t in range(len(r["steps"])):
            ident = ("key", tuple(int(x) for x in r["token_ids"][(r["steps"] == r["steps"][t])
                                                                  & (r["seqs"] == r["seqs"][t])]))
            prompt_of.setdefault((run, ident), pt[(int(r["steps"][t]), int(r["seqs"][t]))])
    cells = defaultdict(list)
    for t in ref["both"]:
        p = prompt_of.get(("A", t[0]))
        p = prompt_of.get(("B", t[0])) if p is None else p
        phase = "unknown" if p is None else ("prompt" if t[1] < p else "generated")
        cells[phase].append([sorted(ref["ta"][t][l]) == sorted(ref["tb"][t][l]) for l in ref["ta"][t]])
    assert set(cells) == {"prompt", "generated", "unknown"}
    for source in ("token_sets", "routes"):
        got = ag.phase_agreement(con, A, B, source=source)
        assert list(got.columns) == ag.PHASE_COLUMNS and got["phase"].tolist() == ["prompt", "generated", "unknown"]
        for r in got.itertuples():
            v = cells[r.phase]
            assert r.tokens == len(v)
            assert r.set_agreement == pytest.approx(np.mean([x for s in v for x in s]))
            assert r.tokens_differing == pytest.approx(np.mean([not all(s) for s in v]))


def test_token_view_and_sequences_against_a_numpy_loop():
    con, ra, rb = two_runs(seed=6)
    ref = reference(ra, rb)
    con.execute("INSERT INTO vocab SELECT 'A', i, 'w' || i FROM range(0, 200) t(i)")
    seqs = ag.sequence_disagreement(con, A, B)
    assert list(seqs.columns) == ag.SEQUENCE_COLUMNS
    assert seqs["tokens_differing"].is_monotonic_decreasing
    # by hand: the matched tokens of each of A's sequences (first occurrences), per position
    for r in seqs.itertuples():
        mask = (ra["steps"] == r.step) & (ra["seqs"] == r.seq)
        ident = ("key", tuple(int(x) for x in ra["token_ids"][mask]))
        toks = sorted((t for t in ref["both"] if t[0] == ident), key=lambda t: t[1])
        differ = [sum(sorted(ref["ta"][t][l]) != sorted(ref["tb"][t][l]) for l in ref["ta"][t]) for t in toks]
        assert r.tokens == len(toks) and r.tokens_differing == pytest.approx(np.mean([d > 0 for d in differ]))
        view = ag.token_view(con, A, B, run_id=r.run_id, step=r.step, rank=r.rank, seq=r.seq)
        assert list(view.columns) == ag.TOKEN_VIEW_COLUMNS
        assert view["pos"].tolist() == [t[1] for t in toks] and view["token_id"].tolist() == [t[2] for t in toks]
        assert view["text"].tolist() == [f"w{t[2]}" for t in toks]
        assert view["layers_differing"].tolist() == differ and (view["layers"] == 3).all()


# ---------------------------------------------------------------------------------------------------- match_by


def keyless_pair(seed: int = 3, noise: float = 0.6, swap_ids: bool = False):
    """Run A (token ids, seq_keys; 2 steps of 3 sequences) and run B: A's sequences in the same (step, rank, seq)
    order, 2 per step at other step numbers, without token ids (-1: no seq_key, as a Megatron trace), routed from perturbed logits.
    `swap_ids`: B keeps its token ids, and one of its sequences has other ids (paired by order, its tokens do not
    match)."""
    rng = np.random.default_rng(seed)
    ra = synthetic_routing(n_steps=2, n_layers=3, n_experts=8, top_k=2, seqs_per_step=3, seq_len=6, seed=seed)
    n = len(ra["steps"])
    ra["token_ids"] = rng.integers(0, 40, n)
    ra["keep"] = rng.random(n) > 0.1
    rb = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in ra.items()}
    g = ra["steps"] * 3 + ra["seqs"]  # A's sequence number in (step, seq) order; B packs them 2 per step
    rb["steps"], rb["seqs"] = 50 + g // 2, g % 2
    rb["logits"] = rb["logits"] + rng.normal(0, noise, rb["logits"].shape)
    rb["index"] = np.argsort(-rb["logits"], axis=-1, kind="stable")[..., :2]
    rb["weights"] = np.full(rb["index"].shape, 0.5)
    rb["keep"] = rng.random(n) > 0.1
    if swap_ids:
        other = (rb["steps"] == 51) & (rb["seqs"] == 0)
        rb["token_ids"] = np.where(other, rb["token_ids"] + 100, rb["token_ids"])
    else:
        rb["token_ids"] = np.full(n, -1)
    con = store_from_routing(**{k: v for k, v in ra.items() if k != "logits"}, run_id="A")
    store_from_routing(**{k: v for k, v in rb.items() if k != "logits"}, run_id="B", con=con)
    return con, ra, rb


def test_match_by_order_against_a_numpy_loop():
    con, ra, rb = keyless_pair()
    ref = reference(ra, rb, order=True)
    assert ref["matched"][2] > 0 and ref["matched"][8:10] == ["order", 0]
    check_against_reference(con, A, B, ref, match_by="order")


def test_order_compares_token_ids_where_both_sides_have_them():
    con, ra, rb = keyless_pair(swap_ids=True)
    ref = reference(ra, rb, order=True)
    assert 0 < ref["matched"][2] < ref["matched"][0] - 3  # the sequence with other ids is left out
    assert ref["matched"][9] == ref["matched"][2]  # every matched token had its id compared
    check_against_reference(con, A, B, ref, match_by="order")


def test_auto_never_falls_back_to_order_and_says_how():
    con, _, _ = keyless_pair()
    with pytest.raises(ag.AgreementError, match=r"Side b has no sequence key.*--match-by order.*--sample-ids"):
        ag.layer_agreement(con, A, B)
    m = ag.matched(con, A, B)
    assert m["matched"].iloc[0] == 0 and m["matched_by"].iloc[0] is None
    with pytest.raises(ag.AgreementError, match="match_by must be one of"):
        ag.matched(con, A, B, match_by="position")


def test_explicit_keys_match_on_that_key_only():
    con, ra, rb = two_runs()
    ref = reference(ra, rb)
    assert ag.matched(con, A, B, match_by="seq_key").iloc[0].tolist() == ref["matched"]
    with pytest.raises(ag.AgreementError, match="sample_id"):  # neither side has one
        ag.layer_agreement(con, A, B, match_by="sample_id")


def test_cli_match_by_order_says_so_and_auto_says_how(tmp_path):
    con, ra, rb = keyless_pair()
    ref = reference(ra, rb, order=True)
    write_run_folder(tmp_path / "A", con, "A")
    write_run_folder(tmp_path / "B", con, "B")
    p = moeviz("agree", tmp_path / "A", tmp_path / "B")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "Side b has no sequence key" in p.stderr and "--match-by order" in p.stderr
    p = moeviz("agree", tmp_path / "A", tmp_path / "B", "--match-by", "order")
    assert p.returncode == 0, p.stderr
    assert f"matched tokens: {ref['matched'][2]} (a has {ref['matched'][0]}" in p.stdout
    assert "matched by order: no token ids on side b — a wrong order gives wrong agreement" in p.stdout
    p = moeviz("agree", tmp_path / "A", tmp_path / "A", "--match-by", "order", "--memory-limit", "0.5")
    assert "and the token ids of all" in p.stdout
    p = moeviz("agree", tmp_path / "A", tmp_path / "A", "--memory-limit", "lots")
    assert p.returncode == 2 and "--memory-limit must be a number of GB" in p.stderr and "Traceback" not in p.stderr


def routing_of_lengths(lengths, seed: int, token_ids: bool) -> dict:
    """One step of sequences of the given lengths (rows 0..n-1), 3 layers, top-2 of 8 experts drawn at random
    (distinct per token), token ids 0..39 or none (-1, as a Megatron trace)."""
    rng = np.random.default_rng(seed)
    seqs = np.repeat(np.arange(len(lengths)), lengths)  # [T]
    pos = np.concatenate([np.arange(n) for n in lengths])  # [T]
    index = np.array([[rng.choice(8, 2, replace=False) for _ in range(3)] for _ in range(len(seqs))])  # [T, 3, 2]
    ids = rng.integers(0, 40, len(seqs)) if token_ids else np.full(len(seqs), -1)
    return {"index": index, "steps": np.zeros(len(seqs), np.int64), "ranks": np.zeros(len(seqs), np.int64),
            "seqs": seqs, "pos": pos, "token_ids": ids}


def shifted_pair(extra: bool = True):
    """Run A (sequences of 5, 3, 4, 6 tokens, token ids) and run B (the same lengths, no token ids) with, if
    `extra`, one more sequence of 2 tokens in row 1: by order every later pair is shifted. B's routing is its own
    (the agreement figures come from the reference loop either way)."""
    ra = routing_of_lengths([5, 3, 4, 6], seed=11, token_ids=True)
    rb = routing_of_lengths([5, 2, 3, 4, 6] if extra else [5, 3, 4, 6], seed=12, token_ids=False)
    con = store_from_routing(ra["index"], n_experts=8, **{k: v for k, v in ra.items() if k != "index"}, run_id="A")
    store_from_routing(rb["index"], n_experts=8, **{k: v for k, v in rb.items() if k != "index"}, run_id="B",
                       con=con)
    return con, ra, rb


def test_order_counts_the_paired_sequences_whose_lengths_differ():
    con, ra, rb = shifted_pair()
    ref = reference(ra, rb, order=True)
    # by hand: pairs (5, 5), (3, 2), (4, 3), (6, 4): three differ; B's last sequence is left unpaired
    assert ref["matched"][10] == 3 and ref["matched"][8:10] == ["order", 0]
    check_against_reference(con, A, B, ref, match_by="order")
    m = ag.matched(con, A, B, match_by="order").iloc[0]
    assert ag.length_warning(m).startswith("warning: 3 matched sequence pair(s) have a different number of tokens")
    assert ag.length_mismatches(con, A, B, match_by="order") == 3
    con, ra, rb = shifted_pair(extra=False)
    ref = reference(ra, rb, order=True)
    assert ref["matched"][10] == 0
    check_against_reference(con, A, B, ref, match_by="order")
    assert ag.length_warning(ag.matched(con, A, B, match_by="order").iloc[0]) is None


def test_cli_warns_of_shifted_order_and_strict_fails(tmp_path):
    for name, extra in (("B", True), ("B_ok", False)):
        con, _, _ = shifted_pair(extra)
        write_run_folder(tmp_path / name, con, "B")
    write_run_folder(tmp_path / "A", con, "A")
    p = moeviz("agree", tmp_path / "A", tmp_path / "B", "--match-by", "order", "--no-checks")
    assert p.returncode == 0, p.stderr
    assert "warning: 3 matched sequence pair(s) have a different number of tokens" in p.stdout
    p = moeviz("agree", tmp_path / "A", tmp_path / "B", "--match-by", "order", "--no-checks", "--strict",
               "--format", "csv")
    assert p.returncode == 1 and p.stdout.startswith(",".join(ag.LAYER_COLUMNS)), p.stderr
    assert "matched by order: no token ids on side b" in p.stderr and "warning: 3 matched sequence" in p.stderr
    p = moeviz("agree", tmp_path / "A", tmp_path / "B_ok", "--match-by", "order", "--no-checks", "--strict",
               "--format", "csv")
    assert p.returncode == 0 and "matched by order: no token ids on side b" in p.stderr, p.stderr
    assert "warning" not in p.stderr and p.stdout.startswith(",".join(ag.LAYER_COLUMNS))


def test_cli_offers_the_analysis_match_modes():
    from moeviz.cli.agree import MATCH_BY

    assert MATCH_BY == ag.MATCH_BY


def test_token_view_names_the_sequence_that_matches_nothing():
    con, ra, rb = keyless_pair(swap_ids=True)
    ref = reference(ra, rb, order=True)
    order = sorted({(int(s), int(q)) for s, q in zip(ra["steps"], ra["seqs"])})
    matched = {t[0][1] for t in ref["both"]}
    (step, seq), = [order[i] for i in range(len(order)) if i not in matched]  # the one with other ids on B
    with pytest.raises(ag.AgreementError, match=rf"^no token of sequence \(run A, step {step}, rank 0, seq {seq}\) "
                                                r"of selection a matches a token of selection b by order"):
        ag.token_view(con, A, B, run_id="A", step=step, rank=0, seq=seq, match_by="order")
    for i in sorted(matched):  # the others, token by token, against the loop (only a's step and rank are read)
        view = ag.token_view(con, A, B, run_id="A", step=order[i][0], rank=0, seq=order[i][1], match_by="order")
        toks = sorted(t for t in ref["both"] if t[0] == ("ord", i))
        mask = (ra["steps"] == order[i][0]) & (ra["seqs"] == order[i][1])
        ids = dict(zip(ra["pos"][mask].tolist(), ra["token_ids"][mask].tolist()))
        assert view["pos"].tolist() == [t[1] for t in toks]
        assert view["token_id"].tolist() == [ids[t[1]] for t in toks]
        assert view["layers_differing"].tolist() == [sum(sorted(ref["ta"][t][l]) != sorted(ref["tb"][t][l])
                                                         for l in ref["ta"][t]) for t in toks]
