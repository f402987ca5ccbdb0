"""routes.dropped and routes.margin as the Recorder stores them, against the model's own outputs.

- dropped: Switch Transformers' router returns a dispatch mask whose row is all zero where its capacity dropped the
  token (the expert then never runs on it); every stored route is compared with that mask, and with what the
  experts computed (a dropped token's expert output row is exactly zero). Routers that never drop store false.
- margin: the weakest chosen expert's score minus the best unchosen one's, recomputed in numpy (float64) from the
  router logits the model itself returns (`output_router_logits=True`): the full softmax for Mixtral and Qwen3-MoE,
  sigmoid + `e_score_correction_bias` for DeepSeek-V3 (the space its top-k ranks in). The chosen experts are the
  router's own return value, captured by a raw hook.
(DeepSpeed, Megatron-Core and torchtitan: in their own test modules' recorder tests.)
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from collectors import Recorder  # noqa: E402
from collectors.routers import find_routers  # noqa: E402
from collectors.testing import tiny_model  # noqa: E402
from moeviz.store import query  # noqa: E402


def padded(vocab, lengths, seq, left=False, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (len(lengths), seq), generator=gen)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        if left:
            mask[b, seq - n:] = 1
        else:
            mask[b, :n] = 1
    return ids * mask, mask


def np_margin(space, chosen):
    space = np.asarray(space, dtype=np.float64)
    picked = np.take_along_axis(space, chosen, 1).min(1)
    others = space.copy()
    np.put_along_axis(others, chosen, -np.inf, 1)
    return picked - others.max(1)


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_switch_routes_dropped_are_the_models_own_drops(tmp_path, left):
    """Switch counts every token of a sequence toward an expert's capacity, padding included (its router sees the
    whole row): with left padding, pad tokens take capacity before the real tokens. The stored flags are the
    model's own, whatever it counted."""
    model, config = tiny_model("switch_transformers")
    ids, mask = padded(config.vocab_size, [10, 6, 9], 10, left=left)
    labels = torch.randint(2, 100, (3, 12), generator=torch.Generator().manual_seed(5))
    sites = find_routers(model)
    raw, expert_out = {}, {}
    modules = dict(model.named_modules())
    hooks = [s.module.register_forward_hook(lambda m, i, o, s=s: raw.__setitem__(s.layer, o[0].detach().clone()))
             for s in sites]
    hooks += [modules[s.name.rsplit(".", 1)[0] + ".experts"].register_forward_hook(
        lambda m, i, o, s=s: expert_out.__setitem__(s.layer, o.detach().clone())) for s in sites]
    try:
        with Recorder(model, tmp_path / "run") as rec:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, labels=labels)
            rec.step(0)
    finally:
        for h in hooks:
            h.remove()
    routes = query(tmp_path / "run", "SELECT layer, seq, pos, expert, dropped, margin FROM routes "
                   "ORDER BY layer, seq, pos")
    n_dropped = 0
    for s in sites:
        got = routes[routes.layer == s.layer]
        seq, pos = got.seq.to_numpy(), got.pos.to_numpy()
        dispatch = raw[s.layer].numpy()  # [B, S, E] one-hot, zero row where the model dropped the token
        want = dispatch[seq, pos].sum(-1) == 0
        np.testing.assert_array_equal(got.dropped.to_numpy(), want)
        rows = expert_out[s.layer].reshape(dispatch.shape[0], dispatch.shape[1], -1).numpy()
        np.testing.assert_array_equal(got.dropped.to_numpy(), (rows[seq, pos] == 0).all(-1))  # the experts skipped it
        kept = ~want
        np.testing.assert_array_equal(got.expert.to_numpy()[kept], dispatch[seq, pos].argmax(-1)[kept])
        n_dropped += int(want.sum())
        in_mask = mask.numpy() if s.stack == "encoder" else np.ones(labels.shape, dtype=bool)
        assert len(got) == int(in_mask.sum())
    assert n_dropped > 0
    ls = query(tmp_path / "run", "SELECT sum(dropped) AS d FROM layer_stats").d[0]
    assert ls == n_dropped  # the per-step counts and the per-assignment flags agree


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_margin_is_recomputed_from_the_models_router_logits(tmp_path, family):
    model, config = tiny_model(family, seed=4)
    ids, mask = padded(config.vocab_size, [9, 5], 9)
    sites = find_routers(model)
    chosen = {}  # the router's own top-k index, per layer
    hooks = [s.module.register_forward_hook(
        lambda m, i, o, s=s: chosen.__setitem__(s.layer, next(t for t in o if not t.is_floating_point()).detach()))
        for s in sites]
    try:
        with Recorder(model, tmp_path / "run") as rec:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
            rec.step(0)
    finally:
        for h in hooks:
            h.remove()
    routes = query(tmp_path / "run", "SELECT layer, seq, pos, slot, expert, dropped, margin FROM routes "
                   "ORDER BY layer, seq, pos, slot")
    assert not routes.dropped.any()  # these models never drop
    for s in sites:
        k = s.top_k
        got = routes[routes.layer == s.layer]
        seq, pos = got.seq.to_numpy()[::k], got.pos.to_numpy()[::k]
        t = seq * ids.shape[1] + pos  # row of the flattened batch
        logits = out.router_logits[s.layer].double().reshape(-1, s.n_experts).numpy()[t]  # [N, E]
        index = chosen[s.layer].reshape(-1, k).numpy()[t]  # [N, k] the router's own choice
        np.testing.assert_array_equal(np.sort(got.expert.to_numpy().reshape(-1, k), 1), np.sort(index, 1))
        if family == "deepseek_v3":
            bias = s.module.e_score_correction_bias.double().numpy()
            space = 1.0 / (1.0 + np.exp(-logits)) + bias  # what its (group-limited) top-k ranked
        else:
            space = np.exp(logits - logits.max(1, keepdims=True))
            space /= space.sum(1, keepdims=True)  # the full softmax, before any renormalisation
        margin = got.margin.to_numpy().reshape(-1, k)
        assert (margin == margin[:, :1]).all()  # the same on every slot row of the token
        assert (margin * 65536 == np.round(margin * 65536)).all()  # in steps of 2^-16, as weight_q
        np.testing.assert_allclose(margin[:, 0], np_margin(space, index), atol=1e-5)  # stored in steps of 2^-16
        if family == "deepseek_v3":
            assert (margin[:, 0] < 0).any()  # group limits left out a higher-scoring expert: a negative margin
        else:
            assert (margin[:, 0] >= 0).all()


