"""Issue 22, the two-engine test: the same routing logged by two engines in their own layouts, imported into one
store, compared with `moeviz.agreement`. Expected figures come from the generated routing (tests/engine_logs.py),
never from an import.

- vLLM (responses with routed experts) against SGLang (a per_token dump): SGLang's dump has no request ids, so its
  sequences are keyed by the sample ids given at import (`--sample-ids`), or paired by order.
- a Megatron trace (no token ids) against a recorded run of the same tokens: paired by order, or matched by the
  token ids given at import (`--token-ids`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeviz.analyses import agreement as ag
from moeviz.importers import SourceError, import_megatron, import_sglang, import_vllm
from moeviz.selection import Selection
from moeviz.store import RunWriter, open_store, sequence_key
from tests import engine_logs as gen
from tests.engine_logs import MOE, E, K

V, S = Selection(run_ids=("vllm",)), Selection(run_ids=("sglang",))


def tokens_of(seqs) -> int:
    return sum(len(q["experts"]) for q in seqs)


def two_engines(tmp_path, seqs_b=None, keys: bool = True):
    """vLLM's log of `shared_routing` and SGLang's of `seqs_b` (default: the same routing), imported side by side."""
    seqs = gen.shared_routing(seed=1)
    gen.write_vllm_of(tmp_path / "v.jsonl", seqs)
    ids_file = gen.write_sglang_of(tmp_path / "sg", seqs if seqs_b is None else seqs_b, seed=2)
    import_vllm(tmp_path / "v.jsonl", tmp_path / "runs" / "vllm")
    import_sglang(tmp_path / "sg", tmp_path / "runs" / "sglang", sample_ids=ids_file if keys else None)
    return open_store(tmp_path / "runs"), seqs


@pytest.mark.parametrize("match_by", ["auto", "order"])
def test_vllm_and_sglang_logs_of_the_same_routing_agree_everywhere(tmp_path, match_by):
    con, seqs = two_engines(tmp_path)
    n = tokens_of(seqs)
    m = ag.matched(con, V, S, match_by=match_by).iloc[0]
    assert (m["tokens_a"], m["tokens_b"], m["matched"], m["ids_compared"]) == (n, n, n, n)
    assert m["matched_by"] == ("sample_id" if match_by == "auto" else "order")
    lay = ag.layer_agreement(con, V, S, match_by=match_by)
    assert lay["layer"].tolist() == list(range(len(MOE))) and (lay["tokens"] == n).all()
    assert (lay["set_agreement"] == 1.0).all() and (lay["overlap"] == 1.0).all()
    assert ag.token_disagreement(con, V, S, match_by=match_by)["tokens"].tolist() == [n] + [0] * len(MOE)
    for layer in range(len(MOE)):
        assert ag.swap_matrix(con, V, S, layer, match_by=match_by).empty
    con.close()


def test_known_swaps_give_the_known_swap_matrix(tmp_path):
    seqs = gen.shared_routing(seed=1)
    seqs_b, swaps = gen.swapped(seqs, seed=3)
    con, _ = two_engines(tmp_path, seqs_b)
    n = tokens_of(seqs)
    for layer in range(len(MOE)):
        got = ag.swap_matrix(con, V, S, layer)
        assert {(r.expert_a, r.expert_b): r.tokens for r in got.itertuples()} == dict(swaps[layer])
        lay = ag.layer_agreement(con, V, S).set_index("layer")
        assert lay.loc[layer, "set_agreement"] == pytest.approx(1 - sum(swaps[layer].values()) / n)
    con.close()


def test_sglang_without_keys_matches_only_by_order_and_says_so(tmp_path):
    con, seqs = two_engines(tmp_path, keys=False)
    assert con.execute("SELECT count(sample_id) + count(seq_key) FROM sequences WHERE run_id = 'sglang'").fetchone() \
        == (0,)
    with pytest.raises(ag.AgreementError, match="Side b has no sequence key.*--match-by order"):
        ag.summary(con, V, S)
    assert ag.summary(con, V, S, match_by="order")["matched"]["matched"].iloc[0] == tokens_of(seqs)
    con.close()


def test_sample_ids_file_must_fit_the_sequences(tmp_path):
    seqs = gen.shared_routing(seed=1)
    ids_file = gen.write_sglang_of(tmp_path / "sg", seqs)
    ids_file.write_text("a\nb\n")
    with pytest.raises(SourceError, match=r"has 2 line\(s\) but the source has 5 sequence\(s\)"):
        import_sglang(tmp_path / "sg", tmp_path / "out", sample_ids=ids_file)
    ids_file.write_text("a\nb\nc\nd\na\n")
    with pytest.raises(SourceError, match="gives sample id 'a' to more than one sequence"):
        import_sglang(tmp_path / "sg", tmp_path / "out", sample_ids=ids_file)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ Megatron


def fixed_length_routing(seed: int, sequences: int = 4, length: int = 5) -> list[dict]:
    """Sequences of one length (a training batch), experts for every token."""
    rng = np.random.default_rng(seed)
    return [{"id": f"s{i}", "ids": rng.integers(0, 1000, length).tolist(), "experts": gen.draw(rng, length)}
            for i in range(sequences)]


def write_recorded(run_dir, seqs, step: int = 3, sample_ids: bool = False) -> None:
    """A run as the Recorder writes one (RunWriter; token ids, seq_key), its sequences at `step`, rows 0..n-1;
    `sample_ids`: each sequence's "id" as its sample_id (Recorder.step(sample_ids=...))."""
    rows = [(i, p, q["ids"][p], li, s, int(q["experts"][p, li, s])) for i, q in enumerate(seqs)
            for p in range(len(q["ids"])) for li in range(len(MOE)) for s in range(K)]
    df = pd.DataFrame(rows, columns=["seq", "pos", "token_id", "layer", "slot", "expert"]).sort_values(
        ["layer", "seq", "pos", "slot"])
    with RunWriter(run_dir) as w:
        w.write_run({"model_class": "Recorded", "n_layers": len(MOE), "n_experts": E, "top_k": K})
        w.write_layers([{"layer": i, "n_experts": E, "top_k": K} for i in range(len(MOE))])
        w.write_flush({"routes": {c: df[c].to_numpy() for c in df.columns} | {"step": np.full(len(df), step),
                                                                            "weight": np.full(len(df), 0.5)},
                       "sequences": {"step": np.full(len(seqs), step), "seq": np.arange(len(seqs)), "domain": None,
                                     "tag": "train", "n_tokens": [len(q["ids"]) for q in seqs],
                                     "seq_key": np.array([sequence_key(q["ids"]) for q in seqs], dtype=object),
                                     "pos_offset": 0}
                                    | ({"sample_id": np.array([q["id"] for q in seqs], dtype=object)}
                                       if sample_ids else {})})


