"""Llama 4 (`Llama4Router`) and NLLB-MoE (`NllbMoeTop2Router`), transformers 5.x, out of the box, on tiny random
models built from their configs (collectors.testing.tiny_model).

References, for every token, layer and slot:
1. the router logits the model itself returns (`output_router_logits=True`);
2. each family's routing rule, written out here from those logits (Llama 4: top-k of the logits, sigmoid weights;
   NLLB-MoE: softmax argmax, then the best other logit, then the per-batch capacity by position, brute force,
   then the renormalisation over the kept choices);
3. the router module's own return value (what the experts consumed: Llama 4's `router_scores`, NLLB-MoE's
   `top_1_mask` and combine weights `router_probs`), captured by a separate raw hook.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from collectors.recorder import Recorder  # noqa: E402
from collectors.routers import RouterError, check_router_output, find_routers  # noqa: E402
from collectors.testing import extractions_under_guard, tiny_model  # noqa: E402
from moeviz.store import query  # noqa: E402

BATCH, SEQ, DEC_SEQ = 2, 9, 6

CONFIGS = {
    "llama4_top2": ("llama4", {}),
    "llama4_top1": ("llama4", dict(num_experts_per_tok=1)),
    # eval capacity = ceil(0.3 * tokens) per expert: the tiny batch overflows it
    "nllb_all_capacity": ("nllb_moe", dict(moe_eval_capacity_token_fraction=0.3)),
    "nllb_all_no_drops": ("nllb_moe", {}),  # eval capacity = every token: nothing dropped
    "nllb_prob_norm_before_batch_prioritized": ("nllb_moe", dict(
        moe_eval_capacity_token_fraction=0.3, normalize_router_prob_before_dropping=True,
        batch_prioritized_routing=True)),
    "nllb_random_second": ("nllb_moe", dict(second_expert_policy="random", moe_eval_capacity_token_fraction=0.3)),
}


def _inputs(family, config):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, config.vocab_size, (BATCH, SEQ), generator=gen)
    if family == "nllb_moe":
        dec = torch.randint(3, config.vocab_size, (BATCH, DEC_SEQ), generator=gen)
        return dict(input_ids=ids, decoder_input_ids=dec)
    return dict(input_ids=ids)


@pytest.fixture(scope="module", params=list(CONFIGS))
def run(request):
    family, overrides = CONFIGS[request.param]
    model, config = tiny_model(family, seed=3, **overrides)
    sites = find_routers(model)  # out of the box: no predicate, no adapter
    captured, raw = {}, {}
    handles = []
    for s in sites:
        handles.append(
            s.module.register_forward_hook(lambda m, i, o, s=s: captured.__setitem__(s.layer, s.extract(m, i, o))))
        handles.append(s.module.register_forward_hook(lambda m, i, o, s=s: raw.__setitem__(s.layer, o)))
    inputs = _inputs(family, config)
    torch.manual_seed(11)  # NLLB's 'random' policy samples the second expert
    try:
        with torch.no_grad():
            out = model(**inputs, output_router_logits=True)
    finally:
        for h in handles:
            h.remove()
    if family == "nllb_moe":
        logits = tuple(out.encoder_router_logits) + tuple(out.decoder_router_logits)
    else:
        logits = tuple(out.router_logits)
    return request.param, family, model, config, sites, captured, raw, logits, inputs


def _dense(index, weights, n_experts):
    return torch.zeros(index.shape[0], n_experts, dtype=torch.float64).scatter(1, index.long(), weights.double())


def ref_llama4(logits, k):
    """Top-k of the logits (argsort, descending), weight sigmoid(logit)."""
    order = torch.argsort(logits.float(), dim=-1, descending=True, stable=True)[:, :k]
    return order, torch.sigmoid(logits.float().gather(1, order))


def ref_nllb(logits, cfg):
    """NLLB-MoE's top-2 with second_expert_policy='all', batch_prioritized_routing=False, in eval: (index [T, 2],
    weights [T, 2], dropped [T, 2]); a choice is dropped when its expert already holds `capacity` tokens, first
    choices (in token order) before second choices; weights renormalised over the kept choices (or over both)."""
    probs = torch.softmax(logits.float(), -1)
    T, E = probs.shape
    first = probs.argmax(-1)
    second = logits.float().scatter(1, first[:, None], float("-inf")).argmax(-1)
    capacity = math.ceil(cfg.moe_eval_capacity_token_fraction * T)
    load = [0] * E
    dropped = torch.zeros(T, 2, dtype=torch.bool)
    for slot, choice in enumerate((first, second)):
        for t in range(T):
            e = int(choice[t])
            dropped[t, slot] = load[e] >= capacity
            load[e] += 1  # the position counts also when dropped (cumsum over the choice mask)
    index = torch.stack([first, second], 1)
    p = probs.gather(1, index)
    kept_p = p.masked_fill(dropped, 0.0)
    applied = (p if cfg.normalize_router_prob_before_dropping else kept_p) / (
        (p if cfg.normalize_router_prob_before_dropping else kept_p).sum(-1, keepdim=True).clamp(min=1.2e-7))
    before = p / p.sum(-1, keepdim=True)
    return index, torch.where(dropped, before, applied), dropped


def test_found_with_their_readers(run):
    name, family, model, config, sites, *_ = run
    if family == "llama4":
        assert [s.name for s in sites] == [f"model.layers.{i}.feed_forward.router" for i in range(2)]
        assert {s.kind for s in sites} == {"llama4-router"}
        assert all(s.top_k == config.num_experts_per_tok and s.n_experts == 4 for s in sites)
    else:
        assert [s.stack for s in sites] == ["encoder"] * 2 + ["decoder"] * 2
        assert {s.kind for s in sites} == {"nllb-top2"}
        assert all(s.top_k == 2 and s.capacity_factor is None and s.expert_capacity is None for s in sites)


def test_logits_are_the_models_and_routing_equals_the_rule(run):
    name, family, model, config, sites, captured, raw, logits, _ = run
    assert len(logits) == len(sites)
    n_dropped = 0
    for s, model_logits in zip(sites, logits):
        got = captured[s.layer]
        assert torch.equal(got.logits, model_logits.reshape(-1, s.n_experts))
        check_router_output(s, got)  # moeviz's first-output check accepts it
        if family == "llama4":
            idx, w = ref_llama4(model_logits, s.top_k)
            assert torch.equal(got.index, idx)
            torch.testing.assert_close(got.weights.float(), w, rtol=1e-6, atol=1e-7)
            assert got.dropped is None
            continue
        n_dropped += int(got.dropped.sum())
        if name in ("nllb_all_capacity", "nllb_all_no_drops"):
            idx, w, dropped = ref_nllb(model_logits, config)
            assert torch.equal(got.index, idx)
            assert torch.equal(got.dropped, dropped)
            torch.testing.assert_close(got.weights.float(), w, rtol=1e-5, atol=1e-6)
        else:  # batch-prioritised or random second choice: the first expert still follows the rule
            assert torch.equal(got.index[:, 0], torch.softmax(model_logits.float(), -1).argmax(-1))
    if name == "nllb_all_no_drops":
        assert n_dropped == 0
    elif family == "nllb_moe":
        assert n_dropped > 0  # the test exercises the model's drops


def test_routing_equals_router_return_value(run):
    """What the experts consumed, per token and expert, equals the kept captured (expert, weight) pairs."""
    name, family, model, config, sites, captured, raw, *_ = run
    for s in sites:
        got = captured[s.layer]
        if family == "llama4":
            scores = raw[s.layer][0].reshape(-1, s.n_experts)  # sigmoid at the chosen experts, 0 elsewhere
            assert torch.equal(_dense(got.index, got.weights, s.n_experts), scores.double())
            continue
        top_1_mask, combine, _ = (t.reshape(-1, s.n_experts) for t in raw[s.layer])
        kept_w = got.weights.masked_fill(got.dropped, 0.0)
        assert torch.equal(_dense(got.index, kept_w, s.n_experts), combine.double())
        kept_first = torch.zeros_like(top_1_mask).scatter(1, got.index[:, :1], (~got.dropped[:, :1]).long())
        assert torch.equal(kept_first, top_1_mask)
        assert bool((combine.gather(1, got.index)[got.dropped] == 0).all())


def test_recorder_stores_the_routing(run, tmp_path):
    name, family, model, config, sites, captured, raw, logits, inputs = run
    if name == "nllb_random_second":
        pytest.skip("the second expert is sampled anew in the Recorder's forward; read against the model above")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "saw N tokens ... matches no input batch", clipping
        with Recorder(model, tmp_path / "run", flush_every=1) as rec:
            with torch.no_grad():
                model(**inputs)
            rec.step(0)
    stats = query(tmp_path / "run", "SELECT layer, expert, assigned, first_choice, dropped, prob_sum FROM step_stats "
                                    "ORDER BY layer, expert")
    for s in sites:
        got = captured[s.layer]  # equal to the model's routing (above)
        st = stats[stats.layer == s.layer]
        E = s.n_experts
        np.testing.assert_array_equal(st.assigned.to_numpy(), np.bincount(got.index.reshape(-1).numpy(), minlength=E))
        np.testing.assert_array_equal(st.first_choice.to_numpy(), np.bincount(got.index[:, 0].numpy(), minlength=E))
        want_dropped = np.zeros(E, dtype=np.int64)
        if got.dropped is not None:
            want_dropped = np.bincount(got.index[got.dropped].numpy(), minlength=E)
        np.testing.assert_array_equal(st.dropped.to_numpy(), want_dropped)
        np.testing.assert_allclose(st.prob_sum.to_numpy(),
                                   torch.softmax(logits[s.layer].double(), -1).reshape(-1, E).sum(0).numpy(), rtol=1e-5)
    routes = query(tmp_path / "run", "SELECT layer, seq, pos, slot, expert, weight, dropped, margin FROM routes "
                   "ORDER BY ALL")
    for s in sites:  # every token of each stack (encoder and decoder for NLLB-MoE), in (seq, pos, slot) order
        k = s.top_k
        r = routes[routes.layer == s.layer]
        seq_len = DEC_SEQ if s.stack == "decoder" else SEQ
        np.testing.assert_array_equal(r.pos.to_numpy(), np.tile(np.repeat(np.arange(seq_len), k), BATCH))
        np.testing.assert_array_equal(r.expert.to_numpy().reshape(-1, k), captured[s.layer].index.numpy())
        np.testing.assert_allclose(r.weight.to_numpy().reshape(-1, k), captured[s.layer].weights.numpy(), atol=2e-5)
        expert = r.expert.to_numpy().reshape(-1, k)
        # routes.dropped against the model's own output: NLLB's first choice dropped where its top_1_mask row is
        # zero, its second where the combine weight of that expert is zero; Llama 4 never drops
        dropped = r.dropped.to_numpy().reshape(-1, k)
        if family == "nllb_moe":
            top_1_mask, combine = (t.reshape(-1, s.n_experts) for t in raw[s.layer][:2])
            want = np.stack([top_1_mask.sum(-1).numpy() == 0,
                             np.take_along_axis(combine.numpy(), expert[:, 1:], 1)[:, 0] == 0], 1)
            np.testing.assert_array_equal(dropped, want)
        else:
            assert not dropped.any()
        # routes.margin from the model's own router logits: the full softmax (NLLB), the sigmoid score (Llama 4)
        lg = logits[s.layer].double().reshape(-1, s.n_experts)
        space = (torch.softmax(lg, -1) if family == "nllb_moe" else torch.sigmoid(lg)).numpy()
        picked = np.take_along_axis(space, expert, 1).min(1)
        np.put_along_axis(space, expert, -np.inf, 1)
        want_margin = np.repeat((picked - space.max(1))[:, None], k, 1)
        np.testing.assert_allclose(r.margin.to_numpy().reshape(-1, k), want_margin, atol=2e-5)


def test_nllb_sampled_second_expert_refused_at_start(tmp_path):
    model, _ = tiny_model("nllb_moe", seed=3, second_expert_policy="sampling")
    with pytest.raises(RouterError, match="second_expert_policy='sampling'.*adapter="):
        find_routers(model)
    with pytest.raises(RouterError, match="NllbMoeTop2Router"):
        Recorder(model, tmp_path / "run").start()


@pytest.mark.parametrize("family", ["llama4", "nllb_moe"])
def test_extract_never_syncs(family):
    model, config = tiny_model(family, seed=3, **({"moe_eval_capacity_token_fraction": 0.3}
                                                   if family == "nllb_moe" else {}))
    sites = find_routers(model)
    with torch.no_grad():
        guard, captured = extractions_under_guard(sites, lambda: model(**_inputs(family, config)))
    assert guard.checked_calls == len(sites) == len(captured)


def test_moeviz_collect_records_a_saved_llama4(tmp_path):
    """`moeviz collect --hf-model` on a tiny Llama 4 saved with save_pretrained: unchanged CLI, every token of the
    text routed in every MoE layer, the run finished."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moeviz.cli import main

    text = "the cat sat on the mat and the dog ran off quickly " * 4  # 48 words: one token each
    folder = tmp_path / "tiny-llama4"
    model, _ = tiny_model("llama4", seed=3)
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    (tmp_path / "prose.txt").write_text(text)
    rc = main(["collect", "--hf-model", str(folder), "--text", str(tmp_path / "prose.txt"), "--out",
               str(tmp_path / "run"), "--seq-len", "16", "--batch-size", "2", "--no-progress"])
    assert rc == 0
    totals = query(tmp_path / "run", "SELECT layer, sum(tokens) AS n FROM layer_stats GROUP BY layer ORDER BY layer")
    assert totals.n.tolist() == [48, 48]
    assert query(tmp_path / "run", "SELECT status FROM runs").status[0] == "finished"
    n_routes = query(tmp_path / "run", "SELECT count(*) AS n FROM routes").n[0]
    assert n_routes == 48 * 2 * 2  # tokens x layers x top-2


