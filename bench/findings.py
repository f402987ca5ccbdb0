"""Compute every number in docs/findings.md from a moeviz store, with moeviz's public analysis functions only.

    python bench/findings.py runs/demo            # Markdown tables on stdout
    python bench/findings.py runs/demo --json out.json

Why a script: the findings in the docs must be reproducible from the recorded store, not hand-copied. Every
table printed here names the analysis that made it. Defaults follow docs/findings.md: held-out text
(tag='eval') at the last eval checkpoint, balance metrics on the train steps of the last 20% of training.
The store is only read (open_store gives a read-only connection); the shuffled-label NMI baseline copies the
eval routes into a private in-memory DuckDB.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import pandas as pd

from moeviz.analyses import aux_loss, capacity, health, load, placement, specialization
from moeviz.analyses.bounds import aux_loss_infimum
from moeviz.selection import Selection

CAPACITY_FACTORS = (1.0, 1.25)
POLICIES = ("position", "probability")


# ------------------------------------------------------------------------------------------------ selections


def run_ids(con) -> list[str]:
    """Runs of the store, in id order."""
    return [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall()]


def tagged_steps(con, run_id: str, tag: str) -> list[int]:
    """Steps of `run_id` whose sequences carry `tag`, ascending."""
    rows = con.execute(
        "SELECT DISTINCT step FROM sequences WHERE run_id = ? AND tag = ? ORDER BY step", [run_id, tag]
    ).fetchall()
    return [int(r[0]) for r in rows]


def eval_selection(con, run_id: str) -> Selection:
    """Held-out text at the last eval checkpoint of the run."""
    steps = tagged_steps(con, run_id, "eval")
    if not steps:
        raise SystemExit(f"run {run_id!r} has no step tagged 'eval'; record eval passes with tag='eval'")
    return Selection(run_ids=(run_id,), tags=("eval",), steps=(steps[-1], steps[-1]))


def late_train_steps(con, run_id: str, share: float = 0.2) -> list[int]:
    """The train steps of the last `share` of training (at least one)."""
    steps = tagged_steps(con, run_id, "train")
    if not steps:
        raise SystemExit(f"run {run_id!r} has no step tagged 'train'")
    return steps[-max(1, math.ceil(share * len(steps))):]


# ------------------------------------------------------------------------------------------------ 1. specialization


def top_experts_by_domain(con, run_id: str, n: int = 2) -> pd.DataFrame:
    """Per layer and domain: the `n` experts taking most of the domain's first choices, with that share, and the
    top expert's all-slot share against the uniform k/E (ratio)."""
    sel = eval_selection(con, run_id)
    first = specialization.domain_share_first_choice(con, sel)
    allk = specialization.domain_share(con, sel)
    rows = []
    for (layer, domain), g in first.groupby(["layer", "domain"], sort=True):
        g = g.sort_values(["share", "expert"], ascending=[False, True]).head(n)
        a = allk[(allk.layer == layer) & (allk.domain == domain)].set_index("expert")
        top = int(g.expert.iloc[0])
        rows.append({
            "run_id": run_id, "layer": int(layer), "domain": domain, "tokens": int(g.tokens.iloc[0]),
            "top_experts": ", ".join(f"E{int(e)} {s:.0%}" for e, s in zip(g.expert, g.share)),
            "top_first_share": float(g.share.iloc[0]),
            "top_allk_share": float(a.loc[top, "share"]), "uniform_allk": float(a.loc[top, "uniform"]),
            "top_allk_ratio": float(a.loc[top, "ratio"]),
        })
    return pd.DataFrame(rows)


def _eval_copy(con, run_id: str, sel: Selection):
    """A private in-memory DuckDB with the public tables of one run restricted to `sel`'s step (for shuffling)."""
    from moeviz.store import duckdb_compat

    step = sel.steps[0]
    mem = duckdb_compat.connect()
    frames = {
        "runs": con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id]).df(),
        "layers": con.execute("SELECT * FROM layers WHERE run_id = ?", [run_id]).df(),
        "routes": con.execute("SELECT * FROM routes WHERE run_id = ? AND step = ?", [run_id, step]).df(),
        "sequences": con.execute(
            "SELECT * FROM sequences WHERE run_id = ? AND step = ? AND tag = 'eval'", [run_id, step]).df(),
    }
    for name, df in frames.items():
        mem.register(f"_{name}", df)
        mem.execute(f"CREATE TABLE {name} AS SELECT * FROM _{name}")
        mem.unregister(f"_{name}")
    return mem


