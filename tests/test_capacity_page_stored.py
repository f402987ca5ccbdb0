"""The Capacity page on a long compacted run offers the capacity factors the compacted tables answer
(step_drops, expert_drops) and replays nothing while the reader stays on them; another factor is asked for
explicitly and marked slow. Numbers against numpy over the counts the run was written from; a short or live run
keeps the continuous slider."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")

from moeviz.store.rollups import DROP_FACTORS  # noqa: E402
from moeviz.testing import long_run_aggregates, write_aggregates  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_app import arr, chart, metric, open_app, texts  # noqa: E402

N_STEPS, L, E, K, T = 1234, 2, 4, 2, 64


@pytest.fixture(scope="module")
def agg():
    return long_run_aggregates(n_steps=N_STEPS, n_layers=L, n_experts=E, top_k=K, tokens_per_step=T, skew=1.5,
                               seed=3)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, agg):
    root = tmp_path_factory.mktemp("capstored")
    write_aggregates(root / "compacted", agg, run_id="long")
    write_aggregates(root / "live", agg, run_id="long", compact_on_close=False)
    return root



@pytest.fixture
def slow_above_1000_rows(monkeypatch):
    """The test run (1,234 steps x 2 layers x 4 experts = 9,872 rows) counts as one whose replay is slow."""
    import app.wide

    monkeypatch.setattr(app.wide, "SLOW_REPLAY_ROWS", 1000)


def numpy_drops(agg: dict, cf: float) -> np.ndarray:
    """[L, E] drops max(0, n - C) summed over steps, C = ceil(CF x T x k / E) (one rank: one group a step)."""
    cap = math.ceil(round(cf * T * K / E, 9))
    return np.maximum(0, agg["counts"] - cap).sum(0)


def _forbid_replay(monkeypatch) -> None:
    """Any capacity query that replays step_stats rows or routes fails (an error box on the page)."""
    from moeviz.analyses import capacity

    def replay(*a, **kw):
        raise AssertionError("replayed every row")

    monkeypatch.setattr(capacity, "_units_sql", replay)


def _check_numbers(at, agg: dict, cf: float) -> None:
    d = numpy_drops(agg, cf)
    a = agg["counts"].sum(0)  # [L, E]
    assert d.sum() > 0, cf  # the factor drops something: not a comparison of zeros
    assert metric(at, "Dropped assignments") == f"{int(d.sum()):,}"
    assert metric(at, "Assignments") == f"{int(a.sum()):,}"
    heat = chart(at, "Dropped share per expert and layer")["data"][0]
    np.testing.assert_allclose(arr(heat["z"]).reshape(L, E), d / a, rtol=1e-12)


def test_a_long_compacted_run_offers_the_stored_factors_and_replays_nothing(stores, agg, slow_above_1000_rows,
                                                                           monkeypatch):
    _forbid_replay(monkeypatch)
    at = open_app(stores / "compacted", run="long", page="capacity")
    assert not [s for s in at.slider if s.key == "cap_cf"]  # no continuous slider
    pick = at.select_slider(key="cap_cf_stored")
    assert [float(o) for o in pick.options] == list(DROP_FACTORS)  # the model's own (default 1.25) is one of them
    assert pick.value == 1.25
    _check_numbers(at, agg, 1.25)
    curve = chart(at, "Dropped share over capacity factor")["data"][0]
    assert list(arr(curve["x"])) == list(DROP_FACTORS)
    want = [numpy_drops(agg, f).sum() / agg["counts"].sum() for f in DROP_FACTORS]
    np.testing.assert_allclose(arr(curve["y"]), want, rtol=1e-12)
    at.select_slider(key="cap_cf_stored").set_value(0.75).run()
    assert not at.exception and not at.error, texts(at, "error")
    _check_numbers(at, agg, 0.75)
    assert "read from tables" in texts(at, "caption")


def test_another_factor_is_asked_for_and_marked_slow(stores, agg, slow_above_1000_rows):
    at = open_app(stores / "compacted", run="long", page="capacity")
    at.toggle(key="cap_cf_other").set_value(True).run()
    at.number_input(key="cap_cf_typed").set_value(1.1).run()
    assert not at.exception and not at.error, texts(at, "error")
    assert "1.1 replays every step" in texts(at, "caption")
    _check_numbers(at, agg, 1.1)
    curve = chart(at, "Dropped share over capacity factor")["data"][0]
    xs = list(np.round(arr(curve["x"]), 6))
    assert xs == sorted(set(DROP_FACTORS) | {1.1})  # the stored ones plus the chosen point


def test_a_live_or_short_run_keeps_the_continuous_slider(stores, agg, slow_above_1000_rows):
    at = open_app(stores / "live", run="long", page="capacity")  # not compacted: the tables cannot answer
    assert [s for s in at.slider if s.key == "cap_cf"] and not [s for s in at.select_slider if s.key == "cap_cf_stored"]
    at.slider(key="cap_cf").set_value(1.1).run()
    _check_numbers(at, agg, 1.1)


def test_a_short_compacted_run_keeps_the_continuous_slider(stores, agg):
    at = open_app(stores / "compacted", run="long", page="capacity")  # 9,872 rows: below SLOW_REPLAY_ROWS
    assert [s for s in at.slider if s.key == "cap_cf"] and not [s for s in at.select_slider if s.key == "cap_cf_stored"]
