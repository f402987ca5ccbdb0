"""Mutual information between a layer's expert and the token or the domain (normalised: NMI), from the
compaction's counts or the routes.

See `moeviz.analyses.specialization` for how these read the store.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from moeviz.analyses.specialization._shared import (
    SpecializationError,
    _counts_by_domain,
    _df,
    _per_run,
    _token_cells,
)
from moeviz.selection import Selection

_MI_COLUMNS = ["run_id", "layer", "variable", "slots", "n", "mi", "h_expert", "h_variable", "nmi"]


def mutual_information(con, sel: Selection, *, variables: Sequence[str] = ("token", "domain"),
                       source: str = "auto") -> pd.DataFrame:
    """Normalized mutual information between the expert and the token id, and between the expert and the domain,
    per layer: how much knowing one tells about the other (0 = independent, 1 = each determines the other).

    Two joint distributions per variable X (column `slots`):
      'first'  one observation per token: (X, its first-choice expert)
      'all'    one observation per route: (X, expert) for each of the token's k experts
    MI and entropies are in nats; NMI uses the arithmetic mean, as scikit-learn's default
    (`normalized_mutual_info_score(average_method='arithmetic')`): NMI = I(E; X) / ((H(E) + H(X)) / 2), with
    sklearn's conventions: 1 when both variables are constant, 0 when only one is.
    Tokens without ids (-1) are left out of 'token'; tokens without a domain are left out of 'domain'.
    """
    unknown = set(variables) - {"token", "domain"}
    if unknown or not variables:
        raise SpecializationError(
            f"variables must be a non-empty subset of ('token', 'domain'); got {tuple(variables)}"
        )

    def sums(run_id: str, variable: str) -> pd.DataFrame:
        """Per layer and slots: N and Σ c ln c over the joint cells and both marginals."""
        if variable == "token":
            src, params = _token_cells(sel, run_id)
            src = f"SELECT layer, token_id AS x, expert, n, f FROM ({src})"
        else:
            src, params = _counts_by_domain(sel, run_id, ["layer", "expert"], known_domain=True)
            src = f"SELECT layer, domain AS x, expert, n, f FROM ({src})"
        sql = f"""
            WITH c AS ({src}),
            j AS (
                SELECT layer, sum(f) AS n_first, sum(n) AS n_all,
                       sum(CASE WHEN f > 0 THEN f * ln(f) END) AS sxy_first, sum(n * ln(n)) AS sxy_all
                FROM c GROUP BY layer),
            mx AS (
                SELECT layer, sum(CASE WHEN vf > 0 THEN vf * ln(vf) END) AS sx_first,
                       count(*) FILTER (WHERE vf > 0) AS nx_first,
                       sum(vn * ln(vn)) AS sx_all, count(*) AS nx_all
                FROM (SELECT layer, x, sum(f) AS vf, sum(n) AS vn FROM c GROUP BY ALL) GROUP BY layer),
            my AS (
                SELECT layer, sum(CASE WHEN vf > 0 THEN vf * ln(vf) END) AS se_first,
                       count(*) FILTER (WHERE vf > 0) AS ne_first,
                       sum(vn * ln(vn)) AS se_all, count(*) AS ne_all
                FROM (SELECT layer, expert, sum(f) AS vf, sum(n) AS vn FROM c GROUP BY ALL) GROUP BY layer)
            SELECT * FROM j JOIN mx USING (layer) JOIN my USING (layer) ORDER BY layer"""
        wide = _df(con, sql, params)
        return pd.concat([
            pd.DataFrame({
                "slots": slots, "layer": wide["layer"], "n": wide[f"n_{slots}"], "s_xy": wide[f"sxy_{slots}"],
                "s_x": wide[f"sx_{slots}"], "s_y": wide[f"se_{slots}"], "nx": wide[f"nx_{slots}"],
                "ny": wide[f"ne_{slots}"],
            })
            for slots in ("first", "all")
        ], ignore_index=True)

    def one(run_id: str) -> pd.DataFrame:
        frames = []
        for variable in variables:
            s = sums(run_id, variable)
            if s.empty:
                continue
            s["variable"] = variable
            frames.append(s)
        if not frames:
            return pd.DataFrame()
        s = pd.concat(frames, ignore_index=True)
        s[["s_xy", "s_x", "s_y"]] = s[["s_xy", "s_x", "s_y"]].astype("float64").fillna(0.0)
        n = s["n"].astype("float64")
        ln_n = np.log(n)
        h_xy = ln_n - s["s_xy"] / n
        h_x = ln_n - s["s_x"] / n
        h_e = ln_n - s["s_y"] / n
        mi = (h_x + h_e - h_xy).clip(lower=0.0)
        denom = (h_x + h_e) / 2
        both_constant = (s["nx"] <= 1) & (s["ny"] <= 1)
        nmi = np.where(both_constant, 1.0, np.where(denom > 0, mi / denom.where(denom > 0, 1.0), 0.0))
        out = pd.DataFrame({
            "layer": s["layer"].astype("int64"), "variable": s["variable"], "slots": s["slots"],
            "n": n.astype("int64"), "mi": mi, "h_expert": h_e.clip(lower=0.0), "h_variable": h_x.clip(lower=0.0),
            "nmi": np.clip(nmi, 0.0, 1.0),
        })
        return out.sort_values(["layer", "variable", "slots"], ignore_index=True)

    return _per_run(con, sel, _MI_COLUMNS, one, source)
