"""A training process killed with SIGKILL while recording: everything it flushed stays readable, and the run
reads as 'interrupted' (not 'running' forever). The parent watches the store live while the child writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TRAIN = textwrap.dedent(
    """
    import itertools, sys, time
    import torch
    from collectors import Recorder
    from collectors.testing import tiny_linear_gate_moe

    torch.set_num_threads(1)
    model, _ = tiny_linear_gate_moe()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    with Recorder(model, sys.argv[1], run_name="doomed", flush_every=1) as rec:
        for step in itertools.count():
            ids = torch.randint(0, 64, (2, 5), generator=gen)
            loss = model(ids).logsumexp(-1).mean()
            loss.backward(); opt.step(); opt.zero_grad()
            rec.step(step)
            time.sleep(0.02)
    """
)


def flushed_steps(run_dir: Path) -> tuple[list[int], str | None]:
    from moeviz.store import open_store

    try:
        con = open_store(run_dir)
    except Exception:  # the run folder may not exist yet
        return [], None
    try:
        steps = con.execute("SELECT DISTINCT step FROM layer_stats ORDER BY step").df().step.tolist()
        status = con.execute("SELECT status FROM runs").df().status.tolist()
        return steps, status[0] if status else None
    except Exception:  # tables appear with the first segment
        return [], None
    finally:
        con.close()


@pytest.mark.slow
def test_sigkill_leaves_flushed_data_readable_and_run_interrupted(tmp_path):
    run_dir = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(script), str(run_dir)], env=env, stderr=subprocess.PIPE)
    seen_running = False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert child.poll() is None, f"training process died on its own: {child.stderr.read().decode()}"
            steps, status = flushed_steps(run_dir)
            seen_running |= status == "running"
            if len(steps) >= 5:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the child flushed fewer than 5 steps in 120 s")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert seen_running  # the live reader saw the run as running

    steps, status = flushed_steps(run_dir)
    assert status == "interrupted"
    assert len(steps) >= 5 and steps == list(range(len(steps)))  # no gap: every flushed step is whole

    from moeviz.store import open_store

    con = open_store(run_dir)
    try:
        per_step = con.execute("SELECT step, layer, sum(assigned) AS a, min(tokens) AS t FROM step_stats GROUP BY ALL").df()
        n_routes = con.execute("SELECT step, count(*) AS n FROM routes GROUP BY step").df()
    finally:
        con.close()
    assert (per_step.t == 10).all() and (per_step.a == 20).all()  # 2 x 5 tokens, top-2, in every flushed step
    assert (n_routes.n == 10 * 2 * 2).all()


NEVER_CLOSED = textwrap.dedent(
    """
    import sys
    import torch
    from collectors import Recorder
    from collectors.testing import tiny_linear_gate_moe

    model, _ = tiny_linear_gate_moe()
    rec = Recorder(model, sys.argv[1], flush_every=100).start()  # never closed; nothing flushed before exit
    for step in range(3):
        with torch.no_grad():
            model(torch.randint(0, 64, (2, 5)))
        rec.step(step)
    if sys.argv[2] == "raises":
        raise ValueError("diverged at step 3")
    """
)


@pytest.mark.parametrize("ending", ["raises", "returns"])
def test_a_script_that_never_closes_the_recorder_loses_nothing(tmp_path, ending):
    """start() without close(): at exit the buffered steps are written and the run is failed with the unhandled
    exception, or finished when the script simply ended (not 'interrupted' with its last steps lost)."""
    from moeviz.store import open_store

    script = tmp_path / "script.py"
    script.write_text(NEVER_CLOSED)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), ending], env=env,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode != 0) == (ending == "raises"), proc.stderr[-2000:]
    con = open_store(tmp_path / "run")
    status, error = con.execute("SELECT status, error FROM runs").fetchone()
    if ending == "raises":
        assert status == "failed" and "ValueError: diverged at step 3" in error
    else:
        assert (status, error) == ("finished", None)
    assert con.execute("SELECT count(DISTINCT step) FROM layer_stats").fetchone()[0] == 3