def nmi_with_baseline(con, run_id: str, shuffles: int = 50, seed: int = 0) -> pd.DataFrame:
    """NMI(first-choice expert, domain) per layer, and the same with the domain labels shuffled across the eval
    sequences (`shuffles` permutations): mean and maximum, the NMI that chance alone gives with this few
    sequences."""
    sel = eval_selection(con, run_id)
    real = specialization.mutual_information(con, sel, variables=("domain",))
    real = real[real.slots == "first"][["layer", "nmi", "n"]].rename(columns={"nmi": "nmi_first"})
    mem = _eval_copy(con, run_id, sel)
    seqs = mem.execute("SELECT step, rank, seq, domain FROM sequences ORDER BY step, rank, seq").df()
    rng = np.random.default_rng(seed)
    null = []
    for _ in range(shuffles):
        seqs["shuffled"] = rng.permutation(seqs.domain.to_numpy())
        mem.register("_perm", seqs)
        mem.execute("UPDATE sequences s SET domain = p.shuffled FROM _perm p "
                    "WHERE s.step = p.step AND s.rank = p.rank AND s.seq = p.seq")
        mem.unregister("_perm")
        mi = specialization.mutual_information(mem, sel, variables=("domain",))
        null.append(mi[mi.slots == "first"].set_index("layer").nmi)
    null = pd.concat(null, axis=1)
    out = real.set_index("layer")
    out["shuffled_mean"] = null.mean(axis=1)
    out["shuffled_max"] = null.max(axis=1)
    out.insert(0, "run_id", run_id)
    return out.reset_index()


# ------------------------------------------------------------------------------------------------ 2. balance


def _late(df: pd.DataFrame, steps: list[int]) -> pd.DataFrame:
    return df[df.step.isin(steps)]


def balance_per_layer(con, run_id: str) -> pd.DataFrame:
    """Mean over the late train steps of the per-step max/mean, MaxVio and Switch loss, per layer."""
    steps = late_train_steps(con, run_id)
    sel = Selection(run_ids=(run_id,), steps=(steps[0], steps[-1]))
    imb = _late(load.imbalance(con, sel), steps).groupby("layer")[["max_over_mean", "max_vio", "norm_entropy"]].mean()
    sw = _late(aux_loss.switch_loss(con, sel), steps).groupby("layer")[["aux_loss"]].mean()
    out = imb.join(sw).reset_index()
    out.insert(0, "run_id", run_id)
    out["steps"] = f"{steps[0]}-{steps[-1]} ({len(steps)} train steps)"
    return out


def pooled_loss(con, run_id: str) -> dict:
    """transformers' pooled load-balancing loss (uniform = k), mean over the late train steps."""
    steps = late_train_steps(con, run_id)
    sel = Selection(run_ids=(run_id,), steps=(steps[0], steps[-1]))
    p = _late(aux_loss.pooled_switch_loss(con, sel), steps)
    return {"run_id": run_id, "pooled_aux_loss": float(p.aux_loss.mean()),
            "pooled_per_slot": float(p.aux_loss_per_slot.mean()), "mean_layer_loss": float(p.mean_layer_loss.mean()),
            "top_k": int(p.top_k.iloc[0]), "n_experts": int(p.n_experts.iloc[0])}


def expert_parallel(con, run_id: str, gpus: int = 4, redundant: int = 2) -> pd.DataFrame:
    """Busiest of `gpus` GPUs over the mean GPU per layer (mean over the late train steps of the per-step value: a
    step waits for its busiest GPU), contiguous placement against a balanced one fitted on the same steps, without
    and with `redundant` replicas (`moeviz.analyses.placement.placement_comparison`)."""
    steps = late_train_steps(con, run_id)
    sel = Selection(run_ids=(run_id,), steps=(steps[0], steps[-1]))
    cmp = _late(placement.placement_comparison(con, sel, gpus, redundant=redundant, by_step=True), steps)
    cmp = cmp.assign(placement=cmp.placement.where(cmp.redundant == 0, cmp.placement + f"_r{redundant}"))
    out = cmp.pivot_table(index="layer", columns="placement", values="max_over_mean", aggfunc="mean")
    out = out[["contiguous", "balanced", f"balanced_r{redundant}"]].reset_index()
    out.columns.name = None
    out.insert(0, "run_id", run_id)
    out.insert(2, "gpus", gpus)
    return out


