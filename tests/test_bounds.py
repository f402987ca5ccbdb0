"""moeviz.analyses.bounds against independent references: hand constructions, exhaustive search over designs with an LP
per token (scipy linprog, which does not know the vertex lemma), global optimisation of softmax logits."""

from __future__ import annotations

import itertools
import subprocess
import sys
import timeit
from fractions import Fraction

import numpy as np
import pytest
from scipy.optimize import dual_annealing, linprog

from moeviz.analyses.bounds import BoundInputError, aux_loss_infimum, blog_construction
from moeviz.cli import main as cli_main


def loss_ref(weights, k):
    """Independent L = E sum f_i P_i with each row's own top-k (ties to the lower index)."""
    w = np.asarray(weights, float)
    T, E = w.shape
    counts = np.zeros(E)
    for row in w:
        order = sorted(range(E), key=lambda i: (-row[i], i))
        for i in order[:k]:
            counts[i] += 1
    return E * float(np.sum(counts / (T * k) * w.mean(axis=0)))


def strict_topk_ok(w, k):
    s = np.sort(w, axis=1)[:, ::-1]
    return k == w.shape[1] or bool(np.all(s[:, k - 1] > s[:, k]))


# ------------------------------------------------------------------------------ hand constructions from the brief


def test_e2_three_to_one_split_gives_seven_eighths():
    eps = 1e-7
    w = np.array([[0.5 + eps, 0.5 - eps]] * 3 + [[0.0, 1.0]])
    assert loss_ref(w, 1) == pytest.approx(7 / 8, abs=1e-6)
    r = aux_loss_infimum(2, 1, 4)
    assert r.fraction == Fraction(7, 8)
    assert aux_loss_infimum(2, 1).fraction == Fraction(7, 8)


def test_e8_top1_goes_below_half():
    r = aux_loss_infimum(8, 1)
    assert r.value < 0.5
    assert loss_ref(r.weights, 1) < 0.5
    # hand construction: 4 experts take one token each, every token spreads 1/5 over its expert + 4 idle ones
    w = np.zeros((4, 8))
    for t in range(4):
        w[t, 4:] = 0.2 - 1e-7
        w[t, t] = 0.2 + 4e-7
    assert loss_ref(w, 1) == pytest.approx(0.4, abs=1e-5)
    assert r.value == pytest.approx(0.4)


def test_blog_construction_value_and_position():
    b = blog_construction(3, 4, eps=1e-3)  # the blog's 4 x 3 example: L = 3/4 (1 + 2 eps)
    assert loss_ref(b.weights, 1) == pytest.approx(0.75 * (1 + 2e-3))
    for E in range(2, 25):
        b = blog_construction(E)
        assert b.value == pytest.approx(E / (2 * (E - 1)))
        assert loss_ref(b.weights, 1) == pytest.approx(E * (0.5 + 1e-3) / (E - 1))
        assert aux_loss_infimum(E, 1).value <= b.value + 1e-12
    assert aux_loss_infimum(6, 1).fraction == Fraction(1, 2)  # E = 6 already reaches 1/2 ...
    assert aux_loss_infimum(7, 1).value < 0.5  # ... and E >= 7 goes below it


# ------------------------------------------------------------------- exhaustive search with an LP for every token


def token_lp_min(n, S):
    """min <n, p> over {p in simplex : p_i >= p_j for i in S, j not in S}, solved as an LP."""
    E = len(n)
    rows = []
    for i in S:
        for j in range(E):
            if j not in S:
                row = np.zeros(E)
                row[j], row[i] = 1.0, -1.0  # p_j - p_i <= 0
                rows.append(row)
    res = linprog(
        np.asarray(n, float),
        A_ub=np.array(rows) if rows else None,
        b_ub=np.zeros(len(rows)) if rows else None,
        A_eq=np.ones((1, E)),
        b_eq=[1.0],
        bounds=[(0, 1)] * E,
        method="highs",
    )
    assert res.status == 0
    return res.fun


