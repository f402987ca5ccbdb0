"""The demo MoE model: shapes, the Switch aux loss and z-loss against independent references, capacity dropping
against hand-computed cases, noisy gating, and that it learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moeviz.demo.model import (
    DemoMoE,
    DemoMoEConfig,
    MoELayer,
    TopKRouter,
    capacity_of,
    dropped_assignments,
    router_adapter,
    router_z_loss,
    switch_aux_loss,
)


def tiny(**kw) -> DemoMoEConfig:
    base = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, n_experts=4, top_k=2, expert_hidden=32)
    base.update(kw)
    return DemoMoEConfig(**base)


def test_router_returns_transformers_style_tuple_with_shapes():
    torch.manual_seed(0)
    router = TopKRouter(tiny(n_experts=6, top_k=3))
    logits, weights, index = router(torch.randn(2, 5, 16))
    assert logits.shape == (10, 6) and weights.shape == (10, 3) and index.shape == (10, 3)
    assert index.dtype == torch.int64
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))  # renormalised over the k chosen
    # slot 0 is the most probable expert, and the chosen experts are the k largest logits
    assert torch.equal(index[:, 0], logits.argmax(-1))
    assert torch.equal(index.sort(-1).values, logits.topk(3, -1).indices.sort(-1).values)


def test_model_forward_shapes_and_loss_parts():
    torch.manual_seed(0)
    model = DemoMoE(tiny())
    x = torch.randint(0, 64, (3, 16))
    logits, loss, parts = model(x[:, :-1], x[:, 1:])
    assert logits.shape == (3, 15, 64)
    assert set(parts) == {"lm_loss", "aux_loss", "z_loss"}
    expected = parts["lm_loss"] + 0.01 * parts["aux_loss"]  # default coefficients: aux 0.01, z 0
    torch.testing.assert_close(loss.detach(), expected)
    # untrained: cross-entropy close to log(vocab)
    assert abs(float(parts["lm_loss"]) - math.log(64)) < 0.5
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_aux_loss_is_one_for_a_uniform_router():
    # uniform probabilities and assignments spread evenly over the experts: f_i = P_i = 1/E
    E, k, T = 8, 2, 64
    logits = torch.zeros(T, E)
    t = torch.arange(T)
    index = torch.stack([t % E, (t + 1) % E], dim=1)  # every expert gets exactly T*k/E assignments
    assert float(switch_aux_loss(logits, index, E)) == pytest.approx(1.0, abs=1e-6)


def test_aux_loss_hand_computed_collapsed_router():
    # every token sends both choices to experts 0 and 1, with probabilities (0.6, 0.3, 0.1/(E-2) ...)
    E, k, T = 4, 2, 10
    p = np.array([0.6, 0.3, 0.05, 0.05])
    logits = torch.tensor(np.log(p), dtype=torch.float32).repeat(T, 1)
    index = torch.tensor([[0, 1]] * T)
    f = np.array([0.5, 0.5, 0.0, 0.0])  # share of the T*k assignments
    expected = E * float(np.sum(f * p))  # 4 * (0.3 + 0.15) = 1.8
    assert expected == pytest.approx(1.8)
    assert float(switch_aux_loss(logits, index, E)) == pytest.approx(expected, rel=1e-5)


def test_aux_loss_is_mixtral_loss_divided_by_k():
    """transformers' Mixtral loss counts f over tokens (sum f = k); ours over assignments (sum f = 1)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(1)
    E, k = 8, 2
    logits = torch.randn(50, E) * 2
    index = logits.softmax(-1).topk(k, -1).indices
    ours = float(switch_aux_loss(logits, index, E))
    theirs = float(load_balancing_loss_func((logits,), num_experts=E, top_k=k))
    assert ours == pytest.approx(theirs / k, rel=1e-5)


def test_router_z_loss_against_numpy():
    torch.manual_seed(2)
    logits = torch.randn(7, 5) * 3
    a = logits.numpy().astype(np.float64)
    m = a.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(a - m).sum(axis=1, keepdims=True)))[:, 0]
    assert float(router_z_loss(logits)) == pytest.approx(float(np.mean(lse**2)), rel=1e-5)


