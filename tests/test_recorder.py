"""Recorder: exact aggregates and routes against a numpy brute force from transformers' own router logits,
masking, gradient accumulation, the sampling policy, hook removal on error, writer errors, and no host sync in
the hooks (a TorchDispatchMode that fails on any op which would make the CPU wait for the device)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy.special import entr
from torch.utils._python_dispatch import TorchDispatchMode

from collectors import Recorder
from collectors.recorder import RecorderError
from collectors.testing import tiny_model
from moeviz.store import query

K = 2  # tiny Mixtral: 4 experts, top-2
E = 4


# ---------------------------------------------------------------------------------------------- references


def np_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def brute_force(logits, mask, k=K):
    """Per-layer aggregates from router logits [N, E] and a 0/1 mask [N], by explicit loops where it is cheap."""
    logits = np.asarray(logits, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    p = np_softmax(logits)
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]  # [N, k]
    n_exp = logits.shape[1]
    assigned = np.zeros(n_exp, dtype=np.int64)
    first = np.zeros(n_exp, dtype=np.int64)
    for t in range(len(logits)):
        if not mask[t]:
            continue
        first[top[t, 0]] += 1
        for j in range(k):
            assigned[top[t, j]] += 1
    lse = np.log(np.exp(logits).sum(1))
    entropy = entr(p).sum(1)  # -p log p, with 0 log 0 = 0
    return dict(
        tokens=int(mask.sum()),
        assigned=assigned,
        first_choice=first,
        prob_sum=(p * mask[:, None]).sum(0),
        z_loss_sum=float((lse**2)[mask].sum()),
        entropy_sum=float(entropy[mask].sum()),
        top=top,
        p=p,
    )


def forward_with_reference(model, ids, mask):
    """Run a forward that the hooks see, returning transformers' own router logits per layer [B*S, E]."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    return [t.float().numpy() for t in out.router_logits]


