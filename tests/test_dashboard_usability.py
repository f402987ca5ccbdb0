"""What a new user trips over in the dashboard (issue 16), checked on the chart functions' output and, where the
page decides what is shown, with AppTest on a real store (the fixtures of tests/test_app.py).

Each value drawn is checked against an independent computation from the routing arrays the store was written
from, not only "something is shown"."""

from __future__ import annotations

import html
import json
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



# --- ratios to uniform: a colour scale that cannot go below 0 ------------------------------------------------------


def _color_at(trace, z: float) -> str:
    """The colour scale's stop at value z (the stops of ratio_colorscale sit at 0, ½, 1, … of the ratio)."""
    pos = (z - trace.zmin) / (trace.zmax - trace.zmin)
    stops = {round(float(p), 9): c for p, c in trace.colorscale}
    return stops[round(pos, 9)]


def _ratio_scale_checks(trace, values) -> None:
    v = np.asarray(values, float)
    assert trace.zmid is None and trace.zmin == 0  # no impossible negative ratios on the bar
    assert trace.zmax == pytest.approx(max(2.0, np.nanmax(v)))  # the largest ratio is on the bar
    assert _color_at(trace, 1.0) == charts.RATIO_WHITE  # uniform is white
    assert _color_at(trace, 0.0) == trace.colorscale[0][1] != charts.RATIO_WHITE  # a dead expert: the deepest blue


def test_every_times_uniform_heat_map_starts_at_0_with_1_white():
    rows = [{"run_id": "r", "layer": l, "expert": e, "relative_load": [0.0, 0.5, 1.0, 6.5][e], "load_fraction": 0.25,
             "domain": d, "ratio": [0.0, 1.0, 3.0, 0.2][e] * (1 + l), "share": 0.1, "bucket": b, "pos_lo": lo,
             "pos_hi": hi}
            for l in range(2) for e in range(4) for d, (b, lo, hi) in zip(["code", "math"], [(0, 0, 1), (1, 1, None)])]
    df = pd.DataFrame(rows)
    df["pos_hi"] = df["pos_hi"].astype("Int64")
    _ratio_scale_checks(charts.load_heatmap(df.drop_duplicates(["layer", "expert"]), value="relative_load").data[0],
                        df["relative_load"])
    _ratio_scale_checks(charts.domain_heatmap(df, layer=1).data[0], df[df.layer == 1]["ratio"])
    _ratio_scale_checks(charts.position_heatmap(df, layer=0).data[0], df[df.layer == 0]["ratio"])
    both = pd.concat([df, df.assign(run_id="s", ratio=df.ratio / 2, relative_load=df.relative_load / 4)])
    fig = charts.compare_domain_share(both, runs=("r", "s"), layer=1)
    for t in fig.data:  # both runs on one scale: 0 … the larger run's max
        _ratio_scale_checks(t, both[both.layer == 1]["ratio"])
    for t in charts.compare_heatmaps(both.drop_duplicates(["run_id", "layer", "expert"]), value="relative_load",
                                     runs=("r", "s")).data:
        _ratio_scale_checks(t, both["relative_load"])
    # a small ratio still gets a bar up to 2, with 1 in the middle
    small = df.assign(relative_load=df.relative_load.clip(upper=1.2)).drop_duplicates(["layer", "expert"])
    assert charts.load_heatmap(small, value="relative_load").data[0].zmax == 2.0


# --- position buckets: in position order, "0" not "0–0" -------------------------------------------------------------


