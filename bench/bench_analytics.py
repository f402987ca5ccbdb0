"""Every moeviz analysis over a big store (DuckDB through open_store) against the same computation in pandas.

For each analysis: moeviz's first call and the median of `--repeats` further calls; then the same result computed
idiomatically in pandas/numpy (vectorised groupby/merge/sort) from DataFrames loaded with narrow dtypes (load
time reported on its own, excluded from the per-analysis times), checked equal to moeviz's result (within float
tolerance) so that the comparison is honest. Analyses that read the exact aggregates in moeviz get two pandas
rows: over the same aggregate rows (`step_stats`/`layer_stats` in pandas), and over the routes (what a notebook
user without those aggregates would do). Targets (issue): < 1 s where moeviz reads aggregates, < 5 s where it
reads every route, and >= 10x faster than pandas. Prints a Markdown table.

    python bench/bench_analytics.py --store bench/out/store100m [--repeats 3] [--pandas-routes 30_000_000]

With `--pandas-routes N` (when the whole routes table would not fit in memory as a DataFrame) pandas runs on the
first steps holding about N routes; its times are then extrapolated linearly to the whole store (marked '~'),
and its results are checked against moeviz on the same steps.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeviz.analyses import aux_loss, capacity, health, load, specialization as spec  # noqa: E402
from moeviz.selection import Selection  # noqa: E402
from moeviz.store import open_store  # noqa: E402

CF_CURVE = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
POS_BINS = spec.DEFAULT_POSITION_BINS


# ------------------------------------------------------------------------------------------------ data for pandas


@dataclass
class Frames:
    """What a notebook user loads into pandas: the routes and the small tables, narrow dtypes."""

    routes: pd.DataFrame  # step i32, seq i16, pos i16, token_id i32, layer i8, slot i8, expert i8, weight f32
    seqs: pd.DataFrame  # step, seq, domain (category), tag (category)
    step_stats: pd.DataFrame
    layer_stats: pd.DataFrame
    n_experts: int
    top_k: int
    n_routes: int


def load_frames(con, last_step: int | None) -> Frames:
    """Routes and aggregates into pandas (through DuckDB -> Arrow -> pandas, the fastest loader at hand)."""
    cond = "TRUE" if last_step is None else f"step <= {int(last_step)}"
    routes = con.execute(f"""
        SELECT CAST(step AS INTEGER) AS step, CAST(seq AS SMALLINT) AS seq, CAST(pos AS SMALLINT) AS pos, token_id,
               CAST(layer AS TINYINT) AS layer, slot, CAST(expert AS TINYINT) AS expert,
               CAST(weight AS FLOAT) AS weight
        FROM routes WHERE {cond}""").to_arrow_table().to_pandas()
    seqs = con.execute(f"SELECT CAST(step AS INTEGER) AS step, CAST(seq AS SMALLINT) AS seq, domain, tag "
                       f"FROM sequences WHERE {cond}").df()
    seqs["domain"] = seqs["domain"].astype("category")
    seqs["tag"] = seqs["tag"].astype("category")
    ss = con.execute(f"SELECT CAST(step AS INTEGER) AS step, CAST(layer AS TINYINT) AS layer, "
                     f"CAST(expert AS TINYINT) AS expert, tokens, assigned, first_choice, prob_sum "
                     f"FROM step_stats WHERE {cond}").df()
    ls = con.execute(f"SELECT CAST(step AS INTEGER) AS step, CAST(layer AS TINYINT) AS layer, tokens, z_loss_sum, "
                     f"entropy_sum, coalesce(nonfinite_tokens, 0) AS nonfinite_tokens "
                     f"FROM layer_stats WHERE {cond}").df()
    e, k = con.execute("SELECT max(n_experts), max(top_k) FROM layers").fetchone()
    return Frames(routes, seqs, ss, ls, int(e), int(k), len(routes))


# ------------------------------------------------------------------------------------------------ pandas versions
# Each takes Frames and returns a DataFrame with the columns it is compared on.


def counts_from_routes(f: Frames) -> pd.DataFrame:
    """step_stats-like counts (no prob_sum) from the routes: what a user without aggregates computes first."""
    r = f.routes
    keys = ["step", "layer", "expert"]
    c = r.groupby(keys, observed=True).size().rename("assigned").to_frame()
    c["first_choice"] = r[r["slot"] == 0].groupby(keys, observed=True).size()
    c = c.fillna({"first_choice": 0}).reset_index()
    c["tokens"] = c.groupby(["step", "layer"])["first_choice"].transform("sum")
    c["prob_sum"] = np.nan
    return c


def pd_expert_load(f: Frames, ss: pd.DataFrame, by_step: bool) -> pd.DataFrame:
    keys = ["step", "layer", "expert"] if by_step else ["layer", "expert"]
    g = ss.groupby(keys, as_index=False)[["tokens", "assigned", "first_choice", "prob_sum"]].sum(min_count=1)
    if not by_step:  # tokens of the layer summed over steps (each step counted once, not once per expert)
        g["tokens"] = ss.drop_duplicates(["step", "layer"]).groupby("layer")["tokens"].sum().reindex(g["layer"]).values
    tot = g.groupby(keys[:-1])["assigned"].transform("sum")
    g["load_fraction"] = g["assigned"] / tot
    g["relative_load"] = f.n_experts * g["load_fraction"]
    g["token_share"] = g["assigned"] / g["tokens"]
    return g


def pd_imbalance(f: Frames, ss: pd.DataFrame) -> pd.DataFrame:
    g = pd_expert_load(f, ss, by_step=True)
    lk = ["step", "layer"]
    frac = g["load_fraction"]
    g["plogp"] = np.where(frac > 0, frac * np.log(frac.where(frac > 0, 1.0)), 0.0)
    g["dead"] = frac < 0.1 / f.n_experts
    top = g.sort_values(lk + ["assigned"], ascending=[True, True, False]).groupby(lk).head(f.top_k)
    out = g.groupby(lk).agg(mx=("assigned", "max"), mean=("assigned", "mean"), plogp=("plogp", "sum"),
                            dead_experts=("dead", "sum"))
    out["cv"] = g.groupby(lk)["assigned"].std(ddof=0) / out["mean"]
    out["max_vio"] = (out["mx"] - out["mean"]) / out["mean"]
    out["norm_entropy"] = -out["plogp"] / math.log(f.n_experts)
    out["top_n_coverage"] = top.groupby(lk)["load_fraction"].sum()
    return out.reset_index()


def pd_switch_loss(f: Frames) -> pd.DataFrame:
    g = f.step_stats.assign(ap=f.step_stats["assigned"] * f.step_stats["prob_sum"])
    out = g.groupby(["step", "layer"]).agg(ap=("ap", "sum"), a=("assigned", "sum"), t=("tokens", "first"))
    out["aux_loss"] = f.n_experts * out["ap"] / (out["a"] * out["t"])
    return out.reset_index()


def pd_pooled_switch_loss(f: Frames) -> pd.DataFrame:
    ss = f.step_stats
    per_e = ss.groupby(["step", "expert"])[["assigned", "prob_sum"]].sum()
    ap = (per_e["assigned"] * per_e["prob_sum"]).groupby("step").sum()
    n = ss.drop_duplicates(["step", "layer"]).groupby("step")["tokens"].sum().astype("float64")
    layer = pd_switch_loss(f).groupby("step")["aux_loss"].agg(["mean", "max"])
    return pd.DataFrame({"aux_loss": f.n_experts * ap / (n * n), "mean_layer_loss": layer["mean"],
                         "max_layer_loss": layer["max"]}).reset_index()


def pd_z_loss(f: Frames) -> pd.DataFrame:
    g = f.layer_stats.groupby(["step", "layer"])[["tokens", "z_loss_sum", "entropy_sum"]].sum()
    return pd.DataFrame({"z_loss": g["z_loss_sum"] / g["tokens"],
                         "mean_entropy": g["entropy_sum"] / g["tokens"]}).reset_index()


def _capacity(cf: float, tokens, k: int, e: int):
    return np.ceil(np.round(cf * tokens.astype("float64") * k / e, 9))


def pd_capacity_counts(f: Frames, ss: pd.DataFrame, cf: float = 1.0) -> pd.DataFrame:
    cap = _capacity(cf, ss["tokens"], f.top_k, f.n_experts)
    d = ss.assign(dropped=np.maximum(0, ss["assigned"] - cap))
    out = d.groupby(["layer", "expert"])[["assigned", "dropped"]].sum()
    out["drop_rate"] = out["dropped"] / out["assigned"]
    return out.reset_index()


def pd_drop_curve(f: Frames, ss: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for cf in CF_CURVE:
        cap = _capacity(cf, ss["tokens"], f.top_k, f.n_experts)
        dropped = np.maximum(0, ss["assigned"] - cap).sum()
        rows.append({"capacity_factor": cf, "assigned": ss["assigned"].sum(), "dropped": dropped,
                     "drop_rate": dropped / ss["assigned"].sum()})
    return pd.DataFrame(rows)


def pd_capacity_probability(f: Frames, by: tuple[str, ...] = ("layer", "expert")) -> pd.DataFrame:
    """Probability policy with dropped weight: rank every assignment within (step, layer, expert) by weight
    (ties by slot, seq, pos), drop the ranks past C, then count per `by` (layer, expert, pos or domain)."""
    r = f.routes
    order = np.lexsort((r["pos"].values, r["seq"].values, r["slot"].values, -r["weight"].values,
                        r["expert"].values, r["layer"].values, r["step"].values))
    s = r.iloc[order]
    rank = s.groupby(["step", "layer", "expert"], sort=False).cumcount().values
    tokens = (r["slot"] == 0).groupby([r["step"], r["layer"]]).sum().rename("t")
    t = tokens.reindex(pd.MultiIndex.from_arrays([s["step"].values, s["layer"].values])).values
    cap = _capacity(1.0, t, f.top_k, f.n_experts)
    w = s["weight"].values.astype("float64")
    d = pd.DataFrame({"dropped": rank >= cap, "w": w})
    for c in by:
        if c == "domain":
            dom = f.seqs.set_index(["step", "seq"])["domain"]
            d[c] = dom.reindex(pd.MultiIndex.from_arrays([s["step"].values, s["seq"].values])).astype(str).values
        else:
            d[c] = s[c].values
    d["dw"] = np.where(d["dropped"], w, 0.0)
    out = d.groupby(list(by)).agg(assigned=("w", "size"), dropped=("dropped", "sum"),
                                  dropped_weight=("dw", "sum"), wsum=("w", "sum"))
    out["drop_rate"] = out["dropped"] / out["assigned"]
    out["weight_drop_rate"] = out["dropped_weight"] / out["wsum"]
    return out.reset_index()


def pd_health(f: Frames, window: float = 0.25) -> pd.DataFrame:
    """health_summary's findings (default thresholds) from the aggregates, one row per finding or 'ok' per check:
    check, layer, expert (-1 where none), value."""
    ss, E, k = f.step_stats, f.n_experts, f.top_k
    steps = np.sort(ss["step"].unique())
    n = max(1, math.ceil(len(steps) * window))
    first, last = steps[:n], steps[-n:]
    rows = []
    recent = pd_expert_load(f, ss[ss["step"].isin(last)], by_step=False)
    found = {"collapsed_expert": [], "dead_expert": [], "growing_imbalance": [], "capacity_drops": [],
             "model_drops": []}
    top = recent.sort_values(["layer", "first_choice", "expert"], ascending=[True, False, True]).drop_duplicates("layer")
    share = top["first_choice"] / top["tokens"]
    found["collapsed_expert"] = [(l, e, v) for l, e, v in zip(top["layer"], top["expert"], share)
                                 if v > max(0.5, min(1.0, 2.0 / E))]
    dead = recent[recent["relative_load"] < 0.1]
    found["dead_expert"] = list(zip(dead["layer"], dead["expert"], dead["relative_load"]))
    if len(steps) >= 2:
        imb = pd_imbalance(f, ss)
        early = imb[imb["step"].isin(first)].groupby("layer")["max_vio"].mean()
        late = imb[imb["step"].isin(last)].groupby("layer")["max_vio"].mean()
        tok = ss.drop_duplicates(["step", "layer"]).groupby("layer")["tokens"].mean()
        noise = np.maximum(0.05, np.sqrt(2 * math.log(E) * E / (tok * k)))
        thr = 2.0 * np.maximum(early, noise)
        found["growing_imbalance"] = [(l, -1, late[l]) for l in late.index if late[l] > thr[l]]
    else:
        del found["growing_imbalance"]
    drops = pd_capacity_counts(f, ss, 1.25).groupby("layer")[["assigned", "dropped"]].sum()
    rate = drops["dropped"] / drops["assigned"]
    found["capacity_drops"] = [(l, -1, v) for l, v in rate.items() if v > 0.1]
    ls = f.layer_stats  # tokens with NaN/inf router outputs: their share of the layer's tokens
    if "nonfinite_tokens" in ls.columns:
        bad = ls.groupby("layer")["nonfinite_tokens"].sum()
        share = bad / (bad + ls.groupby("layer")["tokens"].sum())
        found["nonfinite_router"] = [(l, -1, share[l]) for l in bad.index if bad[l] > 0]
    else:
        found["nonfinite_router"] = []
    found["recording_errors"] = []  # runs.recording_errors: the synthetic stores record no failure
    for check, items in found.items():
        rows += [{"check": check, "layer": int(l), "expert": int(e), "value": float(v)} for l, e, v in items] \
            or [{"check": check, "layer": -1, "expert": -1, "value": np.nan}]
    return pd.DataFrame(rows)


def _with_domain(f: Frames, keys: list[str]) -> pd.DataFrame:
    """Route counts n (all slots) and f (slot 0) per sequence and `keys`, then joined with the sequences' domain
    (grouping before the merge, as a good notebook user would: the merge touches counts, not routes)."""
    r = f.routes
    c = r.assign(f=r["slot"].eq(0)).groupby(["step", "seq"] + keys, observed=True).agg(
        n=("f", "size"), f=("f", "sum")).reset_index()
    c = c.merge(f.seqs[["step", "seq", "domain"]], on=["step", "seq"], how="left")
    return c.groupby(keys[:1] + ["domain"] + keys[1:], observed=True)[["n", "f"]].sum().reset_index()


def pd_domain_share(f: Frames, slot0: bool) -> pd.DataFrame:
    c = _with_domain(f, ["layer", "expert"])
    c["tokens"] = c.groupby(["layer", "domain"], observed=True)["f"].transform("sum")
    c["assigned"] = c["f"] if slot0 else c["n"]
    c["share"] = c["assigned"] / c["tokens"]
    c["ratio"] = c["share"] / ((1.0 if slot0 else f.top_k) / f.n_experts)
    c["domain"] = c["domain"].astype(str)
    return c


def _token_counts(f: Frames) -> pd.DataFrame:
    r = f.routes
    r = r[r["token_id"] != -1]
    return r.assign(f=r["slot"].eq(0)).groupby(["layer", "token_id", "expert"]).agg(
        n=("f", "size"), f=("f", "sum")).reset_index()


def pd_vocab_specialization(f: Frames, min_count: int = 5) -> pd.DataFrame:
    c = _token_counts(f)
    c["count"] = c.groupby(["layer", "token_id"])["f"].transform("sum")
    best = c[c["count"] >= min_count].sort_values(["layer", "token_id", "n", "expert"],
                                                   ascending=[True, True, False, True])
    best = best.drop_duplicates(["layer", "token_id"]).rename(columns={"n": "routed"})
    best["specialization"] = best["routed"] / best["count"]
    return best


def pd_vocab_summary(f: Frames) -> pd.DataFrame:
    b = pd_vocab_specialization(f)
    out = b.groupby("layer").agg(token_ids=("token_id", "size"), occurrences=("count", "sum"), routed=("routed", "sum"))
    out["specialization"] = out["routed"] / out["occurrences"]
    return out.reset_index()


def pd_top_tokens(f: Frames, n: int = 10, min_count: int = 5) -> pd.DataFrame:
    c = _token_counts(f)
    c["token_count"] = c.groupby(["layer", "token_id"])["f"].transform("sum")
    et = c.groupby(["layer", "expert"])["n"].transform("sum")
    lt = c.groupby("layer")["f"].transform("sum")
    c = c[c["n"] > 0].assign(count=lambda d: d["n"], lift=(c["n"] / et) / (c["token_count"] / lt),
                             ratio=c["n"] / c["token_count"])
    by_count = c.sort_values(["layer", "expert", "count", "token_id"], ascending=[True, True, False, True])
    by_count = by_count.groupby(["layer", "expert"]).head(n).assign(by="count")
    by_lift = c[c["token_count"] >= min_count].sort_values(["layer", "expert", "ratio", "count", "token_id"],
                                                          ascending=[True, True, False, False, True])
    by_lift = by_lift.groupby(["layer", "expert"]).head(n).assign(by="lift")
    out = pd.concat([by_count, by_lift])
    out["rank"] = out.groupby(["layer", "expert", "by"]).cumcount() + 1
    return out


def pd_position_share(f: Frames) -> pd.DataFrame:
    r = f.routes
    bucket = np.searchsorted(np.asarray(POS_BINS), r["pos"].values, side="right") - 1
    c = r.assign(bucket=bucket, f=r["slot"].eq(0)).groupby(["layer", "bucket", "expert"]).agg(
        assigned=("f", "size"), first=("f", "sum")).reset_index()
    c["tokens"] = c.groupby(["layer", "bucket"])["first"].transform("sum")
    c["share"] = c["assigned"] / c["tokens"]
    return c


def token_matrix(f: Frames) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per (layer, token) in (layer, step, seq, pos) order, and its experts [tokens, k] by slot."""
    r = f.routes
    order = np.lexsort((r["slot"].values, r["pos"].values, r["seq"].values, r["step"].values, r["layer"].values))
    ex = r["expert"].values[order].reshape(-1, f.top_k)  # [tokens, k]
    first = order[:: f.top_k]
    keys = pd.DataFrame({c: r[c].values[first] for c in ("layer", "step", "seq", "pos")})
    return keys, ex


