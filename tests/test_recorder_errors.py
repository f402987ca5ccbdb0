"""Recording never stops training (#13): NaN/inf router outputs, a writer that fails (a full disk), a step whose
aggregates cannot be computed, a step number given twice.

References, independent of the Recorder's device code: the router logits the model itself returns
(`output_router_logits=True`) with a numpy softmax / top-k / logsumexp brute force (as tests/test_recorder.py),
tokens poisoned by construction (we know which ones we set to NaN or inf), and the steps a patched writer was
made to refuse. Every test records a real tiny transformers model (collectors.testing.tiny_model).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from scipy.special import entr

from collectors import Recorder, RecordingWarning
from collectors.recorder import RecorderError
from collectors.routers import find_routers
from collectors.testing import GuardedRecorder, tiny_model
from moeviz.analyses.health import health_summary
from moeviz.cli import main as cli_main
from moeviz.errors import MoevizError
from moeviz.store import open_store, query

K, E = 2, 4  # tiny Mixtral: 4 experts, top-2, 2 MoE layers
BATCH, SEQ, LENGTHS = 3, 8, [8, 6, 3]


@pytest.fixture(scope="module")
def mixtral():
    model, _ = tiny_model("mixtral")
    return model


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (BATCH, SEQ), generator=gen)
    mask = torch.zeros(BATCH, SEQ, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    return ids * mask, mask


def model_logits(model, ids, mask) -> list[np.ndarray]:
    """A forward that the Recorder sees; returns the model's own router logits per layer, float64 [B*S, E]."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    return [t.double().numpy() for t in out.router_logits]


def brute_force(logits: np.ndarray, keep: np.ndarray) -> dict:
    """Aggregates of the tokens `keep` [N] from router logits [N, E] (softmax top-k, Mixtral's rule)."""
    x = logits[keep]
    finite = np.where(np.isneginf(x), -1e300, x)
    p = np.exp(finite - finite.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.argsort(-p, axis=1, kind="stable")[:, :K]  # [n, K]
    lse = np.log(np.exp(x).sum(1))
    return dict(tokens=int(keep.sum()), assigned=np.bincount(top.reshape(-1), minlength=E),
                first_choice=np.bincount(top[:, 0], minlength=E), prob_sum=p.sum(0),
                z_loss_sum=float((lse ** 2).sum()), entropy_sum=float(entr(p).sum()), top=top,
                weights=np.take_along_axis(p, top, 1) / np.take_along_axis(p, top, 1).sum(1, keepdims=True))


def check_step(run_dir, step: int, per_layer: list[np.ndarray], keep_per_layer: list[np.ndarray]) -> None:
    """The step's layer_stats, step_stats and routes equal the brute force over the kept tokens, layer by layer."""
    # summed over rows: a repeated step has one row per step() call
    ls = query(run_dir, f"SELECT layer, sum(tokens) AS tokens, sum(z_loss_sum) AS z_loss_sum, sum(entropy_sum) "
                        f"AS entropy_sum FROM layer_stats WHERE step = {step} GROUP BY layer ORDER BY layer")
    ss = query(run_dir, f"SELECT layer, expert, sum(assigned) AS assigned, sum(first_choice) AS first_choice, "
                        f"sum(prob_sum) AS prob_sum FROM step_stats WHERE step = {step} GROUP BY layer, expert "
                        "ORDER BY layer, expert")
    routes = query(run_dir, f"SELECT * FROM routes WHERE step = {step} ORDER BY layer, seq, pos, slot")
    assert len(ls) == len(per_layer)
    for layer, (logits, keep) in enumerate(zip(per_layer, keep_per_layer)):
        ref = brute_force(logits, keep)
        row = ls.iloc[layer]
        assert row.tokens == ref["tokens"]
        assert row.z_loss_sum == pytest.approx(ref["z_loss_sum"], rel=1e-5)
        assert row.entropy_sum == pytest.approx(ref["entropy_sum"], rel=1e-5)
        got = ss[ss.layer == layer]
        np.testing.assert_array_equal(got.assigned.to_numpy(), ref["assigned"])
        np.testing.assert_array_equal(got.first_choice.to_numpy(), ref["first_choice"])
        np.testing.assert_allclose(got.prob_sum.to_numpy(), ref["prob_sum"], rtol=1e-5)
        r = routes[routes.layer == layer]
        flat = np.flatnonzero(keep)  # the kept tokens, in (seq, pos) order (seq continues in a repeated step)
        assert len(r) == len(flat) * K
        np.testing.assert_array_equal(r.seq.to_numpy()[::K] * SEQ + r.pos.to_numpy()[::K], flat)
        np.testing.assert_array_equal(r.expert.to_numpy().reshape(-1, K), ref["top"])
        np.testing.assert_allclose(r.weight.to_numpy().reshape(-1, K), ref["weights"], atol=2e-5)


def recording_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RecordingWarning)]


