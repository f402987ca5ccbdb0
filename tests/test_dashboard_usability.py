"""What a new user trips over in the dashboard (issue 16), checked on the chart functions' output and, where the
page decides what is shown, with AppTest on a real store (the fixtures of tests/test_app.py).

Each value drawn is checked against an independent computation from the routing arrays the store was written
from, not only "something is shown"."""

from __future__ import annotations

import html
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moeviz import charts
from moeviz.testing import store_from_routing, synthetic_routing


class _Tokens(HTMLParser):
    """The tokens of `charts.token_text_html`: (layer, pos, expert, text, title) per token span, in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict] = []
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and a.get("class") == "moeviz-token":
            self._open = {"layer": int(a["data-layer"]), "pos": int(a["data-pos"]),
                          "expert": int(a["data-expert"]) if "data-expert" in a else None,
                          "title": a["title"], "style": a["style"], "text": ""}

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(self._open)
            self._open = None


def parse_tokens(body: str) -> list[dict]:
    p = _Tokens()
    p.feed(body)
    return p.spans


# --- Tokens: the text itself, coloured by expert, one line per layer ----------------------------------------------


def test_token_text_is_the_sentence_coloured_by_top_expert_with_experts_on_hover():
    r = synthetic_routing(n_steps=1, n_layers=3, n_experts=6, top_k=2, seqs_per_step=1, seq_len=9, seed=3)
    con = store_from_routing(**r)
    words = ["The", " cat", " <sat>", " on", "\n", " the", " mat", "&", "."]
    con.execute("INSERT INTO vocab SELECT 'run0', i, 'w' || i FROM range(100) r(i)")
    for t, w in zip(r["token_ids"], words):
        con.execute("UPDATE vocab SET text = ? WHERE token_id = ?", [w, int(t)])
    from moeviz.store.catalog import sequence_routes

    df = sequence_routes(con, "run0", 0, 0, 0)
    body = charts.token_text_html(df, n_experts=6)
    spans = parse_tokens(body)
    texts = {int(t): w for t, w in zip(r["token_ids"], words)}  # the same id may repeat: last word wins, as vocab
    assert len(spans) == 3 * 9
    for layer in range(3):
        line = [s for s in spans if s["layer"] == layer]
        assert [s["pos"] for s in line] == list(range(9))  # one line per layer, tokens in order
        # the text itself (newline shown as ⏎), readable as the sentence
        assert "".join(s["text"] for s in line) == "".join(texts[int(t)] for t in r["token_ids"]).replace("\n", "⏎")
        # each token on its top expert's colour, and its experts with weights on hover
        np.testing.assert_array_equal([s["expert"] for s in line], r["index"][:, layer, 0])
        for s in line:
            bg = re.search(r"background:([^;]+)", s["style"]).group(1)
            assert bg == charts.EXPERT_COLORS[s["expert"]]
            (e0, e1), (w0, w1) = r["index"][s["pos"], layer], r["weights"][s["pos"], layer]
            assert f"e{e0} {w0:.3f}, e{e1} {w1:.3f}" in s["title"] and f"layer {layer}" in s["title"]
    assert "<sat>" not in body and html.escape("<sat>") in body  # token text is escaped, never markup
    assert body.count("<br>") == 3  # the newline token breaks the line, once per layer
    assert all(f"expert {e}<" in body for e in range(6))  # the legend


def test_token_text_of_an_empty_sequence_says_so():
    empty = pd.DataFrame(columns=["pos", "text", "layer", "slot", "expert", "weight"])
    assert "no per-token detail" in charts.token_text_html(empty, n_experts=4)


# --- pages, on the real store of tests/test_app.py ------------------------------------------------------------------

sys.path.insert(0, str(Path(__file__).parent))
from test_app import (  # noqa: E402
    MAIN,
    VOCAB,
    _release_cached_connections,  # noqa: F401 - fixture
    arr,
    chart,
    charts as page_charts,
    open_app,
    routing,  # noqa: F401 - fixture
    store,  # noqa: F401 - fixture
    texts,
)


def test_tokens_page_shows_the_text_coloured_by_expert(store, routing):
    at = open_app(store, page="tokens")
    (el,) = at.get("html")
    spans = parse_tokens(el.proto.body)
    sel = (routing["steps"] == 3) & (routing["seqs"] == 0)  # newest step, first sequence: the default
    for layer in range(MAIN["n_layers"]):
        line = [s for s in spans if s["layer"] == layer]
        assert [s["text"] for s in line] == [VOCAB[t] for t in routing["token_ids"][sel]]
        np.testing.assert_array_equal([s["expert"] for s in line], routing["index"][sel, layer, 0])