def pd_coactivation(f: Frames) -> pd.DataFrame:
    keys, ex = token_matrix(f)
    E, k = f.n_experts, f.top_k
    layer = keys["layer"].values.astype(np.int64)
    pair = np.zeros((layer.max() + 1) * E * E, np.int64)
    for a in range(k):
        for b in range(k):
            pair += np.bincount((layer * E + ex[:, a]) * E + ex[:, b], minlength=len(pair))
    pair = pair.reshape(-1, E, E)  # [layer, i, j]; diagonal = tokens routed to i
    L, i, j = np.meshgrid(np.arange(pair.shape[0]), np.arange(E), np.arange(E), indexing="ij")
    out = pd.DataFrame({"layer": L.ravel(), "expert_i": i.ravel(), "expert_j": j.ravel(),
                        "tokens_i": np.diagonal(pair, axis1=1, axis2=2)[L.ravel(), i.ravel()],
                        "tokens_ij": pair.ravel()})
    out = out[out["expert_i"] != out["expert_j"]]
    out["p_j_given_i"] = out["tokens_ij"] / out["tokens_i"].where(out["tokens_i"] > 0)
    return out


def pd_consecutive(f: Frames) -> pd.DataFrame:
    keys, ex = token_matrix(f)
    prev = (keys[["layer", "step", "seq"]].shift(1) == keys[["layer", "step", "seq"]]).all(axis=1).to_numpy()
    prev = prev & (keys["pos"].diff().to_numpy() == 1)
    cur, pre = ex[1:], ex[:-1]
    ok = prev[1:]
    first = cur[:, 0]
    first_in = (pre == first[:, None]).any(axis=1)
    overlap = (cur[:, :, None] == pre[:, None, :]).any(axis=(1, 2))
    layer = keys["layer"].values[1:]
    d = pd.DataFrame({"layer": layer[ok], "same": (first == pre[:, 0])[ok], "fin": first_in[ok], "ov": overlap[ok]})
    out = d.groupby("layer").agg(pairs=("same", "size"), same_first=("same", "sum"), first_in_topk=("fin", "sum"),
                                 topk_overlap=("ov", "sum"))
    tl = pd.Series(keys["layer"].values)
    p = pd.crosstab(tl, ex[:, 0], normalize="index")  # [layer, expert] first-choice shares
    q = sum(pd.crosstab(tl, ex[:, a]) for a in range(f.top_k)).div(tl.value_counts().sort_index(), axis=0)
    out["baseline_first"] = (p * p).sum(axis=1)
    out["baseline_first_in_topk"] = (p * q.reindex(columns=p.columns, fill_value=0)).sum(axis=1)
    return out.reset_index()


