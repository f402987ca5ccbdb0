"""Balancing over time: load.max_violation, balancing.expert_bias / bias_summary and the SQL of
aux_loss.sequence_balance_loss, against numpy over the arrays the store was built from and hand-computed rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeviz.analyses.aux_loss import sequence_balance_loss
from moeviz.analyses.balancing import bias_summary, expert_bias, max_vio_summary
from moeviz.analyses.load import AnalysisError, max_violation
from moeviz.selection import Selection
from moeviz.testing import _insert, store_from_routing


def _routing(seed=0, tokens=240, layers=3, experts=6, k=2, steps=4):
    rng = np.random.default_rng(seed)
    scores = rng.random((tokens, layers, experts)) - 0.6 * np.arange(experts) / experts
    index = np.argsort(-scores, -1)[..., :k]  # [T, L, k]
    step = np.repeat(np.arange(steps), tokens // steps)  # [T]
    return index, step, experts


def test_max_violation_per_step_and_over_the_selection_equals_numpy():
    index, step, experts = _routing()
    con = store_from_routing(index, steps=step, n_experts=experts)
    per_step = max_violation(con)
    for (s, layer), row in per_step.set_index(["step", "layer"]).iterrows():
        load = np.bincount(index[step == s, layer].ravel(), minlength=experts)
        assert row.max_vio == pytest.approx(load.max() / load.mean() - 1)
    whole = max_violation(con, Selection(steps=(1, 3)), by_step=False).set_index("layer")
    for layer in range(index.shape[1]):
        load = np.bincount(index[step >= 1, layer].ravel(), minlength=experts)
        assert whole.loc[layer, "max_vio"] == pytest.approx(load.max() / load.mean() - 1)
    # the MaxVio of summed batches is at most the largest per-batch one
    assert (whole.max_vio <= per_step[per_step.step >= 1].groupby("layer").max_vio.max() + 1e-12).all()
    assert list(per_step.columns) == ["run_id", "step", "layer", "tokens", "assignments", "max_vio"]


def test_expert_bias_mean_over_ranks_spread_buckets_and_summary():
    index, step, experts = _routing(steps=2)
    con = store_from_routing(index, steps=step, n_experts=experts)
    rng = np.random.default_rng(1)
    bias = rng.normal(size=(5, 2, experts)) * 0.1  # [steps, layers, E]
    rows = {k: [] for k in ("run_id", "step", "rank", "layer", "expert", "bias")}
    for s in range(5):
        for layer in range(2):
            for rank in range(2):
                for e in range(experts):
                    off = 1e-3 if (rank == 1 and s == 3 and layer == 0 and e == 0) else 0.0  # ranks disagree once
                    for key, v in zip(rows, ("run0", s, rank, layer, e, bias[s, layer, e] + off)):
                        rows[key].append(v)
    _insert(con, "expert_bias", {k: np.array(v) if k != "run_id" else v for k, v in rows.items()})
    got = expert_bias(con)
    assert len(got) == 5 * 2 * experts
    g = got.set_index(["step", "layer", "expert"])
    assert g.loc[(2, 1, 3), "bias"] == pytest.approx(bias[2, 1, 3])
    assert g.loc[(3, 0, 0), "bias"] == pytest.approx(bias[3, 0, 0] + 5e-4)
    assert g.loc[(3, 0, 0), "rank_spread"] == pytest.approx(1e-3) and g.rank_spread.drop((3, 0, 0)).max() == 0
    bucketed = expert_bias(con, Selection(layers=(1,)), step_bucket=2).set_index(["step", "expert"])
    assert sorted(set(bucketed.index.get_level_values(0))) == [0, 2, 4]
    assert bucketed.loc[(2, 4), "bias"] == pytest.approx(bias[2:4, 1, 4].mean())
    assert (bucketed.rank_spread == 0).all()  # the ranks agree at every step, though the bias moves between steps
    layer0 = expert_bias(con, Selection(layers=(0,)), step_bucket=2).set_index(["step", "expert"])
    assert layer0.loc[(2, 0), "rank_spread"] == pytest.approx(1e-3) and layer0.rank_spread.drop((2, 0)).max() == 0
    summary = bias_summary(con, Selection(steps=(1, 4))).set_index("layer")
    for layer in range(2):
        assert summary.loc[layer, "spread_first"] == pytest.approx(np.ptp(bias[1, layer]))
        last = bias[4, layer]
        assert summary.loc[layer, "spread_last"] == pytest.approx(np.ptp(last))
        assert summary.loc[layer, "mean_abs_change"] == pytest.approx(np.abs(last - bias[1, layer]).mean())
    # a run without bias: empty, not an error
    empty = store_from_routing(index, steps=step, n_experts=experts)
    assert expert_bias(empty).empty and bias_summary(empty).empty
    with pytest.raises(AnalysisError):
        expert_bias(con, Selection(domains=("code",)))


def test_sequence_balance_loss_sql_by_hand():
    """Rows written by hand: two stacks of two layers, two ranks, two steps. Per layer: sums over ranks and steps
    / sequences; pooled Switch: the stack-pooled sum of the last selected layer of each stack; pooled DeepSeek:
    the mean of the selected layers' values."""
    index, step, experts = _routing(layers=4, steps=2)
    con = store_from_routing(index, steps=step, n_experts=experts)
    con.execute("UPDATE layers SET stack = CASE WHEN layer < 2 THEN 'encoder' ELSE 'decoder' END")
    rows = []
    rng = np.random.default_rng(2)
    for s in range(2):
        for rank in range(2):
            for layer in range(4):
                n = 3 + rank
                rows.append(dict(run_id="run0", step=s, rank=rank, layer=layer, sequences=n,
                                 switch_sum=n * rng.uniform(1, 2), switch_stack_sum=n * rng.uniform(1, 2),
                                 seq_aux_sum=n * rng.uniform(1, 2)))
    df = pd.DataFrame(rows)
    _insert(con, "balance_stats", {c: df[c].to_numpy() if c != "run_id" else df[c].tolist() for c in df.columns})
    per_layer = sequence_balance_loss(con, by_step=False)
    for layer in range(4):
        d = df[df.layer == layer]
        for conv, col in (("switch", "switch_sum"), ("deepseek_v3_seq", "seq_aux_sum")):
            got = per_layer[(per_layer.layer == layer) & (per_layer.convention == conv)].iloc[0]
            assert got.aux_loss == pytest.approx(d[col].sum() / d.sequences.sum()) and got.sequences == 14
    by_step = sequence_balance_loss(con)
    assert set(by_step.step) == {0, 1} and (by_step.scope == "layer").all()
    pooled = sequence_balance_loss(con, Selection(layers=(0, 2)), pooled=True, by_step=False)
    sw = pooled[pooled.convention == "switch"].set_index("stack")
    enc = df[df.layer == 0]
    assert sw.loc["encoder", "aux_loss"] == pytest.approx(enc.switch_stack_sum.sum() / enc.sequences.sum())
    assert (sw.loc["encoder", "first_layer"], sw.loc["encoder", "last_layer"]) == (0, 0)
    assert (sw.loc["decoder", "first_layer"], sw.loc["decoder", "last_layer"]) == (2, 2)
    whole = sequence_balance_loss(con, pooled=True, by_step=False)
    ds = whole[whole.convention == "deepseek_v3_seq"].set_index("stack")
    dec = df[df.layer >= 2].groupby("layer")[["seq_aux_sum", "sequences"]].sum()
    assert ds.loc["decoder", "aux_loss"] == pytest.approx((dec.seq_aux_sum / dec.sequences).mean())
    sw = whole[whole.convention == "switch"].set_index("stack")
    last = df[df.layer == 3]
    assert sw.loc["decoder", "aux_loss"] == pytest.approx(last.switch_stack_sum.sum() / last.sequences.sum())
    assert sequence_balance_loss(store_from_routing(index, steps=step, n_experts=experts)).empty


def test_max_vio_summary_global_and_per_step_equal_numpy():
    index, step, experts = _routing(seed=3)
    con = store_from_routing(index, steps=step, n_experts=experts)
    got = max_vio_summary(con).set_index("layer")
    for layer in range(index.shape[1]):
        per_step = []
        for s in range(4):
            load = np.bincount(index[step == s, layer].ravel(), minlength=experts)
            per_step.append(load.max() / load.mean() - 1)
        load = np.bincount(index[:, layer].ravel(), minlength=experts)
        row = got.loc[layer]
        assert row.global_max_vio == pytest.approx(load.max() / load.mean() - 1) and row.steps == 4
        assert row.step_mean_max_vio == pytest.approx(np.mean(per_step))
        assert row.step_max_max_vio == pytest.approx(np.max(per_step))
    assert max_vio_summary(con, Selection(steps=(100, 200))).empty
