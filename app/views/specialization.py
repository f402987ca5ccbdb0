"""Specialization: which experts take which domains, tokens and positions, and how routes flow between layers."""

from __future__ import annotations

import streamlit as st

from app.components import run_page
from app.state import Ctx


def render(ctx: Ctx) -> None:
    st.info("Specialization needs moeviz.specialization.")


if __name__ == "__main__":
    run_page("Specialization", render)
