"""moeviz dashboard entry point: `streamlit run app/main.py -- PATH` (or `moeviz dashboard PATH`).

Builds the sidebar (store, run, selection, live refresh), hands the page context to the chosen page through
session state, and runs the page (`st.navigation` + `st.Page`, one file per page under app/views/).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # `streamlit run app/main.py` puts app/ on the path, not the package root
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from app import sidebar, state  # noqa: E402
from app.components import guarded  # noqa: E402
from moeviz import charts  # noqa: E402

FAVICON = str(Path(__file__).resolve().parent / "favicon.png")
# (file under app/, title, icon); the order is the order in the navigation
PAGES = [
    ("views/overview.py", "Overview", ":material/dashboard:"),
    ("views/load.py", "Load balance", ":material/balance:"),
    ("views/aux_loss.py", "Aux loss", ":material/functions:"),
    ("views/balancing.py", "Balancing", ":material/tune:"),
    ("views/capacity.py", "Capacity", ":material/filter_alt:"),
    ("views/expert_parallel.py", "Expert parallel", ":material/device_hub:"),
    ("views/specialization.py", "Specialization", ":material/category:"),
    ("views/tokens.py", "Tokens", ":material/text_fields:"),
    ("views/bounds.py", "Bound explorer", ":material/calculate:"),
    ("views/toy.py", "Toy MoE", ":material/scatter_plot:"),
    ("views/sql.py", "SQL", ":material/terminal:"),
    ("views/compare.py", "Compare", ":material/compare:"),
    ("views/agreement.py", "Agreement", ":material/join_inner:"),
]


def main() -> None:
    # a local file: a `:material/...:` page icon makes the browser fetch the favicon from fonts.gstatic.com,
    # which fails on every page load offline
    st.set_page_config(page_title="moeviz", page_icon=FAVICON, layout="wide")
    charts.use_moeviz_template_by_default()  # this process draws moeviz charts only: ~20 -> 3 ms a figure
    # expanded: every page in the sidebar (past 10 pages Streamlit folds the rest under "View more")
    nav = st.navigation([st.Page(path, title=title, icon=icon) for path, title, icon in PAGES], expanded=True)
    ctx = None
    with guarded("Sidebar"):
        ctx = sidebar.build()
    state.set_context(ctx)
    nav.run()


main()
