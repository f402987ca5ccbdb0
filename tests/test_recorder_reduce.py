"""Recorder(reduce_ranks=True): four gloo ranks (spawned CPU processes) record the same batches twice, once with
each rank's own step aggregates and once summed over the ranks at each flush (one all_reduce). Every analysis
that reads the aggregates gives the same answer from both runs, live and after compaction (step buckets read the
roll-ups then), and the sums equal a brute force over the routing the model itself logged. Ranks that step
differently (a renumbered step, a rank that stops early) neither deadlock nor lose data: the flushes whose steps
differ are written per rank, and the answers still equal a per-rank recording of the same batches."""

from __future__ import annotations

import shutil
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from test_recorder_dist import rank_batch  # noqa: E402

WORLD = 4
STEPS = 5  # flush_every=2: two full flushes and the closing one


def _steps_of(rank: int, kind: str) -> list[int]:
    """The step numbers rank `rank` gives step() in a recording of `kind`."""
    if kind == "mismatched":  # rank 1 numbers its step 1 as 101: same shapes, other steps
        return [s + (100 if rank == 1 and s == 1 else 0) for s in range(STEPS)]
    if kind == "uneven_strict":  # rank 3 stops after 3 steps; the others flush by hand after step 2 and go on
        return list(range(3 if rank == 3 else STEPS))
    if kind == "uneven":  # rank 3 stops after 2 steps, rank 2 takes 2 more: a sum joined by a closing rank
        return list(range({3: 2, 2: STEPS + 2}.get(rank, STEPS)))
    return list(range(STEPS))


def _record(model, rank: int, path: str, kind: str, reduce: bool | None, strict: bool = False) -> None:
    from collectors import Recorder

    if kind == "uneven_strict":  # strict=True raises where the default warns: after the collectives, not inside
        from collectors import RecorderError

        try:
            _record(model, rank, path, "uneven_hand_flush", reduce, strict=True)
        except RecorderError as e:
            Path(f"{path}-rank{rank}.error").write_text(str(e))
        return
    with Recorder(model, path, run_name=Path(path).name, flush_every=2, reduce_ranks=reduce, strict=strict) as rec:
        assert rec.reduce_ranks is bool(reduce)
        if kind == "failing" and rank == 2:  # building its first flush's sums fails (as out of memory would)
            import collectors.recorder as recorder_module

            recorder_module.torch = _CatFailingOnceInReducedFlush()
        if kind == "stepfail" and rank == 1:  # its step 1 cannot be recorded (as out of memory in step() would)
            real = rec._step_record

            def failing(step, *args, **kwargs):
                if step == 1:
                    raise RuntimeError("simulated: step 1's aggregates could not be computed")
                return real(step, *args, **kwargs)

            rec._step_record = failing
        for step in _steps_of(rank, "uneven_strict" if kind == "uneven_hand_flush" else kind):
            ids, mask = rank_batch(rank, step % 100)
            with torch.no_grad():
                model(ids)
            rec.step(step, token_ids=ids, attention_mask=mask,
                     domain=["code" if (rank + step + i) % 2 else "web" for i in range(ids.shape[0])])
            if kind == "uneven_hand_flush" and step == 2 and rank != 3:  # pairs with rank 3's closing flush (step 2)
                rec.flush()


class _CatFailingOnceInReducedFlush:
    """Stands in for `torch` in collectors.recorder: the first torch.cat called from Recorder._reduced_flush raises,
    as running out of device memory while building the buffers to sum would."""

    failed = False

    def __getattr__(self, name):
        return getattr(torch, name)

    def cat(self, *args, **kwargs):
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != "_reduced_flush":
            frame = frame.f_back
        if frame is not None and not _CatFailingOnceInReducedFlush.failed:
            _CatFailingOnceInReducedFlush.failed = True
            raise RuntimeError("simulated: out of memory building the sums")
        return torch.cat(*args, **kwargs)


