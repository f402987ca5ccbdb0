"""A wide model (58 MoE layers x 256 experts, top-8) stays legible: no page sends megabytes of figure JSON, the
Overview draws a page of layers with the busiest experts of each and the others summed, and one expert can be
found by number across layers. Values are checked against numpy over the routing the store was written from."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")

from moeviz.testing import synthetic_routing  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_app import APP, PAGES, arr, charts, write_run_dir  # noqa: E402

L, E, K = 58, 256, 8
MAX_FIGURE_BYTES = 1_000_000  # per page: a browser draws megabytes of figure JSON for seconds


@pytest.fixture(scope="module")
def routing():
    return synthetic_routing(n_steps=3, n_layers=L, n_experts=E, top_k=K, seqs_per_step=2, seq_len=16, skew=2.0,
                             seed=11, domains=("code", "prose"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory, routing):
    root = tmp_path_factory.mktemp("wide")
    write_run_dir(root / "wide", routing, run_id="wide")
    return root / "wide"



def open_app(path, run: str, page: str):
    """The page rendered by AppTest: no exception (its health box may show errors: 96 tokens leave most of 256
    experts without a token, which the Overview rightly flags)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["store_path"] = str(path)
    at.session_state["run_id"] = run
    at.switch_page(f"views/{page}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def counts(r) -> np.ndarray:
    """[layers, experts] assignments over every step (all k slots)."""
    c = np.zeros((L, E), np.int64)
    for slot in range(K):
        np.add.at(c, (np.arange(L)[None, :].repeat(len(r["index"]), 0), r["index"][:, :, slot]), 1)
    return c


@pytest.mark.parametrize("page", [p for p in PAGES if p not in ("sql", "agreement")])
def test_no_page_sends_megabytes_of_figure_json(wide, page):
    at = open_app(wide, run="wide", page=page)
    sizes = [len(el.proto.spec) for el in at.get("plotly_chart")]
    assert sum(sizes) < MAX_FIGURE_BYTES, (page, sizes)


def test_overview_shows_a_page_of_layers_with_the_busiest_experts_and_the_others_summed(wide, routing):
    at = open_app(wide, run="wide", page="overview")
    fig = next(c for c in charts(at) if "busiest" in c["layout"]["title"]["text"])
    panels = {t["hovertemplate"].split(",")[0] for t in fig["data"]}
    assert panels == {f"layer {i}" for i in range(8)}  # the first page of 8 layers
    c = counts(routing)
    for layer in (0, 5):
        traces = [t for t in fig["data"] if t["hovertemplate"].startswith(f"layer {layer},")]
        assert len(traces) == 9  # 8 busiest + others
        order = sorted(range(E), key=lambda e: (-c[layer, e], e))  # busiest first, ties by number
        busiest = traces[0]
        assert f"expert {order[0]}<br>" in busiest["hovertemplate"] and busiest["name"] == "#1"
        others = next(t for t in traces if t["name"] == "others")
        # per step shares: the others' assignments are the layer's minus the 8 busiest experts'
        steps = np.unique(routing["steps"])
        for i, s in enumerate(steps):
            idx = routing["index"][routing["steps"] == s, layer, :].ravel()
            per = np.bincount(idx, minlength=E)
            assert arr(others["y"])[i] == pytest.approx(per[order[8:]].sum() / per.sum())
            assert arr(busiest["y"])[i] == pytest.approx(per[order[0]] / per.sum())
    at.selectbox(key="overview-layer-page").set_value(7).run()  # the last page: layers 56-57
    fig = next(c for c in charts(at) if "busiest" in c["layout"]["title"]["text"])
    assert {t["hovertemplate"].split(",")[0] for t in fig["data"]} == {"layer 56", "layer 57"}


def test_find_expert_marks_it_in_every_layer(wide, routing):
    c = counts(routing)
    quiet = int(np.argsort(c.sum(0))[0])  # an expert among the least busy: not in any top 8
    at = open_app(wide, run="wide", page="overview")
    at.number_input(key="overview-find").set_value(quiet).run()
    fig = next(c for c in charts(at) if "busiest" in c["layout"]["title"]["text"])
    found = [t for t in fig["data"] if t["name"] == f"expert {quiet}"]
    assert len(found) == 8 and all(t["line"]["color"] == "black" for t in found)
    at = open_app(wide, run="wide", page="load")
    at.number_input(key="load-find").set_value(quiet).run()
    bars = next(ch for ch in charts(at) if ch["layout"]["title"]["text"].startswith(f"Expert {quiet}"))
    y = np.concatenate([arr(t["y"]) for t in bars["data"] if t.get("type") == "bar"])
    np.testing.assert_allclose(y, E * c[:, quiet] / c.sum(1))
    heat = next(ch for ch in charts(at) if "per expert and layer" in ch["layout"]["title"]["text"])
    assert any(s.get("type") == "rect" for s in heat["layout"].get("shapes", []))


def test_tokens_page_shows_a_page_of_layers_of_a_wide_model(wide, routing):
    """58 lines of text with every token's experts on hover were 4.9 MB of HTML at 256 tokens (10,000-step
    DeepSeek-V3-shaped run): the page shows LAYERS_PER_PAGE layers, picked like the Overview's panels, and each
    token's colour is its top expert in the routing the store was written from."""
    from test_dashboard_usability import parse_tokens

    from app.wide import LAYERS_PER_PAGE

    at = open_app(wide, run="wide", page="tokens")
    (el,) = at.get("html")
    spans = parse_tokens(el.proto.body)
    step = int(routing["steps"].max())  # the default sequence: the newest step's first
    sel = (routing["steps"] == step) & (routing["seqs"] == 0)
    assert sorted({s["layer"] for s in spans}) == list(range(LAYERS_PER_PAGE))
    for layer in range(LAYERS_PER_PAGE):
        line = [s for s in spans if s["layer"] == layer]
        np.testing.assert_array_equal([s["expert"] for s in line], routing["index"][sel, layer, 0])
    at.selectbox(key="tokens-layer-page").set_value(7).run()  # the last page: layers 56-57
    spans = parse_tokens(at.get("html")[0].proto.body)
    assert sorted({s["layer"] for s in spans}) == [56, 57]
    np.testing.assert_array_equal([s["expert"] for s in spans if s["layer"] == 57], routing["index"][sel, 57, 0])


def test_balancing_load_of_a_wide_model_draws_the_busiest_experts_and_the_others(wide, routing):
    """Balancing's load per expert of one layer drew 256 lines (1,000 buckets each at 10,000 steps: 0.96 s to read);
    a wide model's shows the busiest TOP_EXPERTS and the others' mean, each against numpy over the routing."""
    import json

    from app.wide import TOP_EXPERTS

    at = open_app(wide, run="wide", page="balancing")
    figs = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    (fig,) = [f for f in figs if "busiest experts over steps, layer 0" in f["layout"]["title"]["text"]]
    traces = [t for t in fig["data"] if t.get("name") != "uniform"]
    assert len(traces) == TOP_EXPERTS + 1, [t.get("name") for t in traces]
    steps = np.unique(routing["steps"])
    per_step = np.stack([np.bincount(routing["index"][routing["steps"] == s, 0, :].ravel(), minlength=E) for s in steps])
    order = np.lexsort((np.arange(E), -per_step.sum(0)))  # busiest over the run first, ties: lower number
    share = per_step / per_step.sum(1, keepdims=True)  # [steps, experts]
    for rank, expert in enumerate(order[:TOP_EXPERTS], 1):
        (t,) = [t for t in traces if t["name"] == f"#{rank} · expert {expert}"]
        np.testing.assert_allclose(arr(t["y"]), share[:, expert] * E, rtol=1e-9)
    others = order[TOP_EXPERTS:]
    (t,) = [t for t in traces if t["name"].startswith("others")]
    np.testing.assert_allclose(arr(t["y"]), share[:, others].sum(1) * E / len(others), rtol=1e-9)


def test_bound_explorer_draws_the_observed_loss_in_the_pages_buckets(wide, routing, monkeypatch):
    """The observed Switch loss against the bounds drew every step (58 layers x 10,000 steps: 580,000 points
    re-sent on each widget change, 2.9 s): it now uses the step bucket of every curve over steps. Buckets of 2
    steps forced on the 3-step run: one point per bucket (steps 0 and 2) and layer, each the loss of the bucket's
    pooled counts, E x sum_i f_i P_i, against numpy over the routing."""
    import json

    import app.state

    monkeypatch.setattr(app.state, "step_bucket_for", lambda *a, **k: 2)
    at = open_app(wide, run="wide", page="bounds")
    figs = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    (fig,) = [f for f in figs if any(str(t.get("name", "")).startswith("layer") for t in f["data"])]
    t0 = [t for t in fig["data"] if t.get("name") == "layer 0"][0]
    assert list(arr(t0["x"])) == [0, 2]
    probs = np.exp(routing["logits"] - routing["logits"].max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # [tokens, layers, experts]
    want = []
    for lo in (0, 2):
        m = (routing["steps"] >= lo) & (routing["steps"] < lo + 2)
        f = np.bincount(routing["index"][m, 0, :].ravel(), minlength=E) / (m.sum() * K)
        P = probs[m, 0, :].mean(0)
        want.append(E * (f * P).sum())
    np.testing.assert_allclose(arr(t0["y"]), want, rtol=1e-6)
