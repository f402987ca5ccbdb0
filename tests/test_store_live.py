"""Real processes: one writes flushes while another reads the store live; two ranks write one run at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moeviz.store import open_store

ROOT = str(Path(__file__).resolve().parents[1])

# Deterministic flushes, run both by the writer processes and by the test to know what was written.
GEN = """
import numpy as np
TOKENS, LAYERS, K = 64, 4, 2

def flush(step, rank):
    rng = np.random.default_rng(1000 * rank + step)
    n = TOKENS * LAYERS * K
    return {"routes": {"step": step, "rank": rank, "seq": np.repeat(np.arange(TOKENS) // 32, K).tolist() * LAYERS,
                       "pos": np.repeat(np.arange(TOKENS) % 32, K).tolist() * LAYERS,
                       "token_id": np.repeat(rng.integers(0, 32000, TOKENS), K).tolist() * LAYERS,
                       "layer": np.repeat(np.arange(LAYERS), TOKENS * K), "slot": np.tile(np.arange(K), TOKENS * LAYERS),
                       "expert": rng.integers(0, 8, n), "weight": rng.random(n)},
            "layer_stats": {"step": np.full(LAYERS, step), "layer": np.arange(LAYERS), "tokens": np.full(LAYERS, TOKENS),
                            "z_loss_sum": rng.random(LAYERS), "entropy_sum": rng.random(LAYERS), "dropped": 0}}
"""

WRITER = GEN + """
import sys, time
from moeviz.store import RunWriter
run_dir, rank, world, flushes, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
w = RunWriter(run_dir, run_id="live", rank=rank, world_size=world)
w.write_run({"model_class": "Tiny", "n_layers": LAYERS, "n_experts": 8, "top_k": K})
print("started", flush=True)
for step in range(flushes):
    w.write_flush(flush(step, rank))
    print("flushed", step, flush=True)
    time.sleep(pause)
w.close()
print("closed", flush=True)
"""

READER = """
import json, sys, time
from moeviz.store import open_store
run_dir, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        con = open_store(run_dir)
        n, status = con.execute("SELECT (SELECT count(*) FROM routes), (SELECT status FROM runs)").fetchone()
        con.close()
    except Exception as e:  # a compaction deleted a segment this snapshot listed: open again
        print(json.dumps({"error": str(e).splitlines()[0]}), flush=True)
        continue
    print(json.dumps({"n": n, "status": status}), flush=True)
    if status == "finished":
        break
    time.sleep(0.05)
"""


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _expected():
    ns: dict = {}
    exec(GEN, ns)
    return ns["flush"], ns["TOKENS"] * ns["LAYERS"] * ns["K"]


def test_a_second_process_sees_the_run_grow_while_it_is_written(tmp_path):
    run_dir = tmp_path / "live"
    flushes = 8
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir), "0", "1", str(flushes), "0.8"],
                              stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert writer.stdout.readline().strip() == "started"
        reader = subprocess.run([sys.executable, "-c", READER, str(run_dir), "50"], capture_output=True, text=True,
                                env=_env(), timeout=90)
        assert reader.returncode == 0, reader.stderr
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0
    _, per_flush = _expected()
    seen = [json.loads(line) for line in reader.stdout.splitlines()]
    counts = [s["n"] for s in seen if "n" in s]
    errors = [s["error"] for s in seen if "error" in s]
    assert len(errors) <= 2, errors  # only around the final compaction
    assert all(c % per_flush == 0 for c in counts)  # whole flushes only, never a partial segment
    assert counts == sorted(counts) and counts[-1] == flushes * per_flush  # grows, never double counts
    assert len(set(counts)) >= 3, counts  # it really saw the run grow
    statuses = [s["status"] for s in seen if "status" in s]
    assert statuses[0] == "running" and statuses[-1] == "finished"


def test_two_writer_processes_as_two_ranks_merge_into_one_run(tmp_path):
    run_dir = tmp_path / "live"
    flushes = 3
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir), str(r), "2", str(flushes), "0.1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for r in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        assert out.splitlines()[-1] == "closed"
    flush, per_flush = _expected()
    con = open_store(run_dir)
    assert con.execute("SELECT run_id, world_size, status, model_class FROM runs").fetchall() == [("live", 2, "finished", "Tiny")]
    assert (run_dir / "run.duckdb").exists() and not list(run_dir.glob("routes/rank=*/*.parquet"))
    for rank in (0, 1):
        exp = [flush(s, rank)["routes"] for s in range(flushes)]
        got = con.execute("SELECT count(*), sum(token_id), sum(expert), sum(round(weight * 65535)), count(DISTINCT step) "
                          "FROM routes WHERE rank = ?", [rank]).fetchone()
        assert got[0] == flushes * per_flush
        assert got[1] == sum(int(np.sum(e["token_id"])) for e in exp)
        assert got[2] == sum(int(np.sum(e["expert"])) for e in exp)
        assert got[3] == sum(int(np.rint(e["weight"] * 65535).sum()) for e in exp)
        assert got[4] == flushes
        z = con.execute("SELECT sum(z_loss_sum) FROM layer_stats WHERE rank = ?", [rank]).fetchone()[0]
        assert z == sum(float(np.sum(flush(s, rank)["layer_stats"]["z_loss_sum"])) for s in range(flushes))
    statuses = sorted(p.name for p in (run_dir / "_status").iterdir())
    assert statuses == ["rank=0.json", "rank=1.json"]
    t0 = time.perf_counter()
    open_store(run_dir).close()
    assert time.perf_counter() - t0 < 5  # opening is cheap enough to re-open on every refresh