def _worker(rank: int, root: str, init_file: str) -> None:
    import warnings

    import torch.distributed as dist

    from collectors.testing import tiny_linear_gate_moe

    torch.set_num_threads(1)
    # a deadlock would show as a gloo timeout (an error in the test), never as a hung test
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    warnings.simplefilter("ignore")  # the RecordingWarnings of the mismatched runs are what they test
    try:
        model, _ = tiny_linear_gate_moe()
        for kind in ("same", "mismatched", "uneven"):
            _record(model, rank, f"{root}/{kind}-per_rank", kind, False)
            dist.barrier()
            _record(model, rank, f"{root}/{kind}-reduced", kind, True)
            dist.barrier()
        _record(model, rank, f"{root}/failing-reduced", "failing", True)
        import collectors.recorder as recorder_module

        recorder_module.torch = torch
        dist.barrier()
        _record(model, rank, f"{root}/stepfail-reduced", "stepfail", True)
        dist.barrier()
        _record(model, rank, f"{root}/uneven_strict-reduced", "uneven_strict", True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reduce")
    mp.spawn(_worker, args=(str(root), str(root / "init")), nprocs=WORLD, join=True)
    return root


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    df = df.drop(columns=["run_id"], errors="ignore")
    keys = [c for c in df.columns if df[c].dtype.kind not in "fc"]
    return df.sort_values(keys, kind="stable").reset_index(drop=True) if keys else df


def _assert_same(a: pd.DataFrame, b: pd.DataFrame, what: str) -> None:
    a, b = _sorted(a), _sorted(b)
    assert list(a.columns) == list(b.columns), what
    assert len(a) == len(b) > 0, what
    for c in a.columns:
        if a[c].dtype.kind in "fc":
            np.testing.assert_allclose(a[c].to_numpy(float), b[c].to_numpy(float), rtol=1e-9, equal_nan=True,
                                       err_msg=f"{what}.{c}")
        else:
            assert a[c].astype(str).tolist() == b[c].astype(str).tolist(), f"{what}.{c}"


def _analyses():
    """(name, f(con) -> DataFrame) for every analysis that reads the aggregates, and those that read the routes and
    sequences (kept per rank either way). Not here: router_saturation, which needs the same batch at two steps
    (a probe batch) and reads the routes alone. capacity_drops(group='step') is not among them: see test_capacity_per_rank_group_needs_per_rank_rows."""
    from moeviz.analyses import aux_loss, balancing, capacity, health, load, placement, top_experts
    from moeviz.analyses.specialization import (coactivation, consecutive_agreement, domain_share, layer_flow,
                                                mutual_information, position_share, vocab_specialization)
    from moeviz.selection import Selection

    s = Selection()
    code = Selection(domains=("code",))
    return [
        ("expert_load by step", lambda c: load.expert_load(c, s, by_step=True)),
        ("expert_load total", lambda c: load.expert_load(c, s, by_step=False)),
        ("expert_load bucket 2", lambda c: load.expert_load(c, s, by_step=True, step_bucket=2)),
        ("load_matrix", lambda c: load.load_matrix(c, s)),
        ("imbalance", lambda c: load.imbalance(c, s, by_step=True)),
        ("imbalance bucket 2", lambda c: load.imbalance(c, s, by_step=True, step_bucket=2)),
        ("max_violation", lambda c: load.max_violation(c, s, by_step=True)),
        ("switch_loss", lambda c: aux_loss.switch_loss(c, s, by_step=True)),
        ("switch_loss bucket 2", lambda c: aux_loss.switch_loss(c, s, by_step=True, step_bucket=2)),
        ("pooled_switch_loss", lambda c: aux_loss.pooled_switch_loss(c, s, by_step=True)),
        ("z_loss", lambda c: aux_loss.z_loss(c, s, by_step=True)),
        ("sequence_balance_loss", lambda c: aux_loss.sequence_balance_loss(c, s)),
        ("max_vio_summary", lambda c: balancing.max_vio_summary(c, s)),
        ("top_expert_load", lambda c: top_experts.top_expert_load(c, s, n=2)),
        ("capacity_drops per sequence", lambda c: capacity.capacity_drops(c, s, 1.0, group="sequence")),
        # capacity drops per rank and step are refused on summed steps: test_capacity_per_rank_group_needs_per_rank_rows
        ("health_summary", lambda c: health.health_summary(c, s, capacity_factor=None)),
        ("coactivation", lambda c: coactivation(c, s, source="aggregates")),
        ("consecutive_agreement", lambda c: consecutive_agreement(c, s, source="aggregates")),
        ("layer_flow", lambda c: layer_flow(c, s, 0, 1, source="aggregates")),
        ("gpu_load", lambda c: placement.gpu_load(c, s, 2, by_step=True)),
        ("placement_comparison", lambda c: placement.placement_comparison(c, s, 2)),
        ("dispatch_traffic by rank", lambda c: placement.dispatch_traffic(c, s, 2, source="rank")),
        ("dispatch_traffic by sequence", lambda c: placement.dispatch_traffic(c, s, 2, source="sequence")),
        ("placement_summary", lambda c: placement.placement_summary(c, s, 2, source="rank")),
        # the per-token analyses read each rank's routes and sequences (or, compacted, tables built from them)
        ("domain_share", lambda c: domain_share(c, s)),
        ("position_share", lambda c: position_share(c, s)),
        ("vocab_specialization", lambda c: vocab_specialization(c, s, min_count=1)),
        ("mutual_information", lambda c: mutual_information(c, s)),
        ("expert_load of a domain", lambda c: load.expert_load(c, code, by_step=True)),
    ]


def _compare_every_analysis(per_dir: Path, red_dir: Path) -> None:
    from moeviz.store import open_store

    per, red = open_store(per_dir), open_store(red_dir)
    try:
        for name, f in _analyses():
            _assert_same(f(per), f(red), name)
    finally:
        per.close()
        red.close()


@pytest.mark.slow
def test_reduced_and_per_rank_recordings_give_the_same_answers(runs, tmp_path):
    from moeviz.store import compact, open_store

    per, red = open_store(runs / "same-per_rank"), open_store(runs / "same-reduced")
    try:
        assert sorted(per.execute("SELECT DISTINCT rank FROM step_stats").df()["rank"]) == list(range(WORLD))
        assert red.execute("SELECT DISTINCT rank FROM step_stats").df()["rank"].tolist() == [0]  # written once
        for table in ("sequences", "routes"):  # each rank's own rows, which dispatch_traffic reads per rank
            assert sorted(red.execute(f"SELECT DISTINCT rank FROM {table}").df()["rank"]) == list(range(WORLD))
        assert red.execute("SELECT recording_errors FROM runs").fetchone()[0] == 0
    finally:
        per.close()
        red.close()
    _compare_every_analysis(runs / "same-per_rank", runs / "same-reduced")
    # after compaction the step buckets read the roll-ups (built from one rank's sums, or every rank's rows)
    a, b = tmp_path / "per", tmp_path / "red"
    shutil.copytree(runs / "same-per_rank", a)
    shutil.copytree(runs / "same-reduced", b)
    compact(a)
    compact(b)
    _compare_every_analysis(a, b)


@pytest.mark.slow
def test_reduced_sums_equal_a_brute_force(runs):
    from collectors.testing import tiny_linear_gate_moe
    from moeviz.store import open_store

    con = open_store(runs / "same-reduced")
    try:
        ss = con.execute("SELECT step, layer, expert, tokens, assigned FROM step_stats ORDER BY ALL").df()
    finally:
        con.close()
    torch.set_num_threads(1)  # brute force: each rank's batches through the same model, counts summed
    model, routing_log = tiny_linear_gate_moe()
    for step in range(STEPS):
        total, tokens = {}, 0
        for rank in range(WORLD):
            ids, mask = rank_batch(rank, step)
            routing_log.clear()
            with torch.no_grad():
                model(ids)
            m = mask.reshape(-1).numpy().astype(bool)
            tokens += int(m.sum())
            for layer, (logits, _, _) in enumerate(routing_log):
                top = np.argsort(-logits.numpy(), axis=1, kind="stable")[m, :2]
                total[layer] = total.get(layer, 0) + np.bincount(top.reshape(-1), minlength=4)
        for layer, counts in total.items():
            got = ss[(ss.step == step) & (ss.layer == layer)]
            np.testing.assert_array_equal(got.assigned.to_numpy(), counts)
            assert (got.tokens == tokens).all()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mismatched", "uneven"])
def test_ranks_that_step_differently_are_written_per_rank_and_agree(runs, kind):
    """A flush whose steps differ between ranks is written per rank (no data lost, no mixed sums); a rank that
    closes early ends the sums on every rank (no collective is left waiting: the worker would time out). The
    answers equal a per-rank recording of the same batches."""
    from moeviz.store import open_store

    con = open_store(runs / f"{kind}-reduced")
    try:
        ranks = con.execute("SELECT step, list(DISTINCT rank ORDER BY rank) AS r FROM step_stats GROUP BY step "
                            "ORDER BY step").df()
        errors = con.execute("SELECT recording_errors FROM runs").fetchone()[0]
    finally:
        con.close()
    by_step = dict(zip(ranks.step, ranks.r.map(list)))
    assert errors == 0  # nothing lost
    if kind == "mismatched":  # the flush of steps 0-1 on three ranks, 0 and 101 on rank 1: written per rank
        assert by_step[0] == [0, 1, 2, 3] and by_step[1] == [0, 2, 3] and by_step[101] == [1]
        assert by_step[2] == [0]  # the later flushes matched again: summed, written once
    else:  # rank 3 closed after steps 0-1: the second sum (steps 2-3) was joined by its closing flush
        assert by_step[0] == [0]
        assert by_step[2] == [0, 1, 2] and by_step[4] == [0, 1, 2] and by_step[STEPS + 1] == [2]
    _compare_every_analysis(runs / f"{kind}-per_rank", runs / f"{kind}-reduced")


@pytest.mark.slow
def test_capacity_per_rank_group_needs_per_rank_rows(runs):
    """capacity_drops(group='step') groups the tokens one rank routed in a step. A reduced run holds one summed row
    per step (`layer_stats.ranks_summed` = 4), whose drops would be those of the whole group's step, not of any
    rank: the analysis refuses those steps, naming them, and health says the check was not run; the per-rank run
    answers, checked against a brute force. group='sequence' reads each rank's routes and answers on both."""
    from moeviz.analyses.capacity import capacity_drops, drop_curve
    from moeviz.analyses.health import health_summary
    from moeviz.analyses.unknowns import UnknownQuantityError, summed_ranks
    from moeviz.selection import Selection
    from moeviz.store import open_store

    per, red = open_store(runs / "same-per_rank"), open_store(runs / "same-reduced")
    try:
        a = capacity_drops(per, Selection(), 1.0, group="step", by=("layer",))
        with pytest.raises(UnknownQuantityError, match=r"summed the step aggregates of 4 ranks .*group='sequence'"):
            capacity_drops(red, Selection(), 1.0, group="step", by=("layer",))
        with pytest.raises(UnknownQuantityError, match=r"summed the step aggregates of 4 ranks"):
            drop_curve(red, Selection(), group="step")  # the Capacity page's curve
        # units finer than the expert read each rank's routes at group='step': those still answer, as per rank
        by_pos = [capacity_drops(c, Selection(), 1.0, group="step", by=("pos",)) for c in (per, red)]
        found = summed_ranks(red, Selection(ranks=(1,)))  # the rank filter does not hide the summed steps
        assert found is not None and found["ranks"] == 4 and found["steps"] == STEPS
        assert summed_ranks(per, Selection()) is None
        checks = health_summary(red, Selection(), capacity_factor=1.0)
        cap = checks[checks.check == "capacity_drops"]
        assert len(cap) and cap.message.str.startswith("not checked").all()
        seq_a = capacity_drops(per, Selection(), 1.0, group="sequence", by=("layer",))
        seq_b = capacity_drops(red, Selection(), 1.0, group="sequence", by=("layer",))
        steps = per.execute("SELECT step, rank, layer, expert, tokens, assigned FROM step_stats").df()
    finally:
        per.close()
        red.close()
    pd.testing.assert_frame_equal(seq_a.drop(columns='run_id'), seq_b.drop(columns='run_id'))
    pd.testing.assert_frame_equal(by_pos[0].drop(columns='run_id'), by_pos[1].drop(columns='run_id'))
    # brute force per rank and step: C = ceil(CF * tokens * k / E), drops max(0, n - C) per group and expert
    cap = np.ceil(steps.tokens * 2 / 4)
    expected = np.maximum(steps.assigned - cap, 0).groupby(steps.layer).sum().to_numpy()
    np.testing.assert_array_equal(a.dropped.to_numpy(), expected)


def test_auto_reduces_past_one_node(monkeypatch):
    """reduce_ranks=None sums over ranks only when torch.distributed runs more than 8 ranks and the Recorder
    records for all of them (`reduce_by_default`); never without torch.distributed."""
    from collectors import recorder

    assert recorder.reduce_by_default(1) is False  # no process group here
    for dist_world, world, expected in [(9, 9, True), (64, 64, True), (8, 8, False), (2, 2, False), (9, 4, False)]:
        monkeypatch.setattr(recorder, "_distributed_rank_and_size", lambda w=dist_world: (0, w))
        assert recorder.reduce_by_default(world) is expected, (dist_world, world)


def test_reduce_ranks_needs_a_process_group():
    from collectors import Recorder, RecorderError
    from collectors.testing import tiny_linear_gate_moe

    model, _ = tiny_linear_gate_moe()
    with pytest.raises(RecorderError, match="needs torch.distributed initialised"):
        Recorder(model, "unused", rank=0, world_size=2, reduce_ranks=True)
    with pytest.raises(RecorderError, match="True, False or None"):
        Recorder(model, "unused", reduce_ranks="yes")
    assert Recorder(model, "unused", rank=0, world_size=2).reduce_ranks is False  # auto, no process group
    assert Recorder(model, "unused", reduce_ranks=True).reduce_ranks is False  # one rank: nothing to sum


def _cells(run_dir: Path, where: str = "", sql: str | None = None) -> pd.DataFrame:
    """Per step, layer and expert of a recorded run: the assignments summed over ranks (n) and the ranks that
    wrote rows (r), for the step_stats rows `where` selects (or the result of `sql`)."""
    from moeviz.store import open_store

    con = open_store(run_dir)
    try:
        return con.execute(sql or f"SELECT step, layer, expert, sum(assigned) AS n, list(DISTINCT rank ORDER BY rank) "
                                  f"AS r FROM step_stats {where} GROUP BY ALL ORDER BY step, layer, expert").df()
    finally:
        con.close()


@pytest.mark.slow
def test_a_rank_failing_before_the_sums_costs_its_own_steps_only(runs):
    """Rank 2's first flush fails while building the buffers to sum: it still joins the head, with its failure flag,
    so every rank writes that flush per rank (nobody waits for it) and rank 2 loses steps 0-1 alone (a recording
    error in its status); the next flushes are summed again: steps 2-4 equal the complete per-rank run."""
    got = _cells(runs / "failing-reduced")
    want = _cells(runs / "same-per_rank", "WHERE step >= 2 OR rank <> 2")
    rank_file = runs / "failing-reduced" / "_status" / "rank=2.json"
    assert "simulated: out of memory" in rank_file.read_text()
    assert got[got.step < 2].r.map(list).map(tuple).unique().tolist() == [(0, 1, 3)]
    assert got[got.step >= 2].r.map(list).map(tuple).unique().tolist() == [(0,)]  # summed again, written once
    np.testing.assert_array_equal(got.n.to_numpy(), want.n.to_numpy())
    assert got[["step", "layer", "expert"]].values.tolist() == want[["step", "layer", "expert"]].values.tolist()


@pytest.mark.slow
def test_sidebar_says_which_steps_hold_summed_ranks(runs):
    """The rank filter of a reduced run would show the group's sums as rank 0's: the sidebar says which steps hold
    summed aggregates, and says nothing on the per-rank run."""
    from tests.test_app import open_app

    red = open_app(runs / "same-reduced", run="same-reduced", page="capacity")
    notes = [c.value for c in red.caption if "summed at recording" in c.value]
    assert notes == [f"Steps 0-{STEPS - 1} ({STEPS} steps) hold the step aggregates of {WORLD} ranks summed at "
                     "recording (reduce_ranks): their counts appear under rank 0 (each group's first) and no rank's "
                     "own counts are known there; the rank filter selects their routes only."]
    per = open_app(runs / "same-per_rank", run="same-per_rank", page="capacity")
    assert not [c.value for c in per.caption if "summed at recording" in c.value]


@pytest.mark.slow
def test_a_step_that_cannot_be_recorded_keeps_the_flushes_in_step(runs):
    """Rank 1's step 1 raises inside step() (its aggregates could not be computed): the step is lost on rank 1
    alone, and rank 1 still flushes after its second step() call, as the others do (flushes follow calls, not
    recorded steps), so no collective is left waiting (the worker would time out): the flush of steps 0-1 is
    written per rank (its signature differs), the later ones are summed; every count equals the per-rank run's
    without rank 1's step 1."""
    got = _cells(runs / "stepfail-reduced")
    want = _cells(runs / "same-per_rank", "WHERE NOT (step = 1 AND rank = 1)")
    errors = _cells(runs / "stepfail-reduced", sql="SELECT recording_errors FROM runs").iloc[0, 0]
    assert "step 1 was not recorded" in (runs / "stepfail-reduced" / "_status" / "rank=1.json").read_text()
    assert errors is not None
    assert got[got.step == 0].r.map(tuple).unique().tolist() == [(0, 1, 2, 3)]
    assert got[got.step == 1].r.map(tuple).unique().tolist() == [(0, 2, 3)]
    assert got[got.step >= 2].r.map(tuple).unique().tolist() == [(0,)]
    np.testing.assert_array_equal(got.n.to_numpy(), want.n.to_numpy())


@pytest.mark.slow
def test_strict_ranks_stepping_on_after_a_close_raise_without_leaving_it_waiting(runs):
    """strict=True: rank 3 closes after step 2 while the others flush step 2 by hand and step on: the same steps,
    so the sum is made, joined by rank 3's closing flush. The others raise RecorderError ("stepped on after a rank
    ... closed") only after that sum, so rank 3 closes normally (before, they raised between the head and the
    data's sum, and rank 3 waited in it until gloo's timeout failed the worker)."""
    errors = {r: (runs / f"uneven_strict-reduced-rank{r}.error") for r in range(WORLD)}
    assert not errors[3].exists()
    for r in (0, 1, 2):
        assert "stepped on after a rank of the reduce group closed" in errors[r].read_text()