def test_position_heat_map_rows_are_in_position_order_and_single_positions_read_as_one_number():
    r = synthetic_routing(n_steps=1, n_layers=1, n_experts=4, top_k=1, seqs_per_step=2, seq_len=80, seed=1)
    con = store_from_routing(**r)
    from moeviz.analyses.specialization import position_share
    from moeviz.selection import Selection

    pos = position_share(con, Selection())
    hm = charts.position_heatmap(pos, layer=0).data[0]
    assert list(hm.y) == ["0", "1", "2–3", "4–7", "8–15", "16–31", "32–63", "64–127"]  # the buckets with tokens
    # each row holds its own bucket's ratios, independently: the share of the bucket's tokens sent to each expert
    positions = np.tile(np.arange(80), 2)
    edges = [0, 1, 2, 4, 8, 16, 32, 64, 128]
    for row, (lo, hi) in enumerate(zip(edges, edges[1:])):
        in_bucket = (positions >= lo) & (positions < hi)
        want = np.bincount(r["index"][in_bucket, 0, 0], minlength=4) / in_bucket.sum() / (1 / 4)
        np.testing.assert_allclose(np.asarray(hm.z, float)[row], want, rtol=1e-9)


# --- pages, on the real store of tests/test_app.py ------------------------------------------------------------------

sys.path.insert(0, str(Path(__file__).parent))
from test_app import (  # noqa: E402
    MAIN,
    VOCAB,
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


# --- a run with train, eval and probe steps, as the demo records them ----------------------------------------------

TAGS = ["train", "probe", "train", "eval", "train", "probe", "train", "probe"]  # step -> tag


@pytest.fixture(scope="module")
def tagged_routing():
    r = synthetic_routing(n_steps=len(TAGS), n_layers=2, n_experts=4, top_k=2, seqs_per_step=2, seq_len=8, seed=5)
    steps = r["steps"]
    r["tags"] = np.asarray([TAGS[s] for s in steps], dtype=object)
    first_probe = steps == TAGS.index("probe")
    for s in np.flatnonzero(np.asarray(TAGS) == "probe"):  # the probe batch: the same tokens at every probe step
        r["token_ids"][steps == s] = r["token_ids"][first_probe]
    return r


@pytest.fixture(scope="module")
def tagged_store(tmp_path_factory, tagged_routing):
    from test_app import write_run_dir

    root = tmp_path_factory.mktemp("tagged")
    write_run_dir(root / "tagged", tagged_routing, run_id="tagged", vocab=VOCAB)
    return root


def _saturation(r, a: int, b: int, layer: int) -> float:
    ia, ib = r["index"][r["steps"] == a, layer], r["index"][r["steps"] == b, layer]  # [tokens, k], same order
    k = ia.shape[1]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ia, ib)]))


def test_router_saturation_opens_on_the_probe_steps_and_names_them(tagged_store, tagged_routing):
    at = open_app(tagged_store, run="tagged", page="specialization")
    probes = [s for s, t in enumerate(TAGS) if t == "probe"]
    assert at.selectbox(key="sat_a").options == [str(s) for s in probes]
    assert (at.selectbox(key="sat_a").value, at.selectbox(key="sat_b").value) == (probes[0], probes[-1])
    assert "recorded at steps 1, 5, 7" in texts(at, "caption")
    bars = chart(at, f"Router saturation: step {probes[0]} against step {probes[-1]}")["data"][0]
    np.testing.assert_allclose(arr(bars["y"]), [_saturation(tagged_routing, probes[0], probes[-1], l) for l in (0, 1)],
                               rtol=1e-12)
    at.selectbox(key="sat_a").set_value(5).run()
    bars = chart(at, "Router saturation: step 5 against step 7")["data"][0]
    np.testing.assert_allclose(arr(bars["y"]), [_saturation(tagged_routing, 5, 7, l) for l in (0, 1)], rtol=1e-12)


# --- the sidebar's per-token window follows the Steps range ----------------------------------------------------------


