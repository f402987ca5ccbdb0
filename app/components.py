"""Pieces every page uses: a guard that turns failures into messages, and a chart with its data download."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Callable

import pandas as pd
import streamlit as st

from app.state import Ctx, current_context
from moeviz.analyses.step_buckets import MAX_POINTS
from moeviz.analyses.unknowns import UnknownQuantityError
from moeviz.errors import MoevizError

log = logging.getLogger("moeviz.app")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "chart"


def error_message(what: str, e: BaseException) -> None:
    """Show a failure as a message (never a stack trace); the traceback goes to the server log. What the run does not
    hold (an engine log's missing probabilities, slot order, token counts) is not a failure: an info box says why
    the chart is absent."""
    if isinstance(e, UnknownQuantityError):
        st.info(f"{what}: {e}")
    elif isinstance(e, MoevizError):
        st.error(f"{what}: {e}")
    else:
        import duckdb

        log.exception("%s failed", what)
        if isinstance(e, duckdb.Error):
            st.error(f"{what}: the store could not answer ({type(e).__name__}: {str(e).splitlines()[0]}). "
                     "If a segment is corrupt, run `moeviz compact` or remove the damaged file.")
        else:
            st.error(f"{what} failed: {type(e).__name__}: {e}")


@contextmanager
def guarded(what: str):
    """Run a section of a page; an exception becomes an info/error message so the rest of the page still shows.

    Streamlit's own control flow (st.rerun, st.stop) derives from BaseException and passes through.
    """
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure becomes a message, never a trace
        error_message(what, e)


def show_chart(fig, data: pd.DataFrame, key: str, *, caption: str | None = None) -> None:
    """Render a figure and offer its data as CSV."""
    st.plotly_chart(fig, width="stretch", key=f"chart-{key}")
    if caption:
        st.caption(caption)
    _csv_download("Download data (CSV)", data, key)


def bucket_note(step_bucket: int) -> str | None:
    """The caption of a curve over steps drawn in buckets (moeviz.analyses.step_buckets), None for every step."""
    if step_bucket <= 1:
        return None
    return (f"Bucketed: each point is {step_bucket:,} steps (plotted at the bucket's first step), computed from the "
            f"summed counts of those steps, not an average of per-step values; at most {MAX_POINTS:,} points per "
            f"line. Narrow the step range in the sidebar to see every step.")


def show_table(data: pd.DataFrame, key: str, *, height: int | None = None, shown: pd.DataFrame | None = None) -> None:
    """A data table with a CSV download; `shown` (default: `data`) is what the table displays, e.g. the same
    numbers formatted, while the download keeps `data`."""
    st.dataframe(data if shown is None else shown, width="stretch", hide_index=True, height=height or "auto",
                 key=f"table-{key}")
    _csv_download("Download table (CSV)", data, key)


def csv_of(data: pd.DataFrame) -> Callable[[], bytes]:
    """The CSV of `data`, as a callable that Streamlit calls only when the user clicks the download button.

    Deferred because writing it on every rerun cost 0.1-0.3 s on the Toy MoE's 85,000-row maps (and time on every
    other page) for a file that is hardly ever fetched."""
    return lambda: data.to_csv(index=False).encode("utf-8")


def _csv_download(label: str, data: pd.DataFrame, key: str) -> None:
    st.download_button(label, data=csv_of(data), file_name=f"{_slug(key)}.csv", mime="text/csv", key=f"dl-{key}")


OBSERVATIONAL = ("Routing frequency is observational: an expert that takes a domain's (or a token's) tokens need not be "
                 "the one that matters for them. Whether it does takes an intervention (ablate or reroute the expert "
                 "and measure the loss), which a routing log cannot show.")


def run_page(title: str, render: Callable[[Ctx], None], *, needs_run: bool = True) -> None:
    """A page body: title, the context main.py built, the page's own render inside a guard."""
    st.title(title)
    ctx = current_context()
    if needs_run and ctx is None:
        st.info("Pick a store and a run in the sidebar to see this page.")
        return
    with guarded(title):
        render(ctx)
