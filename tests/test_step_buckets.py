"""Step buckets (moeviz.analyses.step_buckets): the curves over steps with `step_bucket=b`, checked against numpy
over the routing arrays themselves (the reference: counts, router probabilities and logits per token, bucketed by
step // b in numpy), and against the same analysis pooled over each bucket's step range."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeviz.analyses.aux_loss import pooled_switch_loss, switch_loss, z_loss
from moeviz.analyses.load import expert_load, imbalance
from moeviz.analyses.step_buckets import MAX_POINTS, StepBucketError, bucket_count, step_bucket_for
from moeviz.selection import Selection
from moeviz.testing import softmax, store_from_routing, synthetic_routing

N_STEPS, L, E, K = 23, 3, 8, 2
BUCKET = 5  # 23 steps: buckets 0-4, ..., 20-22 (the last one partial)


@pytest.fixture(scope="module")
def routing():
    g = synthetic_routing(n_steps=N_STEPS, n_layers=L, n_experts=E, top_k=K, seqs_per_step=2, seq_len=8, n_ranks=2,
                          skew=1.5, seed=11, domains=None)
    # steps 3, 8, 13, 18 are eval passes: a tag on every sequence of the step
    g["tags"] = np.where(np.isin(g["steps"], [3, 8, 13, 18]), "eval", "train").astype(object)
    return g


@pytest.fixture(scope="module")
def con(routing):
    return store_from_routing(**routing, run_id="r")


def numpy_buckets(g: dict, bucket: int, steps_kept=None) -> dict:
    """Per (bucket, layer): expert counts [E], router probability sums [E], tokens, z-loss sum (numpy only)."""
    probs = softmax(g["logits"])  # [T, L, E]
    m = g["logits"].max(-1, keepdims=True)
    lse = (m + np.log(np.exp(g["logits"] - m).sum(-1, keepdims=True)))[..., 0]  # [T, L]
    keep = np.ones(len(g["steps"]), bool) if steps_kept is None else np.isin(g["steps"], steps_kept)
    out = {}
    for b in np.unique(g["steps"][keep] // bucket):
        t = keep & (g["steps"] // bucket == b)
        for layer in range(L):
            out[(int(b) * bucket, layer)] = dict(
                counts=np.bincount(g["index"][t, layer].ravel(), minlength=E),
                first=np.bincount(g["index"][t, layer, 0], minlength=E),
                probs=probs[t, layer].sum(0), tokens=int(t.sum()), z=float((lse[t, layer] ** 2).sum()))
    return out


def test_bucket_choice_keeps_every_line_under_the_cap():
    assert step_bucket_for(0, MAX_POINTS - 1) == 1
    for first, last in [(0, 19_999), (7, 20_006), (0, 99_999), (123, 1_000_000), (0, 1500), (999, 2500)]:
        b = step_bucket_for(first, last)
        assert bucket_count(first, last, b) <= MAX_POINTS
        smaller = [m * 10 ** e for e in range(8) for m in (1, 2, 5) if m * 10 ** e < b]
        assert all(bucket_count(first, last, s) > MAX_POINTS for s in smaller), (first, last, b)  # the finest
    assert step_bucket_for(0, 19_999) == 20


def test_expert_load_and_imbalance_buckets_equal_numpy(con, routing):
    ref = numpy_buckets(routing, BUCKET)
    load = expert_load(con, by_step=True, step_bucket=BUCKET)
    assert sorted(load["step"].unique()) == [0, 5, 10, 15, 20]
    imb = imbalance(con, by_step=True, step_bucket=BUCKET).set_index(["step", "layer"])
    for (step, layer), r in ref.items():
        got = load[(load.step == step) & (load.layer == layer)].sort_values("expert")
        np.testing.assert_array_equal(got["assigned"], r["counts"])
        np.testing.assert_array_equal(got["first_choice"], r["first"])
        assert (got["tokens"] == r["tokens"]).all()
        np.testing.assert_allclose(got["load_fraction"], r["counts"] / r["counts"].sum(), rtol=1e-12)
        np.testing.assert_allclose(got["prob_sum"], r["probs"], rtol=1e-9)
        c = r["counts"]
        np.testing.assert_allclose(imb.loc[(step, layer), "max_vio"], (c.max() - c.mean()) / c.mean(), rtol=1e-12)
        np.testing.assert_allclose(imb.loc[(step, layer), "cv"], c.std() / c.mean(), rtol=1e-9)
    # counts add up to the whole run's: exact totals stay exact
    whole = expert_load(con, by_step=False)
    assert load.groupby(["layer", "expert"])["assigned"].sum().to_numpy().tolist() == whole["assigned"].tolist()


def test_losses_buckets_equal_numpy(con, routing):
    ref = numpy_buckets(routing, BUCKET)
    sw = switch_loss(con, by_step=True, step_bucket=BUCKET).set_index(["step", "layer"])
    z = z_loss(con, by_step=True, step_bucket=BUCKET).set_index(["step", "layer"])
    pooled = pooled_switch_loss(con, by_step=True, step_bucket=BUCKET).set_index("step")
    for (step, layer), r in ref.items():
        f, p = r["counts"] / r["counts"].sum(), r["probs"] / r["tokens"]
        np.testing.assert_allclose(sw.loc[(step, layer), "aux_loss"], E * f @ p, rtol=1e-9)
        np.testing.assert_allclose(z.loc[(step, layer), "z_loss"], r["z"] / r["tokens"], rtol=1e-9)
    for step in sorted({s for s, _ in ref}):
        a = sum(ref[(step, layer)]["counts"] for layer in range(L))
        pr = sum(ref[(step, layer)]["probs"] for layer in range(L))
        n = sum(ref[(step, layer)]["tokens"] for layer in range(L))
        np.testing.assert_allclose(pooled.loc[step, "aux_loss"], E * (a / n) @ (pr / n), rtol=1e-9)  # transformers'


def test_a_bucket_is_the_analysis_pooled_over_its_steps(con):
    sw = switch_loss(con, by_step=True, step_bucket=BUCKET)
    imb = imbalance(con, by_step=True, step_bucket=BUCKET)
    for lo in (0, 10, 20):
        hi = min(lo + BUCKET - 1, N_STEPS - 1)
        sel = Selection(steps=(lo, hi))
        want = switch_loss(con, sel, by_step=False)
        np.testing.assert_allclose(sw[sw.step == lo]["aux_loss"].to_numpy(), want["aux_loss"].to_numpy(), rtol=1e-12)
        want = imbalance(con, sel, by_step=False)
        np.testing.assert_allclose(imb[imb.step == lo]["max_vio"].to_numpy(), want["max_vio"].to_numpy(), rtol=1e-12)


def test_a_bucket_of_one_is_every_step(con):
    for fn in (expert_load, imbalance, switch_loss, pooled_switch_loss, z_loss):
        pd.testing.assert_frame_equal(fn(con, by_step=True, step_bucket=1), fn(con, by_step=True), obj=fn.__name__)


def test_step_tag_keeps_whole_steps_of_that_kind(con, routing):
    train = [s for s in range(N_STEPS) if s not in (3, 8, 13, 18)]
    ref = numpy_buckets(routing, BUCKET, steps_kept=train)
    sw = switch_loss(con, by_step=True, step_bucket=BUCKET, step_tag="train").set_index(["step", "layer"])
    z = z_loss(con, by_step=True, step_bucket=BUCKET, step_tag="train").set_index(["step", "layer"])
    assert len(sw) == len(ref)
    for (step, layer), r in ref.items():
        f, p = r["counts"] / r["counts"].sum(), r["probs"] / r["tokens"]
        np.testing.assert_allclose(sw.loc[(step, layer), "aux_loss"], E * f @ p, rtol=1e-9)
        np.testing.assert_allclose(z.loc[(step, layer), "z_loss"], r["z"] / r["tokens"], rtol=1e-9)
    per_step = switch_loss(con, by_step=True, step_tag="eval")
    assert sorted(per_step["step"].unique()) == [3, 8, 13, 18]


@pytest.mark.parametrize("bad", [0, -5, 2.5, "10", True])
def test_nonsense_buckets_are_refused(con, bad):
    with pytest.raises(StepBucketError):
        switch_loss(con, by_step=True, step_bucket=bad)


def test_a_bucket_needs_steps(con):
    with pytest.raises(StepBucketError, match="by_step"):
        imbalance(con, by_step=False, step_bucket=10)


def test_long_run_benchmark_runs_at_a_tiny_size(tmp_path, monkeypatch, capsys):
    """bench/bench_long_run.py cannot rot: at 1,600 steps every chart's 'after' row draws fewer points."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_long_run.py"
    spec = importlib.util.spec_from_file_location("_bench_long_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["bench_long_run.py", "--steps", "1600", "--layers", "2", "--experts", "4",
                                      "--repeat", "1", "--dir", str(tmp_path)])
    mod.main()
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "MB" in line]
    assert len(rows) == 2 * len(mod.CHARTS)
    points = {(r[2].strip(), r[3].strip()): int(r[5].strip().replace(",", "")) for r in rows}
    for (chart, when), n in points.items():
        assert n == (1600 if when == "before" else 800), (chart, when, n)