def test_per_token_window_comes_back_after_the_steps_range_is_narrowed_and_widened(store, monkeypatch):
    import app.sidebar

    per_step = MAIN["seqs_per_step"] * MAIN["seq_len"] * MAIN["n_layers"] * MAIN["top_k"]
    monkeypatch.setattr(app.sidebar, "ROUTE_BUDGET", 2 * per_step)  # the default window: two steps
    # Streamlit warns ("created with a default value but also had its value set via the Session State API")
    # when a widget gets value= and a session-state value: the window's number input must get only the latter
    import streamlit

    calls = []
    real = streamlit.number_input
    monkeypatch.setattr(streamlit, "number_input", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    at = open_app(store, page="specialization")
    assert at.number_input(key="route_window_steps").value == 2
    at.select_slider(key="steps").set_range(3, 3).run()
    assert "Per-token analyses use steps 3 (" in texts(at, "info")  # one step fits: no window to ask for
    at.select_slider(key="steps").set_range(0, 3).run()  # widened again: the default window, not stuck at 1
    assert at.number_input(key="route_window_steps").value == 2
    assert "Per-token analyses use steps 2–3" in texts(at, "info")
    # a window the user chose is kept through the same narrowing and widening
    at.number_input(key="route_window_steps").set_value(3).run()
    assert "Per-token analyses use steps 1–3" in texts(at, "info")
    at.select_slider(key="steps").set_range(2, 3).run()
    assert at.number_input(key="route_window_steps").value == 2
    at.select_slider(key="steps").set_range(0, 3).run()
    assert at.number_input(key="route_window_steps").value == 3
    assert "Per-token analyses use steps 1–3" in texts(at, "info")
    assert not at.exception and not at.error
    window_calls = [kw for kw in calls if kw.get("key") == "route_window_steps"]
    assert window_calls and not any("value" in kw for kw in window_calls)


# --- health: the worst findings of each kind first -----------------------------------------------------------------

SKEWED = dict(n_steps=4, n_layers=3, n_experts=8, top_k=2, seqs_per_step=3, seq_len=16, skew=2.5, seed=0)


def _drop_rate(r, layer: int, cf: float) -> float:
    """A capacity-limited router's dropped share in one layer, groups = one step's tokens (numpy)."""
    k, n_exp = r["index"].shape[2], r["logits"].shape[2]
    dropped = assigned = 0
    for s in np.unique(r["steps"]):
        idx = r["index"][r["steps"] == s, layer]
        cap = int(np.ceil(round(cf * len(idx) * k / n_exp, 9)))
        n = np.bincount(idx.ravel(), minlength=n_exp)
        dropped, assigned = dropped + int(np.maximum(n - cap, 0).sum()), assigned + int(n.sum())
    return dropped / assigned


def test_health_lists_the_worst_finding_of_each_kind_first():
    from moeviz.analyses.health import health_summary

    r = synthetic_routing(**SKEWED)
    df = health_summary(store_from_routing(**r))
    bad = df[df.severity != "ok"]
    assert list(dict.fromkeys(bad.check)) == ["collapsed_expert", "dead_expert", "capacity_drops"]
    drops = bad[bad.check == "capacity_drops"]
    want = sorted(range(3), key=lambda l: -_drop_rate(r, l, 1.25))  # the largest drop first, not layer 0 first
    assert drops.layer.tolist() == want != sorted(want)
    np.testing.assert_allclose(drops.value, [_drop_rate(r, l, 1.25) for l in want])
    collapsed = bad[bad.check == "collapsed_expert"]
    assert list(collapsed.value) == sorted(collapsed.value, reverse=True)
    dead = bad[bad.check == "dead_expert"]
    assert list(dead.value) == sorted(dead.value) and list(dead.severity) == sorted(dead.severity)  # error < warn


def test_overview_shows_the_worst_of_each_kind_with_a_count(tmp_path):
    from test_app import write_run_dir

    write_run_dir(tmp_path / "skewed", synthetic_routing(**SKEWED), run_id="skewed")
    at = open_app(tmp_path, run="skewed")
    boxes = [str(e.value) for e in (*at.error, *at.warning)]
    assert any("is the top choice of 75% of layer 2" in b and "2 more like it" in b for b in boxes)
    assert any("received no token" in b and "8 more like it" in b for b in boxes)
    assert any("capacity-limited router" in b and b.startswith("layer 2:") for b in boxes)
    assert "collapsed expert (3), dead expert (9), capacity drops (3)" in texts(at, "markdown")


# --- aux loss: one kind of step per curve, an axis that fits the curves ---------------------------------------------


def test_aux_loss_axis_fits_the_curves_and_uniform_not_a_far_bound():
    df = pd.DataFrame({"step": [0, 1, 2] * 2, "layer": [0] * 3 + [1] * 3,
                       "aux_loss": [1.04, 1.02, 1.01, 1.05, 1.03, 1.02]})
    fig = charts.aux_loss_lines(df, bound=0.5714)
    lo, hi = fig.layout.yaxis.range
    assert 0.99 < lo < 1.0 and 1.05 < hi < 1.06  # the data (1.01-1.05) and uniform (1) fill the axis
    assert [s.y0 for s in fig.layout.shapes] == [1.0]  # uniform drawn; the bound is named, not drawn off-axis
    notes = [a.text for a in fig.layout.annotations]
    assert any("true lower bound = 0.5714 (below the axis)" in t for t in notes)
    # reference labels sit on a white box, so that the data never hides them
    assert all(a.bgcolor for a in fig.layout.annotations)


def _switch_loss(r, step: int, layer: int) -> float:
    sel = r["steps"] == step
    idx, logits = r["index"][sel, layer], r["logits"][sel, layer]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    f = np.bincount(idx.ravel(), minlength=p.shape[1]) / idx.size
    return float(p.shape[1] * (f * p.mean(0)).sum())


def test_aux_loss_page_shows_training_steps_by_default_and_each_kind_on_request(tagged_store, tagged_routing):
    at = open_app(tagged_store, run="tagged", page="aux_loss")
    assert at.radio(key="aux_steps").value == "train"
    for kind in ("train", "probe", "eval", "all steps"):
        if kind != "train":
            at.radio(key="aux_steps").set_value(kind).run()
        want = [s for s, t in enumerate(TAGS) if t == kind or kind == "all steps"]
        fig = chart(at, "Switch load-balancing loss per layer")
        for layer, trace in enumerate(fig["data"]):
            assert list(arr(trace["x"])) == want
            np.testing.assert_allclose(arr(trace["y"]), [_switch_loss(tagged_routing, s, layer) for s in want],
                                       rtol=1e-9)
        assert list(arr(chart(at, "pooled over layers")["data"][0]["x"])) == want
        assert list(arr(chart(at, "Router z-loss")["data"][0]["x"])) == want


def test_overview_switch_loss_shows_training_steps_only(tagged_store, tagged_routing):
    """The Overview's aux-loss panels do not mix eval/probe passes into the training curve (the Aux loss page's
    default kind)."""
    at = open_app(tagged_store, run="tagged")
    want = [s for s, t in enumerate(TAGS) if t == "train"]
    fig = chart(at, "Switch load-balancing loss over steps")
    assert len(fig["data"]) == tagged_routing["index"].shape[1]  # a panel (one trace) per layer
    for layer, trace in enumerate(fig["data"]):
        assert list(arr(trace["x"])) == want
        np.testing.assert_allclose(arr(trace["y"]), [_switch_loss(tagged_routing, s, layer) for s in want], rtol=1e-9)
    assert any("Train steps only" in str(c.value) for c in at.caption)


def test_slider_steps_keep_block_ends_and_the_current_value():
    from app.state import slider_steps

    assert slider_steps([3, 5, 9]) == [3, 5, 9]
    steps = list(range(10_000))
    opts = slider_steps(steps, keep=(4321, 20_000))
    assert len(opts) <= 1_600 and opts[0] == 0 and opts[-1] == 9_999
    assert {1_000, 1_999, 4321} <= set(opts) and 20_000 not in opts  # a range of whole blocks; a kept value
    assert 1_001 not in opts
    every_10 = list(range(0, 100_000, 10))  # logged every 10 steps: no step ends a block at s + 1
    opts = slider_steps(every_10)
    stops = len(opts)
    assert 900 < stops <= 1_600 and opts[0] == 0 and opts[-1] == 99_990  # two stops a block (the old rule: one)
    b = opts[1] + 10  # the first block: steps 0 .. b - 10
    assert all(o % b in (0, b - 10) for o in opts)  # each block's first and last recorded step


# --- bound explorer: readable log ticks, the chosen experts marked ---------------------------------------------------


def test_bound_curve_ticks_read_as_numbers_of_experts():
    from moeviz.analyses.bounds import infimum_table

    table = infimum_table((2, 3, 4, 8, 16, 64, 256), (1,))
    xa = charts.bound_curve(table, current_experts=8).layout.xaxis
    assert xa.type == "log" and list(xa.tickvals) == [2, 4, 8, 16, 32, 64, 128, 256]
    assert list(xa.ticktext) == ["2", "4", "8", "16", "32", "64", "128", "256"]


@pytest.mark.parametrize("e,k", [(8, 2), (8, 1), (6, 3)])
def test_bound_matrix_rings_exactly_the_chosen_experts(e, k):
    from moeviz.analyses.bounds import aux_loss_infimum

    res = aux_loss_infimum(e, k, None)
    fig = charts.bound_matrix(charts.matrix_frame(res.weights, res.chosen))
    hm, rings = fig.data
    np.testing.assert_allclose(np.asarray(hm.z, float), res.weights)
    got = sorted(zip(map(int, rings.y), map(int, rings.x)))
    assert got == sorted((t, int(c)) for t in range(len(res.chosen)) for c in res.chosen[t])
    if (e, k) == (8, 2):  # expert 0 is chosen by every token although its probability is 0 in the limit drawn
        assert all(int(c) == 0 for c in res.chosen[:, 0]) and np.all(res.weights[:, 0] < 1e-6)
        assert {(t, 0) for t in range(len(res.chosen))} <= set(got)


# --- labels: legends that name things, not columns; a legend that shows every expert --------------------------------


def test_legends_name_the_series_not_the_column():
    runs = pd.DataFrame({"step": [0, 1] * 2, "run_id": ["aux"] * 2 + ["noaux"] * 2, "aux_loss_per_slot": [1.1, 1.0] * 2})
    assert [t.name for t in charts.aux_loss_lines(runs, value="aux_loss_per_slot", color="run_id").data] == ["aux", "noaux"]
    mi = pd.DataFrame({"layer": [0, 0, 1, 1], "variable": ["domain", "token"] * 2, "nmi": [0.1, 0.2, 0.3, 0.4]})
    assert [t.name for t in charts.per_layer_bars(mi, y="nmi", color="variable", title="t", y_title="y").data] == \
        ["domain", "token"]
    acc = pd.DataFrame({"k": [1, 2, 1, 2], "way": ["compile"] * 2 + ["run"] * 2, "accuracy": [0.7, 0.9, 0.95, 0.96]})
    assert [t.name for t in charts.accuracy_lines(acc).data] == ["compile", "run"]
    by_layer = pd.DataFrame({"step": [0, 1] * 2, "layer": [0, 0, 1, 1], "aux_loss": [1.1, 1.0] * 2})
    assert [t.name for t in charts.aux_loss_lines(by_layer).data] == ["layer 0", "layer 1"]  # numbers keep the column


def test_overview_load_legend_shows_every_expert_in_rows_above_the_panels():
    n_exp = 16
    df = pd.DataFrame([{"step": s, "layer": l, "expert": e, "load_fraction": 1 / n_exp, "n_experts": n_exp}
                       for s in range(3) for l in range(3) for e in range(n_exp)])
    fig = charts.load_small_multiples(df)
    shown = [t.name for t in fig.data if t.showlegend]
    assert shown == [f"expert {e}" for e in range(n_exp)]
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y > 1  # above the panels: nothing scrolls
    assert fig.layout.margin.t >= 70 + 22 * 2  # room for two rows of 12 entries under the title


def test_toy_accuracy_table_shows_no_none(store):
    at = open_app(store, page="toy")
    shown = at.dataframe[0].value
    assert not shown.isna().any().any()  # a missing value is drawn as "None" by the browser's table


# --- compare: the sidebar's steps and layers apply to both runs ------------------------------------------------------


def test_compare_applies_the_sidebars_steps_and_layers_to_both_runs(store, routing):
    from test_app import SMALL, load_share

    small = synthetic_routing(**SMALL)
    at = open_app(store, page="compare")
    at.select_slider(key="steps").set_range(1, 2).run()
    at.multiselect(key="layers").set_value([0]).run()
    assert "Both runs, steps 1–2, layers 0" in texts(at, "caption")
    hm = chart(at, "run by run")
    main_t, small_t = hm["data"]
    def share(r, steps):
        sel = np.isin(r["steps"], steps)
        return load_share({"index": r["index"][sel], "logits": r["logits"][sel], "steps": r["steps"][sel]})
    n_main, n_small = MAIN["n_experts"], SMALL["n_experts"]
    np.testing.assert_allclose(arr(main_t["z"]).reshape(-1, n_main), n_main * share(routing, [1, 2])[:1], rtol=1e-9)
    np.testing.assert_allclose(arr(small_t["z"]).reshape(-1, n_small), n_small * share(small, [1, 2])[:1], rtol=1e-9)
    aux = chart(at, "pooled over layers")
    assert all(list(arr(t["x"])) == [1, 2] for t in aux["data"])


# --- offline: no request to the internet, no Deploy button -----------------------------------------------------------


def test_the_page_icon_is_a_local_file_and_the_dashboard_hides_deploy(store):
    """A `:material/…:` page icon makes the browser fetch the favicon from fonts.gstatic.com (fails offline); a
    file is served by the dashboard itself. (The Chromium test checks that a page load asks no other host.)"""
    from moeviz.cli.dashboard import dashboard_command

    src = (Path(__file__).parents[1] / "app" / "main.py").read_text()
    assert "page_icon=FAVICON" in src and ":material/hub:" not in src
    assert (Path(__file__).parents[1] / "app" / "favicon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cmd = dashboard_command(store)
    assert cmd[cmd.index("--client.toolbarMode") + 1] == "minimal"


# --- the dashboard command: a busy port, --version ---------------------------------------------------------------------


def test_dashboard_on_a_busy_port_fails_before_saying_serving(store, capsys):
    import socket

    from moeviz.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["dashboard", str(store), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "serving" not in err and f"cannot serve at 127.0.0.1:{port}" in err and "--port" in err


def test_version_flag(capsys):
    from moeviz import __version__
    from moeviz.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"moeviz {__version__}"


# --- the demo's summary and closing command ------------------------------------------------------------------------------


def test_demo_prints_a_readable_summary_and_a_command_that_runs(monkeypatch, tmp_path, capsys):
    import shlex
    import subprocess

    import moeviz.demo.run as D
    from moeviz import cli

    class Result:
        def summary(self):
            return {"run": "aux", "wall_s": 33.4, "final_loss": 3.2101, "final_aux": 1.0213,
                    "eval_loss": {"code": 2.5, "math": 1.25}, "imbalance_max_over_mean": [1.21, 1.5],
                    "nmi_expert_domain": [0.1, 0.42], "top_experts_by_domain": {"code": [[1, 2], [3, 7]],
                                                                               "math": [[0, 4], [0, 5]]}}

    monkeypatch.setattr(D, "run_demo", lambda cfg, out: [Result()])
    assert cli.main(["demo", "--steps", "1", "--out", str(tmp_path / "demo"), "--no-dashboard"]) == 0
    out, err = capsys.readouterr()
    assert "{" not in out and out.startswith("aux: 33 s, final training loss 3.210, Switch aux loss 1.021")
    assert "held-out loss: code 2.500, math 1.250" in out and "top experts in the last layer (1): code -> 3, 7" in out
    command = err.rsplit("open the dashboard with: ", 1)[1].strip()
    argv = shlex.split(command)
    assert argv[-2:] == ["dashboard", str(tmp_path / "demo")]
    # it runs as printed, without an active venv: --help of the same program answers
    help_run = subprocess.run(argv[:-2] + ["dashboard", "--help"], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1])})
    assert help_run.returncode == 0 and "PATH" in help_run.stdout
    assert cli.main(["demo", "--steps", "1", "--out", str(tmp_path / "demo"), "--no-dashboard", "--json"]) == 0
    assert '"run": "aux"' in capsys.readouterr().out