def brute_force_infimum(E, k, T):
    subsets = list(itertools.combinations(range(E), k))
    cache, best = {}, np.inf
    for design in itertools.combinations_with_replacement(range(len(subsets)), T):
        n = [0] * E
        for d in design:
            for i in subsets[d]:
                n[i] += 1
        total = 0.0
        for d in design:
            key = (tuple(n), d)
            if key not in cache:
                cache[key] = token_lp_min(n, subsets[d])
            total += cache[key]
        best = min(best, E / (k * T * T) * total)
    return best


CASES = [(2, 1, T) for T in range(1, 9)] + [(3, 1, T) for T in range(1, 7)] + [(4, 1, T) for T in range(1, 6)]
CASES += [(3, 2, T) for T in range(1, 6)] + [(4, 2, T) for T in range(1, 5)] + [(5, 2, 3), (4, 3, 3), (5, 3, 3)]


@pytest.mark.parametrize("E,k,T", CASES)
def test_matches_exhaustive_search_with_lp(E, k, T):
    assert aux_loss_infimum(E, k, T).value == pytest.approx(brute_force_infimum(E, k, T), abs=1e-8)


def vertex_cost(n, S):
    """Independent float version of the vertex lemma, for bigger exhaustive searches (k = 1 partitions)."""
    others = sorted(n[j] for j in range(len(n)) if j not in S)
    s, c = sum(n[i] for i in S), len(S)
    best = s / c
    for u in others:
        s, c = s + u, c + 1
        best = min(best, s / c)
    return min(best, min(n[i] for i in S)) if len(S) > 1 else best


def partitions(T, E, top=None):
    top = T if top is None else top
    if E == 0:
        if T == 0:
            yield ()
        return
    for v in range(min(T, top), -1, -1):
        if v * E >= T:
            for rest in partitions(T - v, E - 1, v):
                yield (v,) + rest


@pytest.mark.parametrize("E", [3, 4, 5, 6, 7, 8])
def test_top1_matches_search_over_all_count_vectors(E):
    for T in range(1, 19):
        best = min(
            E / T**2 * sum(n[i] * vertex_cost(n, (i,)) for i in range(E)) for n in partitions(T, E)
        )
        assert aux_loss_infimum(E, 1, T).value == pytest.approx(best, abs=1e-9), (E, T)


# --------------------------------------------------------------------------------- global optimisation of logits


def loss_of_logits(x, T, E, k):
    """L of softmax(logits) with the rows' own top-k (vectorised twin of loss_ref, for the optimiser)."""
    z = x.reshape(T, E)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    chosen = np.argsort(-p, axis=1, kind="stable")[:, :k]
    counts = np.bincount(chosen.ravel(), minlength=E)
    return E * float(np.dot(counts / (T * k), p.mean(axis=0)))


@pytest.mark.parametrize("E,k,T", [(2, 1, 4), (4, 2, 3), (6, 1, 3)])
def test_global_optimisation_of_logits_never_beats_and_nearly_reaches(E, k, T):
    inf = aux_loss_infimum(E, k, T).value
    res = dual_annealing(loss_of_logits, [(-4, 4)] * (T * E), args=(T, E, k), seed=0, maxiter=400)
    found = loss_ref(_softmax(res.x.reshape(T, E)), k)  # recomputed independently from the returned logits
    assert min(found, res.fun) >= inf - 1e-12  # nothing a router can do beats the infimum
    assert found <= inf + 0.05  # and a blind global search gets close to it (blog: dual annealing)
    assert found < 1.0 - 0.05  # far below Switch's claimed minimum


def _softmax(z):
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------- the returned batch itself


