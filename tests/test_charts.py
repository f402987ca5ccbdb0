"""moeviz.charts: every figure has a title, labelled axes, hover text, and draws exactly the data it was given."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from moeviz import charts
from moeviz.testing import store_from_routing, synthetic_routing


def _title(fig: go.Figure) -> str:
    return fig.layout.title.text or ""


def _axis_titles(fig: go.Figure) -> tuple[str, str]:
    return fig.layout.xaxis.title.text or "", fig.layout.yaxis.title.text or ""


@pytest.fixture(scope="module")
def load_rows():
    """Long-form load rows as moeviz.analyses.load.load_matrix returns them, built by hand."""
    rng = np.random.default_rng(0)
    rows = []
    for layer in range(3):
        counts = rng.integers(0, 50, 4)
        for e in range(4):
            rows.append({"run_id": "r", "layer": layer, "expert": e, "assigned": int(counts[e]), "tokens": 100,
                         "first_choice": int(counts[e]) // 2, "load_fraction": counts[e] / counts.sum(),
                         "relative_load": 4 * counts[e] / counts.sum(), "n_experts": 4})
    return pd.DataFrame(rows)


def test_load_heatmap_draws_the_pivot_with_counts_on_hover(load_rows):
    fig = charts.load_heatmap(load_rows)
    (hm,) = fig.data
    assert isinstance(hm, go.Heatmap)
    expected = np.array([[r.load_fraction for r in load_rows[load_rows.layer == l].sort_values("expert").itertuples()]
                         for l in range(3)])
    np.testing.assert_allclose(np.asarray(hm.z, float), expected)
    assert list(hm.x) == ["0", "1", "2", "3"] and list(hm.y) == ["0", "1", "2"]
    # hover carries the assigned count of each cell
    assert "assigned" in hm.hovertemplate
    assert hm.customdata[1][2][0] == load_rows[(load_rows.layer == 1) & (load_rows.expert == 2)].assigned.item()
    assert _title(fig) and _axis_titles(fig) == ("expert", "MoE layer")
    assert hm.colorbar.title.text == "share of layer's assignments"


def test_relative_load_heatmap_runs_from_0_with_uniform_white(load_rows):
    hm = charts.load_heatmap(load_rows, value="relative_load").data[0]
    assert hm.zmid is None and hm.zmin == 0 and hm.zmax == max(2.0, load_rows.relative_load.max())
    assert [1 / hm.zmax, charts.RATIO_WHITE] in [list(c) for c in hm.colorscale]  # 1 × uniform is white


def test_empty_frame_gives_a_titled_message_not_an_error():
    fig = charts.load_heatmap(pd.DataFrame(columns=["layer", "expert", "load_fraction"]))
    assert len(fig.data) == 0 and "Nothing recorded" in fig.layout.annotations[0].text
    assert _title(fig)


def test_missing_columns_are_a_clear_error():
    with pytest.raises(charts.ChartDataError, match=r"needs columns \['load_fraction'\]"):
        charts.load_heatmap(pd.DataFrame({"layer": [0], "expert": [0]}))


def test_lines_one_trace_per_layer_with_reference_lines():
    df = pd.DataFrame({"step": [0, 1, 2] * 2, "layer": [0] * 3 + [1] * 3, "aux_loss": [1.2, 1.1, 1.05, 2.0, 1.5, 1.3]})
    fig = charts.aux_loss_lines(df, bound=0.98)
    assert [t.name for t in fig.data] == ["layer 0", "layer 1"]
    assert list(fig.data[1].y) == [2.0, 1.5, 1.3]
    refs = sorted(s.y0 for s in fig.layout.shapes)
    assert refs == [0.98, 1.0]
    texts = " ".join(a.text for a in fig.layout.annotations)
    assert "uniform routing = 1" in texts and "true lower bound = 0.98" in texts
    assert _axis_titles(fig)[0] == "step" and "Σ" in _axis_titles(fig)[1]


def test_lines_sort_by_x_within_each_series():
    df = pd.DataFrame({"step": [2, 0, 1], "layer": [0, 0, 0], "z_loss": [3.0, 1.0, 2.0]})
    fig = charts.z_loss_lines(df)
    assert list(fig.data[0].x) == [0, 1, 2] and list(fig.data[0].y) == [1.0, 2.0, 3.0]


def test_imbalance_lines_label_the_metric():
    df = pd.DataFrame({"step": [0, 1], "layer": [0, 0], "cv": [0.5, 0.7], "tokens": [10, 10]})
    fig = charts.imbalance_lines(df, "cv")
    assert "coefficient of variation" in _title(fig)
    assert fig.layout.shapes[0].y0 == 0.0  # balanced reference


def test_small_multiples_one_panel_per_layer():
    df = pd.DataFrame([{"step": s, "layer": l, "expert": e, "load_fraction": 0.25, "n_experts": 4}
                       for s in range(3) for l in range(5) for e in range(4)])
    fig = charts.load_small_multiples(df)
    assert len(fig.data) == 5 * 4  # one line per expert in each of 5 panels
    assert [a.text for a in fig.layout.annotations][:5] == [f"layer {l}" for l in range(5)]
    # legend shows each expert once
    assert sum(bool(t.showlegend) for t in fig.data) == 4
    # each panel's lines and its uniform 1/E line share that panel's axes
    assert [(s.yref, s.y0) for s in fig.layout.shapes] == [(t.yaxis, 0.25) for t in fig.data[::4]]
    assert {s.xref for s in fig.layout.shapes} == {f"{t.xaxis} domain" for t in fig.data}


def test_token_routes_colours_each_cell_by_its_top_expert():
    r = synthetic_routing(n_steps=1, n_layers=2, n_experts=6, top_k=2, seqs_per_step=1, seq_len=7, seed=3)
    con = store_from_routing(**r)
    con.execute("INSERT INTO vocab SELECT 'run0', i, 'tok' || i FROM range(100) r(i)")
    from moeviz.store.catalog import sequence_routes

    df = sequence_routes(con, "run0", 0, 0, 0)
    fig = charts.token_routes(df, n_experts=6)
    (hm,) = fig.data
    np.testing.assert_array_equal(np.asarray(hm.z, float), r["index"][:, :, 0].T)  # [layers, tokens]
    assert list(fig.layout.xaxis.ticktext) == [f"{p} tok{t}" for p, t in enumerate(r["token_ids"])]  # each token once
    assert list(fig.layout.xaxis.tickvals) == list(hm.x) and hm.text is None
    # hover lists both chosen experts with their weights
    t, layer = 4, 1
    e0, e1 = r["index"][t, layer]
    w0, w1 = r["weights"][t, layer]
    assert hm.customdata[layer][t][1] == f"e{e0} ({w0:.3f}), e{e1} ({w1:.3f})"
    assert hm.zmin == -0.5 and hm.zmax == 5.5
    assert _axis_titles(fig) == ("token in the sequence (position and text)", "MoE layer")


def test_token_routes_makes_whitespace_visible():
    df = pd.DataFrame({"pos": [0, 1], "text": [" the", "\n"], "layer": [0, 0], "slot": [0, 0], "expert": [1, 0],
                       "weight": [1.0, 1.0]})
    fig = charts.token_routes(df, n_experts=2)
    assert list(fig.layout.xaxis.ticktext) == ["0 ·the", "1 ⏎"]
    assert [c[0] for c in fig.data[0].customdata[0]] == ["·the", "⏎"]  # hover: the token


def test_sankey_links_carry_the_flows():
    df = pd.DataFrame({"from_expert": [0, 0, 1], "to_expert": [1, 2, 1], "tokens": [5, 3, 7]})
    fig = charts.sankey(df, source="from_expert", target="to_expert", value="tokens", source_label="L0 e",
                        target_label="L1 e", title="flow")
    (sk,) = fig.data
    assert list(sk.node.label) == ["L0 e 0", "L0 e 1", "L1 e 1", "L1 e 2"]
    assert list(sk.link.source) == [0, 0, 1] and list(sk.link.target) == [2, 3, 2]
    assert list(sk.link.value) == [5.0, 3.0, 7.0]


def test_drop_curve_marks_the_current_factor():
    df = pd.DataFrame({"capacity_factor": [0.5, 1.0, 2.0], "drop_rate": [0.5, 0.2, 0.0]})
    fig = charts.drop_curve(df, current_cf=1.25)
    assert fig.layout.shapes[0].x0 == 1.25
    assert "capacity factor" in _axis_titles(fig)[0]


def test_bars_group_by_colour_and_keep_hover_counts():
    df = pd.DataFrame({"layer": [0, 1, 0, 1], "run_id": ["a", "a", "b", "b"], "drop_rate": [0.1, 0.2, 0.3, 0.4],
                       "dropped": [1, 2, 3, 4], "assigned": [10] * 4})
    fig = charts.bars(df, x="layer", y="drop_rate", color="run_id", title="t", x_title="MoE layer",
                      y_title="dropped / assigned", hover=["dropped", "assigned"])
    assert [t.name for t in fig.data] == ["a", "b"]  # run ids stand alone in the legend (#16)
    assert list(fig.data[1].y) == [0.3, 0.4]
    assert fig.data[1].customdata[0][0] == 3


def test_compare_heatmaps_share_one_colour_scale(load_rows):
    both = pd.concat([load_rows, load_rows.assign(run_id="s", relative_load=load_rows.relative_load * 2)])
    fig = charts.compare_heatmaps(both, runs=("r", "s"))
    assert len(fig.data) == 2
    assert fig.data[0].zmax == fig.data[1].zmax == pytest.approx(both.relative_load.max())
    assert [a.text for a in fig.layout.annotations] == ["run r", "run s"]


def test_decision_maps_place_each_probability_at_its_point():
    xs, ys = np.linspace(-1, 1, 5), np.linspace(-1, 1, 4)
    gx, gy = np.meshgrid(xs, ys)
    rows = []
    for way in ("compile", "run"):
        for k in (1, 2):
            prob = (gx + 2 * gy + k + (way == "run")) / 10
            rows.append(pd.DataFrame({"way": way, "k": k, "x": gx.ravel(), "y": gy.ravel(), "prob": prob.ravel()}))
    df = pd.concat(rows, ignore_index=True).sample(frac=1.0, random_state=0)  # row order must not matter
    fig = charts.decision_maps(df)
    labels = ["compile time, k=1", "compile time, k=2", "run time, k=1", "run time, k=2"]
    assert [t.hovertemplate.split("<br>")[0] for t in fig.data] == labels
    assert [a.text for a in fig.layout.annotations] == labels  # panel titles
    # one pair of axes: panels side by side (columns: k) and stacked (rows: way), none overlapping
    run2, compile1 = fig.data[3], fig.data[0]
    np.testing.assert_allclose(compile1.x, xs) and np.testing.assert_allclose(compile1.y, ys)
    assert run2.x[0] > compile1.x[-1] and run2.y[-1] < compile1.y[0]
    np.testing.assert_allclose(np.diff(run2.x), np.diff(xs)) and np.testing.assert_allclose(np.diff(run2.y), np.diff(ys))
    assert _axis_titles(fig) == ("x", "y") and list(fig.layout.xaxis.ticktext[:3]) == ["-1", "0", "1"]
    np.testing.assert_allclose(np.asarray(run2.z, float), np.round((gx + 2 * gy + 3) / 10, 3), atol=1e-6)
    assert "P(class 1)" in run2.hovertemplate
    assert sum(bool(t.showscale) for t in fig.data) == 1  # one colour legend for all maps


def test_charts_use_plotly_white_for_every_trace_type_they_draw():
    import re
    from pathlib import Path

    import plotly.io as pio

    white = pio.templates["plotly_white"]
    template = pio.templates[charts.TEMPLATE]
    assert template.layout.to_plotly_json() == white.layout.to_plotly_json()
    for t in charts.TRACE_TYPES:
        assert template.data[t] == white.data[t]
    drawn = set(re.findall(r"go\.([A-Z][a-zA-Z]*)\(", Path(charts.__file__).read_text())) - {"Figure"}
    assert {d.lower() for d in drawn} <= set(charts.TRACE_TYPES)
    fig = charts.drop_bars(pd.DataFrame({"layer": [0, 1], "drop_rate": [0.1, 0.2]}), by="layer", cf=1.0)
    assert fig.layout.template.layout.plot_bgcolor == "white"


def test_moeviz_template_as_plotly_default_writes_out_the_same_figure():
    """The dashboard makes moeviz's template Plotly's default (figures then skip assigning it, 3 vs ~20 ms a
    figure); what a chart writes out must be the same as with the template assigned to it."""
    import plotly.io as pio

    df = pd.DataFrame({"layer": [0, 1], "drop_rate": [0.1, 0.2]})
    assigned = pio.to_json(charts.drop_bars(df, by="layer", cf=1.0), validate=False)
    before = pio.templates.default
    try:
        charts.use_moeviz_template_by_default()
        assert pio.to_json(charts.drop_bars(df, by="layer", cf=1.0), validate=False) == assigned
    finally:
        pio.templates.default = before


def test_heatmap_places_rows_in_any_order_and_leaves_missing_cells_empty():
    df = pd.DataFrame({"expert": [2, 0, 1, 0], "layer": [1, 1, 0, 0], "v": [0.5, 0.3, 0.2, 0.1], "n": [5, 3, 2, 1]})
    (hm,) = charts.heatmap(df, x="expert", y="layer", z="v", title="t", x_title="x", y_title="y", z_title="z",
                           hover=["n"]).data
    np.testing.assert_array_equal(np.asarray(hm.z, float), [[0.1, 0.2, np.nan], [0.3, np.nan, 0.5]])
    assert [[c[0] for c in row] for row in hm.customdata] == [[1, 2, None], [3, None, 5]]


def test_swap_heatmap_shows_every_expert_and_never_cuts_one_off():
    sw = pd.DataFrame({"expert_a": [1, 5], "expert_b": [2, 0], "tokens": [3, 4]})
    z = np.asarray(charts.swap_heatmap(sw, layer=2, n_experts=4).data[0].z, dtype=float)
    assert z.shape == (6, 6) and z[1, 2] == 3 and z[5, 0] == 4 and z.sum() == 7  # run B had 6 experts
    assert "No swap" in str(charts.swap_heatmap(sw.iloc[:0], layer=2).layout.annotations[0].text)


def test_top_load_title_counts_the_top_experts_not_the_found_one():
    """Finding expert 200 (busy rank 200) beside the 8 busiest: the title still says 8."""
    import pandas as pd

    from moeviz.charts import top_load_small_multiples

    rows = [{"step": 0, "layer": 0, "expert": e, "busy_rank": r, "load_fraction": 0.1, "label": f"#{r}",
             "n_experts": 256} for e, r in [(e, e + 1) for e in range(8)] + [(200, 200)]]
    rows.append({"step": 0, "layer": 0, "expert": -1, "busy_rank": 9, "load_fraction": 0.2, "label": "others",
                 "n_experts": 256})
    fig = top_load_small_multiples(pd.DataFrame(rows), found=200)
    assert "the 8 busiest experts" in fig.layout.title.text
