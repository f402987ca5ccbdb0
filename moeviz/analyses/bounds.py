"""The true lower bound (infimum) of the Switch load-balancing loss, and the constructions that reach it.

Setting.  E experts, top-k routing, a batch of T tokens.  Token t has a probability vector p_t in the simplex
(the router softmax over all E experts) and is sent to its k most probable experts S_t.  With
n_i = #{t : i in S_t} (assignments per expert, sum n_i = T*k),

    f_i = n_i / (T*k)            share of all assignments (uniform routing gives f_i = 1/E for every k)
    P_i = mean_t p_t[i]          mean router probability
    L   = E * sum_i f_i * P_i    (transformers' ``load_balancing_loss_func`` returns k times this)

Switch Transformers says L >= 1 (uniform routing); a popular blog post says the true floor for top-1 is 1/2.
Both are wrong; this module computes the infimum.

Ties.  A top-k choice is only defined when the k-th and (k+1)-th probabilities differ.  We take the infimum over
all batches: a tie may be broken in whichever way lowers L, because every tied configuration is the limit of
untied ones (move a hair of mass eps onto the chosen experts) and L is continuous in p for fixed choices.  So the
infimum is usually *not attained* by a router with a strict top-k: it is approached as eps -> 0.  The returned
``weights`` are such an eps-perturbed matrix, whose own strict top-k is ``chosen`` and whose loss is within
O(eps) of ``value``.

Reduction (proof sketch).
 1. Fix the chosen sets S_t, hence the counts n.  Then L = E/(k T^2) * sum_t <n, p_t> is linear in each p_t,
    and p_t ranges over the polytope Q(S) = {p in simplex : p_i >= p_j for i in S, j not in S}.  A linear
    function is minimised at a vertex.  Q(S) is the simplex slice of the cone of an order (every chosen expert
    above every unchosen one); its vertices are the uniform distributions on the up-sets of that order:
    uniform on a non-empty A subset of S, or uniform on S u U for any set U of unchosen experts.
 2. Hence a token's best cost is   v(S) = min( min_{i in S} n_i ,  min_U mean(n over S u U) ).
    The second term is a water level: the chosen experts pour their mass onto the unchosen experts with the
    fewest assignments, while those are below the current mean.  Never-chosen experts (n_j = 0) are free
    sinks: that is the whole trick behind both counter-examples to "1 is the minimum".
    For k = 1 the first term never helps; for k >= 2 it lets a token park all its mass on its least-loaded
    chosen expert (the other chosen experts get 0, tied with the unchosen ones).
 3. L = E/(k T^2) * sum_t v(S_t) is now a function of the design (the multiset of chosen sets) only.  We
    minimise it over three families of designs, each optimised exactly (closed form over one integer):
      - "pour":  h experts share the T*k assignments as evenly as possible, the other z = E - h are never
        chosen; every token spreads its mass evenly over its k chosen experts and all z idle experts.
        Continuum value  E k / (h (k + z)),  best at z ~ (E - k) / 2, i.e. about 4 E k / (E + k)^2 -> 0.
      - "park" (k >= 2): k - 1 experts are chosen by every token; the last slot is spread evenly over the
        other E - k + 1 experts; each token puts all its mass on that least-loaded one.  Value E/(k(E-k+1)).
      - "split" (k = 1): two chosen experts with counts T - m > m, the heavy one pours onto the light one and
        the idle ones.  Best share of the light one (1 + z) / (2 (2 + z)); this is the optimum for E = 2
        (7/8 at a 3:1 split).
    That the best of these families is the global infimum is verified, not proved, for general E: it agrees
    with exhaustive search over all designs for small E, k, T and with unconstrained global optimisation of
    softmax logits (tests/test_bounds.py; the table in docs/aux-loss-bound.md says which sizes).  Every
    returned value is in any case achievable (an explicit construction), hence an upper bound on the infimum.

Finite T vs T=None.  For a finite T the counts are integers (the even split is rounded); T=None gives the
infimum over all finite batches, which each family reaches at a finite T (returned as ``tokens_used``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from moeviz.errors import MoevizError

DEFAULT_EPS = 1e-6


class BoundInputError(MoevizError, ValueError):
    """Impossible (experts, top_k, tokens): says which value is wrong and what is allowed."""


@dataclass(frozen=True)
class BoundResult:
    """The infimum of the Switch loss for (experts, top_k, tokens) and a batch that approaches it."""

    experts: int
    top_k: int
    tokens: int | None  # the T asked for; None = infimum over all finite batches
    value: float  # the infimum of L (exact rational in `fraction`)
    fraction: Fraction
    attained: bool  # True: some router with a strict top-k has exactly this loss; False: only a limit eps -> 0
    family: str  # 'pour', 'park', 'split'
    description: str  # the construction in words
    tokens_used: int  # rows of `weights`
    counts: np.ndarray  # [E] int, assignments per expert
    f: np.ndarray  # [E] share of assignments, sums to 1
    P: np.ndarray  # [E] mean router probability of `weights`
    chosen: np.ndarray  # [tokens_used, k] int, each token's experts (its strict top-k under `weights`)
    weights: np.ndarray = field(repr=False)  # [tokens_used, E] eps-perturbed router probabilities
    eps: float = DEFAULT_EPS
    loss_of_weights: float = float("nan")  # L recomputed from `weights` (value + O(eps))

    def to_dict(self) -> dict:
        """JSON-friendly summary (no weight matrix: it can be T x E large)."""
        return {
            "experts": self.experts,
            "top_k": self.top_k,
            "tokens": self.tokens,
            "value": self.value,
            "fraction": str(self.fraction),
            "attained": self.attained,
            "family": self.family,
            "description": self.description,
            "tokens_used": self.tokens_used,
            "counts": self.counts.tolist(),
            "f": self.f.tolist(),
            "P": self.P.tolist(),
            "eps": self.eps,
            "loss_of_weights": self.loss_of_weights,
        }


# ---------------------------------------------------------------------------------------------- the loss itself


def top_k_choice(weights: np.ndarray, k: int) -> np.ndarray:
    """Each row's k largest entries, ties to the lower index (a stable sort of -weights).  [T, E] -> [T, k]"""
    return np.argsort(-weights, axis=1, kind="stable")[:, :k]


