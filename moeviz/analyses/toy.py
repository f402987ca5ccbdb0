"""The 2-D toy Mixture of Experts from the blog post "Mixture of Experts" (moe.ipynb), for the dashboard.

Task: classify points of the plane as "first quadrant" (x > 0 and y > 0) or not, with noise near the edges.
One logistic regression cannot do it (the positive class is a corner); six logistic-regression experts mixed by
a softmax gate can.  Model, as in the post:

    f_i(x) = sigmoid(W_i . x + b_i)         i = 1..6    six logistic experts
    g(x)   = softmax(A x)                   A: 6 x 2    the linear gate ("a matrix": no bias)
    p(x)   = sum_i g_i(x) f_i(x)                        the dense MoE, trained jointly (full-batch L-BFGS on
                                                        the mean binary cross-entropy, exact gradients)

then sparsified two ways for k = 1..6:

- compile time: keep the same k experts for every input, those whose gate rows A_i have the largest L2 norm,
  and renormalise the gate over them (softmax over the kept rows).  k = 1 is a single logistic regression,
  hence a straight decision boundary.
- run time (sparsely-gated MoE): for each input keep the k largest gate logits A x, softmax over those.

The post does not give its data set or noise; here: points uniform on [-1, 1]^2, label 1 iff
min(x, y) + noise > 0 with Gaussian noise of standard deviation `noise` (so labels flip near the edges), and
accuracy measured on a fresh test set drawn the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moeviz.errors import MoevizError

N_EXPERTS = 6
WAYS = ("dense", "compile", "run")


class ToyInputError(MoevizError, ValueError):
    """Bad argument to toy_moe: says which and what is allowed."""


@dataclass(frozen=True)
class ToyParams:
    W: np.ndarray  # [E, 2] expert weights
    b: np.ndarray  # [E] expert biases
    A: np.ndarray  # [E, 2] gate matrix


@dataclass
class ToyResult:
    params: ToyParams
    accuracy: "object"  # pandas DataFrame (k, way, accuracy) on the test set; way in 'dense', 'compile', 'run'
    maps: dict = field(repr=False)  # (way, k) -> [grid, grid] predicted probability; row = y index, col = x index
    grid: np.ndarray = field(repr=False)  # [grid] coordinates along both axes
    points: "object" = field(repr=False)  # DataFrame x, y, label, split ('train'/'test')
    compile_order: np.ndarray = field(default=None)  # [E] experts by gate-row L2 norm, largest first
    train_loss: float = float("nan")


# ------------------------------------------------------------------------------------------------- the model


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def _softmax_masked(logits, keep):
    """Softmax over the entries where keep is True (others get exactly 0).  [N, E], [N, E] bool -> [N, E]"""
    z = np.where(keep, logits, -np.inf)
    z = z - z.max(axis=1, keepdims=True)
    e = np.where(keep, np.exp(z), 0.0)
    return e / e.sum(axis=1, keepdims=True)


def gate_weights(params: ToyParams, X: np.ndarray, way: str = "dense", k: int = N_EXPERTS) -> np.ndarray:
    """Mixing weights [N, E] of the dense, compile-time or run-time sparsified gate."""
    logits = X @ params.A.T  # [N, E]
    E = logits.shape[1]
    if way not in WAYS:
        raise ToyInputError(f"way must be one of {WAYS}, got {way!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= E:
        raise ToyInputError(f"k must be an integer between 1 and {E}, got {k!r}")
    if way == "dense":
        keep = np.ones_like(logits, dtype=bool)
    elif way == "compile":
        kept = compile_time_experts(params, k)
        keep = np.zeros_like(logits, dtype=bool)
        keep[:, kept] = True
    elif way == "run":
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # [N, k]
        keep = np.zeros_like(logits, dtype=bool)
        np.put_along_axis(keep, top, True, axis=1)
    return _softmax_masked(logits, keep)


def compile_time_experts(params: ToyParams, k: int) -> np.ndarray:
    """The k experts kept at compile time: largest gate-row L2 norm (the post's rule), ties to lower index."""
    norms = np.linalg.norm(params.A, axis=1)
    return np.argsort(-norms, kind="stable")[:k]


def predict(params: ToyParams, X: np.ndarray, way: str = "dense", k: int = N_EXPERTS) -> np.ndarray:
    """P(first quadrant) [N] of the mixture sparsified `way` at k experts."""
    experts = _sigmoid(X @ params.W.T + params.b)  # [N, E]
    return np.sum(gate_weights(params, X, way, k) * experts, axis=1)


# ---------------------------------------------------------------------------------------------------- training


def toy_data(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points uniform on [-1, 1]^2 [n, 2] and labels [n]: 1 iff min(x, y) + N(0, noise^2) > 0."""
    X = rng.uniform(-1.0, 1.0, size=(n, 2))
    y = (X.min(axis=1) + noise * rng.standard_normal(n) > 0).astype(float)
    return X, y


def _unpack(theta, E):
    W = theta[: 2 * E].reshape(E, 2)
    b = theta[2 * E : 3 * E]
    A = theta[3 * E :].reshape(E, 2)
    return W, b, A


def _loss_and_grad(theta, X, y, E, l2):
    """Mean binary cross-entropy of the dense mixture and its exact gradient."""
    W, b, A = _unpack(theta, E)
    e = _sigmoid(X @ W.T + b)  # [N, E] expert outputs
    g = _softmax_masked(X @ A.T, np.ones((len(X), E), dtype=bool))  # [N, E] gate
    p = np.clip(np.sum(g * e, axis=1), 1e-12, 1 - 1e-12)  # [N]
    N = len(X)
    loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)) + 0.5 * l2 * float(theta @ theta)
    dp = (p - y) / (p * (1 - p)) / N  # [N] dL/dp
    dz = dp[:, None] * g * e * (1 - e)  # [N, E] dL/d(expert logit)
    dgl = dp[:, None] * g * (e - p[:, None])  # [N, E] dL/d(gate logit)
    grad = np.concatenate([(dz.T @ X).ravel(), dz.sum(axis=0), (dgl.T @ X).ravel()]) + l2 * theta
    return loss, grad


def train_toy(X, y, *, seed=0, n_experts=N_EXPERTS, l2=1e-4, maxiter=2000) -> tuple[ToyParams, float]:
    """Jointly fit experts and gate (L-BFGS from a seeded random start); deterministic given the seed."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    theta0 = rng.normal(0.0, 1.0, size=5 * n_experts)
    res = minimize(_loss_and_grad, theta0, args=(X, y, n_experts, l2), jac=True, method="L-BFGS-B",
                   options={"maxiter": maxiter})
    W, b, A = _unpack(res.x, n_experts)
    return ToyParams(W=W.copy(), b=b.copy(), A=A.copy()), float(res.fun)


# ------------------------------------------------------------------------------------------------- the result


def toy_moe(seed: int = 0, n_points: int = 1000, grid: int = 101, *, noise: float = 0.1, n_test: int = 4000,
            extent: float = 1.0) -> ToyResult:
    """Train the toy MoE and sparsify it both ways for k = 1..6: accuracy table, decision maps, points."""
    import pandas as pd

    if n_points < 10:
        raise ToyInputError(f"n_points must be >= 10, got {n_points}")
    if grid < 2:
        raise ToyInputError(f"grid must be >= 2, got {grid}")
    if not noise >= 0:
        raise ToyInputError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    X, y = toy_data(n_points, noise, rng)
    X_test, y_test = toy_data(n_test, noise, rng)
    params, train_loss = train_toy(X, y, seed=seed)

    rows = [{"k": N_EXPERTS, "way": "dense", "accuracy": _accuracy(params, X_test, y_test, "dense", N_EXPERTS)}]
    for way in ("compile", "run"):
        for k in range(1, N_EXPERTS + 1):
            rows.append({"k": k, "way": way, "accuracy": _accuracy(params, X_test, y_test, way, k)})
    accuracy = pd.DataFrame(rows)

    axis, maps = decision_maps(params, grid, extent)
    points = pd.concat(
        [
            pd.DataFrame({"x": X[:, 0], "y": X[:, 1], "label": y.astype(int), "split": "train"}),
            pd.DataFrame({"x": X_test[:, 0], "y": X_test[:, 1], "label": y_test.astype(int), "split": "test"}),
        ],
        ignore_index=True,
    )
    order = compile_time_experts(params, N_EXPERTS)
    return ToyResult(params=params, accuracy=accuracy, maps=maps, grid=axis, points=points,
                     compile_order=order, train_loss=train_loss)


def decision_maps(params: ToyParams, grid: int, extent: float = 1.0) -> tuple[np.ndarray, dict]:
    """P(class 1) on a grid x grid plane over [-extent, extent]^2 for the dense model and both sparsifications at
    every k: (axis [grid], {(way, k): [grid, grid], row = y, column = x}). Separate from `toy_moe` so that a new
    resolution redraws the maps of an already fitted model (the dashboard's resolution slider)."""
    axis = np.linspace(-extent, extent, grid)  # [grid]
    gx, gy = np.meshgrid(axis, axis)  # [grid, grid]; row = y, column = x
    G = np.column_stack([gx.ravel(), gy.ravel()])  # [grid^2, 2]
    maps = {("dense", N_EXPERTS): predict(params, G).reshape(grid, grid)}
    for way in ("compile", "run"):
        for k in range(1, N_EXPERTS + 1):
            maps[(way, k)] = predict(params, G, way, k).reshape(grid, grid)
    return axis, maps


def _accuracy(params, X, y, way, k) -> float:
    return float(np.mean((predict(params, X, way, k) > 0.5) == (y > 0.5)))


def maps_frame(result: ToyResult):
    """Long DataFrame (way, k, x, y, prob) of all decision maps, for plotting facets."""
    import pandas as pd

    gx, gy = np.meshgrid(result.grid, result.grid)
    frames = [
        pd.DataFrame({"way": way, "k": k, "x": gx.ravel(), "y": gy.ravel(), "prob": m.ravel()})
        for (way, k), m in result.maps.items()
    ]
    return pd.concat(frames, ignore_index=True)