@pytest.mark.parametrize(
    "E,k,T", [(2, 1, 4), (8, 1, None), (5, 2, 4), (16, 2, None), (7, 3, 4), (32, 4, 100), (2, 2, 3)]
)
def test_returned_weights_attain_value_with_their_own_topk(E, k, T):
    r = aux_loss_infimum(E, k, T)
    w = r.weights
    assert w.shape == (r.tokens_used, E)
    assert np.all(w >= 0) and np.allclose(w.sum(axis=1), 1)
    assert strict_topk_ok(w, k)
    assert sorted(map(tuple, np.sort(r.chosen, axis=1))) == sorted(
        map(tuple, np.sort(np.argsort(-w, axis=1)[:, :k], axis=1))
    )
    assert np.array_equal(np.bincount(r.chosen.ravel(), minlength=E), r.counts)
    assert r.f.sum() == pytest.approx(1)
    assert loss_ref(w, k) == pytest.approx(r.value, abs=50 * r.eps)
    assert loss_ref(w, k) >= r.value - 1e-12


def test_uniform_routing_is_one_and_is_attained_only_when_k_equals_e():
    assert aux_loss_infimum(1, 1).value == 1.0
    assert aux_loss_infimum(3, 3, 5).value == pytest.approx(1.0)
    assert aux_loss_infimum(3, 3, 5).attained
    assert not aux_loss_infimum(3, 1, 5).attained  # needs ties: only a limit


# ---------------------------------------------------------------------------------------------------- properties


def test_between_zero_and_one_and_finite_t_not_below_any_t():
    for E in range(1, 10):
        for k in range(1, E + 1):
            inf_any = aux_loss_infimum(E, k).value
            assert 0 < inf_any <= 1
            for T in (1, 2, 3, 5, 8, 13):
                v = aux_loss_infimum(E, k, T).value
                assert inf_any - 1e-12 <= v <= 1 + 1e-12
            r = aux_loss_infimum(E, k)
            assert aux_loss_infimum(E, k, r.tokens_used).value == pytest.approx(r.value)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_non_increasing_in_experts(k):
    values = [aux_loss_infimum(E, k).value for E in range(k, 70)]
    assert all(a >= b - 1e-15 for a, b in zip(values, values[1:]))


def test_top1_closed_form_for_three_or_more_experts():
    for E in range(3, 60):
        best = min(Fraction(E, (E - z) * (1 + z)) for z in range(E))
        assert aux_loss_infimum(E, 1).fraction == best


@pytest.mark.parametrize(
    "bad", [dict(E=0), dict(E=4, k=5), dict(E=4, k=0), dict(E=4, T=0), dict(E=2.5), dict(E=4, T=-3)]
)
def test_bad_input_is_a_clear_error(bad):
    with pytest.raises(BoundInputError):
        aux_loss_infimum(bad["E"], bad.get("k", 1), bad.get("T"))


def test_fast_for_256_experts():
    for T in (None, 4096):
        for k in (1, 2):
            assert min(timeit.repeat(lambda: aux_loss_infimum(256, k, T), number=1, repeat=2)) < 2.0


# ----------------------------------------------------------------------------------------------------------- CLI


def test_cli_prints_bare_number_first(capsys):
    assert cli_main(["bound", "--experts", "2", "--top-k", "1", "--tokens", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert float(out[0]) == 0.875
    assert any("counts" in line for line in out)


def test_cli_json(capsys):
    import json

    assert cli_main(["bound", "--experts", "8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fraction"] == "2/5" and d["attained"] is False and sum(d["counts"]) == d["tokens_used"]


@pytest.mark.parametrize("argv", [["-E", "0"], ["-E", "4", "-k", "5"], ["-E", "4", "-T", "0"]])
def test_cli_bad_input_exits_2(argv, capsys):
    assert cli_main(["bound", *argv]) == 2
    assert "error" in capsys.readouterr().err


def test_table_script_runs():
    out = subprocess.run([sys.executable, "-m", "moeviz.analyses.bounds", "--table"], capture_output=True, text=True, check=True)
    assert "| 256 | 2 |" in out.stdout
