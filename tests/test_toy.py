"""moeviz.analyses.toy: the blog's 2-D toy MoE, checked against hand-written references (no use of the module's own
gate code for the expected values)."""

from __future__ import annotations

import numpy as np
import pytest

from moeviz.analyses.toy import ToyInputError, ToyParams, _loss_and_grad, maps_frame, predict, toy_data, toy_moe


@pytest.fixture(scope="module")
def res():
    return toy_moe(seed=0, n_points=600, grid=61)


def sig(z):
    return 1 / (1 + np.exp(-z))


def ref_predict(p: ToyParams, x, kept):
    """Mixture restricted to the experts in `kept` for one point x, written out by hand."""
    logits = {i: float(p.A[i] @ x) for i in kept}
    m = max(logits.values())
    den = sum(np.exp(v - m) for v in logits.values())
    return sum(np.exp(logits[i] - m) / den * sig(p.W[i] @ x + p.b[i]) for i in kept)


def acc(res, way, k):
    a = res.accuracy
    return float(a[(a.way == way) & (a.k == k)].accuracy.iloc[0])


def test_dense_accuracy_high(res):
    assert acc(res, "dense", 6) >= 0.9
    assert set(res.accuracy.way) == {"dense", "compile", "run"}
    assert len(res.accuracy) == 13


def test_all_six_experts_equals_dense_exactly(res):
    assert np.array_equal(res.maps[("run", 6)], res.maps[("dense", 6)])
    assert np.allclose(res.maps[("compile", 6)], res.maps[("dense", 6)], atol=1e-15, rtol=0)
    assert acc(res, "run", 6) == acc(res, "dense", 6) == acc(res, "compile", 6)


def test_predictions_match_hand_written_mixture(res):
    p = res.params
    rng = np.random.default_rng(1)
    X = rng.uniform(-1, 1, size=(25, 2))
    norms = np.linalg.norm(p.A, axis=1)
    for k in range(1, 7):
        compile_kept = sorted(range(6), key=lambda i: -norms[i])[:k]
        got_c, got_r = predict(p, X, "compile", k), predict(p, X, "run", k)
        for n, x in enumerate(X):
            run_kept = sorted(range(6), key=lambda i: -(p.A[i] @ x))[:k]
            assert got_c[n] == pytest.approx(ref_predict(p, x, compile_kept), abs=1e-12)
            assert got_r[n] == pytest.approx(ref_predict(p, x, run_kept), abs=1e-12)
    assert list(res.compile_order) == sorted(range(6), key=lambda i: -norms[i])


def test_compile_time_k1_is_one_logistic_regression_with_a_straight_boundary(res):
    i = int(res.compile_order[0])
    gx, gy = np.meshgrid(res.grid, res.grid)
    lin = res.params.W[i, 0] * gx + res.params.W[i, 1] * gy + res.params.b[i]
    assert np.allclose(res.maps[("compile", 1)], sig(lin), atol=1e-12)
    clear = np.abs(lin) > 1e-9
    assert np.array_equal((res.maps[("compile", 1)] > 0.5)[clear], (lin > 0)[clear])
    # the 0.5 contour, located from the map alone by interpolating along rows, lies on one line
    pts = []
    m = res.maps[("compile", 1)] - 0.5
    for r in range(len(res.grid)):
        s = np.flatnonzero(np.diff(np.sign(m[r])) != 0)
        for c in s:
            t = m[r, c] / (m[r, c] - m[r, c + 1])
            pts.append((res.grid[c] + t * (res.grid[c + 1] - res.grid[c]), res.grid[r]))
    if len(pts) >= 3:
        P = np.array(pts)
        centred = P - P.mean(axis=0)
        sv = np.linalg.svd(centred, compute_uv=False)
        assert sv[-1] / sv[0] < 0.02  # collinear up to interpolation error


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    X, y = toy_data(50, 0.1, rng)
    theta = rng.normal(size=30)
    _, g = _loss_and_grad(theta, X, y, 6, 1e-3)
    h = 1e-6
    def loss(t):
        return _loss_and_grad(t, X, y, 6, 1e-3)[0]

    num = np.array([(loss(theta + h * e) - loss(theta - h * e)) / (2 * h) for e in np.eye(30)])
    assert np.allclose(g, num, atol=1e-6)


def test_blog_claims_that_hold_for_this_seed(res):
    dense = acc(res, "dense", 6)
    assert acc(res, "compile", 1) < dense - 0.1  # one expert = a linear classifier: not enough
    assert acc(res, "run", 1) > dense - 0.02  # run-time top-1 already usable
    assert acc(res, "run", 2) > dense - 0.01  # run-time top-2 indistinguishable
    for k in (3, 4, 5):
        assert acc(res, "compile", k) > dense - 0.01  # compile-time k >= 3 indistinguishable


def test_deterministic_given_seed():
    a = toy_moe(seed=3, n_points=300, grid=11)
    b = toy_moe(seed=3, n_points=300, grid=11)
    assert a.accuracy.equals(b.accuracy)
    assert np.array_equal(a.maps[("run", 1)], b.maps[("run", 1)])


def test_maps_and_points_shapes(res):
    assert res.maps[("run", 3)].shape == (61, 61)
    assert len(res.maps) == 13
    df = maps_frame(res)
    assert len(df) == 13 * 61 * 61 and set(df.columns) == {"way", "k", "x", "y", "prob"}
    assert set(res.points.split) == {"train", "test"} and set(res.points.label) <= {0, 1}
    assert ((res.maps[("dense", 6)] >= 0) & (res.maps[("dense", 6)] <= 1)).all()


@pytest.mark.parametrize("kw", [dict(n_points=3), dict(grid=1), dict(noise=-1.0)])
def test_bad_input(kw):
    with pytest.raises(ToyInputError):
        toy_moe(**kw)


def test_bad_way_or_k(res):
    X = np.zeros((2, 2))
    with pytest.raises(ToyInputError):
        predict(res.params, X, "sometimes", 2)
    with pytest.raises(ToyInputError):
        predict(res.params, X, "run", 7)


def test_decision_maps_at_a_new_resolution_are_the_models_predictions():
    """The dashboard redraws the maps of a fitted model at another resolution: each cell must be predict() at that
    cell's (x, y), row = y and column = x."""
    from moeviz.analyses.toy import decision_maps

    fitted = toy_moe(seed=1, n_points=300, grid=5)
    axis, maps = decision_maps(fitted.params, 7)
    assert axis.tolist() == np.linspace(-1, 1, 7).tolist() and len(maps) == 13
    for (way, k), grid in maps.items():
        for i, j in ((0, 6), (3, 1), (6, 4)):
            want = predict(fitted.params, np.array([[axis[j], axis[i]]]), way, k)[0]
            assert grid[i, j] == want