def pd_layer_flow(f: Frames, a: int, b: int) -> pd.DataFrame:
    r = f.routes
    s0 = r[r["slot"] == 0]
    ka = s0[s0["layer"] == a][["step", "seq", "pos", "expert"]]
    kb = s0[s0["layer"] == b][["step", "seq", "pos", "expert"]]
    m = ka.merge(kb, on=["step", "seq", "pos"], suffixes=("_a", "_b"))
    out = m.groupby(["expert_a", "expert_b"]).size().rename("tokens").reset_index()
    out["share_of_a"] = out["tokens"] / out.groupby("expert_a")["tokens"].transform("sum")
    return out


def pd_saturation(f: Frames, steps_a: list[int], ref: int) -> pd.DataFrame:
    r = f.routes
    a = r[r["step"].isin(steps_a)]
    b = r[r["step"] == ref].drop(columns=["step"])
    on = ["seq", "pos", "layer"]
    top = a[a["slot"] == 0].merge(b[b["slot"] == 0], on=on, suffixes=("", "_b"))
    t = top.assign(same=top["expert"] == top["expert_b"]).groupby(["step", "layer"]).agg(
        tokens=("same", "size"), top1=("same", "sum"))
    ov = a.merge(b, on=on + ["expert"]).groupby(["step", "layer"]).size().rename("overlap")
    t = t.join(ov).fillna({"overlap": 0})
    t["saturation"] = t["overlap"] / (t["tokens"] * f.top_k)
    t["top1_agreement"] = t["top1"] / t["tokens"]
    return t.reset_index()


