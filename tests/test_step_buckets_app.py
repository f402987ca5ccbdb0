"""A long run draws as fast as a short one: on a run of 5,000 steps (aggregates written through RunWriter) every
curve over steps of the Overview, Load balance and Aux loss pages has at most MAX_POINTS points per trace, says
so in a caption, and its values are the bucketed ones (checked against numpy over the counts that were written)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from moeviz.analyses.step_buckets import MAX_POINTS, step_bucket_for
from moeviz.testing import long_run_aggregates, write_aggregates

sys.path.insert(0, str(Path(__file__).parent))
from test_app import arr, chart, charts, open_app  # noqa: E402

N_STEPS, L, E = 5000, 2, 4
BUCKET = step_bucket_for(0, N_STEPS - 1)  # 5: 1,000 points per line


@pytest.fixture(scope="module")
def agg():
    return long_run_aggregates(n_steps=N_STEPS, n_layers=L, n_experts=E, top_k=2, seed=5)


@pytest.fixture(scope="module")
def long_store(tmp_path_factory, agg):
    root = tmp_path_factory.mktemp("long")
    write_aggregates(root / "long", agg, run_id="long")
    return root / "long"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, agg):
    """The long run beside one of 8,000 steps: Compare must bucket by the longer one."""
    root = tmp_path_factory.mktemp("two")
    write_aggregates(root / "long", agg, run_id="long")
    write_aggregates(root / "longer", long_run_aggregates(n_steps=8000, n_layers=L, n_experts=E, seed=6),
                     run_id="longer")
    return root



def numpy_bucketed(agg: dict) -> dict[str, np.ndarray]:
    """Per bucket and layer from the written counts: load share [B, L, E], MaxVio [B, L], Switch loss [B, L]."""
    n_b = N_STEPS // BUCKET
    c = agg["counts"].reshape(n_b, BUCKET, L, E).sum(1)
    p = agg["prob_sum"].reshape(n_b, BUCKET, L, E).sum(1)
    tokens = agg["tokens"] * BUCKET
    share = c / c.sum(-1, keepdims=True)
    mean = c.mean(-1)
    return {"share": share, "max_vio": (c.max(-1) - mean) / mean, "aux": E * (share * p / tokens).sum(-1)}


def _points(fig: dict) -> list[int]:
    return [len(arr(t["x"])) for t in fig["data"] if t.get("type", "scatter") == "scatter" and "x" in t]


def test_bucket_fits_the_cap():
    assert BUCKET == 5 and N_STEPS // BUCKET <= MAX_POINTS


def test_overview_curves_are_bucketed(long_store, agg):
    at = open_app(long_store, run="long")
    ref = numpy_bucketed(agg)
    load = chart(at, "Load per expert over steps")
    assert len(load["data"]) == L * E and max(_points(load)) == N_STEPS // BUCKET
    first = load["data"][0]  # layer 0, expert 0
    np.testing.assert_array_equal(arr(first["x"]), np.arange(0, N_STEPS, BUCKET))
    np.testing.assert_allclose(arr(first["y"]), ref["share"][:, 0, 0], rtol=1e-12)
    aux = chart(at, "Switch load-balancing loss over steps")
    assert max(_points(aux)) == N_STEPS // BUCKET
    np.testing.assert_allclose(arr(aux["data"][1]["y"]), ref["aux"][:, 1], rtol=1e-9)
    assert sum("Bucketed: each point is 5 steps" in str(c.value) for c in at.caption) == 2


def test_load_and_aux_loss_pages_are_bucketed(long_store, agg):
    ref = numpy_bucketed(agg)
    at = open_app(long_store, run="long", page="load")
    imb = chart(at, "Imbalance per layer over steps")
    assert _points(imb) == [N_STEPS // BUCKET] * L
    np.testing.assert_allclose(arr(imb["data"][0]["y"]), ref["max_vio"][:, 0], rtol=1e-12)
    assert any("Bucketed" in str(c.value) for c in at.caption)
    at = open_app(long_store, run="long", page="aux_loss")
    over_steps = [c for c in charts(at) if "over layers" in c["layout"]["title"]["text"]
                  or "per layer" in c["layout"]["title"]["text"]]
    assert len(over_steps) == 4  # Switch loss per layer, pooled, z-loss, entropy
    for fig in over_steps:
        assert 0 < max(_points(fig)) <= MAX_POINTS
    np.testing.assert_allclose(arr(chart(at, "Switch load-balancing loss per layer")["data"][0]["y"]), ref["aux"][:, 0],
                               rtol=1e-9)


def test_a_narrow_step_range_draws_every_step(long_store):
    at = open_app(long_store, run="long", page="load")
    at.select_slider(key="steps").set_value((1000, 1999)).run()  # the sidebar's step range: 1,000 steps
    imb = chart(at, "Imbalance per layer over steps")
    assert _points(imb) == [1000] * L
    assert not any("Bucketed" in str(c.value) for c in at.caption)


def test_compare_buckets_by_the_longer_run(two_runs):
    at = open_app(two_runs, run="longer", page="compare")  # the sidebar's step range (0-7,999) applies to both
    bucket = step_bucket_for(0, 7999)  # 10: 800 points for the longer run, 500 for the other
    for title in ("pooled over layers", "Imbalance over steps"):
        fig = chart(at, title)
        assert set(_points(fig)) == {N_STEPS // bucket, 8000 // bucket}, title  # per run (and layer)
        for trace in fig["data"]:
            assert (arr(trace["x"]) % bucket == 0).all()  # shared x positions: multiples of the bucket
    assert sum(f"each point is {bucket} steps" in str(c.value) for c in at.caption) == 2
