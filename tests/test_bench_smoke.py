"""Smoke run of the analytics benchmark at a tiny size, so that bench/make_store.py and bench/bench_analytics.py
cannot rot: the generator writes a real store whose aggregates agree with its routes, and every pandas
re-implementation in the benchmark still equals the moeviz analysis it is timed against."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    make_store = _load("make_store")
    out = tmp_path_factory.mktemp("bench") / "tiny"
    shape = make_store.Shape(layers=3, experts=4, top_k=2, batch=4, seq_len=32, probe_seqs=2)
    figures = make_store.generate(out, 6_000, shape, seed=1, steps_per_flush=3, quiet=True)
    return out, shape, figures


def test_generated_store_is_consistent(tiny_store):
    """Aggregates and routes come from the same routing: counts agree exactly, weights sum to 1 per token, every
    token has k distinct experts, and the probe steps repeat the same token ids."""
    from moeviz.store import open_store

    out, shape, figures = tiny_store
    con = open_store(out)
    n_routes = con.execute("SELECT count(*) FROM routes").fetchone()[0]
    assert n_routes == figures["routes"] >= 6_000
    diff = con.execute("""
        SELECT count(*) FROM (SELECT step, layer, expert, count(*) AS n, count(*) FILTER (WHERE slot = 0) AS f
                              FROM routes GROUP BY ALL) r
        FULL JOIN step_stats s USING (step, layer, expert)
        WHERE coalesce(r.n, 0) <> s.assigned OR coalesce(r.f, 0) <> s.first_choice""").fetchone()[0]
    assert diff == 0
    per_token = con.execute("""
        SELECT sum(weight) AS w, count(DISTINCT expert) AS e FROM routes GROUP BY step, seq, pos, layer""").df()
    assert np.allclose(per_token["w"], 1.0, atol=2 * 7.7e-6)
    assert (per_token["e"] == shape.top_k).all()
    probs = con.execute("SELECT step, layer, sum(prob_sum) / any_value(tokens) AS p FROM step_stats GROUP BY ALL").df()
    assert np.allclose(probs["p"], 1.0)
    probe = con.execute("""
        SELECT count(DISTINCT step) AS steps, count(DISTINCT list) AS token_lists FROM (
            SELECT r.step, list(token_id ORDER BY r.seq, pos) AS list FROM routes r
            JOIN sequences q USING (step, seq) WHERE q.tag = 'probe' AND layer = 0 AND slot = 0 GROUP BY r.step)""").fetchone()
    assert probe[0] >= 2 and probe[1] == 1
    domains = con.execute("SELECT count(DISTINCT domain) FROM sequences").fetchone()[0]
    assert domains >= 2
    con.close()


def test_benchmark_runs_and_pandas_equals_moeviz(tiny_store):
    """Every analysis runs; every pandas re-implementation reproduces moeviz's result (no MISMATCH)."""
    bench = _load("bench_analytics")
    out, _, _ = tiny_store
    text = bench.run(out, repeats=0, pandas_routes=None, only=None, no_pandas=False, timeout_s=60)
    rows = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| analysis")]
    assert len(rows) >= 25
    assert "MISMATCH" not in text and "error" not in text, text
    equal = [r.split(" | ")[6] for r in rows]
    assert sum(e.startswith("ok") for e in equal) >= 25, text
    reads = {r.split(" | ")[0][2:]: r.split(" | ")[1] for r in rows}
    assert reads["specialization.coactivation"] == "aggregates (pair_stats)"  # source='aggregates' ran, no error
    assert reads["specialization.coactivation [source=routes]"] == "routes"
    flows = [name for name in reads if name.startswith("specialization.layer_flow")]
    assert len(flows) == 4
    assert all(reads[n] == ("routes" if "routes" in n else "aggregates (flow_stats)") for n in flows)
    probs = [r for r in rows if r.startswith("| capacity_drops CF 1.0 probability, ")]  # with_weight, domain, pos, slot
    assert len(probs) == 4 and all(r.split(" | ")[6].startswith("ok") for r in probs), probs
    sat = [name for name in reads if "saturation" in name]
    assert len(sat) == 4 and all(reads[n] == ("routes" if "routes" in n else "aggregates (probe_sets)") for n in sat)


def test_compare_detects_a_difference(tiny_store):
    """The equality check can fail: a perturbed pandas result is reported as a mismatch."""
    import pandas as pd

    bench = _load("bench_analytics")
    case = bench.Case("x", "aggregates", None, ["layer"], ["v"])
    m = pd.DataFrame({"layer": [0, 1], "v": [1.0, 2.0]})
    assert bench.compare(m, m.copy(), case) == "ok"
    assert bench.compare(m, m.assign(v=[1.0, 2.001]), case).startswith("MISMATCH")
    assert bench.compare(m, m.iloc[:1], case).startswith("MISMATCH")


def test_balance_benchmark_runs(capsys):
    """bench/bench_balance.py at a tiny size: it times both and prints one line."""
    pytest.importorskip("torch")
    assert _load("bench_balance").main(["--seqs", "2", "--seq-len", "8", "--repeats", "1", "--layers", "2"]) == 0
    assert "balance sums" in capsys.readouterr().out