def _entropy_terms(c: pd.DataFrame, x: str, cnt: str) -> pd.DataFrame:
    """Per layer: N and Σ c ln c over the joint (x, expert) cells and both marginals, for count column cnt."""
    c = c[c[cnt] > 0]

    def xlogx(counts: pd.Series) -> pd.Series:  # per layer: Σ c ln c
        v = counts.astype("float64")
        return (v * np.log(v)).groupby(level="layer").sum()

    n = c.groupby("layer")[cnt].sum().astype("float64")
    sxy = xlogx(c.set_index("layer")[cnt])
    sx = xlogx(c.groupby(["layer", x], observed=True)[cnt].sum())
    se = xlogx(c.groupby(["layer", "expert"])[cnt].sum())
    hxy, hx, he = np.log(n) - sxy / n, np.log(n) - sx / n, np.log(n) - se / n
    mi = (hx + he - hxy).clip(lower=0)
    return pd.DataFrame({"n": n, "mi": mi, "nmi": mi / ((hx + he) / 2)}).reset_index()


def pd_mutual_information(f: Frames) -> pd.DataFrame:
    tok = _token_counts(f)
    dom = _with_domain(f, ["layer", "expert"])
    dom = dom[dom["domain"].notna()]
    frames = []
    for variable, c, x in (("token", tok, "token_id"), ("domain", dom, "domain")):
        for slots, cnt in (("first", "f"), ("all", "n")):
            frames.append(_entropy_terms(c, x, cnt).assign(variable=variable, slots=slots))
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------------ the cases


