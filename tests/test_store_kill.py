"""kill -9 of a real writer process: everything it flushed stays readable, the run reads 'interrupted', and
`compact` folds it afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from moeviz.store import compact, open_store, store_info

ROOT = str(Path(__file__).resolve().parents[1])
ROWS = 4 * 256 * 2  # routes per flush: layers * tokens * k

WRITER = """
import sys, numpy as np
from moeviz.store import RunWriter
w = RunWriter(sys.argv[1], compact_on_close=True)
w.write_run({"model_class": "Tiny", "n_layers": 4, "n_experts": 8, "top_k": 2})
rng = np.random.default_rng(0)
step = 0
while True:  # until killed
    n = 4 * 256 * 2
    w.write_flush({"routes": {"step": step, "seq": 0, "pos": np.tile(np.repeat(np.arange(256), 2), 4),
                              "token_id": rng.integers(0, 32000, n), "layer": np.repeat(np.arange(4), 512),
                              "slot": np.tile([0, 1], 1024), "expert": rng.integers(0, 8, n), "weight": rng.random(n)},
                   "layer_stats": {"step": np.full(4, step), "layer": np.arange(4), "tokens": 256,
                                   "z_loss_sum": 1.0, "entropy_sum": 2.0, "dropped": 0}})
    print(step, flush=True)
    step += 1
"""


def test_kill_9_keeps_every_flush_and_reads_interrupted_then_compacts(tmp_path):
    run_dir = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        printed = [proc.stdout.readline() for _ in range(5)]
        assert [int(x) for x in printed] == [0, 1, 2, 3, 4]
        os.kill(proc.pid, signal.SIGKILL)  # mid-flush, most likely: no close, no final status
    finally:
        proc.wait(timeout=30)  # reaped: no zombie that would look alive
    assert proc.returncode == -signal.SIGKILL

    segments = sorted(run_dir.glob("routes/rank=0/part-*.parquet"))
    assert len(segments) >= 5
    on_disk = sum(pq.read_metadata(p).num_rows for p in segments)  # every renamed segment is whole
    con = open_store(run_dir)
    n, steps, status, ended = con.execute(
        "SELECT (SELECT count(*) FROM routes), (SELECT count(DISTINCT step) FROM routes), "
        "(SELECT status FROM runs), (SELECT ended_at FROM runs)").fetchone()
    assert on_disk == ROWS * len(segments)
    # what the commits name: every flush before the kill; a segment renamed into place but not yet committed when
    # the kill came is left out (with a StoreWarning naming it), never read half
    assert n == ROWS * steps and steps in (len(segments), len(segments) - 1) and steps >= 5  # 5 printed
    assert (status, ended) == ("interrupted", None)
    assert con.execute("SELECT count(*) FROM layer_stats").fetchone()[0] >= 4 * 5
    con.close()

    result = compact(run_dir)["runs"][0]
    assert result["rows"]["routes"] == n
    assert not list(run_dir.glob("routes/rank=0/part-*.parquet"))
    con = open_store(run_dir)
    assert con.execute("SELECT (SELECT count(*) FROM routes), (SELECT status FROM runs)").fetchone() == (n, "interrupted")
    info = store_info(run_dir)["runs"][0]
    assert info["status"] == "interrupted" and info["routes"] == n and info["compacted"]
