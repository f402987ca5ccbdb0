"""moeviz.store.catalog: store browsing, checked against numpy on known routing (users' SQL: test_sql_sandbox.py)."""

from __future__ import annotations

import numpy as np
import pytest

from moeviz.store import catalog as queries
from moeviz.testing import store_from_routing, synthetic_routing


@pytest.fixture(scope="module")
def routing():
    return synthetic_routing(n_steps=3, n_layers=2, n_experts=4, top_k=2, seqs_per_step=3, seq_len=5, seed=1)


@pytest.fixture(scope="module")
def con(routing):
    keep = routing["steps"] != 1  # step 1 has aggregates but no per-token detail
    c = store_from_routing(**routing, keep=keep, run_id="a")
    store_from_routing(**synthetic_routing(n_steps=2, n_layers=1, n_experts=2, top_k=1, seed=2, domains=None), run_id="b", con=c)
    texts = [f"t{i}" for i in range(100)]
    c.execute("INSERT INTO vocab SELECT 'a', i, 't' || i FROM range(100) r(i)")
    assert texts[3] == "t3"
    return c


def test_list_runs_has_both_runs_with_their_shapes(con):
    runs = queries.list_runs(con).set_index("run_id")
    assert set(runs.index) == {"a", "b"}
    assert runs.loc["a", ["n_layers", "n_experts", "top_k"]].tolist() == [2, 4, 2]
    assert runs.loc["b", ["n_layers", "n_experts", "top_k"]].tolist() == [1, 2, 1]


def test_run_overview_counts_match_numpy(con, routing):
    ov = queries.run_overview(con, "a").iloc[0]
    n_tok = len(routing["steps"])
    assert ov["steps"] == 3 and ov["first_step"] == 0 and ov["last_step"] == 2
    assert ov["tokens"] == n_tok  # every token of the first layer, all steps
    kept = int((routing["steps"] != 1).sum())
    assert ov["routed_tokens"] == kept
    assert ov["route_rows"] == kept * 2 * 2  # kept tokens x layers x k
    assert ov["sequences"] == 3 * 3 and ov["domains"] == 2
    assert ov["status"] == "finished"


def test_run_overview_unknown_run_is_a_clear_error(con):
    with pytest.raises(queries.RunNotFoundError, match="no run 'zzz'.*a, b"):
        queries.run_overview(con, "zzz")


def test_step_range_and_lists(con):
    assert queries.step_range(con, "a") == (0, 2)
    assert queries.step_range(con, "nope") is None
    assert queries.steps_list(con, "b") == [0, 1]
    assert queries.domain_list(con, "a") == ["code", "prose"]
    assert queries.domain_list(con, "b") == []
    assert queries.rank_list(con, "a") == [0]
    assert queries.layer_list(con, "a")["layer"].tolist() == [0, 1]


def test_sequence_list_only_lists_sequences_with_detail(con, routing):
    seqs = queries.sequence_list(con, "a")
    assert sorted(set(seqs["step"])) == [0, 2]  # step 1 kept nothing
    assert len(seqs) == 6 and (seqs["kept_tokens"] == 5).all()
    row = seqs[(seqs.step == 2) & (seqs.seq == 1)].iloc[0]
    sel = (routing["steps"] == 2) & (routing["seqs"] == 1)
    expected = "".join(f"t{t}" for t in routing["token_ids"][sel][:3])
    assert queries.sequence_list(con, "a", step=2, preview_tokens=3).set_index("seq").loc[1, "preview"] == expected
    assert row["domain"] == routing["domains"][sel][0]
    assert queries.sequence_list(con, "a", step=1).empty


def test_sequence_routes_match_the_arrays(con, routing):
    df = queries.sequence_routes(con, "a", 2, 0, 1)
    sel = np.flatnonzero((routing["steps"] == 2) & (routing["seqs"] == 1))
    assert len(df) == len(sel) * 2 * 2
    for p, t in enumerate(sel):
        for layer in range(2):
            rows = df[(df.pos == p) & (df.layer == layer)].sort_values("slot")
            assert rows["expert"].tolist() == routing["index"][t, layer].tolist()
            # stores keep weights to 1/65535
            np.testing.assert_allclose(rows["weight"], routing["weights"][t, layer], atol=0.5 / 65535 + 1e-12)
            assert (rows["text"] == f"t{routing['token_ids'][t]}").all()
    # run b has no vocabulary: the id stands in for the text
    b = queries.sequence_routes(con, "b", 0, 0, 0)
    assert (b["text"] == b["token_id"].astype(str)).all()


def test_browsing_and_charts_stay_light():
    """moeviz.store.catalog, moeviz.charts and the dashboard command import neither torch nor streamlit."""
    import subprocess
    import sys

    code = ("import sys, moeviz.store.catalog, moeviz.charts, moeviz.cli.dashboard; "
            "print(sorted(m for m in ('torch', 'streamlit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
