"""Widgets for wide models (58 MoE layers x 256 experts): pages of layers, and finding one expert.

Why: one panel per layer and one line per expert is 58 panels x 256 lines, megabytes of figure JSON that no one
can read. Pages drawing per-layer panels show LAYERS_PER_PAGE layers at a time (a select box picks which), and
curves per expert show the busiest experts of each layer with the others summed
(moeviz.analyses.top_experts); `find_expert` lets a reader follow one expert by number across layers and pages.
"""

from __future__ import annotations

import streamlit as st

from app.state import Ctx

LAYERS_PER_PAGE = 8  # panels per page: 2 rows of 4, a screen's height
WIDE_EXPERTS = 16  # above this many experts per layer, curves show the busiest experts and the others summed
TOP_EXPERTS = 8  # the busiest experts drawn per layer
# step_stats rows (selected steps x layers x experts, per rank) above which replaying them per widget change takes
# seconds: 30 M rows (2,000 steps of 58 x 256) replayed in 1.4-1.8 s, 149 M in 14-19 s (docs/benchmarks.md)
SLOW_REPLAY_ROWS = 2_000_000


def is_wide(ctx: Ctx) -> bool:
    return ctx.n_experts > WIDE_EXPERTS


def replay_is_slow(ctx: Ctx) -> bool:
    """Whether an analysis that replays every selected step_stats row (capacity drops at an arbitrary factor)
    takes seconds on this run, so that a page should offer what the compacted tables answer instead."""
    return len(ctx.selected_steps) * len(ctx.chosen_layers) * ctx.n_experts > SLOW_REPLAY_ROWS


def layer_page(ctx: Ctx, key: str) -> tuple[int, ...] | None:
    """The layers a page's per-layer panels show: all selected ones when they fit one page (None: the sidebar's
    selection as it is), else the page of LAYERS_PER_PAGE layers picked in a select box."""
    layers = list(ctx.chosen_layers)
    if len(layers) <= LAYERS_PER_PAGE:
        return None
    pages = [tuple(layers[i:i + LAYERS_PER_PAGE]) for i in range(0, len(layers), LAYERS_PER_PAGE)]
    page = st.selectbox(
        "Layers shown", range(len(pages)), key=f"{key}-layer-page",
        format_func=lambda i: f"layers {pages[i][0]}-{pages[i][-1]} ({i + 1} of {len(pages)})",
        help=f"{len(layers)} MoE layers: {LAYERS_PER_PAGE} panels at a time. The sidebar's Layers pick narrows them.")
    return pages[int(page)]


def find_expert(ctx: Ctx, key: str) -> int | None:
    """An expert number typed by the reader (None: none): charts keep and mark it in every layer."""
    value = st.number_input(
        "Find expert", min_value=0, max_value=max(0, ctx.n_experts - 1), value=None, step=1, key=f"{key}-find",
        placeholder=f"0-{ctx.n_experts - 1}",
        help="An expert number: drawn in black in every layer's panel, kept even when it is not among the busiest.")
    return None if value is None else int(value)
