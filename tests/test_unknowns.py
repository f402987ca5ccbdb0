"""Analyses on runs imported from engine logs: what the log holds is answered exactly, what it lacks raises
UnknownQuantityError (never zeros or NaN). References come from the routing the test generated."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeviz.analyses.aux_loss import pooled_switch_loss, switch_loss, z_loss
from moeviz.analyses.capacity import capacity_drops
from moeviz.analyses.load import expert_load, imbalance
from moeviz.analyses.specialization import (
    consecutive_agreement,
    domain_share_first_choice,
    layer_flow,
)
from moeviz.analyses.unknowns import UnknownQuantityError
from moeviz.importers import import_sglang, import_vllm
from moeviz.selection import Selection
from moeviz.store import open_store
from tests import engine_logs as gen
from tests.engine_logs import E, K


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    routes, counts, _ = gen.write_vllm(root / "r.jsonl", "lists")
    import_vllm(root / "r.jsonl", root / "run")
    con = open_store(root / "run")
    yield con, routes, counts
    con.close()


@pytest.fixture(scope="module")
def counts_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang")
    gen.write_sglang(root / "dump", "per_pass")
    import_sglang(root / "dump", root / "run")
    con = open_store(root / "run")
    yield con
    con.close()


@pytest.mark.parametrize("fn, needs", [(switch_loss, "probabilities"), (pooled_switch_loss, "probabilities"),
                                       (z_loss, "logits")])
def test_losses_say_why_they_cannot_answer(vllm_run, fn, needs):
    con, _, _ = vllm_run
    with pytest.raises(UnknownQuantityError, match=f"router's {needs}.*'run'.*vLLM routed experts"):
        fn(con, Selection())


def test_first_choice_analyses_say_why(vllm_run):
    con, _, _ = vllm_run
    for call in (lambda: domain_share_first_choice(con, Selection()), lambda: consecutive_agreement(con, Selection()),
                 lambda: layer_flow(con, Selection(), 0, 1), lambda: imbalance(con, Selection(), count="first_choice")):
        with pytest.raises(UnknownQuantityError, match="top choice"):
            call()


def test_probability_capacity_needs_weights(vllm_run):
    con, _, _ = vllm_run
    with pytest.raises(UnknownQuantityError, match="gate weights"):
        capacity_drops(con, Selection(), 1.0, policy="probability")


def test_load_is_exact_and_first_choice_stays_unknown(vllm_run):
    con, _, counts = vllm_run
    df = expert_load(con, Selection(), by_step=False).sort_values(["layer", "expert"])
    exp = counts.groupby(["layer", "expert"], as_index=False)["assigned"].sum()
    np.testing.assert_array_equal(df["assigned"].to_numpy(), exp["assigned"].to_numpy())
    assert df["first_choice"].isna().all() and df["prob_sum"].isna().all()
    tokens = counts.groupby("layer")["tokens"].first()
    np.testing.assert_array_equal(df.groupby("layer")["tokens"].first().to_numpy(), tokens.to_numpy())


def test_position_capacity_drops_match_the_generated_routing(vllm_run):
    con, _, counts = vllm_run
    got = capacity_drops(con, Selection(), 1.0, by=("layer",)).sort_values("layer")
    for layer, g in counts.groupby("layer"):  # one step: C = ceil(1.0 * tokens * k / E), drops max(0, n - C)
        c = math.ceil(1.0 * int(g["tokens"].iloc[0]) * K / E)
        want = int(np.maximum(g["assigned"].to_numpy() - c, 0).sum())
        assert int(got.loc[got.layer == layer, "dropped"].iloc[0]) == want


def test_count_dumps_cannot_answer_capacity_but_answer_load(counts_run):
    with pytest.raises(UnknownQuantityError, match="number of tokens"):
        capacity_drops(counts_run, Selection(), 1.0)
    df = expert_load(counts_run, Selection(), by_step=False)
    assert df["tokens"].isna().all() and df["token_share"].isna().all() and df["assigned"].sum() > 0


def test_health_says_which_checks_it_could_not_run(counts_run):
    from moeviz.analyses.health import health_summary

    df = health_summary(counts_run, Selection()).set_index("check")
    assert df.loc["collapsed_expert", "message"].startswith("not checked: the run holds no top choices")
    assert df.loc["capacity_drops", "message"].startswith("not checked:") and "tokens" in df.loc["capacity_drops", "message"]
    assert (df.loc[["collapsed_expert", "capacity_drops"], "severity"] == "ok").all()