# ---------------------------------------------------------------------------------------------- non-finite values


def test_nan_in_a_router_is_counted_and_every_other_token_is_recorded_exactly(mixtral, tmp_path):
    """One token's router input turns NaN at step 2 (layer 0); NaN then spreads through attention to later tokens
    of that sequence in layer 1. Training goes on; every step is recorded; the NaN tokens are counted per layer
    and step as the model's own logits show them, and left out of everything else."""
    router0 = find_routers(mixtral)[0].module
    poison = {"on": False}
    token = 1 * SEQ + 2  # sequence 1, position 2: inside the mask

    def nan_input(module, args):
        if poison["on"]:
            h = args[0].clone()
            h.view(-1, h.shape[-1])[token] = float("nan")
            return (h,) + tuple(args[1:])

    handle = router0.register_forward_pre_hook(nan_input)
    refs = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Recorder(mixtral, tmp_path / "run", flush_every=2) as rec:
                for step in range(5):
                    poison["on"] = step == 2
                    ids, mask = batch(step)
                    refs[step] = (model_logits(mixtral, ids, mask), mask.reshape(-1).numpy().astype(bool))
                    rec.step(step)
    finally:
        handle.remove()
    run = tmp_path / "run"
    logits2, mask2 = refs[2]
    assert np.isnan(logits2[0][token]).all() and not np.isnan(np.delete(logits2[0], token, 0)).any()
    assert (~np.isfinite(logits2[1]).all(1) & mask2).sum() > 1  # spread to later tokens of the sequence

    ls = query(run, "SELECT step, layer, nonfinite_tokens FROM layer_stats ORDER BY step, layer")
    assert sorted(set(ls.step)) == [0, 1, 2, 3, 4]
    for r in ls.itertuples():
        logits, mask = refs[r.step][0][r.layer], refs[r.step][1]
        assert r.nonfinite_tokens == int((mask & ~np.isfinite(logits).all(1)).sum()), (r.step, r.layer)
    assert ls.nonfinite_tokens[ls.step != 2].eq(0).all() and (ls.nonfinite_tokens[ls.step == 2] > 0).all()
    for step, (per_layer, mask) in refs.items():
        check_step(run, step, per_layer, [mask & np.isfinite(lg).all(1) for lg in per_layer])
    assert np.isfinite(query(run, "SELECT z_loss_sum, entropy_sum FROM layer_stats").to_numpy()).all()

    msgs = recording_warnings(caught)
    assert len(msgs) == 1 and "NaN or infinite" in msgs[0] and "step 2" in msgs[0], msgs
    info = query(run, "SELECT status, recording_errors FROM runs").iloc[0]
    assert info.status == "finished" and info.recording_errors == 0  # counted, not lost: not degraded

    found = health_summary(open_store(run), capacity_factor=None)
    bad = found[(found.check == "nonfinite_router") & (found.severity == "error")].sort_values("layer")
    assert bad.layer.tolist() == [0, 1] and all("step 2" in m for m in bad.message)
    assert bad.value.iloc[0] == pytest.approx(1 / mask2.sum())  # layer 0: the one poisoned token of step 2


