"""Toy MoE: decision maps of a 2-D mixture of logistic experts sparsified to k experts at compile time
(the k largest-norm router rows) against run time (top-k per input)."""

from __future__ import annotations

import streamlit as st

from app.components import run_page
from app.state import Ctx


def render(ctx: Ctx | None) -> None:
    st.info("The toy model needs moeviz.toy.")


if __name__ == "__main__":
    run_page("Toy MoE", render, needs_run=False)
