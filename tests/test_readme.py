"""The README is part of the contract: its schema section is generated from moeviz.store.schema, and its example
queries run against a store."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeviz.store.schema import TABLES, schema_markdown
from moeviz.testing import synthetic_store

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def test_schema_section_matches_moeviz_schema():
    text = _readme()
    section = text.split("<!-- schema:start -->", 1)[1].split("<!-- schema:end -->", 1)[0]
    assert section.strip() == schema_markdown().strip(), "README schema is stale: paste `moeviz schema --markdown`"


def _example_queries() -> list[str]:
    text = _readme().split("### Example queries", 1)[1]
    block = re.search(r"```sql\n(.*?)```", text, re.S).group(1)
    return [q.strip() for q in block.split(";") if q.strip() and not q.strip().startswith("--") or "SELECT" in q]


def test_readme_has_example_queries_for_the_main_tables():
    sql = " ".join(_example_queries())
    for table in ("step_stats", "routes", "sequences", "vocab", "layer_stats", "runs"):
        assert re.search(rf"\b{table}\b", sql), f"no README example reads {table}"


@pytest.mark.parametrize("i", range(5))
def test_readme_example_query_runs(i):
    queries = [q for q in _example_queries() if "SELECT" in q]
    assert len(queries) == 5
    con = synthetic_store(n_steps=3, n_layers=4, n_experts=8, top_k=2, seed=1)
    con.execute("INSERT INTO vocab SELECT DISTINCT run_id, token_id, 'tok' || token_id FROM routes")
    df = con.sql(queries[i]).df()
    assert len(df) > 0
    assert set(df.columns) <= {c.name for t in TABLES.values() for c in t.columns} | {"n", "share", "aux", "z_loss"}


def test_readme_aux_loss_query_gives_one_for_uniform_routing():
    """The README's aux-loss SQL against a hand-made uniform case: every expert equally loaded and equally
    probable gives exactly 1 (Switch's value for balanced routing)."""
    import numpy as np

    from moeviz.testing import store_from_routing

    T, L, E, k = 16, 1, 4, 2
    index = np.zeros((T, L, k), dtype=np.int64)
    for t in range(T):  # expert pairs cycle so every expert takes T*k/E assignments
        index[t, 0] = [(2 * t) % E, (2 * t + 1) % E]
    logits = np.zeros((T, L, E))  # uniform probabilities 1/E
    weights = np.full((T, L, k), 0.5)
    con = store_from_routing(index=index, weights=weights, logits=logits, top_k=k, n_experts=E)
    query = [q for q in _example_queries() if "aux" in q][0]
    df = con.sql(query).df()
    assert np.allclose(df["aux"].to_numpy(), 1.0)


def test_readme_aux_loss_query_keeps_runs_apart_on_a_folder_of_runs():
    """Two runs in one store (as `runs/demo` holds aux and noaux): the aux loss of each run is its own value,
    1 for a uniform run, not the sum of both runs' (2 at every step when run_id is missing from the GROUP BY)."""
    import numpy as np

    from moeviz.testing import store_from_routing

    T, E, k = 16, 4, 2
    index = np.array([[[(2 * t) % E, (2 * t + 1) % E]] for t in range(T)])
    kw = dict(index=index, weights=np.full((T, 1, k), 0.5), logits=np.zeros((T, 1, E)), top_k=k, n_experts=E)
    con = store_from_routing(**kw, run_id="aux")
    store_from_routing(**kw, run_id="noaux", con=con)
    query = [q for q in _example_queries() if "aux" in q][0]
    df = con.sql(query).df()
    assert sorted(df["run_id"]) == ["aux", "noaux"] and np.allclose(df["aux"].to_numpy(), 1.0)
