"""docs/spark.md's recipe, run as written: PySpark in local mode computes the load per expert, MaxVio, the Switch
loss per layer and the capacity drops at a factor from a store, and each equals moeviz's own function on the same
store (the reference: moeviz.analyses over open_store, DuckDB).

Two ways in, as the doc says: a `moeviz export` of a compacted run, and the commit records of a run never
compacted. The run is written through RunWriter by two ranks, so the recipe sums over ranks as moeviz does.

Without Java or pyspark this module is skipped, except where MOEVIZ_REQUIRE_SPARK=1 (set by .ci/run): there a
skipped Spark test is not a pass, and the missing piece fails the run.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = [
    pytest.mark.spark,
    pytest.mark.slow,  # a JVM start and ~40 small Spark jobs: ~100 s on 2 shared cores
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

_REQUIRE = os.environ.get("MOEVIZ_REQUIRE_SPARK") == "1"
_INSTALL = "apt-get install -y openjdk-17-jre-headless && pip install pyspark"


def _missing() -> str | None:
    try:
        import pyspark  # noqa: F401
    except ImportError as e:
        return f"pyspark is not installed ({e})"
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        return "no Java runtime (java not on PATH, JAVA_HOME unset)"
    return None


_why = _missing()
if _why:  # pragma: no cover - depends on the machine
    if _REQUIRE:
        raise ImportError(f"Spark is required here (MOEVIZ_REQUIRE_SPARK=1): {_why}; {_INSTALL}")
    pytest.skip(f"{_why}; {_INSTALL}", allow_module_level=True)

from moeviz.analyses.aux_loss import switch_loss  # noqa: E402
from moeviz.analyses.capacity import capacity_drops  # noqa: E402
from moeviz.analyses.load import expert_load, imbalance  # noqa: E402
from moeviz.selection import Selection  # noqa: E402
from moeviz.store import RunWriter, open_store  # noqa: E402
from moeviz.store.export import export  # noqa: E402
from moeviz.testing import store_from_routing, synthetic_routing  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "spark.md"
ROUTING = dict(n_steps=6, n_layers=3, n_experts=8, top_k=2, seqs_per_step=3, seq_len=16, n_ranks=2, skew=1.5,
               seed=7, domains=None)
FACTORS = (0.5, 1.0, 1.25)


def recipe() -> dict:
    """The doc's recipe block, executed: its functions by name."""
    text = DOC.read_text(encoding="utf-8")
    block = text.split("<!-- recipe:start -->", 1)[1].split("<!-- recipe:end -->", 1)[0]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


def write_run(run_dir: Path, *, compact: bool) -> None:
    """The synthetic routing as a real run folder: one RunWriter per rank, one flush per step."""
    mem = store_from_routing(**synthetic_routing(**ROUTING), run_id="r")
    run = mem.execute("SELECT * FROM runs").df().iloc[0]
    layers = mem.execute("SELECT * EXCLUDE (run_id) FROM layers").df().to_dict("records")
    for rank in (0, 1):
        w = RunWriter(run_dir, run_id="r", run_name="r", rank=rank, world_size=2, compact_on_close=compact)
        w.write_run({k: (run[k].item() if hasattr(run[k], "item") else run[k])
                     for k in ("model_class", "n_layers", "n_experts", "top_k", "sample_every")})
        w.write_layers(layers)
        for step in range(ROUTING["n_steps"]):
            tables = {}
            for t in ("routes", "step_stats", "layer_stats", "sequences"):
                df = mem.execute(f"SELECT * EXCLUDE (run_id) FROM {t} WHERE step = ? AND rank = ?", [step, rank]).df()
                tables[t] = {c: df[c].to_numpy() for c in df.columns}
            w.write_flush(tables)
        w.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("spark")
    write_run(root / "compacted", compact=True)
    write_run(root / "live", compact=False)
    export(root / "compacted", root / "export")
    assert (root / "compacted" / "run.duckdb").exists() and not (root / "live" / "run.duckdb").exists()
    return root


@pytest.fixture(scope="module")
def spark():
    r = recipe()
    session = r["spark_session"](2)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def _same(got: pd.DataFrame, want: pd.DataFrame, keys: list[str], exact: list[str], close: list[str]) -> None:
    got = got.sort_values(keys).reset_index(drop=True)
    want = want.sort_values(keys).reset_index(drop=True)
    assert len(got) == len(want) > 0
    for c in keys + exact:
        np.testing.assert_array_equal(got[c].to_numpy(np.int64), want[c].to_numpy(np.int64), err_msg=c)
    for c in close:
        np.testing.assert_allclose(got[c].to_numpy(float), want[c].to_numpy(float), rtol=1e-12, atol=1e-12, err_msg=c)


@pytest.mark.parametrize("source", ["export", "commits"])
def test_recipe_equals_moeviz(spark, stores, source):
    r = recipe()
    if source == "export":
        r["views_from_export"](spark, stores / "export")
    else:
        r["views_from_commits"](spark, stores / "live")
    con = open_store(stores / "compacted")
    try:
        load = expert_load(con, by_step=False)
        _same(r["expert_load"](spark).toPandas(), load, ["layer", "expert"],
              ["tokens", "assigned", "first_choice", "n_experts", "top_k"],
              ["prob_sum", "load_fraction", "relative_load", "token_share"])
        for by_step in (True, False):
            keys = ["step", "layer"] if by_step else ["layer"]
            _same(r["max_vio"](spark, by_step).toPandas(), imbalance(con, by_step=by_step), keys, ["assignments"],
                  ["max_vio"])
            _same(r["switch_loss"](spark, by_step).toPandas(), switch_loss(con, by_step=by_step), keys, ["tokens"],
                  ["aux_loss"])
        for cf in FACTORS:
            want = capacity_drops(con, Selection(), cf)
            got = r["capacity_drops"](spark, cf).toPandas()
            _same(got, want, ["layer", "expert"], ["assigned", "dropped"], ["drop_rate"])
            if cf == 0.5:
                assert want["dropped"].sum() > 0  # the factor the test needs to mean something
    finally:
        con.close()


def test_maxvio_against_numpy(spark, stores):
    """An independent check of the recipe's MaxVio and Switch loss (not moeviz's SQL): numpy over the routing."""
    r = recipe()
    r["views_from_export"](spark, stores / "export")
    g = synthetic_routing(**ROUTING)
    E, L = ROUTING["n_experts"], ROUTING["n_layers"]
    counts = np.stack([np.bincount(g["index"][:, layer].ravel(), minlength=E) for layer in range(L)])  # [L, E]
    want = (counts.max(1) - counts.mean(1)) / counts.mean(1)
    got = r["max_vio"](spark, False).toPandas().sort_values("layer")["max_vio"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    probs = np.exp(g["logits"] - g["logits"].max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    T = len(g["index"])
    aux = [E * float((counts[layer] / counts[layer].sum()) @ (probs[:, layer].sum(0) / T)) for layer in range(L)]
    got = r["switch_loss"](spark, False).toPandas().sort_values("layer")["aux_loss"].to_numpy()
    np.testing.assert_allclose(got, aux, rtol=1e-9)
    assert not math.isclose(max(aux), 1.0, rel_tol=1e-3)  # skewed: not the uniform value


def test_commits_refuses_a_compacted_run(spark, stores):
    with pytest.raises(ValueError, match="compacted"):
        recipe()["views_from_commits"](spark, stores / "compacted")
