"""moeviz.analyses.health and `moeviz check` on routing built to be healthy or to show one specific disease."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from moeviz.analyses.health import COLUMNS, health_summary
from moeviz.analyses.load import AnalysisError
from moeviz.selection import Selection
from moeviz.testing import store_from_routing

E, K = 8, 2


def routing(n_steps=8, tokens=1024, n_layers=2, probs=None, seed=0, n_experts=E, k=K):
    """Routing whose top-k experts are drawn without replacement from probs(step, layer) -> [E] (Gumbel top-k).

    Returns store_from_routing keyword arguments; logits are log(probs) + Gumbel noise.
    """
    rng = np.random.default_rng(seed)
    probs = probs or (lambda step, layer: np.full(n_experts, 1 / n_experts))
    steps = np.repeat(np.arange(n_steps), tokens)
    logp = np.stack([[np.log(np.maximum(probs(s, layer), 1e-12)) for layer in range(n_layers)] for s in range(n_steps)])
    logits = logp[steps] + rng.gumbel(size=(len(steps), n_layers, n_experts))  # [T, L, E]
    index = np.argsort(-logits, axis=-1)[..., :k]
    seqs, pos = np.divmod(np.arange(len(steps)) % tokens, 64)
    return dict(logits=logits, index=index, steps=steps, seqs=seqs, pos=pos,
                domains=np.where(seqs % 2 == 0, "code", "prose").astype(object))


def flagged(df: pd.DataFrame, check: str) -> pd.DataFrame:
    return df[(df["check"] == check) & (df["severity"] != "ok")]


def test_healthy_run_is_all_ok():
    con = store_from_routing(**routing())
    df = health_summary(con)
    assert list(df.columns) == COLUMNS
    assert (df["severity"] == "ok").all(), df.to_string()
    assert set(df["check"]) == {"collapsed_expert", "dead_expert", "growing_imbalance", "capacity_drops", "model_drops",
                                "nonfinite_router", "recording_errors"}


def test_collapsed_expert_is_an_error_with_its_share():
    def probs(step, layer):
        p = np.full(E, 0.2 / (E - 1))
        if layer == 1 and step >= 6:
            p = np.full(E, 0.02 / (E - 1))
            p[3] = 0.98
        else:
            p = np.full(E, 1 / E)
        return p

    r = routing(probs=probs)
    df = health_summary(store_from_routing(**r), capacity_factor=None)
    got = flagged(df, "collapsed_expert")
    assert got[["layer", "expert"]].values.tolist() == [[1, 3]]
    assert (got["severity"] == "error").all()
    window = r["steps"] >= 6  # last 25% of 8 steps = steps 6-7
    share = (r["index"][window, 1, 0] == 3).mean()
    assert got["value"].iloc[0] == pytest.approx(share)
    assert share > 0.9
    # judged on the recent window: the whole run pooled would be diluted (2 of 8 steps) below 0.5
    assert flagged(health_summary(store_from_routing(**r), window=1.0, capacity_factor=None), "collapsed_expert").empty
    assert df["severity"].iloc[0] == "error"  # worst first


def test_dead_experts_are_flagged_per_expert():
    def probs(step, layer):
        p = np.full(E, 1.0)
        if layer == 0:
            p[5] = 0.0  # never chosen: error
            p[6] = 0.03  # chosen rarely: below 0.1 x uniform share -> warn
        return p / p.sum()

    r = routing(probs=probs, seed=1)
    df = health_summary(store_from_routing(**r), dead_threshold=0.1, capacity_factor=None)
    got = flagged(df, "dead_expert").sort_values("expert")
    assert got[["layer", "expert", "severity"]].values.tolist() == [[0, 5, "error"], [0, 6, "warn"]]
    window = r["steps"] >= 6
    share6 = (r["index"][window, 0] == 6).sum() / r["index"][window, 0].size
    assert got["value"].iloc[1] == pytest.approx(share6 * E)  # relative load: share / uniform share
    assert got["value"].iloc[0] == 0


def test_growing_imbalance_warns_and_stable_imbalance_does_not():
    def growing(step, layer):
        p = np.full(E, 1.0)
        if layer == 0:
            p[0] = 1 + 0.4 * step  # step 0: uniform; step 7: expert 0 ~3.8x heavier
        return p / p.sum()

    def stable(step, layer):
        p = np.full(E, 1.0)
        p[0] = 3.0
        return p / p.sum()

    r = routing(probs=growing, seed=2)
    df = health_summary(store_from_routing(**r), capacity_factor=None)
    got = flagged(df, "growing_imbalance")
    assert got["layer"].tolist() == [0]
    counts = [np.bincount(r["index"][r["steps"] == s, 0].ravel(), minlength=E) for s in (6, 7)]
    late = np.mean([(c.max() - c.mean()) / c.mean() for c in counts])
    assert got["value"].iloc[0] == pytest.approx(late)
    assert flagged(health_summary(store_from_routing(**routing(probs=stable, seed=3)), capacity_factor=None),
                   "growing_imbalance").empty


def test_capacity_drops_warn_with_the_brute_force_rate():
    def skewed(step, layer):
        p = np.full(E, 1.0)
        p[:2] = 4.0
        return p / p.sum()

    r = routing(probs=skewed, seed=4, n_steps=2)
    df = health_summary(store_from_routing(**r), capacity_factor=1.0, drop_rate_threshold=0.05)
    got = flagged(df, "capacity_drops").sort_values("layer")
    assert got["layer"].tolist() == [0, 1]
    for layer, value in zip(got["layer"], got["value"]):
        cap = math.ceil(1.0 * 1024 * K / E)
        dropped = sum(np.maximum(np.bincount(r["index"][r["steps"] == s, layer].ravel(), minlength=E) - cap, 0).sum()
                      for s in (0, 1))
        assert value == pytest.approx(dropped / (2 * 1024 * K))
    assert flagged(health_summary(store_from_routing(**r), capacity_factor=4.0), "capacity_drops").empty
    assert "capacity_drops" not in set(health_summary(store_from_routing(**r), capacity_factor=None)["check"])


def test_model_drops_from_the_recorded_aggregates():
    r = routing(n_steps=2, seed=5)
    dropped = np.zeros(r["index"].shape, bool)
    dropped[:300, 1, 1] = True  # 300 of 2048 * 2 assignments of layer 1
    df = health_summary(store_from_routing(**r, dropped=dropped), capacity_factor=None, drop_rate_threshold=0.05)
    got = flagged(df, "model_drops")
    assert got["layer"].tolist() == [1]
    assert got["value"].iloc[0] == pytest.approx(300 / (2 * 1024 * K))


def test_no_data_and_domain_selection():
    con = store_from_routing(**routing(n_steps=2, seed=6))
    df = health_summary(con, Selection(steps=(100, 200)))
    assert df[["check", "severity"]].values.tolist() == [["no_data", "error"]]
    dom = health_summary(con, Selection(domains=("code",)))
    assert (dom["severity"] == "ok").all()
    assert "model_drops" not in set(dom["check"])  # aggregates have no domain


def test_two_runs_are_judged_separately():
    def dead(step, layer):
        p = np.full(E, 1.0)
        p[2] = 0
        return p / p.sum()

    con = store_from_routing(**routing(n_steps=2, seed=7), run_id="good")
    store_from_routing(**routing(n_steps=2, seed=8, probs=dead), run_id="bad", con=con)
    df = health_summary(con, capacity_factor=None)
    assert set(df.loc[df.severity != "ok", "run_id"]) == {"bad"}
    assert (df.loc[df.run_id == "good", "severity"] == "ok").all()


def test_bad_arguments():
    con = store_from_routing(**routing(n_steps=1, tokens=64))
    with pytest.raises(AnalysisError, match="window"):
        health_summary(con, window=0)
    with pytest.raises(AnalysisError, match="collapse_share"):
        health_summary(con, collapse_share=2)


# ---- `moeviz check` on a real store folder --------------------------------------------------------------------

def write_run(run_dir, **kwargs):
    """Write routing into a store folder through moeviz.store.RunWriter (table by table from the in-memory store)."""
    store = pytest.importorskip("moeviz.store", reason="moeviz.store (the store engineer's module) is not importable")
    mem = store_from_routing(**kwargs)
    meta = mem.execute("SELECT model_class, n_layers, n_experts, top_k FROM runs").df().iloc[0].to_dict()
    layers = mem.execute("SELECT layer, module_name, n_experts, top_k, block_index, stack FROM layers").df()
    with store.RunWriter(run_dir) as w:
        w.write_run({k: (int(v) if k != "model_class" else v) for k, v in meta.items()})
        w.write_layers([{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                        for row in layers.to_dict("records")])
        w.write_flush({t: _columns(mem.execute(f"SELECT * EXCLUDE (run_id) FROM {t}").df())
                       for t in ("routes", "step_stats", "layer_stats", "sequences")})


def _columns(df: pd.DataFrame) -> dict:
    """numpy columns for RunWriter.write_flush; text columns as lists with None for NULL; nullable integer columns
    (sequences.seq_key: UInt64 with <NA>) as their pandas arrays, which to_numpy() would turn into floats."""
    return {c: (df[c].array if isinstance(df[c].dtype, pd.api.extensions.ExtensionDtype)
                and pd.api.types.is_integer_dtype(df[c]) else df[c].to_numpy()
                if pd.api.types.is_numeric_dtype(df[c])
                else [None if pd.isna(v) else str(v) for v in df[c]]) for c in df.columns}


def test_cli_check_exit_codes(tmp_path, capsys):
    from moeviz.cli import main

    write_run(tmp_path / "healthy", **routing(n_steps=4, tokens=512, seed=9))

    def dead(step, layer):
        p = np.full(E, 1.0)
        p[4] = 0
        return p / p.sum()

    write_run(tmp_path / "sick", **routing(n_steps=4, tokens=512, seed=10, probs=dead))
    assert main(["check", str(tmp_path / "healthy")]) == 0
    out = capsys.readouterr().out
    assert "all checks ok" in out and "dead_expert" in out
    assert main(["check", str(tmp_path / "sick"), "--steps", "1:3"]) == 1
    out = capsys.readouterr().out
    assert "dead_expert" in out and "error" in out
    assert main(["check", str(tmp_path), "--json", "--capacity-factor", "0"]) == 1
    records = json.loads(capsys.readouterr().out)
    bad = [r for r in records if r["severity"] != "ok"]
    assert {r["run_id"] for r in bad} == {"sick"} and {(r["layer"], r["expert"]) for r in bad} == {(0, 4), (1, 4)}
    assert not any(r["check"] == "capacity_drops" for r in records)
    assert main(["check", str(tmp_path / "healthy"), "--steps", "x:y"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_cli_steps_parsing():
    from moeviz.cli.check import CheckArgumentError, parse_steps

    assert parse_steps("3:7") == (3, 7)
    assert parse_steps("5") == (5, 5)
    lo, hi = parse_steps(":4")
    assert hi == 4 and lo < -10**12
    lo, hi = parse_steps("2:")
    assert lo == 2 and hi > 10**12
    assert parse_steps(None) is None
    with pytest.raises(CheckArgumentError):
        parse_steps("a:b")


def test_cli_check_usage_errors_and_readable_output(tmp_path, capsys):
    """An empty --steps range or an unknown --run is a usage error (2) that says what the store holds, not a
    finding (1); the findings print one line each (no <NA> cells, no 260-character table), small ratios with
    two significant digits."""
    from moeviz.cli import main

    def dead(step, layer):
        p = np.full(E, 1.0)
        p[4] = 0
        return p / p.sum()

    write_run(tmp_path / "sick", **routing(n_steps=4, tokens=512, seed=10, probs=dead))
    assert main(["check", str(tmp_path / "sick"), "--steps", "300:400"]) == 2
    err = capsys.readouterr().err
    assert "selects no recorded step" in err and "recorded steps 0-3" in err
    assert main(["check", str(tmp_path), "--run", "nosuch"]) == 2
    assert "no run 'nosuch'" in (err := capsys.readouterr().err) and "its runs: sick" in err
    assert main(["check", str(tmp_path / "sick"), "--layers", "7"]) == 2
    assert "layers are 0, 1" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "sick")]) == 1
    out = capsys.readouterr().out
    assert "<NA>" not in out and max(len(line) for line in out.splitlines()) < 250
    assert out.splitlines()[0].startswith("error  dead_expert")
    from moeviz.analyses.health import _ratio

    assert _ratio(0.000341) == "0.00034x" and _ratio(0.05) == "0.05x" and _ratio(0.5) == "0.50x"