def test_margin_and_dropped_survive_max_tokens_per_step(tmp_path):
    """Kept tokens only (max_tokens_per_step): the margin is taken for exactly the kept rows."""
    model, config = tiny_model("mixtral")
    ids, mask = padded(config.vocab_size, [7, 7], 7)
    with Recorder(model, tmp_path / "a") as rec:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        rec.step(0)
    with Recorder(model, tmp_path / "b", max_tokens_per_step=5) as rec:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        rec.step(0)
    sql = "SELECT layer, seq, pos, slot, expert, margin FROM routes ORDER BY layer, seq, pos, slot"
    a, b = query(tmp_path / "a", sql), query(tmp_path / "b", sql)
    merged = b.merge(a, on=["layer", "seq", "pos", "slot"], suffixes=("_b", "_a"))
    assert len(merged) == len(b) == 5 * 2 * 2
    np.testing.assert_array_equal(merged.expert_a, merged.expert_b)
    np.testing.assert_array_equal(merged.margin_a, merged.margin_b)


def test_margin_functions_by_hand():
    """kept_margin (softmax routers, from the logits) and routing_margin (a router's own scores) against numpy."""
    from collectors.aggregates import kept_margin, routing_margin

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 8, generator=gen) * 3
    logits[3, 5] = float("-inf")  # an expert masked out: probability 0, still an unchosen expert
    index = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(50)])  # any choice, not only top-k
    sel = torch.tensor([0, 3, 7, 49])
    p = np_softmax_rows(logits.double().numpy())
    want = np_margin(p, index.numpy())[sel.numpy()]
    lse = torch.logsumexp(logits, -1)
    np.testing.assert_allclose(kept_margin(logits, index, sel).numpy(), want, atol=1e-6)
    np.testing.assert_allclose(kept_margin(logits, index, sel, lse=lse).numpy(), want, atol=1e-6)
    np.testing.assert_allclose(routing_margin(torch.softmax(logits, -1), index)[sel].numpy(), want, atol=1e-6)
    scores = torch.sigmoid(logits) + 0.3
    np.testing.assert_allclose(kept_margin(logits, index, sel, margin=routing_margin(scores, index)).numpy(),
                               np_margin(scores.double().numpy(), index.numpy())[sel.numpy()], atol=1e-6)
    every = torch.arange(8).expand(50, 8)  # k = E: no unchosen expert, the margin is unknown
    assert torch.isnan(kept_margin(logits, every, sel)).all() and torch.isnan(routing_margin(scores, every)).all()


def np_softmax_rows(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