@dataclass
class Case:
    name: str
    reads: str  # 'aggregates' | 'routes'
    moeviz: Callable  # (con, sel) -> DataFrame
    keys: list[str]
    cols: list[str]
    pandas: list[tuple[str, Callable]] = field(default_factory=list)  # (what it reads, frames -> DataFrame)
    fill_missing: bool = False  # moeviz lists zero rows that a sparse pandas groupby leaves out
    null_is_zero: tuple[str, ...] = ()  # columns moeviz leaves NULL where the sum is over no row (pandas: 0)


def cases(probe_steps: list[int], n_layers: int) -> list[Case]:
    agg, rts = "aggregates", "routes"
    hist = "weight_hist + one pass over routes"
    from_routes = "pandas over routes"
    from_aggs = "pandas over step_stats"
    el_cols = ["assigned", "first_choice", "load_fraction", "relative_load", "token_share"]
    sat_a, sat_ref = (probe_steps[0], probe_steps[-1]) if len(probe_steps) >= 2 else (None, None)
    out = [
        Case("load.expert_load (by step)", agg, lambda c, s: load.expert_load(c, s),
             ["step", "layer", "expert"], el_cols + ["prob_sum"],
             [(from_aggs, lambda f: pd_expert_load(f, f.step_stats, True)),
              (from_routes, lambda f: pd_expert_load(f, counts_from_routes(f), True))]),
        Case("load.load_matrix", agg, lambda c, s: load.load_matrix(c, s), ["layer", "expert"], el_cols,
             [(from_aggs, lambda f: pd_expert_load(f, f.step_stats, False)),
              (from_routes, lambda f: pd_expert_load(f, counts_from_routes(f), False))]),
        Case("load.imbalance (by step)", agg, lambda c, s: load.imbalance(c, s), ["step", "layer"],
             ["max_vio", "cv", "norm_entropy", "dead_experts", "top_n_coverage"],
             [(from_aggs, lambda f: pd_imbalance(f, f.step_stats)),
              (from_routes, lambda f: pd_imbalance(f, counts_from_routes(f)))]),
        Case("aux_loss.switch_loss (by step)", agg, lambda c, s: aux_loss.switch_loss(c, s), ["step", "layer"],
             ["aux_loss"], [(from_aggs, pd_switch_loss)]),
        Case("aux_loss.pooled_switch_loss", agg, lambda c, s: aux_loss.pooled_switch_loss(c, s), ["step"],
             ["aux_loss", "mean_layer_loss", "max_layer_loss"], [(from_aggs, pd_pooled_switch_loss)]),
        Case("aux_loss.z_loss (by step)", agg, lambda c, s: aux_loss.z_loss(c, s), ["step", "layer"],
             ["z_loss", "mean_entropy"], [("pandas over layer_stats", pd_z_loss)]),
        Case("capacity_drops CF 1.0 position", agg, lambda c, s: capacity.capacity_drops(c, s, 1.0),
             ["layer", "expert"], ["assigned", "dropped", "drop_rate"],
             [(from_aggs, lambda f: pd_capacity_counts(f, f.step_stats)),
              (from_routes, lambda f: pd_capacity_counts(f, counts_from_routes(f)))]),
        Case("capacity_drops CF 1.0 probability", agg,
             lambda c, s: capacity.capacity_drops(c, s, 1.0, policy="probability"),
             ["layer", "expert"], ["assigned", "dropped", "drop_rate"],
             [(from_aggs, lambda f: pd_capacity_counts(f, f.step_stats))]),
        Case("capacity_drops CF 1.0 probability, with_weight", hist,
             lambda c, s: capacity.capacity_drops(c, s, 1.0, policy="probability", with_weight=True),
             ["layer", "expert"], ["assigned", "dropped", "drop_rate", "dropped_weight", "weight_drop_rate"],
             [(from_routes, pd_capacity_probability)], null_is_zero=("dropped_weight", "weight_drop_rate")),
        Case("capacity_drops CF 1.0 probability, by domain", hist,
             lambda c, s: capacity.capacity_drops(c, s, 1.0, policy="probability", by=("domain",)),
             ["domain"], ["assigned", "dropped", "drop_rate"],
             [(from_routes, lambda f: pd_capacity_probability(f, ("domain",)))]),
        Case("capacity_drops CF 1.0 probability, by pos", hist,
             lambda c, s: capacity.capacity_drops(c, s, 1.0, policy="probability", by=("pos",)),
             ["pos"], ["assigned", "dropped", "drop_rate"],
             [(from_routes, lambda f: pd_capacity_probability(f, ("pos",)))]),
        Case("capacity_drops CF 1.0 probability, with_weight by slot", hist,  # the pass that counts every route
             lambda c, s: capacity.capacity_drops(c, s, 1.0, policy="probability", with_weight=True, by=("slot",)),
             ["slot"], ["assigned", "dropped", "drop_rate", "dropped_weight", "weight_drop_rate"],
             [(from_routes, lambda f: pd_capacity_probability(f, ("slot",)))],
             null_is_zero=("dropped_weight", "weight_drop_rate")),
        Case(f"capacity.drop_curve ({len(CF_CURVE)} factors)", agg,
             lambda c, s: capacity.drop_curve(c, s, CF_CURVE), ["capacity_factor"],
             ["assigned", "dropped", "drop_rate"],
             [(from_aggs, lambda f: pd_drop_curve(f, f.step_stats)),
              (from_routes, lambda f: pd_drop_curve(f, counts_from_routes(f)))]),
        Case("health.health_summary", agg,
             lambda c, s: health.health_summary(c, s).fillna({"layer": -1, "expert": -1}),
             ["check", "layer", "expert"], ["value"], [(from_aggs, pd_health)]),
        *specialization_cases(rts, from_routes, n_layers),
    ]
    if sat_a is not None:
        sources = (("aggregates", "", "aggregates (probe_sets)"), ("routes", " [source=routes]", rts))
        out += [
            *(Case(f"specialization.router_saturation ({sat_a} vs {sat_ref}){tag}", reads,
                   lambda c, s, src=src: spec.router_saturation(c, s, sat_a, sat_ref, source=src), ["step", "layer"],
                   ["tokens", "overlap", "saturation", "top1_agreement"],
                   [(from_routes, lambda f: pd_saturation(f, [sat_a], sat_ref))])
              for src, tag, reads in sources),
            *(Case(f"specialization.saturation_curve (probe steps){tag}", reads,
                   lambda c, s, src=src: spec.saturation_curve(c, s.with_(tags=("probe",)), source=src),
                   ["step", "layer"], ["tokens", "overlap", "saturation", "top1_agreement"],
                   [(from_routes, lambda f: pd_saturation(f, probe_steps, probe_steps[-1]))])
              for src, tag, reads in sources),
        ]
    return out


