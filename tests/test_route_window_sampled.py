"""A run that keeps per-token detail at some steps only (routes sampled every N steps, as bench/bench_dsv3.py and a
Recorder with sample_every write): the sidebar's default per-token window holds the last steps that kept detail,
so the per-token pages show them instead of saying that the run kept none (the window was the run's last step,
which such a run never sampled: at 10,000 steps sampled every 1,000 every per-token page was empty)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")

from moeviz.testing import store_from_routing, synthetic_routing  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_app import open_app, texts  # noqa: E402

KEPT = (0, 2)  # the steps whose routes and sequences are written; steps 1 and 3 have aggregates only
GEOM = dict(n_steps=4, n_layers=3, n_experts=8, top_k=2, seqs_per_step=3, seq_len=16, skew=1.0, seed=4)


@pytest.fixture(scope="module")
def routing():
    return synthetic_routing(**GEOM)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, routing):
    """One run, one rank: every step's aggregates, the routes and sequences of the KEPT steps only."""
    from moeviz.store import RunWriter

    mem = store_from_routing(**routing, run_id="main")
    run_dir = tmp_path_factory.mktemp("sampled") / "main"
    run = mem.execute("SELECT * FROM runs").df().iloc[0]
    w = RunWriter(run_dir, run_id="main", run_name="main", rank=0, world_size=1)
    w.write_run({k: (None if k == "capacity_factor" else run[k].item() if hasattr(run[k], "item") else run[k])
                 for k in ("model_class", "n_layers", "n_experts", "top_k", "capacity_factor", "config")})
    w.write_layers(mem.execute("SELECT * EXCLUDE (run_id) FROM layers").df().to_dict("records"))
    for step in range(GEOM["n_steps"]):
        tables = {}
        for t in ("step_stats", "layer_stats") + (("routes", "sequences") if step in KEPT else ()):
            df = mem.execute(f"SELECT * EXCLUDE (run_id) FROM {t} WHERE step = ?", [step]).df()
            tables[t] = {c: df[c].to_numpy() for c in df.columns}
        w.write_flush(tables)
    w.close()
    return run_dir


def test_the_default_per_token_window_is_the_last_step_that_kept_detail(sampled, routing, monkeypatch):
    import app.sidebar

    per_step = GEOM["seqs_per_step"] * GEOM["seq_len"] * GEOM["n_layers"] * GEOM["top_k"]
    monkeypatch.setattr(app.sidebar, "ROUTE_BUDGET", per_step)  # the default window: one step's routes
    at = open_app(sampled, page="tokens")
    info = texts(at, "info")
    assert "kept no per-token detail" not in info
    assert "Per-token analyses use steps 2 (" in info
    assert at.number_input(key="route_window_steps").value == 1
    assert at.number_input(key="route_window_steps").max == len(KEPT)  # counts the steps that kept detail
    # the sequences offered are the three of step 2, and the text shown is the first one's token ids
    options = at.selectbox(key="tokens_seq").options
    assert len(options) == GEOM["seqs_per_step"] and all(o.startswith("step 2 ") for o in options)
    (el,) = at.get("html")
    sel = (routing["steps"] == 2) & (routing["seqs"] == 0)
    body = el.proto.body
    shown = [int(t) for t in np.asarray(routing["token_ids"][sel])]
    assert len(shown) == GEOM["seq_len"]
    for t in shown[:4]:  # the token ids as the page writes them without a vocabulary
        assert str(t) in body


def test_widening_the_window_reaches_every_step_that_kept_detail(sampled, monkeypatch):
    import app.sidebar

    per_step = GEOM["seqs_per_step"] * GEOM["seq_len"] * GEOM["n_layers"] * GEOM["top_k"]
    monkeypatch.setattr(app.sidebar, "ROUTE_BUDGET", per_step)
    at = open_app(sampled, page="tokens")
    at.number_input(key="route_window_steps").set_value(2).run()
    assert "Per-token analyses use steps 0–3" not in texts(at, "info")  # the window ends at the last kept step
    assert "Per-token analyses use steps 0–2" in texts(at, "info")
    steps = sorted({o.split(" ")[1] for o in at.selectbox(key="tokens_seq").options})
    assert steps == ["0", "2"]