# ------------------------------------------------------------------------------------------------ 3. capacity


def capacity_table(con, run_id: str) -> pd.DataFrame:
    """Drop rate (and share of gate weight dropped) per layer and overall, per CF and policy, groups = one step."""
    sel = eval_selection(con, run_id)
    rows = []
    for cf in CAPACITY_FACTORS:
        for policy in POLICIES:
            for by in (("layer",), ()):
                d = capacity.capacity_drops(con, sel, cf, policy=policy, group="step", by=by, with_weight=True)
                for _, r in d.iterrows():
                    rows.append({"run_id": run_id, "capacity_factor": cf, "policy": policy,
                                 "layer": int(r.layer) if by else "all", "drop_rate": float(r.drop_rate),
                                 "weight_drop_rate": float(r.weight_drop_rate)})
    return pd.DataFrame(rows)


def capacity_train(con, run_id: str) -> pd.DataFrame:
    """Drop rate on the late train steps (train batches are what a capacity-limited router sees), overall, per
    layer and per domain, one column per capacity factor (the count of drops does not depend on the policy)."""
    steps = late_train_steps(con, run_id)
    sel = Selection(run_ids=(run_id,), steps=(steps[0], steps[-1]), tags=("train",))
    rows = []
    for by in ((), ("layer",), ("domain",)):
        d = capacity.drop_curve(con, sel, CAPACITY_FACTORS, policy="position", group="step", by=by)
        d["part"] = "all" if not by else d[by[0]].map(lambda v, n=by[0]: f"{n} {v}")
        rows.append(d.pivot(index="part", columns="capacity_factor", values="drop_rate").reset_index())
    out = pd.concat(rows, ignore_index=True)
    out.columns = ["part"] + [f"drop_rate_cf_{c}" for c in out.columns[1:]]
    out.insert(0, "run_id", run_id)
    return out


# ------------------------------------------------------------------------------------------------ 4. other


def saturation(con, run_id: str) -> pd.DataFrame:
    """Router saturation (OLMoE) of each probe checkpoint against the last one, per layer."""
    sel = Selection(run_ids=(run_id,), tags=("probe",))
    return specialization.saturation_curve(con, sel)[["run_id", "step", "ref_step", "layer", "saturation",
                                                       "top1_agreement"]]


def agreement(con, run_id: str) -> pd.DataFrame:
    """Consecutive-token routing agreement (Mixtral §5) on the eval text, against its baselines."""
    d = specialization.consecutive_agreement(con, eval_selection(con, run_id))
    return d[["run_id", "layer", "pairs", "rate_first", "baseline_first", "uniform_first", "rate_topk_overlap",
              "uniform_topk_overlap"]]


def domain_expert_tokens(con, run_id: str, domains=("it", "math"), n: int = 8) -> pd.DataFrame:
    """For the layer with the highest NMI(expert, domain): the expert taking most first choices of each domain in
    `domains`, and its top tokens by lift (P(token | expert) / P(token), tokens seen >= 5 times)."""
    sel = eval_selection(con, run_id)
    mi = specialization.mutual_information(con, sel, variables=("domain",))
    mi = mi[mi.slots == "first"]
    layer = int(mi.sort_values("nmi").layer.iloc[-1])
    first = specialization.domain_share_first_choice(con, sel)
    tops = specialization.top_tokens(con, sel.with_(layers=(layer,)), n=n, min_count=5)
    rows = []
    for dom in domains:
        f = first[(first.layer == layer) & (first.domain == dom)]
        if f.empty:
            continue
        expert = int(f.sort_values(["share", "expert"], ascending=[False, True]).expert.iloc[0])
        t = tops[(tops.expert == expert) & (tops["by"] == "lift")]
        rows.append({"run_id": run_id, "layer": layer, "domain": dom, "expert": expert,
                     "domain_first_share": float(f.share.max()),
                     "tokens": " ".join(repr(x if isinstance(x, str) else f"#{i}")
                                        for x, i in zip(t.text, t.token_id)),
                     "lifts": ", ".join(f"{v:.1f}" for v in t.lift)})
    return pd.DataFrame(rows)


