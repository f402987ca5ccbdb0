"""Smoke test of bench/findings.py (the script behind docs/findings.md) on a tiny real run folder, with the
numbers it reports checked against brute force in numpy on the routing arrays the store was written from."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
E, K, L, SEQ_LEN = 4, 2, 2, 16
DOMAINS = ("code", "en", "it", "math")
# step -> tag: eval first and last, a fixed probe batch twice, train in between
TAGS = {0: "eval", 1: "probe", **{s: "train" for s in range(2, 9)}, 9: "probe", 10: "eval"}
SEQS = 8  # two sequences per domain per step


def _load_script():
    spec = importlib.util.spec_from_file_location("_bench_findings", ROOT / "bench" / "findings.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _routing(seed: int = 0) -> dict:
    """Layer 0 routes at random; layer 1 sends domain d to expert d first and d+1 second (a planted specialist)."""
    rng = np.random.default_rng(seed)
    steps, seqs, pos = np.meshgrid(sorted(TAGS), np.arange(SEQS), np.arange(SEQ_LEN), indexing="ij")
    steps, seqs, pos = steps.ravel(), seqs.ravel(), pos.ravel()  # [T]
    dom = seqs % len(DOMAINS)  # [T]
    logits = rng.standard_normal((len(steps), L, E))  # [T, L, E]
    logits[np.arange(len(steps)), 1, dom] += 10.0
    logits[np.arange(len(steps)), 1, (dom + 1) % E] += 5.0
    index = np.argsort(-logits, axis=-1, kind="stable")[..., :K]  # [T, L, k]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    weights = np.take_along_axis(probs, index, axis=-1)  # [T, L, k]
    return {"logits": logits, "index": index, "weights": weights, "steps": steps, "seqs": seqs, "pos": pos,
            "token_ids": seqs * SEQ_LEN + pos, "domains": np.asarray(DOMAINS, dtype=object)[dom],
            "tags": np.asarray([TAGS[s] for s in steps], dtype=object)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_app import write_run_dir

    routing = _routing()
    root = tmp_path_factory.mktemp("findings")
    vocab = [str(i) if i % 3 == 0 else f"w{i}" for i in range(SEQS * SEQ_LEN)]
    write_run_dir(root / "tiny", routing, run_id="tiny", vocab=vocab)
    return root, routing


@pytest.fixture(scope="module")
def results(store):
    from moeviz.store import open_store

    return _load_script().compute(open_store(store[0]), shuffles=20)


def test_every_section_is_computed(results):
    for name in ("specialization", "nmi", "balance", "pooled", "bound", "capacity", "capacity_train", "saturation",
                 "agreement", "domain_tokens", "digits_outside_math"):
        assert len(results[name]), name
    assert results["bound"].infimum.iloc[0] < 1.0  # the true Switch-loss floor for E=4, k=2 is below 1


def test_planted_specialist_is_found(results):
    spec = results["specialization"].set_index(["layer", "domain"])
    for d, name in enumerate(DOMAINS):
        row = spec.loc[(1, name)]
        assert row.top_experts.startswith(f"E{d} 100%")
        assert row.top_allk_ratio == pytest.approx(1.0 / (K / E))  # expert d takes every token: share 1 vs k/E
    nmi = results["nmi"].set_index("layer")
    assert nmi.loc[1, "nmi_first"] == pytest.approx(1.0)
    assert nmi.loc[1, "shuffled_mean"] < 0.9  # shuffled labels break the expert <-> domain map
    assert nmi.loc[0, "nmi_first"] < nmi.loc[1, "nmi_first"]


def test_balance_matches_numpy(results, store):
    """Mean over the last 20% of train steps of the per-step max/mean load, brute force from the index array."""
    _, r = store
    train = sorted(s for s, t in TAGS.items() if t == "train")
    late = train[-math.ceil(0.2 * len(train)):]
    bal = results["balance"].set_index("layer")
    for layer in range(L):
        ratios = []
        for s in late:
            counts = np.bincount(r["index"][r["steps"] == s, layer].ravel(), minlength=E)
            ratios.append(counts.max() / counts.mean())
        assert bal.loc[layer, "max_over_mean"] == pytest.approx(np.mean(ratios))


def test_capacity_matches_numpy(results, store):
    """Eval (last checkpoint) drops at CF 1.0, one group per step: sum over experts of max(0, n - C)."""
    _, r = store
    last_eval = max(s for s, t in TAGS.items() if t == "eval")
    cap = results["capacity"]
    for layer in range(L):
        idx = r["index"][r["steps"] == last_eval, layer]  # [T, k]
        c = math.ceil(1.0 * len(idx) * K / E)
        dropped = np.maximum(np.bincount(idx.ravel(), minlength=E) - c, 0).sum()
        row = cap[(cap.capacity_factor == 1.0) & (cap.policy == "position") & (cap.layer == layer)]
        assert row.drop_rate.iloc[0] == pytest.approx(dropped / idx.size)


def test_main_prints_every_table(store, capsys):
    assert _load_script().main([str(store[0]), "--shuffles", "3"]) == 0
    out = capsys.readouterr().out
    assert "## nmi" in out and "## capacity" in out and "| tiny |" in out


def test_expert_parallel_contiguous_matches_numpy(results, store):
    """Busiest of 4 GPUs over the mean GPU, contiguous (expert e on GPU e * 4 // E), per late train step, averaged;
    the balanced placements are never worse than contiguous on the steps they were fitted on."""
    _, r = store
    train = sorted(s for s, t in TAGS.items() if t == "train")
    late = train[-math.ceil(0.2 * len(train)):]
    ep = results["expert_parallel"].set_index("layer")
    for layer in range(L):
        ratios = []
        for s in late:
            counts = np.bincount(r["index"][r["steps"] == s, layer].ravel(), minlength=E)
            per_gpu = np.bincount(np.arange(E) * 4 // E, weights=counts, minlength=4)
            ratios.append(per_gpu.max() / per_gpu.mean())
        assert ep.loc[layer, "contiguous"] == pytest.approx(np.mean(ratios))
    assert (ep["balanced_r2"] <= ep["balanced"] + 1e-9).all() and (ep["gpus"] == 4).all()
