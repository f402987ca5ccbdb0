"""Recording of load balancing (collectors.balance): the routers' selection bias at every step, and the
per-sequence balance losses computed on the device.

References, never the code under test:
- Switch Transformers: transformers' own `switch_transformers.load_balancing_loss_func` per layer, and the model's
  `encoder_aux_loss` / `decoder_aux_loss` outputs for the pooled per-stack value;
- DeepSeek-V3's complementary sequence-wise loss: the paper's formula (eq. 17-20, without alpha) written out in
  numpy over the router logits and choices captured by a hook of the test's own;
- the selection bias: the gate's buffer as the router saw it during the step's forward, copied by the test's hook,
  while the test changes it by hand between steps (and torchtitan's / Megatron's own update in their tests).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from collectors import Recorder
from collectors.testing import GuardedRecorder, tiny_model
from moeviz import Selection
from moeviz.analyses.aux_loss import sequence_balance_loss
from moeviz.store import open_store, query


def padded_batch(gen, batch, seq, lengths):
    """[batch, seq] token ids and a right-padding mask with the given lengths."""
    ids = torch.randint(2, 128, (batch, seq), generator=gen)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return ids * mask, mask


def _switch_model():
    # 4 blocks, every 2nd sparse: transformers computes the aux loss only when sparse_step > 1
    return tiny_model("switch_transformers", num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2,
                      num_sparse_decoder_layers=2, expert_capacity=64)


def test_switch_loss_per_sequence_and_per_stack_equal_transformers(tmp_path):
    from transformers.models.switch_transformers import modeling_switch_transformers as sw

    model, config = _switch_model()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 100, (3, 10), generator=gen)
    labels = torch.randint(2, 100, (3, 6), generator=gen)
    with Recorder(model, tmp_path / "run") as rec:
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels, output_router_logits=True)
        rec.step(0)
    logits = [lg[0] if isinstance(lg, tuple) else lg for lg in (*out.encoder_router_logits, *out.decoder_router_logits)]
    bs = query(tmp_path / "run", "SELECT * FROM balance_stats ORDER BY layer")
    assert bs.layer.tolist() == [0, 1, 2, 3] and (bs.sequences == 3).all()
    for layer, lg in enumerate(logits):  # [B, S, E] per layer: transformers' loss over the batch's rows
        ref = sw.load_balancing_loss_func(torch.softmax(lg.float(), -1), lg.argmax(-1)).item()
        assert bs.switch_sum[layer] / 3 == pytest.approx(ref, rel=1e-5)
    # a stack's last layer pools the stack: the model's own encoder_aux_loss / decoder_aux_loss
    assert bs.switch_stack_sum[1] / 3 == pytest.approx(float(out.encoder_aux_loss), rel=1e-5)
    assert bs.switch_stack_sum[3] / 3 == pytest.approx(float(out.decoder_aux_loss), rel=1e-5)
    # several rows: the per-row mean differs from the loss of the pooled rows (what the aggregates give)
    lg = logits[0].reshape(1, -1, logits[0].shape[-1])
    pooled_rows = sw.load_balancing_loss_func(torch.softmax(lg.float(), -1), lg.argmax(-1)).item()
    assert abs(pooled_rows - bs.switch_sum[0] / 3) > 1e-3

    con = open_store(tmp_path / "run")
    pooled = sequence_balance_loss(con, Selection(), pooled=True)
    sw_rows = pooled[pooled.convention == "switch"].set_index("stack")
    assert sw_rows.loc["encoder", "aux_loss"] == pytest.approx(float(out.encoder_aux_loss), rel=1e-5)
    assert sw_rows.loc["decoder", "aux_loss"] == pytest.approx(float(out.decoder_aux_loss), rel=1e-5)
    assert sw_rows.loc["encoder", "first_layer"] == 0 and sw_rows.loc["decoder", "last_layer"] == 3


def _deepseek_reference(captured, masks, n_experts, top_k):
    """DeepSeek-V3 eq. 17-20 per sequence (alpha left out), and Switch's per-row loss, in numpy:
    captured = [(logits [B*S, E], index [B*S, k])] per forward of one layer; masks = [B, S] per forward."""
    seq_aux, switch, n_seqs = 0.0, 0.0, 0
    for (logits, index), mask in zip(captured, masks):
        b, s = mask.shape
        logits = logits.reshape(b, s, -1).astype(np.float64)
        index = index.reshape(b, s, -1)
        for row in range(b):
            t = mask[row].astype(bool)
            if not t.any():
                continue
            n_seqs += 1
            lg, idx, T = logits[row][t], index[row][t], int(t.sum())
            chose = np.zeros((T, n_experts))
            for tok in range(T):
                chose[tok, idx[tok]] = 1.0
            aff = 1 / (1 + np.exp(-lg))
            aff = aff / aff.sum(-1, keepdims=True)  # s'_{i,t}
            f = n_experts / (top_k * T) * chose.sum(0)  # f_i
            P = aff.mean(0)  # P_i
            seq_aux += float((f * P).sum())
            probs = np.exp(lg - lg.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            switch += n_experts * float((chose.mean(0) * probs.mean(0)).sum())
    return n_seqs, seq_aux, switch


def test_deepseek_v3_sequence_wise_loss_and_bias_by_hand(tmp_path):
    model, config = tiny_model("deepseek_v3")
    gates = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    assert gates
    seen: dict[int, list] = {i: [] for i in range(len(gates))}
    bias_used: dict[int, list] = {i: [] for i in range(len(gates))}

    def hook(i):
        def f(module, inputs, output):
            logits, _, index = output
            seen[i].append((logits.detach().float().numpy().copy(), index.detach().numpy().copy()))
            bias_used[i].append(module.e_score_correction_bias.detach().clone().numpy())
        return f

    handles = [g.register_forward_hook(hook(i)) for i, g in enumerate(gates)]
    gen = torch.Generator().manual_seed(5)
    batches = []
    with Recorder(model, tmp_path / "run", flush_every=2) as rec:
        for step in range(3):
            step_masks = []
            for _ in range(2):  # gradient accumulation: two forwards per step
                ids, mask = padded_batch(gen, 3, 7, [7, 4, 6])
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)
                step_masks.append(mask.numpy())
            batches.append(step_masks)
            with torch.no_grad():  # the bias moves between forward and step(), as an optimizer hook would move it
                for g in gates:
                    g.e_score_correction_bias.add_(torch.randn(g.e_score_correction_bias.shape, generator=gen) * 0.1)
            rec.step(step)
    for h in handles:
        h.remove()
    n_exp, k = config.n_routed_experts, config.num_experts_per_tok
    bs = query(tmp_path / "run", "SELECT * FROM balance_stats ORDER BY step, layer")
    for step in range(3):
        for layer in range(len(gates)):
            n_seqs, seq_aux, switch = _deepseek_reference(seen[layer][2 * step: 2 * step + 2], batches[step], n_exp, k)
            row = bs[(bs.step == step) & (bs.layer == layer)].iloc[0]
            assert row.sequences == n_seqs == 6
            assert row.seq_aux_sum == pytest.approx(seq_aux, rel=1e-6)
            assert row.switch_sum == pytest.approx(switch, rel=1e-6)
    # the bias of each step is the one the routers ranked with in that step, not the one moved before step()
    eb = query(tmp_path / "run", "SELECT step, layer, expert, bias FROM expert_bias ORDER BY step, layer, expert")
    assert len(eb) == 3 * len(gates) * n_exp
    for step in range(3):
        for layer in range(len(gates)):
            got = eb[(eb.step == step) & (eb.layer == layer)].bias.to_numpy()
            np.testing.assert_array_equal(got, bias_used[layer][2 * step].astype(np.float64))
    for layer in range(len(gates)):  # and it did move: each step ranked with another bias
        assert not np.array_equal(bias_used[layer][0], bias_used[layer][2])
    # analysis: per layer mean over sequences, pooled = mean over layers (each layer adds its own loss)
    con = open_store(tmp_path / "run")
    per_layer = sequence_balance_loss(con, Selection(), by_step=False)
    ds = per_layer[per_layer.convention == "deepseek_v3_seq"].set_index("layer")
    for layer in range(len(gates)):
        sums = bs[bs.layer == layer]
        assert ds.loc[layer, "aux_loss"] == pytest.approx(sums.seq_aux_sum.sum() / sums.sequences.sum())
    pooled = sequence_balance_loss(con, Selection(), pooled=True, by_step=False)
    assert pooled[pooled.convention == "deepseek_v3_seq"].aux_loss.iloc[0] == pytest.approx(ds.aux_loss.mean())
    # Switch pooled over a decoder-only model's layers (no stack): f and P of all layers per row, by hand
    want, rows = 0.0, 0
    for step in range(3):
        for fwd in range(2):
            mask = batches[step][fwd]
            b, t = mask.shape
            chose = np.zeros((b, n_exp))
            probs = np.zeros((b, n_exp))
            for layer in range(len(gates)):
                logits, index = seen[layer][2 * step + fwd]
                logits = logits.reshape(b, t, -1).astype(np.float64)
                index = index.reshape(b, t, -1)
                p = np.exp(logits - logits.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                for row in range(b):
                    inside = mask[row].astype(bool)
                    for tok in np.flatnonzero(inside):
                        chose[row, index[row, tok]] += 1
                    probs[row] += p[row][inside].sum(0)
            for row in range(b):
                n = len(gates) * mask[row].sum()
                want += n_exp * float(((chose[row] / n) * (probs[row] / n)).sum())
                rows += 1
    sw = pooled[pooled.convention == "switch"].iloc[0]
    assert sw.aux_loss == pytest.approx(want / rows, rel=1e-6)
    assert sw.stack is None or pd.isna(sw.stack)
    assert (sw.first_layer, sw.last_layer) == (0, len(gates) - 1)


def test_routers_without_bias_write_no_bias_rows(tmp_path):
    model, _ = tiny_model("mixtral")
    with Recorder(model, tmp_path / "run") as rec:
        with torch.no_grad():
            model(input_ids=torch.randint(0, 100, (2, 5)))
        rec.step(0)
    assert query(tmp_path / "run", "SELECT count(*) AS n FROM expert_bias").n[0] == 0
    assert query(tmp_path / "run", "SELECT count(*) AS n FROM balance_stats").n[0] == len(rec.sites)


def test_bias_and_balance_do_not_sync_on_the_meta_device(tmp_path):
    """A bfloat16 DeepSeek-V3 (biased sigmoid router) on the meta device, under the SyncGuard: the bias copies and
    the per-sequence sums are device ops only (any read of a value raises there). The flush at close cannot copy
    meta tensors: a recording failure, warned once."""
    import warnings

    with torch.device("meta"):
        model, _ = tiny_model("deepseek_v3", experts_implementation="batched_mm", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GuardedRecorder(model, tmp_path / "run", flush_every=100) as rec:
            ids = torch.zeros(2, 6, dtype=torch.long, device="meta")
            for step in range(2):
                with torch.no_grad():
                    model(input_ids=ids)
                rec.step(step)
    assert rec.guard.checked_calls > 0 and rec.steps_recorded == 2


def test_bias_and_balance_under_torch_compile(tmp_path):
    """A DeepSeek-V3 compiled with aot_eager, the Recorder attached before compiling: the bias moved by hand
    between steps is recorded per step as the router used it, the per-sequence sums equal the eager run's, and
    the Recorder adds no graph and no graph break (the copies are taken in the model's eager pre-hook and at
    step(), outside the graph)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    model, config = tiny_model("deepseek_v3", experts_implementation="batched_mm")
    gates = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    gen = torch.Generator().manual_seed(9)
    batches = [torch.randint(2, 100, (2, 6), generator=gen) for _ in range(3)]
    moves = [torch.randn(len(gates), gates[0].e_score_correction_bias.shape[0], generator=gen) * 0.2 for _ in range(3)]

    def run(path, compile_):
        for g, b in zip(gates, initial):
            g.e_score_correction_bias.copy_(b)
        torch._dynamo.reset()
        counters.clear()
        cnt = CompileCounterWithBackend("aot_eager")
        used = []
        with Recorder(model, path) as rec:
            fn = torch.compile(model, backend=cnt) if compile_ else model
            for step, ids in enumerate(batches):
                used.append([g.e_score_correction_bias.clone() for g in gates])
                with torch.no_grad():
                    fn(input_ids=ids)
                    for g, m in zip(gates, moves[step]):
                        g.e_score_correction_bias.add_(m)
                rec.step(step)
        return cnt, used

    initial = [g.e_score_correction_bias.clone() for g in gates]
    torch._dynamo.reset()
    counters.clear()
    baseline = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        torch.compile(model, backend=baseline)(input_ids=batches[0])
    base_breaks = sum(counters["graph_break"].values())
    run(tmp_path / "eager", False)
    cnt, used = run(tmp_path / "compiled", True)
    assert base_breaks == 0 and sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert cnt.frame_count == baseline.frame_count == 1  # one graph: none added, no recompile across steps
    eb = query(tmp_path / "compiled", "SELECT step, layer, expert, bias FROM expert_bias ORDER BY step, layer, expert")
    for step in range(3):
        for layer in range(len(gates)):
            got = eb[(eb.step == step) & (eb.layer == layer)].bias.to_numpy()
            np.testing.assert_array_equal(got, used[step][layer].double().numpy())
    a = query(tmp_path / "eager", "SELECT * EXCLUDE (run_id) FROM balance_stats ORDER BY step, layer")
    b = query(tmp_path / "compiled", "SELECT * EXCLUDE (run_id) FROM balance_stats ORDER BY step, layer")
    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-5)