def padded_batch(gen, batch, seq, lengths):
    ids = torch.randint(2, 128, (batch, seq), generator=gen)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ids = ids * mask  # pad id 0
    return ids, mask


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run 100x faster on one thread than on an oversubscribed pool (2 shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mixtral():
    model, _ = tiny_model("mixtral")
    return model


# ---------------------------------------------------------------------------------------------- aggregates


def test_exact_aggregates_match_brute_force_with_masks_and_accumulation(mixtral, tmp_path):
    gen = torch.Generator().manual_seed(3)
    # step 0: two forwards (gradient accumulation) of different lengths; step 1: one forward.
    batches = {0: [padded_batch(gen, 3, 9, [9, 5, 1]), padded_batch(gen, 2, 6, [6, 3])], 1: [padded_batch(gen, 4, 7, [7, 7, 2, 4])]}
    ref_logits, ref_masks = {}, {}
    with Recorder(mixtral, tmp_path / "run", flush_every=100) as rec:
        for step, fwds in batches.items():
            per_layer = None
            for ids, mask in fwds:
                logits = forward_with_reference(mixtral, ids, mask)
                per_layer = logits if per_layer is None else [np.concatenate([a, b]) for a, b in zip(per_layer, logits)]
            ref_logits[step] = per_layer
            ref_masks[step] = np.concatenate([m.reshape(-1).numpy() for _, m in fwds])
            rec.step(step)

    ss = query(tmp_path / "run", "SELECT * FROM step_stats ORDER BY step, layer, expert")
    ls = query(tmp_path / "run", "SELECT * FROM layer_stats ORDER BY step, layer")
    assert sorted(ss.step.unique()) == [0, 1]
    assert len(ss) == 2 * 2 * E and len(ls) == 2 * 2
    for step in batches:
        for layer in range(2):
            ref = brute_force(ref_logits[step][layer], ref_masks[step])
            got = ss[(ss.step == step) & (ss.layer == layer)]
            assert (got.tokens == ref["tokens"]).all()
            np.testing.assert_array_equal(got.assigned.to_numpy(), ref["assigned"])
            np.testing.assert_array_equal(got.first_choice.to_numpy(), ref["first_choice"])
            np.testing.assert_allclose(got.prob_sum.to_numpy(), ref["prob_sum"], rtol=1e-5)
            np.testing.assert_array_equal(got.dropped.to_numpy(), np.zeros(E))
            row = ls[(ls.step == step) & (ls.layer == layer)].iloc[0]
            assert row.tokens == ref["tokens"] and row.dropped == 0
            assert row.z_loss_sum == pytest.approx(ref["z_loss_sum"], rel=1e-5)
            assert row.entropy_sum == pytest.approx(ref["entropy_sum"], rel=1e-5)
    # padding made a difference: the masked token count is below batch * seq
    assert ss[ss.step == 0].tokens.iloc[0] == 9 + 5 + 1 + 6 + 3 < 3 * 9 + 2 * 6

    seqs = query(tmp_path / "run", "SELECT * FROM sequences ORDER BY step, seq")
    assert seqs[seqs.step == 0].n_tokens.tolist() == [9, 5, 1, 6, 3]
    assert seqs[seqs.step == 1].n_tokens.tolist() == [7, 7, 2, 4]
    assert set(seqs.tag) == {"train"} and seqs.domain.isna().all()


def record_batches(model, run_dir, batches: dict, **recorder_kwargs) -> dict[tuple, list[int]]:
    """Record {step: [(input_ids, attention_mask), ...]} (several forwards per step) with every token kept, and
    return the recorded routes as {(step, layer, seq, pos): [expert of slot 0, slot 1, ...]}."""
    with Recorder(model, run_dir, flush_every=100, **recorder_kwargs) as rec:
        for step, fwds in batches.items():
            for ids, mask in fwds:
                model(input_ids=ids, attention_mask=mask)
            rec.step(step)
    routes = query(run_dir, "SELECT step, layer, seq, pos, slot, expert FROM routes ORDER BY ALL")
    experts: dict[tuple, list[int]] = {}
    for r in routes.itertuples():
        experts.setdefault((r.step, r.layer, r.seq, r.pos), []).append(r.expert)  # slot order
    return experts


def test_adjacency_and_pair_stats_match_brute_force_over_the_recorded_routes(mixtral, tmp_path):
    """layer_stats' adjacency counts and pair_stats, computed on the device, equal Python loops over the routes
    (every token recorded), with padding and two forwards in one step."""
    from itertools import combinations

    gen = torch.Generator().manual_seed(5)
    batches = {0: [padded_batch(gen, 3, 9, [9, 5, 1]), padded_batch(gen, 2, 6, [6, 3])], 1: [padded_batch(gen, 4, 7, [7, 7, 2, 4])]}
    experts = record_batches(mixtral, tmp_path / "run", batches)
    want_adj: dict[tuple, list[int]] = {}
    want_pairs: dict[tuple, int] = {}
    for (step, layer, seq, pos), ex in experts.items():
        counts = want_adj.setdefault((step, layer), [0, 0, 0, 0])
        nxt = experts.get((step, layer, seq, pos + 1))
        if nxt is not None:
            counts[0] += 1
            counts[1] += ex[0] == nxt[0]
            counts[2] += nxt[0] in ex
            counts[3] += bool(set(ex) & set(nxt))
        for i, j in combinations(sorted(set(ex)), 2):
            want_pairs[(step, layer, i, j)] = want_pairs.get((step, layer, i, j), 0) + 1
    ls = query(tmp_path / "run", "SELECT step, layer, adjacent_pairs, same_first, first_in_topk, topk_overlap, "
                                 "coactive_pairs, tokens FROM layer_stats ORDER BY step, layer")
    assert len(ls) == 4
    for r in ls.itertuples():
        assert [r.adjacent_pairs, r.same_first, r.first_in_topk, r.topk_overlap] == want_adj[(r.step, r.layer)]
        assert r.coactive_pairs == r.tokens  # k = 2: one pair per token
    assert want_adj[(0, 0)][0] == (9 - 1) + (5 - 1) + 0 + (6 - 1) + (3 - 1)  # pairs never cross sequences
    ps = query(tmp_path / "run", "SELECT step, layer, expert_i, expert_j, tokens FROM pair_stats")
    assert {(r.step, r.layer, r.expert_i, r.expert_j): r.tokens for r in ps.itertuples()} == want_pairs


def test_pair_stats_can_be_switched_off(mixtral, tmp_path):
    with Recorder(mixtral, tmp_path / "run", pair_stats=False) as rec:
        mixtral(input_ids=torch.tensor([[1, 2, 3]]))
        rec.step(0)
    ls = query(tmp_path / "run", "SELECT coactive_pairs, adjacent_pairs FROM layer_stats")
    assert ls.coactive_pairs.isna().all() and (ls.adjacent_pairs == 2).all()
    assert query(tmp_path / "run", "SELECT count(*) AS n FROM pair_stats").n[0] == 0


@pytest.mark.parametrize("flow", ["adjacent", "all"])
def test_flow_stats_match_brute_force_over_the_recorded_routes(tmp_path, flow):
    """flow_stats, counted on the device, equal Python loops pairing each token's experts in two layers of the
    recorded routes (every token recorded), with padding and two forwards in one step; 'adjacent' counts layer
    l -> l+1 only, 'all' every pair of layers. The model has 3 layers, so the two differ by the pair 0 -> 2."""
    model, config = tiny_model("qwen2_moe", num_hidden_layers=3)
    gen = torch.Generator().manual_seed(11)
    batches = {0: [padded_batch(gen, 3, 9, [9, 5, 1]), padded_batch(gen, 2, 6, [6, 3])], 1: [padded_batch(gen, 2, 7, [7, 2])]}
    recorded = record_batches(model, tmp_path / "run", batches, flow_stats=flow)
    experts = {(step, seq, pos, layer): ex for (step, layer, seq, pos), ex in recorded.items()}
    layer_pairs = [(0, 1), (1, 2)] + ([(0, 2)] if flow == "all" else [])
    want: dict[tuple, list[int]] = {}
    for (step, seq, pos, la), ex_a in experts.items():
        for a, b in layer_pairs:
            if la != a:
                continue
            ex_b = experts[(step, seq, pos, b)]
            cell = want.setdefault((step, a, b, ex_a[0], ex_b[0]), [0, 0])
            cell[0] += 1
            for i in ex_a:
                for j in ex_b:
                    want.setdefault((step, a, b, i, j), [0, 0])[1] += 1
    got = query(tmp_path / "run", "SELECT * FROM flow_stats")
    assert {(r.step, r.layer_a, r.layer_b, r.expert_a, r.expert_b): [r.first_tokens, r.topk_pairs]
            for r in got.itertuples()} == want
    k = config.num_experts_per_tok  # every token adds k * k pairs and one first-choice link per pair of layers
    n_tokens = 9 + 5 + 1 + 6 + 3 + 7 + 2
    links = n_tokens * len(layer_pairs)
    assert got.first_tokens.sum() == links and got.topk_pairs.sum() == links * k * k


def test_flow_stats_can_be_switched_off_and_reject_unknown_choices(mixtral, tmp_path):
    with Recorder(mixtral, tmp_path / "run", flow_stats=None) as rec:
        mixtral(input_ids=torch.tensor([[1, 2, 3]]))
        rec.step(0)
    assert query(tmp_path / "run", "SELECT count(*) AS n FROM flow_stats").n[0] == 0
    with pytest.raises(RecorderError, match="flow_stats must be one of"):
        Recorder(mixtral, tmp_path / "run2", flow_stats="next")


def test_routes_equal_the_models_routing(mixtral, tmp_path):
    gen = torch.Generator().manual_seed(5)
    ids, mask = padded_batch(gen, 3, 8, [8, 6, 3])
    with Recorder(mixtral, tmp_path / "run") as rec:
        logits = forward_with_reference(mixtral, ids, mask)
        rec.step(7, domain=["code", "prose", "code"], tag="eval")
    routes = query(tmp_path / "run", "SELECT * FROM routes ORDER BY layer, seq, pos, slot")
    assert set(routes.step) == {7} and set(routes["rank"]) == {0}
    for layer in range(2):
        ref = brute_force(logits[layer], mask.reshape(-1).numpy())
        got = routes[routes.layer == layer]
        flat = np.flatnonzero(mask.reshape(-1).numpy())  # tokens inside the mask, in (seq, pos) order
        assert len(got) == len(flat) * K  # no padded token recorded
        seq, pos = flat // 8, flat % 8
        np.testing.assert_array_equal(got.seq.to_numpy().reshape(-1, K)[:, 0], seq)
        np.testing.assert_array_equal(got.pos.to_numpy().reshape(-1, K)[:, 0], pos)
        np.testing.assert_array_equal(got.token_id.to_numpy().reshape(-1, K)[:, 0], ids.reshape(-1).numpy()[flat])
        np.testing.assert_array_equal(got.slot.to_numpy().reshape(-1, K), np.tile(np.arange(K), (len(flat), 1)))
        np.testing.assert_array_equal(got.expert.to_numpy().reshape(-1, K), ref["top"][flat])
        # Mixtral renormalises the top-k probabilities
        top_p = np.take_along_axis(ref["p"][flat], ref["top"][flat], 1)
        np.testing.assert_allclose(got.weight.to_numpy().reshape(-1, K), top_p / top_p.sum(1, keepdims=True), atol=2e-5)
    seqs = query(tmp_path / "run", "SELECT * FROM sequences ORDER BY seq")
    assert seqs.domain.tolist() == ["code", "prose", "code"] and set(seqs.tag) == {"eval"}


def test_sampling_policy_keeps_first_tokens_of_sampled_steps(mixtral, tmp_path):
    gen = torch.Generator().manual_seed(11)
    batches = [padded_batch(gen, 3, 6, [2, 6, 4]) for _ in range(4)]
    with Recorder(mixtral, tmp_path / "run", sample_every=2, max_tokens_per_step=5, flush_every=3) as rec:
        for step, (ids, mask) in enumerate(batches):
            with torch.no_grad():
                mixtral(input_ids=ids, attention_mask=mask)
            rec.step(step)
    routes = query(tmp_path / "run", "SELECT DISTINCT step, seq, pos FROM routes ORDER BY step, seq, pos")
    assert sorted(routes.step.unique()) == [0, 2]  # every 2nd step
    # first 5 tokens inside the mask in (seq, pos) order: seq 0 has 2 tokens, then 3 of seq 1
    expected = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    for step in (0, 2):
        got = routes[routes.step == step]
        assert list(zip(got.seq, got.pos)) == expected
    # the aggregates still cover every token of every step
    tokens = query(tmp_path / "run", "SELECT step, tokens FROM layer_stats WHERE layer = 0 ORDER BY step")
    assert tokens.step.tolist() == [0, 1, 2, 3] and tokens.tokens.tolist() == [12, 12, 12, 12]
    runs = query(tmp_path / "run", "SELECT sample_every, max_tokens_per_step FROM runs")
    assert runs.iloc[0].tolist() == [2, 5]


def test_explicit_token_ids_and_mask_override_the_captured_ones(mixtral, tmp_path):
    gen = torch.Generator().manual_seed(2)
    ids, mask = padded_batch(gen, 2, 5, [5, 2])
    with Recorder(mixtral, tmp_path / "run") as rec:
        with torch.no_grad():
            mixtral(ids)  # positional, no mask: every token counts for the model
        rec.step(0, token_ids=ids + 1, attention_mask=mask, domain="it")
        with torch.no_grad():
            mixtral(ids)
        rec.step(1)
    routes = query(tmp_path / "run", "SELECT * FROM routes WHERE layer = 0 AND slot = 0 ORDER BY step, seq, pos")
    r0 = routes[routes.step == 0]
    assert len(r0) == 7 and r0.token_id.tolist() == (ids + 1)[mask.bool()].tolist()
    assert len(routes[routes.step == 1]) == 10  # captured positional input_ids, no mask
    assert routes[routes.step == 1].token_id.tolist() == ids.reshape(-1).tolist()
    seqs = query(tmp_path / "run", "SELECT step, seq, domain, n_tokens FROM sequences ORDER BY step, seq")
    rows = [[r.step, r.seq, None if r.domain is None or r.domain != r.domain else r.domain, r.n_tokens]
            for r in seqs.itertuples()]
    assert rows == [[0, 0, "it", 5], [0, 1, "it", 2], [1, 0, None, 5], [1, 1, None, 5]]


def test_wrong_number_of_domain_labels_is_a_clear_error(mixtral, tmp_path):
    with pytest.raises(RecorderError, match="2 sequences"):
        with Recorder(mixtral, tmp_path / "run") as rec:
            with torch.no_grad():
                mixtral(torch.ones(2, 4, dtype=torch.long))
            rec.step(0, domain=["a", "b", "c"])


def test_run_metadata_layers_and_vocab(mixtral, tmp_path):
    class Tok:
        def __len__(self):
            return 130

        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

    with Recorder(mixtral, tmp_path / "run", run_name="meta", tokenizer=Tok()) as rec:
        with torch.no_grad():
            mixtral(torch.ones(1, 3, dtype=torch.long))
        rec.step(0)
    run = query(tmp_path / "run", "SELECT * FROM runs").iloc[0]
    assert (run.run_name, run.model_class, run.n_layers, run.n_experts, run.top_k) == (
        "meta", "MixtralForCausalLM", 2, 4, 2)
    assert run.status == "finished" and run.world_size == 1
    import json

    assert json.loads(run.config)["num_local_experts"] == 4
    layers = query(tmp_path / "run", "SELECT * FROM layers ORDER BY layer")
    assert layers.module_name.tolist() == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert layers.block_index.tolist() == [0, 1] and set(layers.n_experts) == {4}
    vocab = query(tmp_path / "run", "SELECT * FROM vocab ORDER BY token_id")
    assert len(vocab) == 130 and vocab.text.iloc[129] == "t129"


def test_activation_checkpointing_recompute_is_not_counted_twice(tmp_path):
    model, _ = tiny_model("mixtral")
    model.train()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with Recorder(model, tmp_path / "run") as rec:
        model(input_ids=ids, labels=ids).loss.backward()
        rec.step(0)
    ls = query(tmp_path / "run", "SELECT tokens FROM layer_stats")
    assert ls.tokens.tolist() == [12, 12]


# ---------------------------------------------------------------------------------------------- errors


def _hooks_left(model) -> int:
    """Hooks that belong to a Recorder, on any module (transformers installs hooks of its own: not counted)."""
    import functools
    import inspect

    def owner(h):
        h = h.func if isinstance(h, functools.partial) else h
        h = inspect.unwrap(h)  # the model's hooks are wrapped in torch.compiler.disable
        return getattr(h, "__self__", None)

    return sum(
        isinstance(owner(h), Recorder)
        for m in model.modules()
        for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    )


def test_hooks_removed_and_run_failed_when_the_body_raises(mixtral, tmp_path):
    assert _hooks_left(mixtral) == 0
    with pytest.raises(ValueError, match="boom"):
        with Recorder(mixtral, tmp_path / "run", flush_every=1) as rec:
            assert _hooks_left(mixtral) == 4  # model pre- and post-hook + one per router
            for step in range(2):
                with torch.no_grad():
                    mixtral(torch.full((1, 4), 3))
                rec.step(step)
            with torch.no_grad():
                mixtral(torch.full((1, 4), 3))  # captured but never stepped: discarded
            raise ValueError("boom")
    assert _hooks_left(mixtral) == 0
    run = query(tmp_path / "run", "SELECT status, error FROM runs").iloc[0]
    assert run.status == "failed" and "ValueError: boom" in run.error
    assert query(tmp_path / "run", "SELECT DISTINCT step FROM step_stats ORDER BY step").step.tolist() == [0, 1]
    with pytest.raises(RecorderError, match="closed"):
        rec.step(3)


def test_strict_writer_thread_error_surfaces_on_next_step_and_keeps_written_data(mixtral, tmp_path, monkeypatch):
    from moeviz import store

    real = store.RunWriter.write_flush
    calls = {"n": 0}

    def flaky(self, tables):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(self, tables)

    monkeypatch.setattr(store.RunWriter, "write_flush", flaky)
    with pytest.raises(RecorderError, match="disk full"):  # strict: the default warns and goes on (test_recording_errors)
        with Recorder(mixtral, tmp_path / "run", flush_every=1, strict=True) as rec:
            for step in range(10):
                with torch.no_grad():
                    mixtral(torch.full((1, 4), 3))
                rec.step(step)
                time.sleep(0.05)  # let the writer thread take the flush
    assert _hooks_left(mixtral) == 0
    run = query(tmp_path / "run", "SELECT status, error FROM runs").iloc[0]
    assert run.status == "failed" and "disk full" in run.error
    assert query(tmp_path / "run", "SELECT DISTINCT step FROM step_stats").step.tolist() == [0]


def test_bad_arguments_are_clear_errors(mixtral, tmp_path):
    with pytest.raises(RecorderError, match="sample_every"):
        Recorder(mixtral, tmp_path / "r", sample_every=0)
    with pytest.raises(RecorderError, match="nn.Module"):
        Recorder("not a model", tmp_path / "r")
    rec = Recorder(mixtral, tmp_path / "r")
    with pytest.raises(RecorderError, match="not started"):
        rec.step(0)


# ---------------------------------------------------------------------------------------------- no host sync


class HostSync(AssertionError):
    pass


class SyncDetector(TorchDispatchMode):
    """Fails on every op that makes the host wait for the device: reading a scalar (`.item()`, `bool()`),
    ops whose output size depends on the data (nonzero, boolean indexing, unique, bincount without a size,
    masked_select), and device-to-host copies."""

    DATA_DEPENDENT = ("nonzero", "masked_select", "unique", "_unique", "bincount", "repeat_interleave", "nonzero_static")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" or name.startswith(self.DATA_DEPENDENT):
            raise HostSync(f"host sync: aten.{name}")
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            raise HostSync("host sync: boolean-mask indexing")
        if name == "_to_copy" and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu":
            if args[0].device.type != "cpu":
                raise HostSync("host sync: device-to-host copy")
        if name == "copy_" and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            raise HostSync("host sync: device-to-host copy")
        return func(*args, **kwargs)


class WatchedRecorder(Recorder):
    """The real Recorder with its hooks and step() run under the SyncDetector (the model's own code is not)."""

    def _on_model_call(self, *a):
        with SyncDetector():
            return super()._on_model_call(*a)

    def _on_router(self, *a):
        with SyncDetector():
            return super()._on_router(*a)

    def step(self, *a, **kw):
        with SyncDetector():
            return super().step(*a, **kw)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_hooks_and_step_do_not_sync_with_the_device(tmp_path, family):
    model, _ = tiny_model(family)
    gen = torch.Generator().manual_seed(1)
    ids, mask = padded_batch(gen, 2, 6, [6, 4])
    with WatchedRecorder(model, tmp_path / "run", max_tokens_per_step=5, flush_every=100) as rec:
        for step in range(2):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
                model(input_ids=ids[:1], attention_mask=mask[:1])
            rec.step(step, domain="x")
    assert query(tmp_path / "run", "SELECT count(*) AS n FROM layer_stats").n[0] == 2 * len(rec.sites)


def test_nonfinite_counts_do_not_sync_with_the_device(mixtral, tmp_path):
    """NaN router logits are counted (layer_stats.nonfinite_tokens) by the same sync-free step()."""
    from collectors import RecordingWarning
    from collectors.routers import find_routers

    def nan_logit(module, args, out):  # registered before the Recorder's hooks: they see what it returns
        logits = out[0].clone()
        logits[1] = float("nan")
        return (logits,) + tuple(out[1:])

    handle = find_routers(mixtral)[0].module.register_forward_hook(nan_logit)
    gen = torch.Generator().manual_seed(2)
    ids, mask = padded_batch(gen, 2, 6, [6, 4])
    try:
        with pytest.warns(RecordingWarning, match="NaN or infinite"):
            with WatchedRecorder(mixtral, tmp_path / "run", max_tokens_per_step=5, flush_every=100) as rec:
                for step in range(2):
                    with torch.no_grad():
                        mixtral(input_ids=ids, attention_mask=mask)
                    rec.step(step)
    finally:
        handle.remove()
    ls = query(tmp_path / "run", "SELECT layer, tokens, nonfinite_tokens FROM layer_stats ORDER BY step, layer")
    assert ls.nonfinite_tokens.tolist() == [1, 0, 1, 0] and ls.tokens.tolist() == [9, 10, 9, 10]


@pytest.mark.parametrize(
    "bad",
    [
        lambda out: out.logits.sum().item(),
        lambda out: out.logits[out.logits > 0],
        lambda out: bool(out.weights.max() > 0.5),
        lambda out: torch.bincount(out.index.reshape(-1)),
    ],
    ids=["item", "bool-index", "bool", "bincount"],
)
def test_sync_detector_catches_a_syncing_hook(mixtral, tmp_path, bad):
    """Negative control: the same detector fails a hook that does what the Recorder must not."""

    class Syncing(WatchedRecorder):
        def _on_router(self, module, inputs, output):
            with SyncDetector():
                bad(module._moeviz_sink.extract(module, inputs, output))

    with pytest.raises(HostSync):
        with Syncing(mixtral, tmp_path / "run") as rec:
            with torch.no_grad():
                mixtral(torch.ones(1, 4, dtype=torch.long))
            rec.step(0)
    assert _hooks_left(mixtral) == 0


@pytest.mark.gpu
def test_no_sync_on_cuda_under_sync_debug_mode(tmp_path):
    """On a GPU, torch's own sync detector (set_sync_debug_mode('error')) guards the hooks and step()."""
    model, _ = tiny_model("mixtral")
    model = model.cuda()

    class CudaWatched(Recorder):
        def _guard(self, fn, *a, **kw):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        def _on_model_call(self, *a):
            return self._guard(super()._on_model_call, *a)

        def _on_router(self, *a):
            return self._guard(super()._on_router, *a)

        def step(self, *a, **kw):
            return self._guard(super().step, *a, **kw)

    ids = torch.randint(0, 128, (2, 8), device="cuda")
    mask = torch.ones_like(ids)
    with CudaWatched(model, tmp_path / "run", max_tokens_per_step=6, flush_every=100) as rec:
        for step in range(3):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            rec.step(step)
    assert query(tmp_path / "run", "SELECT sum(tokens) AS n FROM layer_stats").n[0] == 3 * 16 * 2


def test_switch_encoder_decoder_streams_and_capacity_drops(tmp_path):
    """Switch Transformers: encoder routers see input_ids (masked), decoder routers the labels' length; drops
    equal a recount of the capacity rule (top-1, at most expert_capacity tokens per expert and sequence)."""
    model, config = tiny_model("switch_transformers")
    gen = torch.Generator().manual_seed(4)
    ids, mask = padded_batch(gen, 3, 10, [10, 6, 9])
    labels = torch.randint(2, 100, (3, 5), generator=gen)
    with Recorder(model, tmp_path / "run") as rec:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        rec.step(0)
    ls = query(tmp_path / "run", "SELECT layer, tokens, dropped FROM layer_stats ORDER BY layer")
    layers = query(tmp_path / "run", "SELECT layer, stack FROM layers ORDER BY layer")
    assert layers["stack"].tolist() == ["encoder", "encoder", "decoder", "decoder"]
    cap = config.expert_capacity
    refs = [(lg, mask) for lg in out.encoder_router_logits] + [(lg, torch.ones(3, 5)) for lg in out.decoder_router_logits]
    total_dropped = 0
    for layer, (lg, m) in enumerate(refs):
        lg = (lg[0] if isinstance(lg, tuple) else lg).float().numpy()  # [B, S, E]
        expert = lg.argmax(-1)  # [B, S]
        dropped = 0
        for b in range(lg.shape[0]):
            real = expert[b][m[b].numpy().astype(bool)]  # right padding: real tokens come first in priority
            counts = np.bincount(real, minlength=lg.shape[-1])
            dropped += int(np.clip(counts - cap, 0, None).sum())
        row = ls[ls.layer == layer].iloc[0]
        assert (row.tokens, row.dropped) == (int(m.sum()), dropped)
        total_dropped += dropped
    assert total_dropped > 0  # the capacity is small on purpose: the test exercises drops
    st = query(tmp_path / "run", "SELECT layer, sum(dropped) AS d FROM step_stats GROUP BY layer ORDER BY layer")
    assert st.d.tolist() == ls.dropped.tolist()


def test_wrapped_model_and_embeddings_input(mixtral, tmp_path):
    """A DDP-style wrapper (forward(*inputs, **kwargs)) still has its positional token ids captured; a forward
    with inputs_embeds records token_id -1 (unknown) but the right positions and mask."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *inputs, **kwargs):
            return self.module(*inputs, **kwargs)

    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    wrapped = Wrapper(mixtral)
    with Recorder(wrapped, tmp_path / "run") as rec:
        assert rec.sites[0].name == "module.model.layers.0.mlp.gate"
        with torch.no_grad():
            wrapped(ids)
        rec.step(0)
        with torch.no_grad():
            embeds = mixtral.get_input_embeddings()(ids)
            wrapped(inputs_embeds=embeds, attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
        rec.step(1)
    r = query(tmp_path / "run", "SELECT step, seq, pos, token_id FROM routes WHERE layer = 0 AND slot = 0 ORDER BY ALL")
    assert r[r.step == 0].token_id.tolist() == ids.reshape(-1).tolist()
    s1 = r[r.step == 1]
    assert list(zip(s1.seq, s1.pos)) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)] and set(s1.token_id) == {-1}


def test_router_tokens_that_match_no_input_are_counted_and_warned(mixtral, tmp_path):
    with Recorder(mixtral, tmp_path / "run") as rec:
        with torch.no_grad():
            mixtral(torch.ones(2, 4, dtype=torch.long))
        with pytest.warns(UserWarning, match="saw 8 tokens in a step, which matches no input batch"):
            rec.step(0, token_ids=torch.ones(1, 3, dtype=torch.long))
    assert query(tmp_path / "run", "SELECT tokens FROM layer_stats").tokens.tolist() == [8, 8]
    assert query(tmp_path / "run", "SELECT count(*) AS n FROM routes").n[0] == 0


def test_paused_and_discarded_forwards_are_not_recorded(mixtral, tmp_path):
    with Recorder(mixtral, tmp_path / "run") as rec:
        with torch.no_grad():
            mixtral(torch.ones(1, 5, dtype=torch.long))
            with rec.paused():
                mixtral(torch.ones(3, 5, dtype=torch.long))
        rec.step(0)
        with torch.no_grad():
            mixtral(torch.ones(2, 5, dtype=torch.long))
        rec.discard()
        with torch.no_grad():
            mixtral(torch.ones(1, 2, dtype=torch.long))
        rec.step(1)
        rec.step(2)  # nothing routed since step 1: no rows
    ls = query(tmp_path / "run", "SELECT step, tokens FROM layer_stats WHERE layer = 0 ORDER BY step")
    assert ls.values.tolist() == [[0, 5], [1, 2]]


# ---------------------------------------------------------------------------------------------- aggregates.py


def test_layer_aggregates_ignore_nan_padding_and_handle_minus_inf_logits():
    from collectors.aggregates import layer_aggregates

    logits = torch.tensor([[1.0, 2.0, -float("inf"), 0.5], [float("nan")] * 4, [0.0, 0.0, 0.0, 3.0]])
    index = torch.tensor([[1, 0], [0, 1], [3, 0]])
    dropped = torch.tensor([[False, True], [True, True], [False, False]])
    mask = torch.tensor([True, False, True])
    got = layer_aggregates(logits, index, dropped, mask).numpy()
    keep = [0, 2]
    ref = brute_force(np.where(np.isinf(logits.numpy()), -1e30, logits.numpy())[keep], np.ones(2))
    tokens, z, ent, drop = got[:4]
    assert np.isnan(got[4:8]).all()  # no token layout given: adjacency unknown (NULL in the store)
    assert got[8] == 0  # the NaN token is padding: not a non-finite token
    assigned, first, prob, drop_e = got[9:].reshape(4, E)
    assert (tokens, drop) == (2, 1)  # the padded token's drops do not count
    np.testing.assert_array_equal(assigned, [2, 1, 0, 1])
    np.testing.assert_array_equal(first, [0, 1, 0, 1])
    np.testing.assert_array_equal(drop_e, [1, 0, 0, 0])
    np.testing.assert_allclose(prob, ref["prob_sum"], rtol=1e-6)
    assert z == pytest.approx(ref["z_loss_sum"], rel=1e-6)
    # 0 log 0 = 0 for the -inf expert (a naive p * log p would give NaN)
    assert ent == pytest.approx(ref["entropy_sum"], rel=1e-6) and np.isfinite(ent)


def test_adjacency_counts_by_hand():
    from collectors.aggregates import adjacency_counts

    # two sequences of 3 and 4 tokens, batch-major; token 5 is padding (outside the mask)
    seq = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    pos = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    keep = torch.tensor([True, True, True, True, True, False, True])
    index = torch.tensor([[1, 2], [1, 3], [3, 1], [3, 1], [0, 2], [0, 2], [0, 2]])
    got = adjacency_counts(index, keep, seq, pos).tolist()
    # pairs: (0,1) (1,2) in seq 0; (3,4) in seq 1; (4,5) and (5,6) touch the padded token; (2,3) crosses sequences
    # (0,1): first 1 = 1 -> same, first-in, overlap. (1,2): 1 vs 3: first 3 in {1,3} -> first-in, overlap.
    # (3,4): 3 vs 0: {3,1} vs {0,2} -> nothing.
    assert got == [3, 1, 2, 2]


def test_pair_counts_by_hand():
    from collectors.aggregates import pair_counts

    index = torch.tensor([[0, 2, 3], [2, 0, 1], [3, 2, 0], [1, 1, 3]])  # the last token repeats expert 1
    mask = torch.tensor([True, True, True, False])
    got = pair_counts(index, mask, 4).tolist()  # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    assert got == [1, 3, 2, 1, 0, 2]
    assert pair_counts(index[:, :1], mask, 4).tolist() == [0] * 6  # k = 1: no pairs


def test_flow_counts_by_hand():
    from collectors.aggregates import flow_counts

    # 3 tokens, E_a = 3, E_b = 2, k = 2 in both layers; token 2 is padding
    index_a = torch.tensor([[0, 2], [2, 1], [1, 0]])
    index_b = torch.tensor([[1, 0], [1, 0], [0, 1]])
    mask = torch.tensor([True, True, False])
    got = flow_counts(index_a, index_b, mask, 3, 2).tolist()  # cells (i, j) row-major: i * 2 + j
    # first choices: token 0 (0 -> 1), token 1 (2 -> 1)
    assert got[0] == [0, 1, 0, 0, 0, 1]
    # all pairs: token 0 {0,2} x {1,0}: (0,1) (0,0) (2,1) (2,0); token 1 {2,1} x {1,0}: (2,1) (2,0) (1,1) (1,0)
    assert got[1] == [1, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("max_tokens", [None, 0, 1, 4, 100])
def test_kept_token_slots_are_the_first_masked_in_tokens(max_tokens):
    from collectors.aggregates import kept_token_slots

    gen = torch.Generator().manual_seed(max_tokens or 0)
    for n in (0, 1, 9, 40):
        mask = torch.rand(n, generator=gen) < 0.6
        sel, valid = kept_token_slots(mask, max_tokens)
        expected = np.flatnonzero(mask.numpy())[: (n if max_tokens is None else max_tokens)]
        assert sel.shape == valid.shape == (n if max_tokens is None else min(n, max_tokens),)
        np.testing.assert_array_equal(sel[valid].numpy(), expected)


# ---------------------------------------------------------------------------------------------- review fixes


def test_deepseek_weights_are_stored_before_routed_scaling_factor(tmp_path):
    """DeepSeek-V3 multiplies its renormalised gate weights by routed_scaling_factor (2.5 here): the store keeps
    the weights before it (in [0, 1], no clipping warning), i.e. sigmoid(logit_e) / sum over the chosen experts."""
    import warnings

    model, config = tiny_model("deepseek_v3")
    assert config.routed_scaling_factor == 2.5 and config.norm_topk_prob
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 100, (2, 6), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clipped weight would warn (StoreWarning)
        with Recorder(model, tmp_path / "run") as rec:
            assert [s.weight_scale for s in rec.sites] == [2.5, 2.5]
            logits = forward_with_reference(model, ids, torch.ones_like(ids))
            rec.step(0)
    routes = query(tmp_path / "run", "SELECT layer, seq, pos, expert, weight FROM routes ORDER BY layer, seq, pos, slot")
    assert len(routes) == 2 * 12 * 2
    for layer, lg in enumerate(logits):
        r = routes[routes.layer == layer]
        token = (r.seq * 6 + r.pos).to_numpy()
        s = 1 / (1 + np.exp(-lg.astype(np.float64)))  # [N, E] sigmoid scores
        chosen = r.expert.to_numpy().reshape(-1, 2)  # [N, k]
        denom = np.take_along_axis(s[token[::2]], chosen, 1).sum(1).repeat(2)
        want = s[token, r.expert.to_numpy()] / denom
        np.testing.assert_allclose(r.weight.to_numpy(), want, atol=2e-5)
        assert r.weight.max() <= 1.0 and r.weight.groupby([r.seq, r.pos]).sum().between(1 - 1e-4, 1 + 1e-4).all()


def test_switch_capacity_factor_is_derived_from_expert_capacity(tmp_path):
    """Switch has a fixed expert_capacity per sequence: runs.capacity_factor = capacity * experts / seq_len."""
    model, config = tiny_model("switch_transformers")
    ids = torch.randint(2, 100, (2, 10))
    with Recorder(model, tmp_path / "run") as rec:
        with torch.no_grad():
            model(input_ids=ids, labels=torch.randint(2, 100, (2, 5)))
        rec.step(0)
        with torch.no_grad():
            model(input_ids=ids[:, :4], labels=torch.randint(2, 100, (2, 5)))
        rec.step(1)
    runs = query(tmp_path / "run", "SELECT capacity_factor FROM runs")
    assert len(runs) == 1
    assert runs.capacity_factor[0] == pytest.approx(config.expert_capacity * config.num_experts / 10)


def test_mixtral_capacity_factor_stays_null(mixtral, tmp_path):
    with Recorder(mixtral, tmp_path / "run") as rec:
        with torch.no_grad():
            mixtral(torch.ones(1, 4, dtype=torch.long))
        rec.step(0)
    assert query(tmp_path / "run", "SELECT capacity_factor FROM runs").capacity_factor.isna().all()


def test_a_rejected_step_call_keeps_the_steps_routing_for_a_corrected_call(mixtral, tmp_path):
    """step() with a bad argument raises a clear error and loses nothing: the forwards stay buffered."""
    with Recorder(mixtral, tmp_path / "run") as rec:
        with torch.no_grad():
            mixtral(torch.ones(2, 4, dtype=torch.long))
        with pytest.raises(RecorderError, match="2 sequences"):
            rec.step(0, domain=["a", "b", "c"])
        with pytest.raises(RecorderError, match="integer step"):
            rec.step(1.5)
        with pytest.raises(RecorderError, match="same shape"):
            rec.step(0, token_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3))
        rec.step(np.int64(0), domain=["a", "b"])
    seqs = query(tmp_path / "run", "SELECT step, seq, domain FROM sequences ORDER BY seq")
    assert seqs.values.tolist() == [[0, 0, "a"], [0, 1, "b"]]
    assert query(tmp_path / "run", "SELECT sum(tokens) AS n FROM layer_stats").n[0] == 2 * 8


def test_recording_into_a_file_or_a_folder_of_runs_is_a_clear_error(mixtral, tmp_path):
    from moeviz.errors import MoevizError

    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(MoevizError, match="is a file"):
        with Recorder(mixtral, tmp_path / "file.txt"):
            pass
    with Recorder(mixtral, tmp_path / "runs" / "a") as rec:
        with torch.no_grad():
            mixtral(torch.ones(1, 4, dtype=torch.long))
        rec.step(0)
    with pytest.raises(MoevizError, match="folder of runs"):
        with Recorder(mixtral, tmp_path / "runs"):
            pass
    assert _hooks_left(mixtral) == 0
    assert query(tmp_path / "runs", "SELECT count(*) AS n FROM runs").n[0] == 1  # the run "a" is still intact


def test_forwards_after_the_last_step_are_reported_at_close(mixtral, tmp_path):
    with pytest.warns(UserWarning, match=r"2 forward\(s\) since the last step\(\) were not recorded"):
        with Recorder(mixtral, tmp_path / "run"):
            with torch.no_grad():
                mixtral(torch.ones(1, 4, dtype=torch.long))
                mixtral(torch.ones(1, 4, dtype=torch.long))
    assert query(tmp_path / "run", "SELECT status FROM runs").status[0] == "finished"


def test_bad_tokenizer_and_ragged_token_ids_are_clear_errors(mixtral, tmp_path):
    with pytest.raises(RecorderError, match="tokenizer= must be a tokenizer"):
        Recorder(mixtral, tmp_path / "a", tokenizer=object()).start()
    assert _hooks_left(mixtral) == 0
    with Recorder(mixtral, tmp_path / "b") as rec:
        with torch.no_grad():
            mixtral(torch.ones(2, 3, dtype=torch.long))
        with pytest.raises(RecorderError, match="rows of equal length"):
            rec.step(0, token_ids=[[1, 2, 3], [1, 2]])
        rec.step(0, token_ids=[[1, 2, 3], [4, 5, 6]])
    assert query(tmp_path / "b", "SELECT count(*) AS n FROM routes WHERE slot = 0 AND layer = 0").n[0] == 6
    assert query(tmp_path / "a", "SELECT status FROM runs").status[0] == "failed"



def test_layer_aggregates_upcast_bfloat16_logits():
    """bf16 router logits: probabilities, z-loss and entropy are computed in float32 (a bf16 softmax would be
    off by ~1e-2 relative); the reference is float64 numpy on the same bf16 values."""
    from collectors.aggregates import layer_aggregates

    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(64, 8, generator=gen) * 4).to(torch.bfloat16)
    index = logits.float().topk(2, dim=-1).indices
    mask = torch.arange(64) % 5 != 0
    got = layer_aggregates(logits, index, None, mask).numpy()
    ref = brute_force(logits.float().numpy(), mask.numpy(), k=2)
    n_scalars = 9  # tokens, z, entropy, dropped, 4 adjacency counts, nonfinite_tokens
    np.testing.assert_allclose(got[n_scalars + 2 * 8 : n_scalars + 3 * 8], ref["prob_sum"], rtol=1e-5)
    np.testing.assert_allclose(got[1:3], [ref["z_loss_sum"], ref["entropy_sum"]], rtol=1e-5)


def test_a_second_open_recorder_on_the_same_routers_is_refused(mixtral, tmp_path):
    """Each hooked router holds its Recorder's sink (one hook for every router finds it there): a second Recorder
    open on the same model at once is refused at start, and after the first closes the routers are clean."""
    with Recorder(mixtral, tmp_path / "a") as first:
        with pytest.raises(RecorderError, match="already recorded by another open Recorder"):
            Recorder(mixtral, tmp_path / "b").start()
        with torch.no_grad():
            mixtral(torch.ones(1, 4, dtype=torch.long))
        first.step(0)
    assert not any(hasattr(s.module, "_moeviz_sink") for s in first.sites)
    with Recorder(mixtral, tmp_path / "c") as again:
        with torch.no_grad():
            mixtral(torch.ones(1, 4, dtype=torch.long))
        again.step(0)
    assert query(tmp_path / "a", "SELECT count(*) AS n FROM routes").n[0] == 4 * K * 2
    assert query(tmp_path / "c", "SELECT count(*) AS n FROM routes").n[0] == 4 * K * 2


def test_switch_capacity_is_recorded_per_layer_for_both_stacks(tmp_path):
    """runs.capacity_factor is one number (from the encoder's length); each layer's fixed expert_capacity is in
    `layers`, and with it the decoder's own drops (12 decoder tokens, not the encoder's 10) are reproduced."""
    from moeviz.analyses.capacity import capacity_drops
    from moeviz.selection import Selection
    from moeviz.store import open_store

    model, config = tiny_model("switch_transformers")
    torch.manual_seed(0)
    ids, labels = torch.randint(2, 100, (3, 10)), torch.randint(2, 100, (3, 12))
    with Recorder(model, tmp_path / "run") as rec:
        with torch.no_grad():
            model(input_ids=ids, labels=labels)
        rec.step(0)
    con = open_store(tmp_path / "run")
    layers = con.execute("SELECT layer, stack, expert_capacity, capacity_factor FROM layers ORDER BY layer").df()
    assert set(layers["stack"]) == {"encoder", "decoder"}
    assert (layers.expert_capacity == config.expert_capacity).all() and layers.capacity_factor.isna().all()
    decoder = tuple(int(x) for x in layers["layer"][layers["stack"] == "decoder"])
    own = con.execute(f"SELECT layer, sum(dropped) AS dropped FROM layer_stats WHERE layer IN {decoder} "
                      "GROUP BY layer ORDER BY layer").df()
    assert own.dropped.sum() > 0  # the tiny config drops: the check below is not vacuous
    redo = capacity_drops(con, Selection(layers=decoder), capacity=int(config.expert_capacity), group="sequence",
                          by=("layer",)).sort_values("layer")
    np.testing.assert_array_equal(redo.dropped.to_numpy(), own.dropped.to_numpy())


def test_a_capacity_factor_router_records_it_per_layer(mixtral, tmp_path):
    """A dropless router has neither; (Megatron and DeepSpeed capacity factors: tests/test_megatron.py,
    tests/test_deepspeed.py read runs.capacity_factor, which equals every layer's here)."""
    with Recorder(mixtral, tmp_path / "run") as rec:
        with torch.no_grad():
            mixtral(torch.ones(1, 4, dtype=torch.long))
        rec.step(0)
    layers = query(tmp_path / "run", "SELECT capacity_factor, expert_capacity FROM layers")
    assert layers.capacity_factor.isna().all() and layers.expert_capacity.isna().all()


def test_biased_routers_take_no_margin_in_the_hook_when_no_route_is_kept(tmp_path, monkeypatch):
    """DeepSeek-V3's margin is taken in the router hook (its bias may change before step()); a run that keeps no
    routes (max_tokens_per_step=0) never computes it, a run that keeps them does, once per router call, and its
    aggregates are the same either way."""
    import collectors.recorder as recorder_module

    calls = []
    real = recorder_module.routing_margin
    monkeypatch.setattr(recorder_module, "routing_margin", lambda *a: calls.append(1) or real(*a))
    model, config = tiny_model("deepseek_v3", seed=2)
    ids = torch.randint(2, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    loads = {}
    for name, kept in (("none", 0), ("all", None)):
        calls.clear()
        with Recorder(model, tmp_path / name, max_tokens_per_step=kept) as rec:
            for step in range(2):
                with torch.no_grad():
                    model(ids)
                rec.step(step)
        loads[name] = query(tmp_path / name, "SELECT step, layer, expert, assigned FROM step_stats ORDER BY ALL")
        n_routes = query(tmp_path / name, "SELECT count(*) AS n FROM routes")["n"].iloc[0]
        assert len(calls) == (0 if kept == 0 else 2 * len(rec.sites)), name
        assert (n_routes == 0) == (kept == 0), name
    assert loads["none"].equals(loads["all"])