@pytest.mark.parametrize("family", ["llama4", "nllb_moe"])
def test_bfloat16_models_read_as_the_router_returned(family):
    """bfloat16 weights (NLLB-MoE's router keeps its float32 `router_dtype`): the kept (expert, weight) pairs equal
    the router's own return value exactly, and the first-output check accepts the reading."""
    overrides = {"moe_eval_capacity_token_fraction": 0.3} if family == "nllb_moe" else {}
    model, config = tiny_model(family, seed=3, dtype=torch.bfloat16, **overrides)
    sites = find_routers(model)
    got = {}
    handles = [s.module.register_forward_hook(
        lambda m, i, o, s=s: got.__setitem__(s.layer, (s.extract(m, i, o), o))) for s in sites]
    try:
        with torch.no_grad():
            model(**_inputs(family, config))
    finally:
        for h in handles:
            h.remove()
    n_dropped = 0
    for s in sites:
        out, raw = got[s.layer]
        check_router_output(s, out)
        applied = raw[0 if family == "llama4" else 1].reshape(-1, s.n_experts)  # scores / combine weights
        kept_w = out.weights if out.dropped is None else out.weights.masked_fill(out.dropped, 0)
        assert torch.equal(torch.zeros_like(applied).scatter(1, out.index, kept_w.to(applied.dtype)), applied)
        n_dropped += 0 if out.dropped is None else int(out.dropped.sum())
    assert (n_dropped > 0) == (family == "nllb_moe")
