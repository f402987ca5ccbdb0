"""Recorder(reduce_ranks=True): two gloo ranks (spawned CPU processes) record the same batches twice, once with
each rank's own step aggregates and once summed over the ranks at each flush (one all_reduce). Every analysis
over the aggregates gives the same answer from both runs, and both equal a brute force over the routing the
model itself logged (the reduced run holds one rank's rows, the sums)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from test_recorder_dist import STEPS, WORLD, rank_batch  # noqa: E402


def _worker(rank: int, root: str, init_file: str) -> None:
    import torch.distributed as dist

    from collectors import Recorder
    from collectors.testing import tiny_linear_gate_moe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, _ = tiny_linear_gate_moe()
        for name, reduce in (("per_rank", False), ("reduced", True)):
            with Recorder(model, f"{root}/{name}", run_name=name, flush_every=2, reduce_ranks=reduce) as rec:
                for step in range(STEPS):
                    ids, mask = rank_batch(rank, step)
                    with torch.no_grad():
                        model(ids)
                    rec.step(step, token_ids=ids, attention_mask=mask)
            dist.barrier()
        # rank 1 numbers its step 1 as 101: the same shapes, other steps; the sums must not be written
        with Recorder(model, f"{root}/mismatched", run_name="mismatched", flush_every=2, reduce_ranks=True) as rec:
            for step in range(STEPS):
                ids, mask = rank_batch(rank, step)
                with torch.no_grad():
                    model(ids)
                rec.step(step + (100 if rank == 1 and step == 1 else 0), token_ids=ids, attention_mask=mask)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reduce")
    mp.spawn(_worker, args=(str(root), str(root / "init")), nprocs=WORLD, join=True)
    return root


@pytest.mark.slow
def test_reduced_and_per_rank_recordings_give_the_same_answers(runs):
    from collectors.testing import tiny_linear_gate_moe
    from moeviz.analyses.aux_loss import pooled_switch_loss, switch_loss, z_loss
    from moeviz.analyses.load import expert_load, imbalance
    from moeviz.analyses.specialization.coactivation import coactivation
    from moeviz.selection import Selection
    from moeviz.store import open_store

    per, red = open_store(runs / "per_rank"), open_store(runs / "reduced")
    try:
        assert sorted(per.execute("SELECT DISTINCT rank FROM step_stats").df()["rank"]) == [0, 1]
        assert red.execute("SELECT DISTINCT rank FROM step_stats").df()["rank"].tolist() == [0]  # written once
        assert sorted(red.execute("SELECT DISTINCT rank FROM sequences").df()["rank"]) == [0, 1]  # own rows
        sel = Selection()
        for fn, kw in [(expert_load, dict(by_step=True)), (expert_load, dict(by_step=False)),
                       (imbalance, dict(by_step=True)), (switch_loss, dict(by_step=True)),
                       (pooled_switch_loss, dict(by_step=True)), (z_loss, dict(by_step=True)),
                       (expert_load, dict(by_step=True, step_bucket=2))]:
            a, b = fn(per, sel, **kw).drop(columns=["run_id"]), fn(red, sel, **kw).drop(columns=["run_id"])
            assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0, fn.__name__
            for c in a.columns:
                if a[c].dtype.kind in "fc":
                    np.testing.assert_allclose(a[c].to_numpy(float), b[c].to_numpy(float), rtol=1e-9,
                                               err_msg=f"{fn.__name__}.{c}")
                else:
                    assert a[c].tolist() == b[c].tolist(), f"{fn.__name__}.{c}"
        ca = coactivation(per, Selection(), source="aggregates").drop(columns=["run_id"], errors="ignore")
        cb = coactivation(red, Selection(), source="aggregates").drop(columns=["run_id"], errors="ignore")
        assert len(ca) == len(cb) > 0
        np.testing.assert_allclose(ca.select_dtypes("number").to_numpy(float),
                                   cb.select_dtypes("number").to_numpy(float), equal_nan=True)
        ss = red.execute("SELECT step, layer, expert, tokens, assigned FROM step_stats ORDER BY ALL").df()
    finally:
        per.close()
        red.close()

    torch.set_num_threads(1)  # brute force: each rank's batches through the same model, counts summed
    model, routing_log = tiny_linear_gate_moe()
    for step in range(STEPS):
        total = {}
        tokens = 0
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
def test_ranks_that_flushed_different_steps_are_not_summed(runs):
    """The first rank checks that every rank summed the same steps, layers and shapes: the flush holding rank 1's
    renumbered step is a recording error (said in the run), not sums of two different steps."""
    from moeviz.store import open_store

    con = open_store(runs / "mismatched")
    try:
        errors, error = con.execute("SELECT recording_errors, recording_error FROM runs").fetchone()
        steps = sorted(con.execute("SELECT DISTINCT step FROM step_stats").df()["step"])
    finally:
        con.close()
    assert errors >= 1 and "reduce group flushed different steps" in error
    assert 0 not in steps and 1 not in steps and 101 not in steps  # the flush of steps 0-1 was left out whole
    assert steps == list(range(2, STEPS))  # the later flushes matched and were written
