"""Toy MoE: decision maps of a 2-D mixture of six logistic experts sparsified to k experts at compile time
(the k largest-norm gate rows for every input) against run time (the top-k gate logits of each input)."""

from __future__ import annotations

import dataclasses

import streamlit as st

from app.components import run_page, show_chart, show_table
from app.state import Ctx, cached_pure
from moeviz import charts
from moeviz.analyses.toy import maps_frame, toy_moe

FIT_GRID = 2  # the grid toy_moe draws its own maps on: the smallest it takes, as the page redraws them below


@st.cache_data(max_entries=50, show_spinner=False)
def _toy_at(seed: int, n_points: int, noise: float, grid: int):
    """The toy fitted for (seed, points, noise), with its maps on a `grid` x `grid` plane.

    `moeviz.analyses.toy.toy_moe` fits the model and draws the maps in one call, so a change of the map resolution alone
    refitted the model (0.4-0.7 s of the 2 s that change took). Here the fit is cached without the resolution and
    the maps are redrawn from its parameters (`moeviz.analyses.toy.decision_maps`)."""
    from moeviz.analyses.toy import decision_maps

    fitted = cached_pure(toy_moe, seed, n_points, FIT_GRID, noise=noise)
    axis, maps = decision_maps(fitted.params, grid)
    return dataclasses.replace(fitted, maps=maps, grid=axis)


def render(ctx: Ctx | None) -> None:
    _toy_model()


@st.fragment
def _toy_model() -> None:
    """The toy's inputs and everything they drive. A fragment: changing an input re-runs and redraws this part
    only, not the sidebar and the rest of the app around it (the toy needs no store)."""
    c1, c2, c3, c4 = st.columns(4)
    seed = int(c1.number_input("Seed", 0, 10_000, 0, key="toy_seed"))
    n_points = int(c2.number_input("Training points", 50, 5000, 1000, step=50, key="toy_points"))
    noise = float(c3.slider("Label noise (std)", 0.0, 0.5, 0.1, 0.01, key="toy_noise"))
    grid = int(c4.select_slider("Map resolution", [31, 51, 81, 101], value=51, key="toy_grid"))
    with st.spinner("Training the toy MoE..."):
        result = _toy_at(seed, n_points, noise, grid)
    maps = cached_pure(maps_frame, result)
    show_chart(charts.decision_maps(maps), maps, "toy-maps",
               caption="Blue: class 0, red: class 1 (the first quadrant). At k = 1 the compile-time model is one "
               "logistic regression (a straight boundary); the run-time model is already piecewise linear.")
    left, right = st.columns(2)
    with left:
        show_chart(charts.accuracy_lines(result.accuracy), result.accuracy, "toy-accuracy")
    with right:
        st.markdown("**Test accuracy by k** (dense: every expert, so only at k = E)")
        table = result.accuracy.pivot_table(index="k", columns="way", values="accuracy").reset_index()
        show_table(table, "toy-accuracy-table", shown=_accuracy_shown(table))


WAY_NAMES = {"compile": "compile time", "run": "run time", "dense": "dense"}


def _accuracy_shown(table):
    """The accuracy table as the page shows it: percentages, "—" where a way has no model (dense below k = E),
    never "None"."""
    shown = table.rename(columns=WAY_NAMES).rename_axis(columns=None)
    for c in shown.columns:
        if c != "k":
            shown[c] = [f"{v:.1%}" if v == v else "—" for v in shown[c]]
    return shown


if __name__ == "__main__":
    run_page("Toy MoE", render, needs_run=False)
