"""Never a silent wrong number: a router's first recorded output is checked (collectors.routers.
check_router_output), and a reading that is off raises at the end of the first forward, naming the router and
what to pass, before anything is stored.

Each wrong adapter below is a correct one (the family's own router output, read as collectors.routers does)
with one deliberate mistake; the correct reading of every supported family must pass the same check.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from collectors.recorder import Recorder  # noqa: E402
from collectors.routers import (  # noqa: E402
    RouterAdapter,
    RouterOutput,
    RouterOutputError,
    check_router_output,
    find_routers,
)
from collectors.testing import FAMILIES, ENCODER_DECODER_FAMILIES, tiny_model  # noqa: E402
from moeviz.store import query  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_every_supported_familys_reading_passes_the_check(family):
    model, config = tiny_model(family)
    sites = find_routers(model)
    outs = {}
    handles = [s.module.register_forward_hook(lambda m, i, o, s=s: outs.__setitem__(s.layer, s.extract(m, i, o)))
               for s in sites]
    ids = torch.randint(2, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            if family in ENCODER_DECODER_FAMILIES:
                model(input_ids=ids, decoder_input_ids=ids[:, :5])
            else:
                model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    for s in sites:
        check_router_output(s, outs[s.layer])  # raises if the built-in reading looked wrong


class _Wrong(RouterAdapter):
    """Mixtral's router output `(logits, top_k_weights, top_k_index)` read right, then spoiled by `mistake`."""

    n_experts, top_k = 4, 2

    def __init__(self, mistake):
        self.mistake = mistake

    def __call__(self, module, inputs, output):
        logits, weights, index = output
        return self.mistake(RouterOutput(logits=logits, index=index, weights=weights))


MISTAKES = {
    "probabilities as logits": (
        lambda o: RouterOutput(o.logits.softmax(-1), o.index, o.weights), "look like probabilities"
    ),
    "sigmoid scores as logits": (
        lambda o: RouterOutput(o.logits.sigmoid(), o.index, o.weights), "look like sigmoid scores"
    ),
    "scaled weights, no weight_scale": (lambda o: RouterOutput(o.logits, o.index, o.weights * 2.5), "weight_scale"),
    "index out of range": (lambda o: RouterOutput(o.logits, o.index + 3, o.weights), "n_experts=4"),
    "same expert twice": (lambda o: RouterOutput(o.logits, o.index[:, :1].expand(-1, 2), o.weights), "same expert"),
    "negative weights": (lambda o: RouterOutput(o.logits, o.index, -o.weights), "negative"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_wrong_reading_raises_at_the_first_forward_and_nothing_is_stored(tmp_path, mistake):
    spoil, says = MISTAKES[mistake]
    model, config = tiny_model("mixtral")
    ids = torch.randint(2, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))  # 64 logits
    with pytest.raises(RouterOutputError, match=says) as err:
        with Recorder(model, tmp_path / "run", adapter=_Wrong(spoil), flush_every=1) as rec:
            with torch.no_grad():
                model(input_ids=ids)  # raises here, at the end of the first forward
            pytest.fail("the first forward should have raised")
    text = str(err.value)
    assert "model.layers.0.mlp.gate" in text and "adapter=" in text  # names the router and what to pass
    assert query(tmp_path / "run", "SELECT count(*) AS n FROM layer_stats").n[0] == 0
    assert query(tmp_path / "run", "SELECT status FROM runs").status[0] == "failed"
    assert rec.steps_recorded == 0


def test_declared_weight_scale_makes_scaled_weights_pass(tmp_path):
    class Scaled(_Wrong):
        weight_scale = 2.5

    model, config = tiny_model("mixtral")
    ids = torch.randint(2, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with Recorder(model, tmp_path / "run", adapter=Scaled(MISTAKES["scaled weights, no weight_scale"][0])) as rec:
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
        rec.step(0)
    weights = query(tmp_path / "run", "SELECT weight FROM routes ORDER BY pos, layer, slot").weight.to_numpy()
    probs = out.router_logits[0].softmax(-1).topk(2).values  # Mixtral renormalises its top-2: the stored weight
    probs = probs / probs.sum(-1, keepdim=True)
    layer0 = torch.tensor(weights[: 5 * 2 * 2]).reshape(5, 2, 2)[:, 0]  # [pos, slot] of layer 0
    torch.testing.assert_close(layer0, probs.double(), atol=2e-5, rtol=0)


def test_the_check_runs_once_per_router(tmp_path, monkeypatch):
    import collectors.routers as routers

    calls = []
    real = routers.check_router_output
    monkeypatch.setattr(routers, "check_router_output", lambda site, out: calls.append(site.layer) or real(site, out))
    model, config = tiny_model("mixtral")
    ids = torch.randint(2, config.vocab_size, (1, 5))
    with Recorder(model, tmp_path / "run") as rec:
        for step in range(3):
            with torch.no_grad():
                model(input_ids=ids)
                model(input_ids=ids)
            rec.step(step)
    assert sorted(calls) == [0, 1]


@pytest.mark.parametrize(
    "spoil, says",
    [
        (lambda o: RouterOutput(o.logits, o.index.float(), o.weights), "index has dtype torch.float32"),
        (lambda o: RouterOutput(o.logits, o.index, (o.weights * 100).long()), "weights have dtype torch.int64"),
    ],
    ids=["float index", "integer weights"],
)
def test_wrong_dtypes_raise_at_extraction(spoil, says):
    model, _ = tiny_model("mixtral")
    site = find_routers(model, adapter=_Wrong(spoil))[0]
    with pytest.raises(RouterOutputError, match=says):
        site.module.register_forward_hook(lambda m, i, o: site.extract(m, i, o))
        with torch.no_grad():
            model(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_zero_initialised_router_logits_pass(tmp_path):
    """A router whose weight is still zero (transformers initialises some routers so) gives all-zero logits:
    logits all the same, not probabilities; recording from step 0 of a training run must not fail."""
    model, config = tiny_model("qwen3_moe")
    for s in find_routers(model):
        torch.nn.init.zeros_(s.module.weight)
    ids = torch.randint(2, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with Recorder(model, tmp_path / "run") as rec:
        with torch.no_grad():
            model(input_ids=ids)
        rec.step(0)
    assert query(tmp_path / "run", "SELECT count(*) AS n FROM routes").n[0] == 2 * 8 * config.num_hidden_layers * 2