def switch_loss_from_weights(weights: np.ndarray, k: int = 1, chosen: np.ndarray | None = None) -> float:
    """L = E * sum_i f_i P_i of a probability matrix [T, E], routing each token to its own top-k."""
    weights = np.asarray(weights, dtype=float)
    T, E = weights.shape
    if chosen is None:
        chosen = top_k_choice(weights, k)  # [T, k]
    counts = np.bincount(chosen.ravel(), minlength=E)  # [E]
    f = counts / (T * k)
    P = weights.mean(axis=0)  # [E]
    return float(E * np.dot(f, P))


# ------------------------------------------------------------------------------------------------ validation


def _check_inputs(E, k, T) -> None:
    for name, v in (("experts", E), ("top_k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise BoundInputError(f"{name} must be an integer, got {v!r}")
    if E < 1:
        raise BoundInputError(f"experts must be >= 1, got {E}")
    if not 1 <= k <= E:
        raise BoundInputError(f"top_k must be between 1 and experts={E}, got {k}")
    if T is not None:
        if isinstance(T, bool) or not isinstance(T, (int, np.integer)):
            raise BoundInputError(f"tokens must be a positive integer or None, got {T!r}")
        if T < 1:
            raise BoundInputError(f"tokens must be >= 1 (or None for any batch size), got {T}")


# ------------------------------------------------------------------------------------- designs and their cost


def _round_robin(counts: np.ndarray, T: int, k: int) -> np.ndarray:
    """T chosen sets of size k realising `counts` (each <= T, sum T*k): slot j of token t is entry t + j*T of
    the list in which expert i appears counts[i] times.  No token gets an expert twice since counts[i] <= T."""
    slots = np.repeat(np.arange(len(counts)), counts)  # [T*k]
    return slots.reshape(k, T).T.copy()  # [T, k]


def _token_vertex_cost(counts_sorted: list[int], chosen_counts: tuple[int, ...]) -> tuple[Fraction, str, int]:
    """Best cost of one token (in count units) with chosen experts of these counts: (cost, kind, m) where kind is
    'park' (all mass on the least-loaded chosen expert) or 'pour' onto the m least-loaded unchosen experts."""
    rest = list(counts_sorted)
    for c in chosen_counts:
        rest.remove(c)
    total, size, m = sum(chosen_counts), len(chosen_counts), 0
    for u in rest:  # ascending: pour while the next expert is below the current level
        if u * size < total:
            total, size, m = total + u, size + 1, m + 1
        else:
            break
    pour = Fraction(total, size)
    park = Fraction(min(chosen_counts))
    if len(chosen_counts) > 1 and park < pour:
        return park, "park", 0
    return pour, "pour", m


def _group_keys(counts: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens grouped by the sorted loads of their chosen experts (a token's cost depends on no more):
    (keys [G, k], multiplicities [G], group index of each token [T])."""
    keys = np.sort(counts[chosen], axis=1)  # [T, k]
    base = int(counts.max()) + 1
    code = np.zeros(len(keys), dtype=np.int64)
    for j in range(keys.shape[1]):  # mixed-radix code: 1-D unique is much faster than unique(axis=0)
        code = code * base + keys[:, j]
    _, first, inverse, mult = np.unique(code, return_index=True, return_inverse=True, return_counts=True)
    return keys[first], mult, inverse


def _round_robin_groups(counts: np.ndarray, T: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`_group_keys` of `_round_robin(counts, T, k)` without building it: token t's slots sit at t + j*T in the
    slot list, whose load is constant between expert boundaries, so the key only changes where t crosses a
    boundary mod T: at most E + 1 runs of tokens.  Returns (keys [G, k], multiplicities [G])."""
    bounds = np.cumsum(counts)  # [E] end of each expert's run of slots
    starts = np.unique(np.concatenate([[0], bounds % T]))
    starts = starts[starts < T]
    lengths = np.diff(np.concatenate([starts, [T]]))  # tokens per run
    pos = starts[:, None] + T * np.arange(k)[None, :]  # [runs, k] slot positions
    owner = np.searchsorted(bounds, pos, side="right")  # [runs, k] expert of each slot
    keys = np.sort(counts[owner], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    return uniq, np.bincount(inverse.ravel(), weights=lengths).astype(np.int64)


def _token_cost_float(counts_sorted: np.ndarray, key: np.ndarray) -> tuple[float, str, int]:
    """Float twin of `_token_vertex_cost`, vectorised (the pour level is the minimum over prefixes)."""
    keep = np.ones(len(counts_sorted), dtype=bool)
    for c, n_before in zip(*np.unique(key, return_counts=True)):
        start = np.searchsorted(counts_sorted, c)
        keep[start : start + n_before] = False
    rest = counts_sorted[keep]  # ascending
    prefix = np.concatenate([[0], np.cumsum(rest)])
    levels = (key.sum() + prefix) / (len(key) + np.arange(len(prefix)))
    m = int(np.argmin(levels))
    if len(key) > 1 and key[0] < levels[m]:
        return float(key[0]), "park", 0
    return float(levels[m]), "pour", m


def _design_cost_float(counts: np.ndarray, T: int, k: int) -> float:
    """sum_t v(S_t) of the round-robin design of `counts`, in floats (for the search)."""
    counts_sorted = np.sort(counts)
    keys, mult = _round_robin_groups(counts, T, k)
    return float(sum(_token_cost_float(counts_sorted, key)[0] * m for key, m in zip(keys, mult)))


def _design_cost(counts: np.ndarray, chosen: np.ndarray) -> tuple[Fraction, dict]:
    """sum_t v(S_t) exactly (rational), and each group's vertex plan (kind, number of unchosen poured onto)."""
    counts_sorted = sorted(int(c) for c in counts)
    keys, mult, _ = _group_keys(counts, chosen)
    total, plans = Fraction(0), {}
    for key, m in zip(keys, mult):
        key = tuple(int(x) for x in key)
        cost, kind, n_pour = _token_vertex_cost(counts_sorted, key)
        total += cost * int(m)
        plans[key] = (kind, n_pour)
    return total, plans


def _loss_of_design(E: int, k: int, T: int, total_cost: Fraction) -> Fraction:
    return Fraction(E, k * T * T) * total_cost


def _vertex_weights(counts: np.ndarray, chosen: np.ndarray, plans: dict) -> np.ndarray:
    """The vertex probability matrix [T, E] of the design: each token's optimal vertex of Q(S_t)."""
    T, k = chosen.shape
    E = len(counts)
    order = np.argsort(counts, kind="stable")  # experts by load, ascending
    rank = np.empty(E, dtype=int)
    rank[order] = np.arange(E)
    chosen_mask = np.zeros((T, E), dtype=bool)
    np.put_along_axis(chosen_mask, chosen, True, axis=1)
    keys, _, inverse = _group_keys(counts, chosen)
    plan = [plans[tuple(int(x) for x in key)] for key in keys]
    n_pour = np.array([m for _, m in plan])[inverse]  # [T]
    park = np.array([kind == "park" for kind, _ in plan])[inverse]  # [T]
    unchosen_by_rank = ~chosen_mask[:, order]  # [T, E], columns by ascending load
    taken_by_rank = unchosen_by_rank & (np.cumsum(unchosen_by_rank, axis=1) <= n_pour[:, None])
    support = chosen_mask | taken_by_rank[:, rank]  # [T, E]
    if park.any():  # all mass on the least-loaded chosen expert
        load = np.where(chosen_mask, counts[None, :] * E + rank[None, :], np.iinfo(np.int64).max)
        light = np.argmin(load[park], axis=1)
        support[park] = False
        support[np.flatnonzero(park), light] = True
    return support / support.sum(axis=1, keepdims=True)


def _perturb(vertex: np.ndarray, chosen: np.ndarray, eps: float) -> np.ndarray:
    """(1 - eps) * vertex + eps * (half uniform on the chosen, half uniform on all): every entry > 0 (a softmax
    can produce it) and every chosen expert beats every unchosen one by >= eps / (2k), so top-k is strict."""
    T, E = vertex.shape
    k = chosen.shape[1]
    bonus = np.full((T, E), eps / (2 * E))
    np.put_along_axis(bonus, chosen, eps / (2 * E) + eps / (2 * k), axis=1)
    return (1 - eps) * vertex + bonus


# -------------------------------------------------------------------------------------------------- families


def _even_counts(E: int, h: int, total: int, first: int = 0) -> np.ndarray:
    """`total` assignments spread as evenly as possible over experts first..first+h-1; the rest get 0."""
    counts = np.zeros(E, dtype=np.int64)
    q, r = divmod(total, h)
    counts[first : first + h] = q
    counts[first : first + r] += 1
    return counts


def _pour_costs(E: int, k: int, T: int) -> np.ndarray:
    """Float sum_t v(S_t) of the round-robin 'pour' design for every h = k..E at once ([E - k + 1]).

    With q, r = divmod(T k, h) the loads are r experts at q+1, h-r at q, z = E-h at 0.  In the round-robin
    design the first R = r (q+1) slots carry load q+1, so token t holds a(t) = #{j < k : t + j T < R} of them:
    two values of a, for t < R mod T and t >= R mod T.  A token pours onto the unchosen loads in ascending order
    (zeros, then q's, then (q+1)'s); within a run of equal loads the mean moves monotonically, so the best
    level is at one of the run ends, and parking (k >= 2) costs the smallest chosen load."""
    h = np.arange(k, min(E, T * k) + 1)  # h > T k leaves experts at 0: the same design as h = T k
    z = E - h
    q, r = np.divmod(T * k, h)
    R = r * (q + 1)
    alpha, beta = np.divmod(R, T)
    total = np.zeros(len(h))
    for a_raw, n_tok in ((alpha + 1, beta), (alpha, T - beta)):
        a = np.minimum(a_raw, k)  # chosen slots at load q+1
        s = a * (q + 1) + (k - a) * q  # load of the chosen experts
        n_q = h - r - (k - a)  # unchosen experts at load q
        n_q1 = r - a  # unchosen experts at load q+1
        ends = [s / k, s / (k + z), (s + n_q * q) / (k + z + n_q), (s + n_q * q + n_q1 * (q + 1)) / E]
        level = np.minimum.reduce(ends)
        if k > 1:
            level = np.minimum(level, np.where(a < k, q, q + 1))
        total += np.where(n_tok > 0, level * n_tok, 0.0)
    return total


def _pour_design(E: int, k: int, T: int, h: int):
    counts = _even_counts(E, h, T * k)
    z = E - h
    return "pour", counts, (
        f"{h} experts share the {T * k} assignments evenly, {z} experts are never chosen; each token spreads "
        f"its mass evenly over its {k} chosen expert(s) and the never-chosen ones (ties at the k-th place)"
    )


def _park_design(E: int, k: int, T: int):
    counts = np.zeros(E, dtype=np.int64)
    counts[: k - 1] = T
    counts += _even_counts(E, E - k + 1, T, first=k - 1)
    return "park", counts, (
        f"{'expert 0 is' if k == 2 else f'experts 0..{k - 2} are'} chosen by every token, the last slot is spread "
        f"evenly over the other "
        f"{E - k + 1} experts; each token puts all its mass on that least-loaded chosen expert"
    )


def _split_designs(E: int, T: int):
    """k = 1, two chosen experts with counts T - m >= m: evaluated in closed form for all m at once, the best
    one returned as a design."""
    z = E - 2
    m = np.arange(0, T // 2 + 1)
    a, b = T - m, m
    heavy = np.minimum(a / (1 + z), (a + b) / (2 + z))
    cost = b * b / (1 + z) + a * heavy
    best = int(m[np.argmin(cost)])
    counts = np.zeros(E, dtype=np.int64)
    counts[0], counts[1] = T - best, best
    return "split", counts, (
        f"expert 0 takes {T - best} tokens, expert 1 takes {best}, {z} experts are never chosen; the light "
        f"expert's tokens spread over it and the idle ones, the heavy expert's tokens also onto the light one"
    )


def _scored_designs(E: int, k: int, T: int, only: str | None):
    """(float cost, (family, counts, description)) for every candidate design."""
    if only in (None, "pour"):
        for h, cost in zip(range(k, min(E, T * k) + 1), _pour_costs(E, k, T)):
            yield float(cost), lambda h=h: _pour_design(E, k, T, h)
    extra = []
    if k >= 2 and only in (None, "park"):
        extra.append(_park_design(E, k, T))
    if k == 1 and E >= 2 and only in (None, "split"):
        extra.append(_split_designs(E, T))
    for design in extra:
        yield _design_cost_float(design[1], T, k), lambda d=design: d


def _continuum_candidates(E: int, k: int) -> list[tuple[Fraction, str, int]]:
    """(infimum over T, family, a T that reaches it) for each family: the closed forms in the module doc."""
    out = []
    for h in range(k, E + 1):
        z = E - h
        out.append((Fraction(E * k, h * (k + z)), "pour", h // math.gcd(h, k)))
    if k >= 2:
        out.append((Fraction(E, k * (E - k + 1)), "park", E - k + 1))
    if k == 1 and E >= 2:
        z = E - 2
        beta = Fraction(1 + z, 2 * (2 + z))
        if beta <= Fraction(1, 2 + z):
            phi = beta * beta / (1 + z) + (1 - beta) / (2 + z)
            out.append((E * phi, "split", beta.denominator))
    return out


# ------------------------------------------------------------------------------------------------ public API


def _best_design(E: int, k: int, T: int, only: str | None = None):
    """Search the families with float costs, then redo the winner (and near-ties) exactly in rationals."""
    scored = list(_scored_designs(E, k, T, only))
    low = min(c for c, _ in scored)
    best = None
    for cost_f, make in scored:
        if cost_f > low * (1 + 1e-9) + 1e-12:
            continue
        family, counts, desc = make()
        chosen = _round_robin(counts, T, k)  # [T, k]
        cost, plans = _design_cost(counts, chosen)
        if abs(float(cost) - cost_f) > 1e-9 * max(1.0, cost_f):  # the fast search and the exact count disagree
            raise AssertionError(f"internal: {family} cost {float(cost)} != searched {cost_f}")
        value = _loss_of_design(E, k, T, cost)
        if best is None or value < best[0]:
            best = (value, family, counts, chosen, plans, desc)
    return best


def _result(E, k, T_asked, T, best, eps) -> BoundResult:
    value, family, counts, chosen, plans, desc = best
    vertex = _vertex_weights(counts, chosen, plans)  # [T, E]
    weights = _perturb(vertex, chosen, eps)
    attained = not _has_ties(vertex, chosen)
    return BoundResult(
        experts=E,
        top_k=k,
        tokens=T_asked,
        value=float(value),
        fraction=value,
        attained=attained,
        family=family,
        description=desc,
        tokens_used=T,
        counts=counts.copy(),
        f=counts / (T * k),
        P=weights.mean(axis=0),
        chosen=chosen,
        weights=weights,
        eps=eps,
        loss_of_weights=_loss_with_strict_choice(weights, chosen),
    )


def _loss_with_strict_choice(weights: np.ndarray, chosen: np.ndarray) -> float:
    """L of `weights` after checking that `chosen` is each row's strict top-k (cheaper than sorting rows)."""
    T, E = weights.shape
    k = chosen.shape[1]
    if k < E:
        mask = np.zeros((T, E), dtype=bool)
        np.put_along_axis(mask, chosen, True, axis=1)
        low_chosen = np.where(mask, weights, np.inf).min(axis=1)
        high_unchosen = np.where(mask, -np.inf, weights).max(axis=1)
        if not np.all(low_chosen > high_unchosen):
            raise AssertionError("internal: the perturbed weights do not have the designed strict top-k")
    return switch_loss_from_weights(weights, k, chosen=chosen)


def _has_ties(vertex: np.ndarray, chosen: np.ndarray) -> bool:
    """True when some token's smallest chosen probability equals its largest unchosen one (top-k ambiguous)."""
    T, E = vertex.shape
    if chosen.shape[1] == E:
        return False
    mask = np.zeros((T, E), dtype=bool)
    np.put_along_axis(mask, chosen, True, axis=1)
    low_chosen = np.where(mask, vertex, np.inf).min(axis=1)
    high_unchosen = np.where(mask, -np.inf, vertex).max(axis=1)
    return bool(np.any(low_chosen <= high_unchosen + 1e-15))


def aux_loss_infimum(E: int, k: int = 1, T: int | None = None, *, eps: float = DEFAULT_EPS) -> BoundResult:
    """Infimum of the Switch loss L = E sum_i f_i P_i over all routers and batches of T tokens (T=None: any T).

    See the module docstring for the reduction; the result carries a batch of `tokens_used` probability
    vectors whose own strict top-k choice gives a loss within O(eps) of `value`.
    """
    _check_inputs(E, k, T)
    if not 0 < eps < 1e-2:
        raise BoundInputError(f"eps must be in (0, 0.01), got {eps}")
    E, k = int(E), int(k)
    if T is not None:
        T = int(T)
        return _result(E, k, T, T, _best_design(E, k, T), eps)
    value, family, T_used = min(_continuum_candidates(E, k), key=lambda c: (c[0], c[2]))
    best = _best_design(E, k, T_used, only=family)
    if best[0] != value:  # the finite design must reach the closed form exactly
        raise AssertionError(f"internal: {family} design at T={T_used} gives {best[0]}, closed form {value}")
    return _result(E, k, None, T_used, best, eps)


def blog_construction(E: int, T: int | None = None, *, eps: float = 1e-3) -> BoundResult:
    """The blog's top-1 construction: expert 0 gets 1/2 - eps on every token but is never chosen; the other E-1
    experts take the tokens in turn with 1/2 + eps.  L = E (1/2 + eps) / (E - 1) -> E / (2 (E - 1)), which
    tends to 1/2 only as E -> infinity (and is above the true infimum for every E >= 2)."""
    _check_inputs(E, 1, T)
    if E < 2:
        raise BoundInputError(f"the blog construction needs experts >= 2, got {E}")
    T = E - 1 if T is None else int(T)
    chosen = (1 + np.arange(T) % (E - 1))[:, None]  # [T, 1]
    weights = np.zeros((T, E))
    weights[:, 0] = 0.5 - eps
    weights[np.arange(T), chosen[:, 0]] = 0.5 + eps
    counts = np.bincount(chosen[:, 0], minlength=E)
    value = Fraction(E, T * T) * sum(int(c) * int(c) for c in counts) / 2  # limit eps -> 0
    return BoundResult(
        experts=E,
        top_k=1,
        tokens=T,
        value=float(value),
        fraction=value,
        attained=False,
        family="blog",
        description="blog: expert 0 holds 1/2 - eps on every token but is never chosen; the others take turns",
        tokens_used=T,
        counts=counts,
        f=counts / T,
        P=weights.mean(axis=0),
        chosen=chosen,
        weights=weights,
        eps=eps,
        loss_of_weights=switch_loss_from_weights(weights, 1),
    )


def infimum_table(experts=(2, 4, 8, 16, 32, 64, 128, 256), top_ks=(1, 2)):
    """DataFrame (experts, top_k, infimum, fraction, family, tokens_used, blog, switch) for the docs."""
    import pandas as pd

    rows = []
    for E in experts:
        for k in top_ks:
            if k > E:
                continue
            r = aux_loss_infimum(E, k)
            rows.append(
                {
                    "experts": E,
                    "top_k": k,
                    "infimum": r.value,
                    "fraction": str(r.fraction),
                    "family": r.family,
                    "tokens_used": r.tokens_used,
                    "blog_construction": float(Fraction(E, 2 * (E - 1))) if k == 1 and E >= 2 else None,
                    "switch_claim": 1.0,
                }
            )
    return pd.DataFrame(rows)


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m moeviz.analyses.bounds")
    parser.add_argument("--table", action="store_true", help="print the markdown table of infima for the docs")
    args = parser.parse_args(argv)
    if not args.table:
        parser.print_help()
        return 2
    df = infimum_table()
    print("| E | k | infimum | exact | family | T reaching it | blog's construction (k=1) |")
    print("|---|---|---|---|---|---|---|")
    for r in df.itertuples():
        missing = r.blog_construction is None or r.blog_construction != r.blog_construction  # None or NaN
        blog = "" if missing else f"{r.blog_construction:.4f}"
        print(f"| {r.experts} | {r.top_k} | {r.infimum:.4f} | {r.fraction} | {r.family} | {r.tokens_used} | {blog} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