# --- capacity: a fixed expert_capacity and the model's own grouping ----------------------------------------------------


def test_capacity_page_starts_on_the_models_own_fixed_capacity_per_sequence_and_reproduces_its_drops(tmp_path):
    from test_app import metric, write_run_dir

    cap, seq_len = 3, 12
    r = synthetic_routing(n_steps=2, n_layers=2, n_experts=4, top_k=1, seqs_per_step=3, seq_len=seq_len, skew=1.5,
                          seed=2, domains=None)
    # what Switch does: each sequence on its own, the first `cap` tokens of an expert kept, the rest dropped
    dropped = np.zeros(r["index"].shape, dtype=bool)
    for start in range(0, len(r["steps"]), seq_len):
        for layer in range(2):
            seen: dict[int, int] = {}
            for t in range(start, start + seq_len):
                e = int(r["index"][t, layer, 0])
                seen[e] = seen.get(e, 0) + 1
                dropped[t, layer, 0] = seen[e] > cap
    assert dropped.sum() > 0
    write_run_dir(tmp_path / "switch", {**r, "dropped": dropped}, run_id="switch",
                  config={"model_type": "switch_transformers", "num_experts": 4, "expert_capacity": cap},
                  capacity_factor=cap * 4 / seq_len)
    at = open_app(tmp_path, run="switch", page="capacity")
    assert at.radio(key="cap_mode").value == "fixed" and at.number_input(key="cap_slots").value == cap
    assert at.radio(key="cap_group").value == "sequence"
    assert metric(at, "Dropped assignments") == f"{int(dropped.sum()):,}"  # the model's own drops, reproduced
    assert f"The model itself dropped {int(dropped.sum()):,} assignments" in texts(at, "info")
    layer_bars = chart(at, f"Dropped share per layer at a fixed capacity of {cap} per expert")["data"][0]
    np.testing.assert_allclose(arr(layer_bars["y"]), dropped.sum(axis=(0, 2)) / dropped.shape[0], rtol=1e-12)
    # a capacity factor remains one click away
    at.radio(key="cap_mode").set_value("factor").run()
    assert at.slider(key="cap_cf").value == pytest.approx(cap * 4 / seq_len)


def test_model_capacity_reads_the_config():
    from moeviz.analyses.capacity import model_capacity

    assert model_capacity('{"expert_capacity": 64}', 1.0) == {"capacity": 64, "capacity_factor": 1.0, "group": "sequence"}
    assert model_capacity({"num_experts": 8}, None) == {"capacity": None, "capacity_factor": None, "group": "step"}
    assert model_capacity("not json", float("nan"))["capacity_factor"] is None


def test_load_page_table_has_readable_headers_and_the_numbers_of_the_analysis(store, routing):
    at = open_app(store, page="load")
    table = at.dataframe[0]
    labels = {k: v["label"] for k, v in json.loads(table.proto.columns).items() if v.get("label")}
    assert labels["max_over_mean"] == "busiest / mean" and labels["norm_entropy"] == "norm. entropy"
    shown = table.value
    assert "run_id" not in shown.columns
    from test_app import load_share

    share = load_share(routing)  # [layers, experts] over every step
    np.testing.assert_allclose(shown["max_over_mean"], share.max(1) / share.mean(1), rtol=1e-9)