def specialization_cases(rts: str, from_routes: str, n_layers: int) -> list[Case]:
    """The specialization analyses that have aggregate tables, twice: from those tables (source='aggregates',
    which raises if they cannot serve; 'auto', the default, picks them for this whole-run selection) and forced
    to read the routes (source='routes')."""
    out = []
    for src in ("aggregates", "routes"):
        tag = "" if src == "aggregates" else " [source=routes]"

        def reads(table: str, src=src) -> str:
            return f"aggregates ({table})" if src == "aggregates" else rts

        def with_source(fn: Callable, src=src, **kw) -> Callable:
            return lambda c, s: fn(c, s, source=src, **kw)

        out += [
            Case(f"specialization.domain_share{tag}", reads("sequence_stats"), with_source(spec.domain_share),
                 ["layer", "domain", "expert"], ["assigned", "share", "ratio"],
                 [(from_routes, lambda f: pd_domain_share(f, False))], fill_missing=True),
            Case(f"specialization.domain_share_first_choice{tag}", reads("sequence_stats"),
                 with_source(spec.domain_share_first_choice), ["layer", "domain", "expert"],
                 ["assigned", "share", "ratio"], [(from_routes, lambda f: pd_domain_share(f, True))],
                 fill_missing=True),
            Case(f"specialization.vocab_specialization{tag}", reads("token_stats"),
                 with_source(spec.vocab_specialization), ["layer", "token_id"],
                 ["count", "expert", "routed", "specialization"], [(from_routes, pd_vocab_specialization)]),
            Case(f"specialization.vocab_specialization_summary{tag}", reads("token_stats"),
                 with_source(spec.vocab_specialization_summary), ["layer"],
                 ["token_ids", "occurrences", "specialization"], [(from_routes, pd_vocab_summary)]),
            Case(f"specialization.top_tokens (n=10){tag}", reads("token_stats"), with_source(spec.top_tokens),
                 ["layer", "expert", "by", "rank"], ["token_id", "count", "token_count", "lift"],
                 [(from_routes, pd_top_tokens)]),
            Case(f"specialization.position_share{tag}", reads("position_stats"), with_source(spec.position_share),
                 ["layer", "bucket", "expert"], ["assigned", "share"],
                 [(from_routes, pd_position_share)], fill_missing=True),
            Case(f"specialization.coactivation{tag}", reads("pair_stats"), with_source(spec.coactivation),
                 ["layer", "expert_i", "expert_j"], ["tokens_i", "tokens_ij", "p_j_given_i"],
                 [(from_routes, pd_coactivation)]),
            Case(f"specialization.consecutive_agreement{tag}", reads("layer_stats"),
                 with_source(spec.consecutive_agreement), ["layer"],
                 ["pairs", "same_first", "first_in_topk", "topk_overlap", "baseline_first",
                  "baseline_first_in_topk"], [(from_routes, pd_consecutive)]),
            Case(f"specialization.mutual_information{tag}", reads("token_stats + sequence_stats"),
                 with_source(spec.mutual_information), ["layer", "variable", "slots"], ["n", "mi", "nmi"],
                 [(from_routes, pd_mutual_information)]),
            *(Case(f"specialization.layer_flow ({a} -> {b}){tag}", reads("flow_stats"),
                   lambda c, s, a=a, b=b, src=src: spec.layer_flow(c, s, a, b, source=src), ["expert_a", "expert_b"],
                   ["tokens", "share_of_a"], [(from_routes, lambda f, a=a, b=b: pd_layer_flow(f, a, b))])
              for a, b in ((0, 1), (0, n_layers - 1))),
        ]
    return out


# ------------------------------------------------------------------------------------------------ running


def compare(m: pd.DataFrame, p: pd.DataFrame, case: Case, rtol: float = 1e-6) -> str:
    """'ok' when pandas' result equals moeviz's on every key and compared column, else what differs."""
    if not case.cols:
        return "-"
    m = m.copy()
    p = p.copy()
    for k in case.keys:
        if m[k].dtype.kind in "iuf" or p[k].dtype.kind in "iuf":
            m[k] = m[k].astype("int64") if k != "capacity_factor" else m[k].astype("float64")
            p[k] = p[k].astype("int64") if k != "capacity_factor" else p[k].astype("float64")
        else:
            m[k] = m[k].astype(str)
            p[k] = p[k].astype(str)
    if not case.keys:
        m["_k"], p["_k"] = 0, 0
    keys = case.keys or ["_k"]
    j = m[keys + case.cols].merge(p[keys + case.cols], on=keys, how="outer", suffixes=("", "_pd"), indicator=True)
    only_pd = int((j["_merge"] == "right_only").sum())
    only_m = j["_merge"] == "left_only"
    if only_pd:
        return f"MISMATCH: {only_pd} rows only in pandas"
    if only_m.any() and not case.fill_missing:
        return f"MISMATCH: {int(only_m.sum())} rows only in moeviz"
    bad, skipped = [], []
    for c in case.cols:
        if p[c].isna().all() and not m[c].isna().all():
            skipped.append(c)  # e.g. prob_sum: not computable from routes
            continue
        a = pd.to_numeric(j[c], errors="coerce").astype("float64").values
        if c in case.null_is_zero:
            a = np.nan_to_num(a, nan=0.0)
        b = pd.to_numeric(j[c + "_pd"], errors="coerce").astype("float64").values
        if case.fill_missing:
            b = np.where(only_m.values, 0.0, b)
        if not np.allclose(a, b, rtol=rtol, atol=1e-9, equal_nan=True):
            i = int(np.flatnonzero(~np.isclose(a, b, rtol=rtol, atol=1e-9, equal_nan=True))[0])
            bad.append(f"{c} ({a[i]!r} vs {b[i]!r})")
    note = f" ({', '.join(skipped)} not in pandas' result)" if skipped else ""
    return ("ok" + note) if not bad else "MISMATCH: " + ", ".join(bad)