def test_a_megatron_trace_against_a_recorded_run_by_order_and_by_token_ids(tmp_path):
    seqs = fixed_length_routing(seed=4)
    seqs_b, swaps = gen.swapped(seqs, seed=5)
    write_recorded(tmp_path / "runs" / "rec", seqs)
    gen.write_megatron_of(tmp_path / "trace", seqs_b, bsz=2)
    import_megatron(tmp_path / "trace", tmp_path / "runs" / "mg", micro_batch_size=2)
    (tmp_path / "ids.txt").write_text("".join(",".join(map(str, q["ids"])) + "\n" for q in seqs))
    import_megatron(tmp_path / "trace", tmp_path / "runs" / "mg_ids", micro_batch_size=2, token_ids=tmp_path / "ids.txt")
    con = open_store(tmp_path / "runs")
    rec, mg, mg_ids = (Selection(run_ids=(r,)) for r in ("rec", "mg", "mg_ids"))
    n = sum(len(q["ids"]) for q in seqs)
    expect = [1 - sum(swaps[layer].values()) / n for layer in range(len(MOE))]
    with pytest.raises(ag.AgreementError, match="Side b has no sequence key"):
        ag.layer_agreement(con, rec, mg)
    for b, match_by, how, ids in ((mg, "order", "order", 0), (mg_ids, "auto", "seq_key", n)):
        got = ag.summary(con, rec, b, match_by=match_by)
        m = got["matched"].iloc[0]
        assert (m["matched"], m["matched_by"], m["ids_compared"]) == (n, how, ids)
        assert got["layers"]["set_agreement"].tolist() == pytest.approx(expect)
        for layer in range(len(MOE)):
            sw = ag.swap_matrix(con, rec, b, layer, match_by=match_by)
            # Megatron lists a row's ids ascending, so a swap pairs experts in that order: compare the sets of
            # experts that only one side chose, per side
            assert sorted(sw["expert_a"].repeat(sw["tokens"])) == sorted(
                a for (a, _), c in swaps[layer].items() for _ in range(c))
            assert sorted(sw["expert_b"].repeat(sw["tokens"])) == sorted(
                b_ for (_, b_), c in swaps[layer].items() for _ in range(c))
    con.close()