def test_capacity_is_ceil_of_factor_times_tokens_times_k_over_experts():
    assert capacity_of(tokens=10, n_experts=4, top_k=2, capacity_factor=1.0) == 5
    assert capacity_of(tokens=10, n_experts=4, top_k=1, capacity_factor=1.0) == 3  # ceil(2.5)
    assert capacity_of(tokens=8, n_experts=4, top_k=2, capacity_factor=1.25) == 5


def test_dropping_top1_hand_case():
    # E=2, k=1, T=4, capacity ceil(1.0 * 4 * 1 / 2) = 2: the third token sent to expert 0 is dropped
    index = torch.tensor([[0], [0], [0], [1]])
    dropped = dropped_assignments(index, n_experts=2, capacity=2)
    assert dropped.tolist() == [[False], [False], [True], [False]]


def test_dropping_serves_first_choices_before_second_choices():
    # E=3, k=2, T=3, capacity 2. Slot 0: tokens 0,1,2 all choose expert 0 -> token 2 loses its first choice.
    # Slot 1: expert 1 gets tokens 0 and 2 (places 0, 1), expert 2 gets token 1: nothing else dropped.
    index = torch.tensor([[0, 1], [0, 2], [0, 1]])
    assert dropped_assignments(index, 3, 2).tolist() == [[False, False], [False, False], [True, False]]
    # Second choices queue behind every first choice: expert 1 is token 0's first choice and the second
    # choice of tokens 1 and 2; with capacity 2 the last of them (token 2, slot 1) is dropped.
    index = torch.tensor([[1, 0], [2, 1], [0, 1]])
    assert dropped_assignments(index, 3, 2).tolist() == [[False, False], [False, False], [False, True]]


def test_router_zeroes_dropped_weights_and_moe_ignores_them():
    torch.manual_seed(3)
    cfg = tiny(n_experts=2, top_k=1, capacity_factor=0.5)  # capacity ceil(0.5 * 8 * 1 / 2) = 2 of 8 tokens
    layer = MoELayer(cfg)
    x = torch.randn(1, 8, 16)
    logits, weights, index = layer.gate(x)
    dropped = layer.gate.last_dropped
    assert dropped.shape == (8, 1) and int(dropped.sum()) >= 4  # at most 2 + 2 assignments kept
    assert torch.all(weights[dropped] == 0) and torch.all(weights[~dropped] > 0)
    out = layer(x)[0]  # [8, d]
    for t in range(8):
        if dropped[t, 0]:
            assert torch.all(out[t] == 0)  # a dropped token gets nothing from the layer (residual only)
        else:
            e = int(index[t, 0])
            torch.testing.assert_close(out[t], layer.experts[e](x[0, t]) * weights[t, 0])


def test_noisy_gating_noises_training_logits_only():
    torch.manual_seed(4)
    router = TopKRouter(tiny(noisy_gating=True))
    torch.nn.init.normal_(router.noise_weight, std=0.5)
    h = torch.randn(6, 16)
    router.train()
    assert not torch.equal(router(h)[0], router(h)[0])
    router.eval()
    torch.testing.assert_close(router(h)[0], h @ router.weight.t())


def test_loss_decreases_on_a_tiny_batch():
    torch.manual_seed(5)
    model = DemoMoE(tiny(aux_loss_coef=0.01, z_loss_coef=1e-3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (4, 16))
    first = None
    for _ in range(40):
        _, loss, _ = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < 0.5 * first


def test_recorder_finds_the_routers_by_class_and_adapter_reports_drops():
    from collectors.routers import find_routers

    model = DemoMoE(tiny(n_layer=3, n_experts=4, top_k=2, capacity_factor=0.5))
    sites = find_routers(model)
    assert [s.name for s in sites] == [f"blocks.{i}.moe.gate" for i in range(3)]
    assert all(s.n_experts == 4 and s.top_k == 2 and s.capacity_factor == 0.5 for s in sites)
    adapter = router_adapter(4, 2)
    sites = find_routers(model, adapter=adapter)
    router = sites[0].module
    h = torch.randn(12, 16)
    out = sites[0].extract(router, (h,), router(h))
    assert torch.equal(out.dropped, router.last_dropped) and bool(out.dropped.any())