class RecordingConnection:
    """A DuckDB connection that remembers the SQL it ran (to EXPLAIN ANALYZE an analysis' slowest query)."""

    def __init__(self, con):
        self.con, self.log = con, []

    def execute(self, sql, params=None):
        t0 = time.perf_counter()
        out = self.con.execute(sql, params or [])
        self.log.append((time.perf_counter() - t0, sql, params or []))
        return out

    def __getattr__(self, name):
        return getattr(self.con, name)


def profiling_connection(store: Path):
    """The store's views on a connection that is not locked down (open_store locks the configuration, and with
    it profiling): built with store_reader's own steps, minus the lock-down. For EXPLAIN ANALYZE only."""
    from moeviz.store import duckdb_compat

    from moeviz.store import layout
    from moeviz.store import reader as sr

    runs = [sr._RunFiles.scan(d) for d in layout.find_runs(store)]
    con = duckdb_compat.connect()
    compacted = sr._attach_compacted(con, runs)
    for i, run in enumerate(runs):
        folded = compacted.get(i, {}).get("folded", set())
        run.segments = {t: [p for p in ps if layout.relative_name(run.run_dir, p) not in folded]
                        for t, ps in run.segments.items()}
    sr._register_segments(con, runs)
    con.register("_run_status", sr._status_table(con, runs, compacted))
    sr._create_views(con, compacted)
    return con


def _operators(node: dict, out: list) -> list:
    name = node.get("type") or node.get("operator_type") or "?"
    extra = node.get("extra_info") or {}
    detail = "; ".join(f"{k}: " + (", ".join(map(str, v)) if isinstance(v, list) else str(v))
                       for k, v in extra.items() if k in ("Groups", "Aggregates", "Join Type", "Conditions",
                                                          "Function", "Projections"))[:200]
    out.append((float(node.get("timing", node.get("operator_timing", 0.0)) or 0.0),
                int(node.get("intermediate_rows", node.get("operator_cardinality", 0)) or 0), name.strip(), detail))
    for c in node.get("children", []):
        _operators(c, out)
    return out


def explain(store: Path, case: Case, sel: Selection, top: int = 6) -> str:
    """The slowest query of an analysis, profiled: total time and its most expensive operators."""
    import json

    con = profiling_connection(store)
    rec = RecordingConnection(con)
    case.moeviz(rec, sel)
    t, sql, params = max(rec.log, key=lambda x: x[0])
    con.execute("PRAGMA enable_profiling = 'no_output'")
    con.execute("PRAGMA profiling_mode = 'detailed'")
    con.execute(sql, params).fetchall()
    info = json.loads(con.get_profiling_information(format="json"))
    con.execute("PRAGMA disable_profiling")
    ops = sorted([o for n in info.get("operator", [info]) for o in _operators(n, [])], key=lambda x: -x[0])[:top]
    lines = [f"slowest query: {t:.2f} s of {sum(x[0] for x in rec.log):.2f} s in {len(rec.log)} queries; "
             f"profiled total {info.get('total_time', info.get('latency', 0)):.2f} s; top operators:"]
    lines += [f"  {sec:7.2f} s  {rows:>12,} rows  {name}  {detail}" for sec, rows, name, detail in ops]
    return "\n".join(lines)


def call_with_timeout(con, fn: Callable, timeout_s: float | None):
    """fn() with DuckDB interrupted after timeout_s (raises TimeoutError)."""
    import threading

    if not timeout_s:
        return timed(fn)
    fired = threading.Event()

    def stop():
        fired.set()
        con.interrupt()

    timer = threading.Timer(timeout_s, stop)
    timer.start()
    try:
        return timed(fn)
    except Exception:
        if fired.is_set():
            raise TimeoutError(f"interrupted after {timeout_s:g} s") from None
        raise
    finally:
        timer.cancel()


