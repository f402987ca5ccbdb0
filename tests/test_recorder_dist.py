"""Two ranks (torch.distributed, gloo, CPU, spawned processes) record one run: the store merges both ranks,
and each rank's aggregates equal a brute force over the routing the model itself logged for that rank's batches.

The model is the hand-written transformers-4.x-layout Mixtral of collectors.testing (pure torch: the spawned
processes do not pay for importing transformers); the attention masks go to step() explicitly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3
SEQ = 6


def rank_batch(rank: int, step: int):
    """The batch rank `rank` sees at `step`: different lengths on each rank, so their counts differ."""
    gen = torch.Generator().manual_seed(100 * rank + step)
    lengths = [SEQ, 1 + (rank + step) % SEQ, 2 + rank]
    ids = torch.randint(2, 64, (len(lengths), SEQ), generator=gen)
    mask = torch.stack([(torch.arange(SEQ) < n).long() for n in lengths])
    return ids * mask, mask


def _worker(rank: int, run_dir: str, init_file: str) -> None:
    import torch.distributed as dist

    from collectors import Recorder
    from collectors.testing import tiny_linear_gate_moe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, _ = tiny_linear_gate_moe()
        with Recorder(model, run_dir, run_name="ddp", flush_every=2) as rec:  # rank, world size from dist
            assert (rec.rank, rec.world_size) == (rank, WORLD)
            for step in range(STEPS):
                ids, mask = rank_batch(rank, step)
                with torch.no_grad():
                    model(ids)
                rec.step(step, attention_mask=mask)
                dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_record_one_run(tmp_path):
    from collectors.testing import tiny_linear_gate_moe
    from moeviz.store import open_store

    run_dir = tmp_path / "run"
    mp.spawn(_worker, args=(str(run_dir), str(tmp_path / "init")), nprocs=WORLD, join=True)

    con = open_store(run_dir)
    try:
        runs = con.execute("SELECT run_name, world_size, status FROM runs").df()
        ss = con.execute("SELECT * FROM step_stats ORDER BY rank, step, layer, expert").df()
        seqs = con.execute("SELECT rank, step, sum(n_tokens) AS n FROM sequences GROUP BY ALL ORDER BY ALL").df()
    finally:
        con.close()
    assert runs.values.tolist() == [["ddp", 2, "finished"]]
    assert sorted(ss["rank"].unique()) == [0, 1]

    torch.set_num_threads(1)
    model, routing_log = tiny_linear_gate_moe()  # same seed: the ranks' model
    for rank in range(WORLD):
        for step in range(STEPS):
            ids, mask = rank_batch(rank, step)
            routing_log.clear()
            with torch.no_grad():
                model(ids)
            m = mask.reshape(-1).numpy().astype(bool)
            for layer, (logits, _, _) in enumerate(routing_log):
                top = np.argsort(-logits.numpy(), axis=1, kind="stable")[m, :2]  # softmax keeps the order
                got = ss[(ss["rank"] == rank) & (ss.step == step) & (ss.layer == layer)]
                assert (got.tokens == m.sum()).all()
                np.testing.assert_array_equal(got.assigned.to_numpy(), np.bincount(top.reshape(-1), minlength=4))
                np.testing.assert_array_equal(got.first_choice.to_numpy(), np.bincount(top[:, 0], minlength=4))
            assert seqs[(seqs["rank"] == rank) & (seqs.step == step)].n.tolist() == [int(m.sum())]
