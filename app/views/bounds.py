"""Bound explorer: the true lower bound (infimum) of the Switch load-balancing loss for E experts and top-k."""

from __future__ import annotations

import streamlit as st

from app.components import run_page
from app.state import Ctx, cached_pure


def infimum_value(n_experts: int, top_k: int, tokens: int | None = None) -> float | None:
    """The infimum of the Switch loss for E and k (None when moeviz.bounds is absent)."""
    res = cached_pure("moeviz.bounds.aux_loss_infimum", int(n_experts), int(top_k), tokens)
    return float(getattr(res, "value", res))


def render(ctx: Ctx | None) -> None:
    st.info("The bound explorer needs moeviz.bounds.")


if __name__ == "__main__":
    run_page("Bound explorer", render, needs_run=False)