def test_a_megatron_trace_keyed_by_sample_ids_against_a_recorded_run(tmp_path):
    """--sample-ids without --token-ids: Megatron's tokens have no ids (-1), the recorded run's have; they match by
    sample_id and position, the ids uncompared (the join required equal ids: nothing matched). The recorded run
    holds the sequences in reverse order, so pairing by order would pair other sequences."""
    seqs = fixed_length_routing(seed=6)
    seqs_b, swaps = gen.swapped(seqs, seed=7)
    write_recorded(tmp_path / "runs" / "rec", seqs[::-1], sample_ids=True)
    gen.write_megatron_of(tmp_path / "trace", seqs_b, bsz=2)
    (tmp_path / "sid.txt").write_text("".join(q["id"] + "\n" for q in seqs))
    import_megatron(tmp_path / "trace", tmp_path / "runs" / "mg", micro_batch_size=2, sample_ids=tmp_path / "sid.txt")
    con = open_store(tmp_path / "runs")
    rec, mg = Selection(run_ids=("rec",)), Selection(run_ids=("mg",))
    assert con.execute("SELECT count(*) FROM routes WHERE run_id = 'mg' AND token_id >= 0").fetchone()[0] == 0
    n = sum(len(q["ids"]) for q in seqs)
    expect = [1 - sum(swaps[layer].values()) / n for layer in range(len(MOE))]
    for source in ("auto", "routes"):
        got = ag.summary(con, rec, mg, source=source)
        m = got["matched"].iloc[0]
        assert (m["matched"], m["matched_by"], m["ids_compared"], m["length_mismatches"]) == (n, "sample_id", 0, 0)
        assert got["layers"]["set_agreement"].tolist() == pytest.approx(expect)
        pd.testing.assert_frame_equal(ag.matched(con, rec, mg, source=source), got["matched"])
    line = ag.matched_by_line(m, ag.sides_without_token_ids(con, rec, mg))
    assert line.startswith(f"matched by: sample_id ({n} tokens); token ids compared for 0 of {n} tokens (no token "
                           "ids on side b")
    for layer in range(len(MOE)):
        sw = ag.swap_matrix(con, rec, mg, layer)
        assert sorted(sw["expert_a"].repeat(sw["tokens"])) == sorted(
            a for (a, _), c in swaps[layer].items() for _ in range(c))
    con.close()


def test_megatron_token_ids_file_must_fit(tmp_path, capsys):
    from moeviz.cli import main

    seqs = fixed_length_routing(seed=4)
    gen.write_megatron_of(tmp_path / "trace", seqs, bsz=2)
    (tmp_path / "ids.txt").write_text("1 2 3\n" * 4)
    code = main(["import", "megatron", str(tmp_path / "trace"), "--out", str(tmp_path / "mg"), "--micro-batch-size",
                 "2", "--token-ids", str(tmp_path / "ids.txt")])
    err = capsys.readouterr().err
    assert code == 2 and "line 1 has 3 token id(s), but sequence (step 0, rank 0, seq 0) has 5 token(s)" in err
    assert "Traceback" not in err and not (tmp_path / "mg").exists()
    code = main(["import", "vllm", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "v"), "--token-ids",
                 str(tmp_path / "ids.txt")])
    assert code == 2 and "--token-ids applies to megatron traces only" in capsys.readouterr().err
