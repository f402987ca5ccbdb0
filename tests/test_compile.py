"""The Recorder under torch.compile (backend aot_eager, and inductor marked slow, on a tiny Mixtral): hooks
attached before or after compiling record exactly what the model routed, and the recorder adds no graph break
and no graph.

Reference: the router module's own return value `(router_logits, top_k_weights, top_k_index)` in an eager run of
the same model on the same inputs, captured by a raw forward hook that does not use collectors.routers. Graphs
are counted by Dynamo's own CompileCounterWithBackend and graph breaks by torch._dynamo.utils.counters; the
compiled model without a Recorder is the baseline (1 graph).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch._dynamo  # noqa: E402, F811 (the submodule, for torch._dynamo.reset)
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from collectors.recorder import Recorder, _Sink  # noqa: E402
from collectors.testing import tiny_model  # noqa: E402
from moeviz.store import query  # noqa: E402

BATCH, SEQ, STEPS, FORWARDS = 2, 6, 2, 3  # 3 forwards per step: a list append in a hook would recompile each


def _inputs(vocab: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [[torch.randint(2, vocab, (BATCH, SEQ), generator=gen) for _ in range(FORWARDS)] for _ in range(STEPS)]


def _eager_reference(model, batches) -> list[dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Per forward: {router position in module order: (top_k_index [B*S, k], top_k_weights [B*S, k])}, as the
    router returned them in eager mode."""
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    out: list[dict] = []
    seen: dict[int, tuple] = {}
    handles = [
        r.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (o[2].numpy(), o[1].float().numpy())))
        for n, r in enumerate(routers)
    ]
    try:
        for step in batches:
            for ids in step:
                with torch.no_grad():
                    model(ids)
                out.append(dict(seen))
    finally:
        for h in handles:
            h.remove()
    return out


def _assert_routes_equal_reference(path, reference, k: int) -> None:
    routes = query(
        path, "SELECT step, seq, pos, layer, slot, expert, weight FROM routes ORDER BY step, seq, pos, layer, slot"
    )
    n_layers = len(reference[0])
    assert len(routes) == STEPS * FORWARDS * BATCH * SEQ * n_layers * k
    for step in range(STEPS):
        for f in range(FORWARDS):
            ref = reference[step * FORWARDS + f]
            for layer in range(n_layers):
                idx, w = ref[layer]  # [B*S, k]
                got = routes[(routes.step == step) & (routes.layer == layer) & (routes.seq // BATCH == f)]
                got = got.sort_values(["seq", "pos", "slot"])
                np.testing.assert_array_equal(got.expert.to_numpy().reshape(-1, k), idx)
                np.testing.assert_allclose(got.weight.to_numpy().reshape(-1, k), w, atol=2e-5)


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _record(rec, compiled, batches) -> None:
    for step, forwards in enumerate(batches):
        for ids in forwards:
            with torch.no_grad():
                compiled(ids)
        rec.step(step)


@pytest.mark.parametrize(
    "backend",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],  # inductor: ~60 s on 2 cores (C++ builds)
)
def test_hooks_attached_before_compile_record_exactly_in_one_graph(tmp_path, fresh_dynamo, backend):
    model, config = tiny_model("mixtral")
    batches = _inputs(config.vocab_size)
    reference = _eager_reference(model, batches)

    baseline = CompileCounterWithBackend(backend)
    with torch.no_grad():
        torch.compile(model, backend=baseline)(batches[0][0])
    assert baseline.frame_count == 1  # the model alone compiles to one graph
    torch._dynamo.reset()
    counters.clear()

    cnt = CompileCounterWithBackend(backend)
    with Recorder(model, tmp_path / "run") as rec:
        compiled = torch.compile(model, backend=cnt)
        _record(rec, compiled, batches)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert cnt.frame_count == baseline.frame_count == 1  # no graph break, no recompile across forwards/steps
    _assert_routes_equal_reference(tmp_path / "run", reference, config.num_experts_per_tok)


def test_hooks_attached_after_compile_and_warm_up_record_exactly(tmp_path, fresh_dynamo):
    model, config = tiny_model("mixtral")
    batches = _inputs(config.vocab_size)
    reference = _eager_reference(model, batches)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt)
    with torch.no_grad():
        warm = compiled(batches[0][0]).logits  # compiled without hooks
    assert cnt.frame_count == 1

    with Recorder(compiled, tmp_path / "run") as rec:  # the compiled module itself, as users pass it
        _record(rec, compiled, batches)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert cnt.frame_count == 2  # one recompile, to trace the hooks; none per forward or step
    _assert_routes_equal_reference(tmp_path / "run", reference, config.num_experts_per_tok)
    names = query(tmp_path / "run", "SELECT module_name FROM layers ORDER BY layer").module_name.tolist()
    assert names == [f"model.layers.{i}.mlp.gate" for i in range(config.num_hidden_layers)]  # as if uncompiled

    # after close the hooks are gone from the compiled code too: nothing is left in the recorder's sinks
    with torch.no_grad():
        again = compiled(batches[0][0]).logits
    torch.testing.assert_close(again, warm)
    assert all(sink.out == () for sink in rec._sinks)
    assert query(tmp_path / "run", "SELECT status FROM runs").status[0] == "finished"


