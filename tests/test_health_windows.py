"""The growing-imbalance check's per-step MaxVio (health._window_max_vio, one GROUP BY over the windows' rows)
against numpy: per step and layer, (max - mean) / mean of the experts' assignments summed over ranks, an expert
that got nothing counting 0."""

from __future__ import annotations

import numpy as np
import pytest

from moeviz.analyses.health import _window_max_vio
from moeviz.selection import Selection
from moeviz.testing import store_from_routing, synthetic_routing


@pytest.mark.parametrize("n_ranks", [1, 3])
def test_window_max_vio_equals_numpy(n_ranks):
    r = synthetic_routing(n_steps=9, n_layers=2, n_experts=6, top_k=2, n_ranks=n_ranks, skew=3.0, seed=5)
    r["index"][r["index"] == 5] = 4  # expert 5 never chosen: it counts 0 in the mean
    con = store_from_routing(**r, n_experts=6)
    windows = [(0, 2), (6, 8)]
    got = _window_max_vio(con, Selection(run_ids=("run0",)), windows)
    counts = np.zeros((9, 2, 6))
    for slot in range(2):
        np.add.at(counts, (r["steps"][:, None], np.arange(2)[None, :], r["index"][:, :, slot]), 1)
    steps = [s for lo, hi in windows for s in range(lo, hi + 1)]
    want = {(s, l): (counts[s, l].max() - counts[s, l].mean()) / counts[s, l].mean() for s in steps for l in range(2)}
    assert sorted(zip(got["step"], got["layer"])) == sorted(want)
    for s, l, v in zip(got["step"], got["layer"], got["max_vio"]):
        assert v == pytest.approx(want[(s, l)], rel=1e-12)


def test_window_max_vio_adds_up_a_step_split_over_flushes():
    """One rank whose step has two rows per expert (a step given to step() twice, or an import's large step cut
    into two flushes): the check reads the step's summed counts, not each row as if it were the step."""
    import duckdb

    from moeviz.testing import create_schema

    con = duckdb.connect()
    create_schema(con)
    con.execute("INSERT INTO runs (run_id, n_experts, top_k) VALUES ('r', 2, 1)")
    con.execute("INSERT INTO layers (run_id, layer, n_experts, top_k) VALUES ('r', 0, 2, 1)")
    # step 0: first flush 3 + 1 tokens, second flush 0 + 4: the step's counts are 3, 5
    con.execute("INSERT INTO step_stats (run_id, step, rank, layer, expert, tokens, assigned) VALUES "
                "('r', 0, 0, 0, 0, 4, 3), ('r', 0, 0, 0, 1, 4, 1), ('r', 0, 0, 0, 0, 4, 0), ('r', 0, 0, 0, 1, 4, 4)")
    got = _window_max_vio(con, Selection(run_ids=("r",)), [(0, 0)])
    assert got["max_vio"].tolist() == pytest.approx([(5 - 4) / 4])
    assert got["tokens"].tolist() == [8]