def test_sequence_balance_by_hand_with_padding_nan_and_mixed_widths():
    """collectors.balance.SequenceBalance on 2 sequences of 3 tokens (one padded, its logits NaN): the sums equal
    the formulas over the kept tokens only; a layer of another width in the same stream is not pooled with it."""
    from collectors.balance import SequenceBalance

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0],
                           [1.0, -2.0, 0.0], [0.0, 0.0, 0.0], [float("nan")] * 3])  # [N=6, E=3]
    index = torch.tensor([[0], [1], [2], [0], [2], [1]])  # [N, k=1]
    keep = torch.tensor([True, True, True, True, True, False])
    seq = torch.tensor([0, 0, 0, 1, 1, 1])
    out = SequenceBalance().layer(0, logits, index, keep, seq, 2).numpy()
    want_switch = want_ds = 0.0
    for rows in ([0, 1, 2], [3, 4]):
        lg = logits[rows].double().numpy()
        p = np.exp(lg) / np.exp(lg).sum(-1, keepdims=True)
        s = 1 / (1 + np.exp(-lg))
        a = s / s.sum(-1, keepdims=True)
        f = np.bincount(index[rows, 0].numpy(), minlength=3) / len(rows)
        want_switch += 3 * float((f * p.mean(0)).sum())
        want_ds += float((3 * f * a.mean(0)).sum())
    assert out[0] == 2 and out[1] == pytest.approx(want_switch, rel=1e-6) and out[3] == pytest.approx(want_ds, rel=1e-6)
    assert out[2] == pytest.approx(out[1], rel=1e-12)  # one layer: the stack pools only itself
    sb = SequenceBalance()
    sb.layer(0, logits, index, keep, seq, 2)
    wide = sb.layer(0, torch.zeros(6, 5), torch.zeros(6, 1, dtype=torch.long), keep, seq, 2).numpy()
    assert wide[2] == pytest.approx(wide[1])  # pooled on its own, not with the 3-wide layer