def digits_outside_math(con, run_id: str) -> pd.DataFrame:
    """Number tokens inside non-math eval text: per layer, the share whose first choice is the expert that takes
    most number tokens in math text, against the share of the other tokens of the same sequences that go there.
    Plain SQL over the public views (routes, sequences, vocab); tokens are numbers when their text is digits."""
    sel = eval_selection(con, run_id)
    step = sel.steps[0]
    df = con.execute("""
        WITH t AS (
            SELECT r.layer, r.expert, s.domain, regexp_matches(trim(v.text), '^[0-9]+$') AS is_num
            FROM routes r
            JOIN sequences s ON s.run_id = r.run_id AND s.step = r.step AND s.rank = r.rank AND s.seq = r.seq
            JOIN vocab v ON v.run_id = r.run_id AND v.token_id = r.token_id
            WHERE r.run_id = ? AND r.step = ? AND s.tag = 'eval' AND r.slot = 0),
        num_expert AS (
            SELECT layer, mode(expert) AS expert FROM t WHERE domain = 'math' AND is_num GROUP BY layer)
        SELECT t.layer, n.expert AS math_number_expert,
               count(*) FILTER (WHERE is_num) AS numbers_outside_math,
               avg(CASE WHEN t.expert = n.expert THEN 1 ELSE 0 END) FILTER (WHERE is_num) AS numbers_share,
               avg(CASE WHEN t.expert = n.expert THEN 1 ELSE 0 END) FILTER (WHERE NOT is_num) AS other_tokens_share
        FROM t JOIN num_expert n ON n.layer = t.layer
        WHERE t.domain <> 'math' GROUP BY ALL ORDER BY t.layer""", [run_id, step]).df()
    df.insert(0, "run_id", run_id)
    return df


def health_findings(con, run_id: str) -> pd.DataFrame:
    """moeviz's health checks over the late train steps (non-ok rows only)."""
    steps = late_train_steps(con, run_id)
    h = health.health_summary(con, Selection(run_ids=(run_id,), steps=(steps[0], steps[-1])))
    return h[h.severity != "ok"][["run_id", "severity", "check", "layer", "expert", "value", "message"]]


# ------------------------------------------------------------------------------------------------ driver


def compute(con, *, shuffles: int = 50) -> dict[str, pd.DataFrame]:
    """Every table of docs/findings.md, keyed by section name."""
    runs = run_ids(con)
    cat = lambda f: pd.concat([f(con, r) for r in runs], ignore_index=True)  # noqa: E731
    first_run = con.execute("SELECT n_experts, top_k FROM runs ORDER BY run_id LIMIT 1").fetchone()
    E, k = int(first_run[0]), int(first_run[1])
    bound = aux_loss_infimum(E, k)
    return {
        "specialization": cat(top_experts_by_domain),
        "nmi": pd.concat([nmi_with_baseline(con, r, shuffles=shuffles) for r in runs], ignore_index=True),
        "balance": cat(balance_per_layer),
        "pooled": pd.DataFrame([pooled_loss(con, r) for r in runs]),
        "bound": pd.DataFrame([{"n_experts": E, "top_k": k, "switch_uniform": 1.0, "infimum": bound.value,
                                "fraction": str(bound.fraction), "family": bound.family}]),
        "expert_parallel": cat(expert_parallel),
        "capacity": cat(capacity_table),
        "capacity_train": cat(capacity_train),
        "saturation": cat(saturation),
        "agreement": cat(agreement),
        "domain_tokens": cat(domain_expert_tokens),
        "digits_outside_math": cat(digits_outside_math),
        "health": cat(health_findings),
    }


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if not math.isnan(v) else "NA"
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    """A pipe table (no tabulate dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def render(results: dict[str, pd.DataFrame]) -> str:
    """All tables as Markdown, each under the name of its section."""
    parts = []
    for name, df in results.items():
        parts.append(f"## {name}\n\n{markdown_table(df) if len(df) else '(none)'}\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="store folder (e.g. the output of `moeviz demo`)")
    ap.add_argument("--json", help="also write the tables as JSON records here")
    ap.add_argument("--shuffles", type=int, default=50, help="label permutations for the NMI baseline")
    args = ap.parse_args(argv)
    from moeviz.store import open_store

    con = open_store(args.store)
    results = compute(con, shuffles=args.shuffles)
    print(render(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({k: json.loads(v.to_json(orient="records")) for k, v in results.items()}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