def timed(fn: Callable, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def fmt_s(x: float | None, approx: bool = False) -> str:
    if x is None:
        return "n/a"
    s = f"{x:.3f}" if x < 10 else f"{x:.1f}"
    return ("~" + s) if approx else s


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run(store: Path, repeats: int, pandas_routes: int | None, only: str | None, no_pandas: bool,
        timeout_s: float | None = None, max_repeat_s: float | None = None) -> str:
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    con = open_store(store)
    open_s = time.perf_counter() - t0
    n_routes = con.execute("SELECT count(*) FROM routes").fetchone()[0]
    n_layers = con.execute("SELECT count(*) FROM layers").fetchone()[0]
    probe_steps = [int(r[0]) for r in con.execute(
        "SELECT DISTINCT step FROM sequences WHERE tag = 'probe' ORDER BY step").fetchall()]
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    sel = Selection()
    last_step = None
    if pandas_routes and pandas_routes < n_routes:  # pandas on the first steps holding ~pandas_routes routes
        per_step = con.execute("SELECT step, count(*) AS n FROM routes GROUP BY step ORDER BY step").df()
        last_step = int(per_step["step"][np.searchsorted(per_step["n"].cumsum().values, pandas_routes)])
    all_cases = [c for c in cases([s for s in probe_steps if last_step is None or s <= last_step], n_layers)
                 if only is None or only in c.name]
    results = []
    for case in all_cases:
        print(f"moeviz: {case.name} ...", file=sys.stderr, flush=True)
        try:
            m, first = call_with_timeout(con, lambda: case.moeviz(con, sel), timeout_s)
            n_rep = repeats if (max_repeat_s is None or first <= max_repeat_s) else 0  # slow: first call only
            reps = [call_with_timeout(con, lambda: case.moeviz(con, sel), timeout_s)[1] for _ in range(n_rep)]
            err = None
        except TimeoutError as e:
            m, first, reps, err = None, None, [], f"> {timeout_s:g} s (interrupted)"
            print(e, file=sys.stderr)
        except Exception as e:  # report, keep benchmarking the others
            traceback.print_exc()
            m, first, reps, err = None, None, [], f"{type(e).__name__}: {e}"[:120]
        results.append({"case": case, "m": m, "first": first, "rep": statistics.median(reps) if reps else None,
                        "n_rep": len(reps), "err": err})
    frames, load_s, scale = None, None, 1.0
    if not no_pandas:
        print("pandas: loading routes and aggregates ...", file=sys.stderr, flush=True)
        frames, load_s = timed(load_frames, con, last_step)
        scale = n_routes / frames.n_routes
        sub_sel = sel if last_step is None else Selection(steps=(0, last_step))
        for res in results:
            case = res["case"]
            res["pd"] = []
            m_sub = res["m"]
            if last_step is not None and case.pandas:
                try:  # moeviz on the pandas subset, for the equality check
                    m_sub = call_with_timeout(con, lambda: case.moeviz(con, sub_sel), timeout_s)[0]
                except Exception:
                    m_sub = None
            for what, fn in case.pandas:
                print(f"pandas: {case.name} ({what}) ...", file=sys.stderr, flush=True)
                try:
                    p, t = timed(fn, frames)
                    check = compare(m_sub, p, case) if m_sub is not None else "-"
                    res["pd"].append((what, t * scale, check))
                except MemoryError:
                    res["pd"].append((what, None, "n/a (memory)"))
                except Exception as e:
                    traceback.print_exc()
                    res["pd"].append((what, None, f"error: {type(e).__name__}: {e}"[:100]))
    approx = scale != 1.0
    lines = [
        f"Store: `{store}`: {n_routes:,} routes, {n_layers} MoE layers, "
        f"{con.execute('SELECT count(DISTINCT step) FROM step_stats').fetchone()[0]} steps "
        f"({len(probe_steps)} probe steps); DuckDB threads = {threads}; open_store {open_s * 1000:.0f} ms; "
        f"load average at start {os.getloadavg()[0]:.1f}.",
    ]
    if frames is not None:
        lines.append(
            f"pandas load (routes with narrow dtypes + aggregates, DuckDB -> Arrow -> pandas): {load_s:.1f} s for "
            f"{frames.n_routes:,} routes ({frames.routes.memory_usage(deep=True).sum() / 1e9:.2f} GB in memory); "
            f"peak RSS of this process {rss_gb():.1f} GB; excluded from the per-analysis times."
            + (f" pandas ran on steps 0-{last_step} ({frames.n_routes:,} routes); its times (marked ~) are "
               f"extrapolated linearly x{scale:.1f} to the whole store." if approx else ""))
    lines += [
        "",
        f"moeviz s = median of {repeats} repeated calls (first call in brackets). Speed-up = pandas s / moeviz s. "
        "Target: < 1 s (reads aggregates) or < 5 s (reads routes), and speed-up >= 10.",
        "",
        "| analysis | reads (moeviz) | moeviz s (first) | pandas computed from | pandas s | speed-up | equal | target met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        case = res["case"]
        limit = 1.0 if case.reads.startswith("aggregates") else 5.0
        ms = res["rep"] if res["rep"] is not None else res["first"]
        n_rep = "" if res.get("n_rep", repeats) == repeats else \
            (" = first call only" if not res.get("n_rep") else f", {res.get('n_rep')} repeat(s)")
        mtxt = f"{fmt_s(ms)} ({fmt_s(res['first'])}{n_rep})" if res["err"] is None else f"{res['err']}"
        pds = res.get("pd") or [("not reimplemented in pandas" if not case.pandas else "(pandas skipped)", None, "-")]
        for what, t, check in pds:
            speed = (t / ms) if (t is not None and ms) else None
            time_ok = ms is not None and ms < limit
            met = ("yes" if time_ok and speed is not None and speed >= 10 and (check == "-" or check.startswith("ok"))
                   else "time only" if time_ok and speed is None else
                   "no: " + ", ".join(x for x in [
                       None if time_ok else f"> {limit:g} s",
                       None if speed is None or speed >= 10 else f"{speed:.1f}x < 10x",
                       None if (check == "-" or check.startswith("ok")) else "result differs"] if x))
            lines.append(f"| {case.name} | {case.reads} | {mtxt} | {what} | {fmt_s(t, approx)} | "
                         f"{'n/a' if speed is None else f'{speed:.1f}x'} | {check} | {met} |")
    con.close()
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pandas-routes", type=lambda s: int(s.replace("_", "")), default=None,
                    help="run pandas on the first steps holding about this many routes (extrapolated)")
    ap.add_argument("--only", default=None, help="only the analyses whose name contains this")
    ap.add_argument("--no-pandas", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    ap.add_argument("--timeout", type=float, default=None, help="interrupt a moeviz call after this many seconds")
    ap.add_argument("--max-repeat-s", type=float, default=None,
                    help="do not repeat a moeviz call whose first call took longer than this (first call only)")
    ap.add_argument("--explain", action="store_true",
                    help="print EXPLAIN ANALYZE of the slowest query of each analysis selected by --only")
    args = ap.parse_args(argv)
    if args.explain:
        for case in cases([], 8):
            if args.only is None or args.only in case.name:
                print(f"### {case.name}\n\n```\n{explain(args.store, case, Selection())}\n```\n", flush=True)
        return 0
    text = run(args.store, args.repeats, args.pandas_routes, args.only, args.no_pandas, args.timeout,
               args.max_repeat_s)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