def test_sink_replaces_its_tuple():
    """The hook's buffer is a tuple replaced by a longer one (what Dynamo can replay without length guards)."""
    sink = _Sink()
    before = sink.out
    sink.out = sink.out + ((1,),)
    assert before == () and sink.out == ((1,),)


def test_a_run_whose_hooks_never_fired_warns_at_close_with_the_cause(tmp_path):
    model, config = tiny_model("mixtral")
    ids = torch.randint(2, config.vocab_size, (1, 4))
    with pytest.warns(UserWarning, match="never called"):
        with Recorder(model, tmp_path / "a") as rec:
            with rec.paused(), torch.no_grad():
                model(ids)
            rec.step(0)
    with pytest.warns(UserWarning, match=r"ran 1 forward\(s\) but none went through its routers' hooks"):
        with Recorder(model, tmp_path / "b") as rec:
            for h in rec._handles[2:]:  # what a compiled graph built without the hooks does: skip them
                h.remove()
            with torch.no_grad():
                model(ids)
            rec.step(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Recorder(model, tmp_path / "c") as rec:
            with torch.no_grad():
                model(ids)
            rec.step(0)


@pytest.mark.slow  # ~24 s on 2 shared cores: AOT-compiling the backward
def test_training_under_compile_records_each_forward_once_and_backward_works(tmp_path, fresh_dynamo):
    """model.train(), forward + backward through the compiled graph (aot_eager compiles the backward too): the
    routes are the eager router's, counted once per forward (the backward calls no hook), gradients reach the
    router, and the Recorder adds no graph and no graph break."""
    model, config = tiny_model("mixtral")
    model.train()
    batches = _inputs(config.vocab_size)
    reference = _eager_reference(model, batches)  # no dropout in the tiny config: train routing = eval routing
    cnt = CompileCounterWithBackend("aot_eager")
    router = next(m for m in model.modules() if type(m).__name__.endswith("TopKRouter"))
    with Recorder(model, tmp_path / "run") as rec:
        compiled = torch.compile(model, backend=cnt)
        for step, forwards in enumerate(batches):
            for ids in forwards:
                model.zero_grad()
                compiled(input_ids=ids, labels=ids).loss.backward()
                assert router.weight.grad is not None and bool(router.weight.grad.abs().sum() > 0)
            rec.step(step)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert cnt.frame_count == 1
    _assert_routes_equal_reference(tmp_path / "run", reference, config.num_experts_per_tok)


def test_margin_in_the_routers_score_space_adds_no_graph_break(tmp_path, fresh_dynamo):
    """DeepSeek-V3's routes.margin is taken in the hook (sigmoid + bias, which may change before step()): traced into
    the graph with the rest of the hook. Same graphs and breaks as the model alone; the same routes, weights,
    drops and margins as an eager recording."""
    model, config = tiny_model("deepseek_v3")
    batches = _inputs(config.vocab_size)
    sql = "SELECT step, seq, pos, layer, slot, expert, weight, dropped, margin FROM routes ORDER BY ALL"
    with Recorder(model, tmp_path / "eager") as rec:
        _record(rec, model, batches)
    eager = query(tmp_path / "eager", sql)

    baseline = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        torch.compile(model, backend=baseline)(batches[0][0])
    breaks = sum(counters["graph_break"].values())
    torch._dynamo.reset()
    counters.clear()

    cnt = CompileCounterWithBackend("aot_eager")
    with Recorder(model, tmp_path / "compiled") as rec:
        _record(rec, torch.compile(model, backend=cnt), batches)
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
    assert cnt.frame_count == baseline.frame_count
    compiled = query(tmp_path / "compiled", sql)
    assert eager.margin.notna().all() and (eager.margin < 0).any()  # biased sigmoid space, group limits
    np.testing.assert_array_equal(compiled[["step", "seq", "pos", "layer", "slot", "expert"]].to_numpy(),
                                  eager[["step", "seq", "pos", "layer", "slot", "expert"]].to_numpy())
    np.testing.assert_allclose(compiled.weight, eager.weight, atol=2e-5)
    np.testing.assert_allclose(compiled.margin, eager.margin, atol=2e-5)
    assert not compiled.dropped.any()