def test_cli_check_flags_nonfinite_router_outputs(mixtral, tmp_path, capsys):
    from moeviz.cli import main

    router1 = find_routers(mixtral)[1].module
    poison = {"on": False}

    def inf_logit(module, args, out):
        if poison["on"]:
            logits = out[0].clone()
            logits[0, 1] = float("inf")
            return (logits,) + tuple(out[1:])

    handle = router1.register_forward_hook(inf_logit)  # before the Recorder's hooks: they see what it returns
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RecordingWarning)
            with Recorder(mixtral, tmp_path / "run") as rec:
                for step in range(2):
                    poison["on"] = step == 1
                    mixtral(input_ids=torch.tensor([[5, 6, 7]]))
                    rec.step(step)
    finally:
        handle.remove()
    assert main(["check", str(tmp_path / "run"), "--capacity-factor", "0"]) == 1
    out = capsys.readouterr().out
    assert "nonfinite_router" in out and "step 1" in out


def test_inf_logits_and_a_nan_gate_weight_after_the_router(mixtral, tmp_path):
    """The issue's case: one NaN gate weight made the writer raise and abort training. Here layer 0 gets a +inf
    logit (token a) and a -inf one (token b: one expert masked, still a finite softmax), a padded token gets NaN
    logits; layer 1 gets a NaN gate weight (token c). Only a (layer 0) and c (layer 1) are non-finite; each is
    missing from that layer's routes only, and every other token is recorded exactly."""
    sites = find_routers(mixtral)
    ids, mask = batch(7)
    m = mask.reshape(-1).numpy().astype(bool)
    a, b, c, pad = 0 * SEQ + 1, 1 * SEQ + 4, 2 * SEQ + 0, 2 * SEQ + 5
    assert m[a] and m[b] and m[c] and not m[pad]

    def poison0(module, args, out):
        logits = out[0].clone()
        logits[a, 2] = float("inf")
        logits[b, int(logits[b].argmin())] = -float("inf")  # the least likely expert: the top-k is unchanged
        logits[pad] = float("nan")
        return (logits,) + tuple(out[1:])

    def poison1(module, args, out):
        weights = out[1].clone()
        weights[c, 0] = float("nan")
        return (out[0], weights) + tuple(out[2:])

    captured = {}
    handles = [sites[0].module.register_forward_hook(poison0), sites[1].module.register_forward_hook(poison1)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Recorder(mixtral, tmp_path / "run") as rec:
                for s in sites:  # after the Recorder's hooks: what it saw
                    handles.append(s.module.register_forward_hook(
                        lambda mod, i, o, s=s: captured.__setitem__(s.layer, o[0].detach().double().numpy())))
                with torch.no_grad():
                    mixtral(input_ids=ids, attention_mask=mask)
                rec.step(0)
                with torch.no_grad():
                    mixtral(input_ids=ids, attention_mask=mask)
                rec.step(1)
    finally:
        for h in handles:
            h.remove()
    run = tmp_path / "run"
    ls = query(run, "SELECT step, layer, nonfinite_tokens FROM layer_stats ORDER BY step, layer")
    assert ls.nonfinite_tokens.tolist() == [1, 1, 1, 1]
    keep0, keep1 = m.copy(), m.copy()
    keep0[a] = False
    keep1[c] = False
    check_step(run, 1, [captured[0], captured[1]], [keep0, keep1])
    assert len(recording_warnings(caught)) == 1
    assert query(run, "SELECT status, recording_errors FROM runs").values.tolist() == [["finished", 0]]


def test_layer_aggregates_count_each_kind_of_nonfinite_token():
    """By hand: NaN logit, +inf logit, every expert -inf, NaN and inf weights are non-finite; one expert at -inf
    is not; a padded NaN token counts nowhere. The sums are those of the finite tokens alone."""
    from collectors.aggregates import LAYER_SCALARS, finite_tokens, layer_aggregates

    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([
        [0.5, 1.0, 0.0, 2.0],  # finite
        [nan, 1.0, 0.0, 2.0],  # NaN logit
        [inf, 1.0, 0.0, 2.0],  # +inf logit
        [-inf, -inf, -inf, -inf],  # no expert possible
        [0.1, -inf, 0.3, 0.2],  # one expert masked: finite
        [1.0, 0.0, 0.0, 0.0],  # NaN weight
        [0.0, 0.0, 3.0, 0.0],  # inf weight
        [nan, nan, nan, nan],  # padding
    ])
    index = torch.tensor([[3, 1], [1, 3], [0, 3], [0, 1], [2, 3], [0, 1], [2, 0], [0, 1]])
    weights = torch.full((8, 2), 0.5)
    weights[5, 1], weights[6, 0] = nan, inf
    mask = torch.tensor([True] * 7 + [False])
    finite = finite_tokens(logits, weights)
    assert finite.tolist() == [True, False, False, False, True, False, False, False]
    got = layer_aggregates(logits, index, None, mask, finite=finite).numpy()
    n = len(LAYER_SCALARS)
    assert got[LAYER_SCALARS.index("nonfinite_tokens")] == 5 and got[0] == 2
    assigned, first, prob, _ = got[n:].reshape(4, E)
    np.testing.assert_array_equal(assigned, [0, 1, 1, 2])  # tokens 0 and 4 only
    np.testing.assert_array_equal(first, [0, 0, 1, 1])
    ref = brute_force(logits.double().numpy(), np.array([True, False, False, False, True, False, False, False]))
    np.testing.assert_allclose(prob, ref["prob_sum"], rtol=1e-6)
    assert got[1] == pytest.approx(ref["z_loss_sum"], rel=1e-6) and got[2] == pytest.approx(ref["entropy_sum"], rel=1e-6)
    # without weights, the logits alone decide (tokens 5 and 6 are then finite)
    assert layer_aggregates(logits, index, None, mask).numpy()[LAYER_SCALARS.index("nonfinite_tokens")] == 3


# ---------------------------------------------------------------------------------------------- write failures


def run_steps(model, rec, steps, refs=None):
    for step in steps:
        ids, mask = batch(100 + step)
        logits = model_logits(model, ids, mask)
        if refs is not None:
            refs[step] = (logits, mask.reshape(-1).numpy().astype(bool))
        rec.step(step)


def test_a_full_disk_once_costs_one_flush_and_training_goes_on(mixtral, tmp_path, monkeypatch):
    from moeviz import store

    real = store.RunWriter.write_flush
    calls = {"n": 0}

    def full_once(self, tables):
        calls["n"] += 1
        if calls["n"] == 3:  # the flush of step 2
            raise OSError(28, "No space left on device")
        return real(self, tables)

    monkeypatch.setattr(store.RunWriter, "write_flush", full_once)
    refs = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(mixtral, tmp_path / "run", flush_every=1) as rec:
            run_steps(mixtral, rec, range(6), refs)
    run = tmp_path / "run"
    msgs = recording_warnings(caught)
    assert len(msgs) == 1 and "step 2" in msgs[0] and "No space left on device" in msgs[0], msgs
    assert len(rec.recording_errors) == 1 and "step 2" in rec.recording_errors[0]
    info = query(run, "SELECT status, error, recording_errors, recording_error FROM runs").iloc[0]
    assert info.status == "finished" and info.error is None
    assert info.recording_errors == 1 and "step 2" in info.recording_error and "No space" in info.recording_error
    status = json.loads((run / "_status" / "rank=0.json").read_text())
    assert status["recording_errors"] == 1 and status["status"] == "finished"
    assert query(run, "SELECT DISTINCT step FROM step_stats ORDER BY step").step.tolist() == [0, 1, 3, 4, 5]
    for step in (0, 1, 3, 4, 5):  # before and after the lost flush: exact
        per_layer, mask = refs[step]
        check_step(run, step, per_layer, [mask] * len(per_layer))
    found = health_summary(open_store(run), capacity_factor=None)
    assert (found[found.check == "recording_errors"].severity == "warn").all()
    assert "step 2" in found[found.check == "recording_errors"].message.iloc[0]


def test_a_disk_full_for_a_while_warns_once_and_the_run_row_catches_up_at_close(mixtral, tmp_path, monkeypatch):
    """Steps 2 and 3 cannot be written, nor the runs row that would say so; once space is back the later steps
    are written and close() writes the runs row with both errors."""
    from moeviz.store import layout

    real = layout.write_segment
    full = {"on": False}

    def write_segment(run_dir, table, rank, seq, data):
        """The disk fills up at the first segment of step 2 and has room again at the first one of step 4 (the
        writer thread runs jobs in order, so this needs no timing)."""
        steps = set(data.column("step").to_pylist()) if "step" in data.column_names else set()
        if steps & {2, 4}:
            full["on"] = 2 in steps
        if full["on"]:
            raise OSError(28, "No space left on device")
        return real(run_dir, table, rank, seq, data)

    monkeypatch.setattr(layout, "write_segment", write_segment)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(mixtral, tmp_path / "run", flush_every=1) as rec:
            run_steps(mixtral, rec, range(6))
    run = tmp_path / "run"
    assert len(recording_warnings(caught)) == 1
    assert query(run, "SELECT DISTINCT step FROM step_stats ORDER BY step").step.tolist() == [0, 1, 4, 5]
    info = query(run, "SELECT status, recording_errors, recording_error FROM runs").iloc[0]
    assert info.status == "finished" and info.recording_errors == 2 and "step 2" in info.recording_error
    assert len(rec.recording_errors) == 2


@pytest.mark.filterwarnings("ignore:moeviz. while closing after an error")  # strict: step 1's NaN raises again at close
def test_strict_raises_where_the_default_warns(mixtral, tmp_path):
    router0 = find_routers(mixtral)[0].module

    def inf_logit(module, args, out):
        logits = out[0].clone()
        logits[0, 0] = float("inf")
        return (logits,) + tuple(out[1:])

    handle = router0.register_forward_hook(inf_logit)
    try:
        with pytest.raises(RecorderError, match="NaN or infinite"):
            with Recorder(mixtral, tmp_path / "a", flush_every=1, strict=True) as rec:
                for step in range(3):
                    mixtral(input_ids=torch.tensor([[1, 2, 3]]))
                    rec.step(step)
    finally:
        handle.remove()
    with pytest.raises(RecorderError, match="twice"):
        with Recorder(mixtral, tmp_path / "b", strict=True) as rec:
            mixtral(input_ids=torch.tensor([[1, 2, 3]]))
            rec.step(3)
            mixtral(input_ids=torch.tensor([[1, 2, 3]]))
            rec.step(3)


def test_a_step_whose_aggregates_fail_is_lost_alone(mixtral, tmp_path, monkeypatch):
    """A failure on the training thread (the device runs out of memory computing a step's aggregates)."""
    import collectors.recorder as recorder_module

    real = recorder_module.layer_aggregates
    calls = {"n": 0}

    def oom_once(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # step 1, layer 0
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*a, **kw)

    monkeypatch.setattr(recorder_module, "layer_aggregates", oom_once)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(mixtral, tmp_path / "run", flush_every=2) as rec:
            run_steps(mixtral, rec, range(4))
    msgs = recording_warnings(caught)
    assert len(msgs) == 1 and "step 1 was not recorded" in msgs[0] and "out of memory" in msgs[0]
    assert query(tmp_path / "run", "SELECT DISTINCT step FROM layer_stats ORDER BY step").step.tolist() == [0, 2, 3]
    assert query(tmp_path / "run", "SELECT recording_errors FROM runs").recording_errors[0] == 1
    with pytest.raises(torch.OutOfMemoryError):  # strict: the error propagates
        calls["n"] = 0
        with Recorder(mixtral, tmp_path / "strict", flush_every=2, strict=True) as rec:
            run_steps(mixtral, rec, range(4))


# ---------------------------------------------------------------------------------------------- repeated steps


def test_a_repeated_step_warns_once_and_adds_to_the_step(mixtral, tmp_path):
    """step(3) twice (and step(1) twice): one warning; the store holds step 3 as one step whose counts add both
    calls, with the second call's sequences numbered after the first's, so joins on (step, seq) stay exact."""
    calls = {3: [batch(31), batch(32)], 1: [batch(11), batch(12)]}
    refs: dict[int, list] = {1: [], 3: []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(mixtral, tmp_path / "run", flush_every=3) as rec:
            for step in (3, 3, 1, 1):
                ids, mask = calls[step][len(refs[step])]
                refs[step].append((model_logits(mixtral, ids, mask), mask.reshape(-1).numpy().astype(bool)))
                rec.step(step, domain="x" if len(refs[step]) == 1 else "y")
    msgs = recording_warnings(caught)
    assert len(msgs) == 1 and "step 3 was given to step() twice" in msgs[0], msgs
    run = tmp_path / "run"
    for step in (1, 3):
        (l1, m1), (l2, m2) = refs[step]
        per_layer = [np.concatenate([a, b]) for a, b in zip(l1, l2)]
        check_step(run, step, per_layer, [np.concatenate([m1, m2])] * 2)  # routes: seq 0-2, then 3-5
    seqs = query(run, "SELECT step, seq, domain, n_tokens FROM sequences WHERE step = 3 ORDER BY seq")
    assert seqs.seq.tolist() == [0, 1, 2, 3, 4, 5] and seqs.domain.tolist() == ["x"] * 3 + ["y"] * 3
    assert seqs.n_tokens.tolist() == LENGTHS * 2
    joined = query(run, "SELECT count(*) AS n FROM routes r JOIN sequences s USING (run_id, step, rank, seq)").n[0]
    assert joined == query(run, "SELECT count(*) AS n FROM routes").n[0]


# ---------------------------------------------------------------------------------------------- no host sync


def test_nonfinite_counts_do_not_sync_and_run_on_the_meta_device(tmp_path):
    """Hooks and step(), non-finite counts included, under the SyncGuard on the meta device (no data at all: any
    read of a value raises). The flush at close cannot copy meta tensors: that is a recording failure like any
    other, warned once, and the run is closed finished and degraded."""
    with torch.device("meta"):
        model, _ = tiny_model("mixtral", experts_implementation="batched_mm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GuardedRecorder(model, tmp_path / "run", max_tokens_per_step=5, flush_every=100) as rec:
            ids = torch.zeros(2, 6, dtype=torch.long, device="meta")
            for step in range(2):
                with torch.no_grad():
                    model(input_ids=ids)
                rec.step(step)
    assert rec.guard.checked_calls > 0 and rec.steps_recorded == 2
    msgs = recording_warnings(caught)
    assert len(msgs) == 1 and "steps 0-1" in msgs[0], msgs
    assert query(tmp_path / "run", "SELECT status, recording_errors FROM runs").values.tolist() == [["finished", 1]]


def test_an_unwritable_run_folder_is_a_clear_error_at_start(mixtral, tmp_path, monkeypatch):
    """Before training starts the caller can fix it: a RecorderError that says what to do, not a raw OSError
    (a read-only filesystem, simulated: these tests may run as root, which writes into read-only folders)."""
    from moeviz.store import layout

    def read_only(*a, **kw):
        raise OSError(30, "Read-only file system")

    def n_hooks():  # transformers installs its own output-capturing hooks: count, do not expect none
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mixtral.modules())

    before = n_hooks()
    monkeypatch.setattr(layout, "write_json_atomic", read_only)
    with pytest.raises(RecorderError, match="Read-only file system.*writable"):
        Recorder(mixtral, tmp_path / "run").start()
    assert n_hooks() == before


def test_a_flush_that_fails_half_way_is_wholly_absent(mixtral, tmp_path, monkeypatch):
    """The disk fills up after step 2's flush wrote two of its tables: no commit names them, so step 2 is absent
    from every table (not torn), before and after compaction; steps 0, 1, 3 are whole."""
    import moeviz.store.writer as writer_module
    from moeviz.store import compact, layout

    real = layout.write_segment
    written = {"step2": 0}

    def write_segment(run_dir, table, rank, seq, data):
        if "step" in data.column_names and 2 in set(data.column("step").to_pylist()):
            written["step2"] += 1
            if written["step2"] == 3:  # two tables of the flush are on disk already
                raise OSError(28, "No space left on device")
        return real(run_dir, table, rank, seq, data)

    monkeypatch.setattr(layout, "write_segment", write_segment)
    monkeypatch.setattr(writer_module, "compact", lambda run_dir: None)  # read the segments first, compact below
    tables = ("step_stats", "layer_stats", "routes", "sequences", "pair_stats", "flow_stats")

    def steps_per_table():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reader names the failed flush's uncommitted files
            return {t: query(tmp_path / "run", f"SELECT DISTINCT step FROM {t} ORDER BY step").step.tolist()
                    for t in tables}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(mixtral, tmp_path / "run", flush_every=1) as rec:
            run_steps(mixtral, rec, range(4))
    assert written["step2"] == 3 and len(recording_warnings(caught)) == 1
    assert steps_per_table() == {t: [0, 1, 3] for t in tables}
    monkeypatch.undo()
    compact(tmp_path / "run")
    assert steps_per_table() == {t: [0, 1, 3] for t in tables}
    assert query(tmp_path / "run", "SELECT recording_errors FROM runs").recording_errors[0] == 1


def test_a_run_past_the_close_limit_is_left_for_moeviz_compact_and_says_so(mixtral, tmp_path, monkeypatch, capsys):
    """compact_on_close="auto" (the default) compacts at close only while the segments hold at most
    MOEVIZ_COMPACT_AT_CLOSE_MAX bytes: past it the last rank warns with the command instead of holding training
    for the compaction (32 min for a 100,000-step run of 58 x 256 experts). Nothing is lost either way."""
    from moeviz.store import StoreWarning, compact

    refs = {}
    monkeypatch.setenv("MOEVIZ_COMPACT_AT_CLOSE_MAX", "1KB")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(mixtral, tmp_path / "big", flush_every=1) as rec:
            run_steps(mixtral, rec, range(3), refs)
    said = [str(w.message) for w in caught if issubclass(w.category, StoreWarning)]
    assert len(said) == 1 and "not compacted at close" in said[0] and "moeviz compact" in said[0], said
    assert str(tmp_path / "big") in said[0] and "MOEVIZ_COMPACT_AT_CLOSE_MAX" in said[0]
    assert not (tmp_path / "big" / "run.duckdb").exists()
    with pytest.warns(StoreWarning, match=r"finished but [0-9.]+ KiB of its segments are not compacted.*compact"):
        open_store(tmp_path / "big").close()  # the dashboard's sidebar shows this
    capsys.readouterr()
    uncompacted_exit = cli_main(["check", str(tmp_path / "big")])
    said = capsys.readouterr()  # a note, not a finding: nothing is wrong with the data
    assert "note: moeviz: run 'big' is finished but" in said.err and "not compacted" not in said.out
    for _ in range(2):  # read from the segments, then after `moeviz compact`: the same exact numbers
        for step, (per_layer, mask) in refs.items():
            check_step(tmp_path / "big", step, per_layer, [mask] * len(per_layer))
        compact(tmp_path / "big")
    assert (tmp_path / "big" / "run.duckdb").exists()
    assert cli_main(["check", str(tmp_path / "big")]) == uncompacted_exit
    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreWarning)
        open_store(tmp_path / "big").close()  # compacted: nothing to say

    monkeypatch.delenv("MOEVIZ_COMPACT_AT_CLOSE_MAX")  # default 1 GiB; True compacts whatever the size
    for name, kwargs in (("small", {}), ("forced", {"compact_on_close": True})):
        if kwargs:
            monkeypatch.setenv("MOEVIZ_COMPACT_AT_CLOSE_MAX", "1")
        with Recorder(mixtral, tmp_path / name, flush_every=1, **kwargs) as rec:
            run_steps(mixtral, rec, range(2))
        assert (tmp_path / name / "run.duckdb").exists(), name
    with Recorder(mixtral, tmp_path / "never", flush_every=1, compact_on_close=False) as rec:
        run_steps(mixtral, rec, range(2))
    assert not (tmp_path / "never" / "run.duckdb").exists()

    with pytest.raises(RecorderError, match="compact_on_close must be True, False or 'auto'"):
        Recorder(mixtral, tmp_path / "x", compact_on_close="yes")
    monkeypatch.setenv("MOEVIZ_COMPACT_AT_CLOSE_MAX", "lots")
    with pytest.raises(MoevizError, match="MOEVIZ_COMPACT_AT_CLOSE_MAX='lots' is not a size"):
        with Recorder(mixtral, tmp_path / "y") as rec:
            run_steps(mixtral, rec, range(1))
