"""generate() with a KV cache, recorded as one step: decode tokens keep their batch row and true position, so a
prompt's sequence (and its domain) covers its generated tokens; `sequences.prompt_tokens` tells prefill from decode.

The reference is independent of the Recorder: one plain forward of the final sequences (prompt + generated, the
left padding of the prompts kept, positions as generate() computes them) with `output_router_logits=True`, whose
router logits give every token's experts, weights and margin by each family's rule written out here in numpy.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from collectors import Recorder  # noqa: E402
from collectors.testing import GuardedRecorder, SyncGuard, tiny_model  # noqa: E402
from moeviz.store import query, sequence_key  # noqa: E402

PROMPT, NEW = 6, 5
PAD = [0, 2, 3]  # left padding of each prompt
DOMAINS = ["code", "prose", "math"]


def np_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def prompts(vocab: int, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (len(PAD), PROMPT), generator=gen)
    mask = torch.ones_like(ids)
    for b, p in enumerate(PAD):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """generated(family, give_ids) -> the recorded generate() call, made once per module."""
    return functools.lru_cache(maxsize=None)(functools.partial(_generated, tmp_path_factory))


def _generated(tmp_path_factory, family: str, give_ids: bool) -> dict:
    model, config = tiny_model(family, seed=2)
    ids, mask = prompts(config.vocab_size)
    path = tmp_path_factory.mktemp(f"generate-{family}")
    with Recorder(model, path, flush_every=100) as rec:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                 do_sample=False, pad_token_id=0)
        rec.step(0, token_ids=out if give_ids else None, domain=DOMAINS, tag="rollout")
    return dict(model=model, config=config, ids=ids, mask=mask, out=out, path=path, sites=rec.sites)


def _reference(model, out, mask):
    """Router logits per layer [B, L-1, E] of one plain forward over the tokens the generate() forwards saw."""
    seen = out[:, :-1]  # the last new token was sampled, never fed to the model
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], seen.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    position_ids = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)  # as generate() makes them
    with torch.no_grad():
        ref = model(input_ids=seen, attention_mask=full_mask, position_ids=position_ids, output_router_logits=True)
    return [lg.float().numpy().reshape(seen.shape[0], seen.shape[1], -1) for lg in ref.router_logits], full_mask


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_generate_routes_cover_prompt_and_generated_tokens_at_true_positions(generated, family):
    r = generated(family, True)
    out, mask = r["out"], r["mask"]
    logits, full_mask = _reference(r["model"], out, mask)
    k = r["sites"][0].top_k
    routes = query(r["path"], "SELECT seq, pos, token_id, layer, slot, expert, weight, dropped, margin FROM routes "
                   "ORDER BY layer, seq, pos, slot")
    n_tokens = int(full_mask.sum())
    assert len(routes) == len(logits) * n_tokens * k  # every token inside the mask, prompt and generated, once
    assert not routes.dropped.any()
    for layer, lg in enumerate(logits):
        got = routes[routes.layer == layer]
        seq, pos = got.seq.to_numpy()[::k], got.pos.to_numpy()[::k]
        np.testing.assert_array_equal(got.token_id.to_numpy()[::k], out.numpy()[seq, pos])
        assert full_mask.numpy()[seq, pos].all()
        p = np_softmax(lg[seq, pos])  # [N, E] the model's full softmax, float64
        top = np.argsort(-p, axis=1, kind="stable")[:, :k]  # [N, k]
        experts = got.expert.to_numpy().reshape(-1, k)
        np.testing.assert_array_equal(experts, top)
        chosen = np.take_along_axis(p, top, 1)
        np.testing.assert_allclose(got.weight.to_numpy().reshape(-1, k), chosen / chosen.sum(1, keepdims=True),
                                   atol=2e-5)  # both families renormalise (Qwen3 norm_topk_prob=True)
        unchosen = p.copy()
        np.put_along_axis(unchosen, top, -np.inf, 1)
        margin = chosen[:, -1] - unchosen.max(1)
        np.testing.assert_allclose(got.margin.to_numpy().reshape(-1, k), np.repeat(margin[:, None], k, 1), atol=2e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_generate_sequences_prompt_tokens_keys_and_domains(generated, family):
    r = generated(family, True)
    out, mask = r["out"], r["mask"]
    seqs = query(r["path"], "SELECT seq, domain, tag, n_tokens, seq_key, pos_offset, prompt_tokens FROM sequences "
                 "ORDER BY seq")
    assert seqs.seq.tolist() == [0, 1, 2]  # one sequence per prompt, not one per decode step
    assert seqs.domain.tolist() == DOMAINS and set(seqs.tag) == {"rollout"}
    assert seqs.prompt_tokens.tolist() == [PROMPT - p for p in PAD]
    assert seqs.pos_offset.tolist() == PAD
    assert seqs.n_tokens.tolist() == [PROMPT - p + NEW for p in PAD]  # the full output rows: the last token too
    for b in range(len(PAD)):
        assert int(seqs.seq_key[b]) == sequence_key(out[b, PAD[b]:].numpy())
    # generated tokens are those at pos - pos_offset >= prompt_tokens, and take the prompt's domain
    gen = query(r["path"], "SELECT s.domain, count(*) AS n FROM routes r "
                "JOIN sequences s USING (run_id, step, rank, seq) WHERE r.pos - s.pos_offset >= s.prompt_tokens "
                "AND r.layer = 0 AND r.slot = 0 GROUP BY ALL ORDER BY 1")
    assert dict(zip(gen.domain, gen.n)) == {d: NEW - 1 for d in DOMAINS}  # the last new token was never routed
    ls = query(r["path"], "SELECT layer, tokens, adjacent_pairs FROM layer_stats ORDER BY layer")
    n_routed = int(mask.sum()) + len(PAD) * (NEW - 1)
    assert ls.tokens.tolist() == [n_routed] * len(ls)
    assert ls.adjacent_pairs.tolist() == [n_routed - len(PAD)] * len(ls)  # consecutive across prefill and decode


def test_generate_without_token_ids_keys_the_routed_tokens(generated):
    r = generated("qwen3_moe", False)
    seqs = query(r["path"], "SELECT seq, n_tokens, seq_key, prompt_tokens FROM sequences ORDER BY seq")
    out = r["out"]
    for b, p in enumerate(PAD):
        assert int(seqs.seq_key[b]) == sequence_key(out[b, p:-1].numpy())
    assert seqs.n_tokens.tolist() == [PROMPT - p + NEW - 1 for p in PAD]
    assert seqs.prompt_tokens.tolist() == [PROMPT - p for p in PAD]


def test_training_forwards_have_no_prompt_tokens(tmp_path):
    model, config = tiny_model("qwen3_moe")
    ids, mask = prompts(config.vocab_size)
    with Recorder(model, tmp_path / "run") as rec:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            model(input_ids=ids[:2], attention_mask=mask[:2])  # gradient accumulation: new sequences
        rec.step(0)
    seqs = query(tmp_path / "run", "SELECT seq, prompt_tokens FROM sequences ORDER BY seq")
    assert seqs.seq.tolist() == [0, 1, 2, 3, 4] and seqs.prompt_tokens.isna().all()
    pos = query(tmp_path / "run", "SELECT seq, max(pos) AS m FROM routes GROUP BY seq ORDER BY seq")
    assert pos.m.tolist() == [PROMPT - 1] * 5


def test_decode_forwards_do_not_sync_on_the_meta_device(tmp_path):
    """A prefill and two decode forwards through a KV cache, as generate() makes them, on the meta device in
    bfloat16 (no data: any read of a value raises) with the hooks and step() under the SyncGuard: the pre-hook
    reads the cache length and the mask width from shapes, step() lays out the decode tokens with fixed-size
    device ops. The flush at close cannot copy meta tensors: one recording warning, as for any meta run."""
    from transformers import DynamicCache

    with torch.device("meta"):
        model, _ = tiny_model("qwen3_moe", experts_implementation="batched_mm")
    model = model.to(torch.bfloat16)
    model.set_attn_implementation("eager")  # sdpa's mask helper reads the mask's values: the model's own sync
    guard = SyncGuard()

    def ones(*shape):
        return torch.ones(*shape, dtype=torch.long, device="meta")

    with pytest.warns(Warning):
        with GuardedRecorder(model, tmp_path / "run", flush_every=100, guard=guard) as rec:
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=ones(2, 5), cache=cache, use_cache=True)
                for t in range(2):
                    model(input_ids=ones(2, 1), cache=cache, use_cache=True)
            assert [(f[0].past, f[0].cached) for f in rec._forwards] == [(0, True), (5, True), (6, True)]
            rec.step(0)
            seqs = next(pc for pc in rec._pending[0].pieces if pc.kind == "seqs")
    assert guard.checked_calls > 3 and rec.steps_recorded == 1
    assert seqs.shape == (2, 2)  # two sequences (n_tokens, prompt_tokens), not one per decode forward


def test_switch_generate_keeps_encoder_detail_and_respects_its_mask(generated):
    """Switch: generate() runs the encoder by itself (not through the model's forward): its tokens are captured
    from the encoder's own call, so encoder routes and aggregates cover the tokens inside the mask; the decoder's
    tokens keep their rows and positions across decode steps."""
    r = generated("switch_transformers", False)
    out, ids, mask, model = r["out"], r["ids"], r["mask"], r["model"]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out[:, :-1], output_router_logits=True)
    enc = [lg.float().numpy() for lg in ref.encoder_router_logits]  # [B, S, E]
    dec = [lg.float().numpy() for lg in ref.decoder_router_logits]  # [B, T, E]
    routes = query(r["path"], "SELECT layer, seq, pos, token_id, expert, dropped FROM routes ORDER BY layer, seq, pos")
    ls = query(r["path"], "SELECT layer, tokens FROM layer_stats ORDER BY layer")
    assert ls.tokens.tolist() == [int(mask.sum())] * 2 + [out[:, :-1].numel()] * 2  # encoder: inside the mask only
    for layer, lg in enumerate(enc + dec):
        got = routes[routes.layer == layer]
        seq, pos = got.seq.to_numpy(), got.pos.to_numpy()
        if layer < 2:
            assert mask.numpy()[seq, pos].all() and len(got) == int(mask.sum())
            np.testing.assert_array_equal(got.token_id, ids.numpy()[seq, pos])
        else:
            assert len(got) == out[:, :-1].numel()
            np.testing.assert_array_equal(got.token_id, out.numpy()[seq, pos])
            assert not got.dropped.any()  # one token per decode forward: never over capacity
        np.testing.assert_array_equal(got.expert, lg[seq, pos].argmax(-1))
    seqs = query(r["path"], "SELECT seq, n_tokens, prompt_tokens FROM sequences ORDER BY seq")
    assert seqs.n_tokens.tolist() == mask.sum(1).tolist()
    assert seqs.prompt_tokens.tolist() == [1, 1, 1]  # the decoder's prompt: its start token


def test_generate_with_a_compiled_forward_records_as_eager(tmp_path):
    """`model.forward = torch.compile(model.forward)` (transformers' recipe for compiled decoding; aot_eager here):
    the router hooks are traced into the prefill and decode graphs with no graph break, and the recorded routes,
    weights, margins and prompt lengths equal an eager recording of the same generate() call."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, config = tiny_model("qwen3_moe", seed=2)
    ids, mask = prompts(config.vocab_size)
    sql = "SELECT seq, pos, token_id, layer, slot, expert, weight, dropped, margin FROM routes ORDER BY ALL"
    got = {}
    try:
        for mode in ("eager", "compiled"):
            torch._dynamo.reset()
            counters.clear()
            with Recorder(model, tmp_path / mode) as rec:
                if mode == "compiled":
                    model.forward = torch.compile(model.forward, backend="aot_eager")
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                         pad_token_id=0)
                rec.step(0, token_ids=out)
            got[mode] = (query(tmp_path / mode, sql),
                         query(tmp_path / mode, "SELECT prompt_tokens FROM sequences ORDER BY seq").prompt_tokens)
            if mode == "compiled":
                assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    finally:
        model.__dict__.pop("forward", None)
        torch._dynamo.reset()
    assert got["compiled"][1].tolist() == got["eager"][1].tolist() == [PROMPT - p for p in PAD]
    np.testing.assert_array_equal(got["compiled"][0].drop(columns=["weight", "margin"]).to_numpy(),
                                  got["eager"][0].drop(columns=["weight", "margin"]).to_numpy())
    np.testing.assert_allclose(got["compiled"][0].weight, got["eager"][0].weight, atol=2e-5)
    np.testing.assert_allclose(got["compiled"][0].margin, got["eager"][0].margin, atol=2e-5)
