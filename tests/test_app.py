"""The dashboard, page by page, with Streamlit's AppTest on real stores written by moeviz.store.RunWriter.

Values shown are checked against numpy computed from the routing arrays the store was written from (load shares,
Switch loss, capacity drops, the tokens' experts, SQL counts), not only "no exception". Error cases (empty
folder, nonexistent path, newer schema, a truncated segment, a run still being written, one layer with one
expert) must show a message, never a traceback.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from moeviz.testing import softmax, store_from_routing, synthetic_routing  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
PAGES = ["overview", "load", "aux_loss", "balancing", "capacity", "expert_parallel", "specialization", "tokens", "bounds", "toy", "sql", "compare", "agreement"]


# --- writing real stores ----------------------------------------------------------------------------------------


def write_run_dir(run_dir, routing: dict, *, run_id: str, close: bool = True, vocab: list[str] | None = None,
                  hold_back: int = 0, config: dict | None = None, **meta):
    """Write routing arrays as a real run folder (one flush per step and rank, one writer per rank), through
    moeviz.store.RunWriter; returns the writer of the last rank.

    `hold_back` keeps the last steps' flushes unwritten in `writer.pending` (for live-refresh tests); `config`
    replaces the runs.config JSON (e.g. a Switch model's expert_capacity).
    The tables come from moeviz.testing.store_from_routing (aggregates over every token), so the run holds exactly
    what the collectors would have recorded for these arrays.
    """
    from moeviz.store import RunWriter

    mem = store_from_routing(**routing, run_id=run_id, **meta)
    if config is not None:
        mem.execute("UPDATE runs SET config = ?", [json.dumps(config)])
    run = mem.execute("SELECT * FROM runs").df().iloc[0]
    ranks = sorted(int(r) for r in mem.execute("SELECT DISTINCT rank FROM step_stats").df()["rank"])

    def plain(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else (v.item() if hasattr(v, "item") else v)

    for rank in ranks:
        w = RunWriter(run_dir, run_id=run_id, run_name=run_id, rank=rank, world_size=len(ranks))
        w.write_run({k: plain(run[k]) for k in ("model_class", "n_layers", "n_experts", "top_k", "capacity_factor",
                                                "config", "sample_every")})
        w.write_layers(mem.execute("SELECT * EXCLUDE (run_id) FROM layers").df().to_dict("records"))
        if vocab:
            w.write_vocab(list(range(len(vocab))), vocab)
        flushes = []
        for step in sorted(mem.execute("SELECT DISTINCT step FROM step_stats").df()["step"]):
            tables = {}
            for t in ("routes", "step_stats", "layer_stats", "sequences"):
                df = mem.execute(f"SELECT * EXCLUDE (run_id) FROM {t} WHERE step = ? AND rank = ?",
                                 [int(step), rank]).df()
                tables[t] = {c: df[c].to_numpy() for c in df.columns}
            flushes.append(tables)
        cut = len(flushes) - hold_back
        for tables in flushes[:cut]:
            w.write_flush(tables)
        w.pending = flushes[cut:]
        if close:
            w.close()
    return w


MAIN = dict(n_steps=4, n_layers=3, n_experts=8, top_k=2, seqs_per_step=3, seq_len=16, skew=1.0, seed=0)
SMALL = dict(n_steps=3, n_layers=2, n_experts=4, top_k=1, seqs_per_step=2, seq_len=8, seed=3, domains=None)
VOCAB = [f"<{i}>" for i in range(100)]


@pytest.fixture(scope="module")
def routing():
    return synthetic_routing(**MAIN)


@pytest.fixture(scope="module")
def store(tmp_path_factory, routing):
    root = tmp_path_factory.mktemp("runs")
    write_run_dir(root / "small", synthetic_routing(**SMALL), run_id="small")
    write_run_dir(root / "main", routing, run_id="main", vocab=VOCAB)
    return root



def open_app(path, run: str | None = "main", page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["store_path"] = str(path)
    if run:
        at.session_state["run_id"] = run
    if page:  # file-based pages keep their file's name as url path, so this works before the first run
        at.switch_page(f"views/{page}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if page:  # on the test stores every section of a page works: no error box
        assert not at.error, texts(at, "error")
    return at


def charts(at) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def arr(v) -> np.ndarray:
    """A trace array from a figure's JSON (plotly 6 sends numpy arrays as typed base64 `bdata`)."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        shape = v.get("shape")
        return a.reshape([int(x) for x in str(shape).split(",")]) if shape else a
    return np.asarray(v, dtype=float)


def chart(at, title_part: str) -> dict:
    found = [c for c in charts(at) if title_part in c["layout"]["title"]["text"]]
    assert found, f"no chart titled *{title_part}*; titles: {[c['layout']['title']['text'] for c in charts(at)]}"
    return found[0]


def metric(at, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def texts(at, kind: str) -> str:
    return " | ".join(str(e.value) for e in getattr(at, kind))


# --- numpy references -------------------------------------------------------------------------------------------


def load_share(r, step=None) -> np.ndarray:
    """[layers, experts] share of each layer's assignments (all k slots)."""
    idx = r["index"] if step is None else r["index"][r["steps"] == step]
    n_lay, n_exp = idx.shape[1], r["logits"].shape[2]
    counts = np.stack([np.bincount(idx[:, l, :].ravel(), minlength=n_exp) for l in range(n_lay)])
    return counts / counts.sum(1, keepdims=True)


def switch_loss(r, step: int, layer: int) -> float:
    sel = r["steps"] == step
    idx, probs = r["index"][sel, layer], softmax(r["logits"][sel, layer])
    n_exp = probs.shape[1]
    f = np.bincount(idx.ravel(), minlength=n_exp) / idx.size
    return float(n_exp * (f * probs.mean(0)).sum())


def dropped_position(r, cf: float) -> tuple[int, int]:
    """(dropped, assigned) of a capacity-limited router, groups = one step's tokens per layer."""
    k, n_exp = r["index"].shape[2], r["logits"].shape[2]
    dropped = assigned = 0
    for s in np.unique(r["steps"]):
        idx = r["index"][r["steps"] == s]
        cap = math.ceil(round(cf * len(idx) * k / n_exp, 9))
        for l in range(idx.shape[1]):
            n = np.bincount(idx[:, l, :].ravel(), minlength=n_exp)
            dropped += int(np.maximum(n - cap, 0).sum())
            assigned += int(n.sum())
    return dropped, assigned


# --- every page on a real store ---------------------------------------------------------------------------------


def test_overview_shows_the_run_and_its_health(store, routing):
    at = open_app(store)
    assert metric(at, "Experts") == "8" and metric(at, "Top-k") == "2" and metric(at, "MoE layers") == "3"
    assert metric(at, "Steps recorded") == "4"
    assert metric(at, "Tokens") == f"{len(routing['steps']):,}"
    assert "finished" in metric(at, "Status")
    assert {c["layout"]["title"]["text"] for c in charts(at)} == {
        "Load per expert over steps, one panel per layer",
        "Switch load-balancing loss over steps, one panel per layer",
    }
    # the health summary reports (skewed routing: some expert is starved) as messages, worst first
    assert "errors" in texts(at, "markdown") or at.success
    # load small multiples: 3 panels x 8 experts
    assert len(chart(at, "Load per expert over steps")["data"]) == 3 * 8


def test_overview_flags_nan_router_outputs_and_a_recording_that_lost_data(tmp_path, monkeypatch):
    """A real recording (tiny Mixtral) with a +inf router logit at step 1 (layer 1) and a flush refused by a full
    disk at step 3: the Overview shows both, with the layer and the steps, whatever else the health checks find."""
    import warnings

    import torch

    from collectors import Recorder, RecordingWarning
    from collectors.routers import find_routers
    from collectors.testing import tiny_model
    from moeviz import store as store_module

    model, _ = tiny_model("mixtral")
    poison = {"on": False}

    def inf_logit(module, args, out):
        if poison["on"]:
            logits = out[0].clone()
            logits[2, 0] = float("inf")
            return (logits,) + tuple(out[1:])

    real = store_module.RunWriter.write_flush

    def full_at_step_3(self, tables):
        if 3 in set(tables["layer_stats"]["step"]):
            raise OSError(28, "No space left on device")
        return real(self, tables)

    monkeypatch.setattr(store_module.RunWriter, "write_flush", full_at_step_3)
    handle = find_routers(model)[1].module.register_forward_hook(inf_logit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RecordingWarning)
            with Recorder(model, tmp_path / "sick", flush_every=1) as rec:
                for step in range(5):
                    poison["on"] = step == 1
                    with torch.no_grad():
                        model(input_ids=torch.arange(2, 34).reshape(2, 16))
                    rec.step(step)
    finally:
        handle.remove()
    at = open_app(tmp_path / "sick", run="sick")
    errors, warned = texts(at, "error"), texts(at, "warning")
    assert "layer 1: 1 token(s) had NaN or infinite router logits" in errors and "in step 1;" in errors
    assert "recording lost data (1 recording error(s)" in warned and "step 3" in warned
    assert metric(at, "Steps recorded") == "4"


def test_load_heatmap_matches_numpy_and_follows_the_step_slider(store, routing):
    at = open_app(store, page="load")
    hm = chart(at, "Load per expert and layer over the selected steps")["data"][0]
    np.testing.assert_allclose(arr(hm["z"]), load_share(routing), atol=1e-12)
    assert len(charts(at)) == 2
    at.select_slider(key="load_step").set_value(2).run()
    hm = chart(at, "at step 2")["data"][0]
    np.testing.assert_allclose(arr(hm["z"]), load_share(routing, step=2), atol=1e-12)
    assert not np.allclose(load_share(routing, step=2), load_share(routing))
    # imbalance chart: one line per layer over the 4 steps
    imb = chart(at, "Imbalance per layer over steps")
    assert [len(arr(t["x"])) for t in imb["data"]] == [4, 4, 4]


def test_aux_loss_page_matches_numpy_switch_loss(store, routing):
    at = open_app(store, page="aux_loss")
    fig = chart(at, "Switch load-balancing loss per layer")
    for layer, trace in enumerate(fig["data"]):
        expected = [switch_loss(routing, s, layer) for s in range(4)]
        np.testing.assert_allclose(arr(trace["y"]), expected, rtol=1e-9)
    refs = sorted(s["y0"] for s in fig["layout"]["shapes"])
    assert 1.0 in refs  # the uniform value
    assert len(charts(at)) >= 4  # per layer, pooled, z-loss, entropy


def test_capacity_slider_changes_the_dropped_share(store, routing):
    at = open_app(store, page="capacity")
    at.slider(key="cap_cf").set_value(1.0).run()
    d1, a1 = dropped_position(routing, 1.0)
    assert metric(at, "Dropped assignments") == f"{d1:,}" and metric(at, "Assignments") == f"{a1:,}"
    assert metric(at, "Dropped share") == f"{d1 / a1:.2%}"
    at.slider(key="cap_cf").set_value(2.0).run()
    d2, _ = dropped_position(routing, 2.0)
    assert metric(at, "Dropped assignments") == f"{d2:,}" and d2 < d1
    curve = chart(at, "Dropped share over capacity factor")
    assert any(s.get("x0") == 2.0 for s in curve["layout"]["shapes"])  # current CF marked
    assert len(charts(at)) == 4  # per layer, per domain, per expert, curve


@pytest.mark.parametrize("policy", ["position", "probability"])
def test_capacity_drops_per_domain_match_the_analysis_at_the_chosen_factor(store, policy):
    """The page picks the per-domain drops out of one query for every slider value: the same numbers as the
    analysis at that one factor."""
    from moeviz.analyses.capacity import capacity_drops
    from moeviz.selection import Selection
    from moeviz.store import open_store

    at = open_app(store, page="capacity")
    at.radio(key="cap_policy").set_value(policy).run()
    con = open_store(store)
    try:
        for cf in (0.75, 1.15):
            at.slider(key="cap_cf").set_value(cf).run()
            want = capacity_drops(con, Selection(run_ids=("main",)), cf, policy=policy, by=("domain",))
            bars = chart(at, "Dropped share per domain")["data"]
            got = {str(x): y for t in bars for x, y in zip(t["x"], arr(t["y"]))}
            assert got == pytest.approx(dict(zip(want["domain"].astype(str), want["drop_rate"])), abs=1e-12)
            assert want["dropped"].sum() > 0  # the factor drops something: the comparison is not all zeros
    finally:
        con.close()


def test_tokens_page_colours_tokens_by_their_top_expert(store, routing):
    at = open_app(store, page="tokens")
    assert not at.get("plotly_chart")  # the grid is built only when asked for
    at.toggle(key="tokens_grid").set_value(True).run()
    hm = chart(at, "Top expert of each token")["data"][0]
    sel = (routing["steps"] == 3) & (routing["seqs"] == 0)  # newest step, first sequence: the default
    np.testing.assert_array_equal(arr(hm["z"]), routing["index"][sel, :, 0].T)
    ticks = chart(at, "Top expert of each token")["layout"]["xaxis"]["ticktext"]
    assert [t.split(" ", 1)[1] for t in ticks] == [VOCAB[t] for t in routing["token_ids"][sel]]


def test_sql_console_runs_queries_and_refuses_bad_ones(store, routing):
    at = open_app(store, page="sql")
    at.text_area(key="sql_text").set_value("SELECT count(*) AS n FROM routes WHERE run_id = 'main'").run()
    assert "1 rows" in texts(at, "success")
    assert int(at.dataframe[0].value["n"][0]) == len(routing["steps"]) * 3 * 2
    at.text_area(key="sql_text").set_value("DELETE FROM runs").run()
    assert "read-only" in texts(at, "error")
    at.text_area(key="sql_text").set_value("SELECT * FROM read_csv('/etc/passwd')").run()
    assert "not allowed" in texts(at, "error").lower() or "permission" in texts(at, "error").lower()
    at.text_area(key="sql_text").set_value("SELECT * FROM range(5000)").run()
    at.number_input(key="sql_rows").set_value(100).run()
    assert "100 rows (cut at 100" in texts(at, "success")


def test_compare_puts_two_runs_on_shared_axes(store):
    at = open_app(store, page="compare")
    hm = chart(at, "run by run")
    assert [t.get("zmax") for t in hm["data"]][0] == hm["data"][1]["zmax"]
    aux = chart(at, "pooled over layers")
    assert {t["name"] for t in aux["data"]} == {"main", "small"}  # run ids stand alone in the legend (#16)
    dom = chart(at, "Expert share of each domain in layer 0, against uniform, run by run")
    assert [len(arr(t["z"])) for t in dom["data"]] == [2, 1]  # main: code and prose; small: no domain


def test_picking_another_run_changes_every_number(store):
    at = open_app(store)
    at.selectbox(key="run_id").set_value("small").run()
    assert metric(at, "Experts") == "4" and metric(at, "Top-k") == "1" and metric(at, "Steps recorded") == "3"
    assert not at.exception


def test_specialization_domain_map_matches_numpy(store, routing):
    at = open_app(store, page="specialization")
    hm = chart(at, "Expert share of each domain in layer 0")["data"][0]
    k, n_exp = 2, 8
    for row, dom in enumerate(hm["y"]):
        sel = routing["domains"] == dom
        counts = np.bincount(routing["index"][sel, 0, :].ravel(), minlength=n_exp)
        np.testing.assert_allclose(arr(hm["z"])[row], counts / sel.sum() / (k / n_exp), rtol=1e-9)
    # the per-layer maps sit in tabs that run only when open: the first tab's map, then each tab's own charts
    titles = " | ".join(c["layout"]["title"]["text"] for c in charts(at))
    assert "Top tokens of expert 0" not in titles and "Co-activation" not in titles
    for tab, parts in (("Tokens", ["Top tokens of expert 0"]),
                       ("Vocabulary and positions", ["Vocabulary specialization", "by token position"]),
                       ("Experts together and in sequence", ["Co-activation", "Consecutive tokens"])):
        at.session_state["spec_tab"] = tab
        at.run()
        assert not at.exception and not at.error, texts(at, "error")
        titles = " | ".join(c["layout"]["title"]["text"] for c in charts(at))
        assert "Expert share of each domain" not in titles, tab
        for part in parts + ["Token flow from layer 0 to layer 1", "mutual information"]:
            assert part in titles, (tab, part)
    at.session_state["spec_tab"] = "Domains"
    at.run()
    # the Sankey's links carry every token once (first choices): 192 tokens from layer 0 to layer 1
    sk = chart(at, "Token flow")["data"][0]
    assert sum(arr(sk["link"]["value"])) == len(routing["steps"])
    # the layer picker drives the per-layer maps (a fragment): layer 2's map, against numpy, the other charts kept
    at.selectbox(key="spec_layer").set_value(2).run()
    hm = chart(at, "Expert share of each domain in layer 2")["data"][0]
    for row, dom in enumerate(hm["y"]):
        sel = routing["domains"] == dom
        counts = np.bincount(routing["index"][sel, 2, :].ravel(), minlength=n_exp)
        np.testing.assert_allclose(arr(hm["z"])[row], counts / sel.sum() / (k / n_exp), rtol=1e-9)
    assert "Token flow from layer 0 to layer 1" in " | ".join(c["layout"]["title"]["text"] for c in charts(at))


def test_bound_explorer_shows_the_infimum_for_the_runs_e_and_k(store):
    at = open_app(store, page="bounds")
    # E = 8, k = 2: k-1 experts take every token, the last slot spreads over E-k+1: E / (k (E-k+1)) = 4/7
    assert metric(at, "True infimum") == f"{4 / 7:.4f}"
    assert metric(at, "Switch's claimed minimum") == "1"
    observed = chart(at, "This run's Switch loss against the bounds")
    assert pytest.approx(4 / 7) in [s["y0"] for s in observed["layout"]["shapes"]]
    at.number_input(key="bound_k").set_value(1).run()
    # top-1: the blog's construction tends to E / (2 (E - 1)) as its eps -> 0
    assert metric(at, "Blog's construction") == f"{8 / (2 * 7):.4f}"
    assert float(metric(at, "True infimum")) < 8 * 0.5 / 7


def test_toy_page_shows_maps_and_accuracy(store):
    at = open_app(store, page="toy")
    maps = chart(at, "decision maps")
    assert len(maps["data"]) == 12  # 2 ways x k = 1..6
    # every map is the model's P(class 1) on the page's default grid (seed 0, 1000 points, noise 0.1, 51 x 51)
    from moeviz.analyses.toy import toy_moe

    model = toy_moe(0, 1000, 51, noise=0.1)
    for i, key in [(0, ("compile", 1)), (5, ("compile", 6)), (6, ("run", 1)), (11, ("run", 6))]:
        trace = maps["data"][i]
        np.testing.assert_allclose(arr(trace["z"]), model.maps[key], atol=6e-4)  # float32, 3 decimals
        x, y = arr(trace["x"]), arr(trace["y"])  # the panel's grid, shifted to its place on the shared axes
        np.testing.assert_allclose(x - x[0], model.grid - model.grid[0], atol=1e-12)
        np.testing.assert_allclose(y - y[0], model.grid - model.grid[0], atol=1e-12)
        assert trace["hovertemplate"].startswith(trace["name"] + "<br>P(class 1): %{z")
    titles = [a["text"] for a in maps["layout"]["annotations"]]
    assert titles[:2] == ["compile time, k=1", "compile time, k=2"] and titles[6] == "run time, k=1"
    at.select_slider(key="toy_grid").set_value(81).run()
    assert arr(chart(at, "decision maps")["data"][0]["z"]).shape == (81, 81)
    table = at.dataframe[0].value.set_index("k")
    assert list(table.index) == [1, 2, 3, 4, 5, 6]
    # percentages, and "—" (never "None") where dense has no model (k < E)
    assert list(table["dense"]) == ["—"] * 5 + [table.loc[6, "dense"]] and "%" in table.loc[6, "dense"]
    acc = table.drop(columns="dense").map(lambda v: float(v.rstrip("%")) / 100)
    # the post's finding: one compile-time expert is a linear classifier, far worse than one run-time expert
    assert acc.loc[1, "compile time"] < acc.loc[1, "run time"] - 0.1
    model_acc = model.accuracy.set_index(["way", "k"])["accuracy"]
    assert acc.loc[1, "run time"] == pytest.approx(model_acc[("run", 1)], abs=5e-4)  # 1 decimal of a percent


def test_chart_downloads_write_the_charts_data_as_csv_on_demand():
    import io

    import pandas as pd

    from app.components import csv_of

    df = pd.DataFrame({"layer": [0, 1], "drop_rate": [0.25, 0.5]})
    make = csv_of(df)  # called by Streamlit only when the user clicks the download button
    pd.testing.assert_frame_equal(pd.read_csv(io.BytesIO(make())), df)


# --- error cases ------------------------------------------------------------------------------------------------


def test_nonexistent_path_is_a_message(tmp_path):
    at = open_app(tmp_path / "nope", run=None)
    assert "No such file or folder" in texts(at, "error")


def test_empty_folder_is_a_message(tmp_path):
    at = open_app(tmp_path, run=None)
    assert texts(at, "error") or texts(at, "info")
    assert re.search(r"no run|holds no runs|Could not open", texts(at, "error") + texts(at, "info"), re.I)


def test_newer_schema_is_refused_with_a_message(tmp_path):
    write_run_dir(tmp_path / "r", synthetic_routing(**SMALL), run_id="r")
    manifest = tmp_path / "r" / "moeviz.json"
    data = json.loads(manifest.read_text())
    data["schema_version"] = 99
    manifest.write_text(json.dumps(data))
    at = open_app(tmp_path, run=None)
    assert "schema" in texts(at, "error").lower()


def test_a_run_being_written_and_a_tiny_model(tmp_path):
    one = dict(SMALL, n_layers=1, n_experts=1, top_k=1)
    writer = write_run_dir(tmp_path / "live", synthetic_routing(**one), run_id="live", close=False, hold_back=1)
    try:
        at = open_app(tmp_path, run="live")
        assert "running" in metric(at, "Status") and metric(at, "Experts") == "1"
        assert at.toggle(key="live").value  # a running run turns live refresh on
        assert metric(at, "Steps recorded") == "2"
        assert "being written" in texts(at, "info")  # the header explains the status
        assert any(e.label == "Model config and recording policy" for e in at.expander)
        writer.write_flush(writer.pending[0])  # the training process flushes another step
        at.button(key="reload").click().run()  # what the live-refresh fragment does when it sees new steps
        assert metric(at, "Steps recorded") == "3"
        for page in PAGES[1:]:
            at.switch_page(f"views/{page}.py").run()
            assert not at.exception, (page, [e.value for e in at.exception])
    finally:
        writer.close()


def test_a_truncated_segment_is_skipped_not_fatal(tmp_path):
    write_run_dir(tmp_path / "r", synthetic_routing(**SMALL), run_id="r", close=False)
    seg = sorted((tmp_path / "r" / "routes").rglob("*.parquet"))[-1]
    seg.write_bytes(seg.read_bytes()[:100])
    at = open_app(tmp_path, run="r")
    assert metric(at, "Experts") == "4"
    assert "skipped 1 damaged Parquet file" in texts(at, "warning")


def test_a_compaction_under_the_dashboard_is_read_again_not_shown_as_an_error(tmp_path):
    """The shared connection lists segments when it opens; a compaction then folds and deletes them. The next
    query re-opens the store (app/state.call) instead of showing "Failed to open local file"."""
    routing = synthetic_routing(**SMALL)
    writer = write_run_dir(tmp_path / "r", routing, run_id="r", close=False)
    at = open_app(tmp_path, run="r", page="load")
    at.toggle(key="live").set_value(False).run()  # live refresh would re-open the store on its own
    assert not at.exception and not texts(at, "error")
    writer.close()  # the last rank closes: compaction folds the segments the open connection reads
    assert not list((tmp_path / "r" / "routes").rglob("*.parquet"))
    at.switch_page("views/aux_loss.py").run()
    assert not at.exception and not texts(at, "error"), texts(at, "error")
    at.switch_page("views/tokens.py").run()
    assert not at.exception and not texts(at, "error"), texts(at, "error")


def test_app_files_hold_no_sql():
    """The app composes: SQL lives in moeviz (queries, analyses), never in app/."""
    root = Path(APP).parent
    offenders = []
    for f in root.rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"\bSELECT\b|\bFROM\b|\bWHERE\b|\bGROUP BY\b", line):
                offenders.append(f"{f.relative_to(root)}:{i}: {line.strip()}")
    assert not offenders, offenders


# --- the `moeviz dashboard` command -----------------------------------------------------------------------------


def test_dashboard_command_refuses_a_missing_path(tmp_path, capsys):
    from moeviz.cli import main

    assert main(["dashboard", str(tmp_path / "nope")]) == 2
    assert "no run folder or folder of runs" in capsys.readouterr().err


def test_dashboard_command_line_runs_streamlit_on_the_app(tmp_path):
    from moeviz.cli.dashboard import app_main_path, dashboard_command

    cmd = dashboard_command(tmp_path, port=8765, host="0.0.0.0")
    assert cmd[1:4] == ["-m", "streamlit", "run"] and Path(cmd[4]) == app_main_path() == Path(APP)
    assert cmd[cmd.index("--server.port") + 1] == "8765" and cmd[cmd.index("--server.address") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[-2:] == ["--", str(tmp_path.resolve())]


def test_launch_without_blocking_serves_and_stops(store):
    """launch(block=False) (what `moeviz demo` calls) returns the server process; it answers, then stops."""
    import socket
    import time
    import urllib.request

    from moeviz.cli.dashboard import _stop, launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = launch(store, port=port, block=False)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.25)  # polling the health endpoint
    finally:
        _stop(proc)
    assert proc.poll() is not None


# --- bounded per-token windows (large stores) -------------------------------------------------------------------


def test_route_budget_queries_match_the_store(store, routing):
    """routes_per_step from the aggregates, route_counts and has_routes from routes, against the arrays."""
    from moeviz.store import catalog as queries
    from moeviz.store import open_store

    con = open_store(store)
    try:
        tokens_per_step = MAIN["seqs_per_step"] * MAIN["seq_len"]
        assert queries.routes_per_step(con, "main") == tokens_per_step * MAIN["n_layers"] * MAIN["top_k"]
        assert queries.route_counts(con, "main") == {"routed_tokens": len(routing["steps"]),
                                                     "route_rows": len(routing["steps"]) * 3 * 2}
        assert queries.has_routes(con, "main")
        ov = queries.run_overview(con, "main", count_routes=False).iloc[0]
        assert ov["tokens"] == len(routing["steps"]) and ov["steps"] == 4
        seqs = queries.sequence_list(con, "main", steps=(2, 3))
        assert sorted(set(seqs["step"])) == [2, 3] and len(seqs) == 2 * MAIN["seqs_per_step"]
    finally:
        con.close()
    # beside another run, each run counts its own routes only (the one-run shortcut must not apply)
    small = synthetic_routing(**SMALL)
    two = store_from_routing(**routing, run_id="a")
    store_from_routing(**small, run_id="b", con=two)
    assert queries.route_counts(two, "a") == {"routed_tokens": len(routing["steps"]),
                                              "route_rows": len(routing["steps"]) * 3 * 2}
    assert queries.route_counts(two, "b") == {"routed_tokens": len(small["steps"]),
                                              "route_rows": len(small["steps"]) * 2 * 1}
    # the same from the routes themselves, on a store without position_stats (a live or older run)
    bare = store_from_routing(**routing, run_id="a", extra_stats=False)
    assert queries.route_counts(bare, "a") == queries.route_counts(two, "a")
    # the last steps that fit the budget, at least one, None without steps
    assert queries.route_window([0, 1, 2, 3], 100, 250) == (2, 3)
    assert queries.route_window([0, 1, 2, 3], 100, 10) == (3, 3)
    assert queries.route_window([0, 5, 9], 100, 10**9) == (0, 9)
    assert queries.route_window([0, 1], 0, 10) == (0, 1)
    assert queries.route_window([], 100, 10) is None


def domain_ratio(r, domain: str, steps, layer: int = 0, k: int = 2, n_exp: int = 8) -> np.ndarray:
    sel = (r["domains"] == domain) & np.isin(r["steps"], steps)
    counts = np.bincount(r["index"][sel, layer, :].ravel(), minlength=n_exp)
    return counts / sel.sum() / (k / n_exp)


def test_per_token_pages_read_only_the_window_and_widen_on_request(store, routing, monkeypatch):
    """With a budget of two steps' routes the Specialization page reads steps 2-3 only (numpy over those steps),
    says so, and reads every step after the sidebar's window is widened to 4 steps."""
    import app.sidebar

    per_step = MAIN["seqs_per_step"] * MAIN["seq_len"] * MAIN["n_layers"] * MAIN["top_k"]
    monkeypatch.setattr(app.sidebar, "ROUTE_BUDGET", 2 * per_step)
    at = open_app(store, page="specialization")
    assert "Per-token analyses use steps 2–3" in texts(at, "info")
    hm = chart(at, "Expert share of each domain in layer 0")["data"][0]
    for row, dom in enumerate(hm["y"]):
        np.testing.assert_allclose(arr(hm["z"])[row], domain_ratio(routing, dom, [2, 3]), rtol=1e-9)
    assert not np.allclose(domain_ratio(routing, hm["y"][0], [2, 3]), domain_ratio(routing, hm["y"][0], [0, 1, 2, 3]))
    at.number_input(key="route_window_steps").set_value(4).run()
    assert "Per-token analyses use steps 0–3" in texts(at, "info")
    hm = chart(at, "Expert share of each domain in layer 0")["data"][0]
    for row, dom in enumerate(hm["y"]):
        np.testing.assert_allclose(arr(hm["z"])[row], domain_ratio(routing, dom, [0, 1, 2, 3]), rtol=1e-9)
    # the Tokens page lists only the window's sequences; aggregate pages still use every step
    tok = open_app(store, page="tokens")
    assert {o.split(" · ")[0] for o in tok.selectbox(key="tokens_seq").options} == {"step 3", "step 2"}
    ov = open_app(store)
    assert metric(ov, "Steps recorded") == "4" and metric(ov, "Tokens with detail") == f"{len(routing['steps']):,}"
    assert list(arr(chart(ov, "Load per expert over steps")["data"][0]["x"])) == [0, 1, 2, 3]


def test_capacity_curve_marks_the_chosen_factor_with_its_drop_rate(store, routing):
    at = open_app(store, page="capacity")
    at.slider(key="cap_cf").set_value(1.1).run()
    d, a = dropped_position(routing, 1.1)
    curve = chart(at, "Dropped share over capacity factor")["data"][0]
    xs, ys = arr(curve["x"]), arr(curve["y"])
    assert list(xs) == sorted(xs) and 1.1 in set(np.round(xs, 6))
    assert ys[list(np.round(xs, 6)).index(1.1)] == pytest.approx(d / a)


def test_expert_parallel_page_shows_gpu_load_traffic_and_staleness(store, routing):
    """The GPU x layer map of the contiguous placement against numpy (expert e on GPU floor(e*4/8)), then the
    balanced placement with replicas and two nodes: every chart, no error."""
    at = open_app(store, page="expert_parallel")
    heat = chart(at, "per GPU, contiguous")["data"][0]
    z = arr(heat["z"]).reshape(3, 4)
    for layer in range(3):
        counts = np.bincount(routing["index"][:, layer].ravel(), minlength=8)
        per_gpu = np.bincount(np.arange(8) * 4 // 8, weights=counts, minlength=4)
        assert np.allclose(z[layer], per_gpu / per_gpu.sum())
    for title in ("Busiest GPU over the mean GPU", "Token copies sent", "goes stale"):
        chart(at, title)
    at.radio(key="ep_placement").set_value("balanced").run()
    at.number_input(key="ep_redundant").set_value(2).run()
    at.number_input(key="ep_nodes").set_value(2).run()
    assert not at.exception and not at.error, texts(at, "error")
    chart(at, "per GPU, balanced")
    at.number_input(key="ep_hidden").set_value(1024).run()  # the traffic table gains the bytes leaving each GPU
    assert not at.exception and not at.error, texts(at, "error")
    local = next(d.value for d in at.dataframe if "remote_bytes" in d.value.columns)
    assert np.allclose(local["remote_bytes"], (local["tokens"] - local["local_tokens"]) * 1024 * 2)
    at.number_input(key="ep_gpus").set_value(16).run()  # more GPUs than experts + replicas: a message, no trace
    assert not at.exception and "exceed" in texts(at, "error")


# --- Balancing over time (issue 17) ------------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["specialization", "tokens", "compare"])
def test_specialization_pages_say_routing_frequency_is_observational(store, page):
    at = open_app(store, page=page)
    assert "Routing frequency is observational" in texts(at, "caption"), page



def test_balancing_page_on_a_run_without_bias_says_so_and_shows_maxvio(store, routing):
    """The demo-like run has no selection bias and no balance stats: the page says so in words, and MaxVio per
    step equals numpy (max / mean - 1 of each step's load)."""
    at = open_app(store, page="balancing")
    info = texts(at, "info")
    assert "no selection bias" in info and "No per-sequence balance losses" in info
    fig = chart(at, "Imbalance per layer over steps")
    for layer, trace in enumerate(fig["data"]):
        expected = []
        for s in range(4):
            n = np.bincount(routing["index"][routing["steps"] == s, layer].ravel(), minlength=8)
            expected.append(n.max() / n.mean() - 1)
        np.testing.assert_allclose(arr(trace["y"]), expected, rtol=1e-9)
    chart(at, "Load per expert over steps")
    chart(at, "MaxVio of each layer over the selected steps")


def test_balancing_page_shows_the_recorded_bias_and_sequence_losses(tmp_path):
    """A run with an expert_bias and balance_stats flush: the bias curve of the chosen layer is the written bias,
    the per-sequence loss curve is the written sums over sequences."""
    r = synthetic_routing(**SMALL)
    w = write_run_dir(tmp_path / "biased", r, run_id="biased", close=False)
    n_exp, steps = 4, sorted(set(int(s) for s in r["steps"]))
    rng = np.random.default_rng(0)
    bias = rng.normal(size=(len(steps), 2, n_exp))
    for i, s in enumerate(steps):
        w.write_flush({
            "expert_bias": {"step": np.full(2 * n_exp, s), "layer": np.repeat([0, 1], n_exp),
                            "expert": np.tile(np.arange(n_exp), 2), "bias": bias[i].ravel()},
            "balance_stats": {"step": np.full(2, s), "layer": [0, 1], "sequences": [2, 2],
                              "switch_sum": [2.2 + i, 2.4], "switch_stack_sum": [2.2, 2.6],
                              "seq_aux_sum": [2.0, 2.1 + i]},
        })
    w.close()
    at = open_app(tmp_path, run="biased", page="balancing")
    fig = chart(at, "Selection bias per expert, layer 0")
    for e, trace in enumerate(fig["data"]):
        np.testing.assert_allclose(arr(trace["y"]), bias[:, 0, e])
    sw = chart(at, "Switch loss per sequence")
    np.testing.assert_allclose(arr(sw["data"][0]["y"]), [1.1 + i / 2 for i in range(len(steps))])
    ds = chart(at, "DeepSeek-V3 sequence-wise")
    np.testing.assert_allclose(arr(ds["data"][1]["y"]), [1.05 + i / 2 for i in range(len(steps))])
    at.selectbox(key="bal_layer").set_value(1).run()
    assert not at.exception and not at.error
    fig = chart(at, "Selection bias per expert, layer 1")
    np.testing.assert_allclose(arr(fig["data"][2]["y"]), bias[:, 1, 2])


# --- Agreement (issue 22) ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agree_store(tmp_path_factory):
    """Runs A and B: the same tokens (B at other step numbers), B routed from perturbed logits."""
    ra = synthetic_routing(n_steps=2, n_layers=3, n_experts=8, top_k=2, seqs_per_step=3, seq_len=8, seed=4)
    rb = dict(ra, steps=ra["steps"] + 10)
    rb["logits"] = ra["logits"] + np.random.default_rng(1).normal(0, 0.7, ra["logits"].shape)
    rb["index"] = np.argsort(-rb["logits"], axis=-1, kind="stable")[..., :2]
    rb["weights"] = np.take_along_axis(softmax(rb["logits"]), rb["index"], axis=-1)
    root = tmp_path_factory.mktemp("agree")
    write_run_dir(root / "A", ra, run_id="A")
    write_run_dir(root / "B", rb, run_id="B")
    return root, ra, rb


def test_agreement_page_matches_numpy(agree_store):
    root, ra, rb = agree_store
    at = open_app(root, run="A", page="agreement")
    n_tok, n_lay = ra["index"].shape[:2]
    same = np.array([[sorted(ra["index"][t, l]) == sorted(rb["index"][t, l]) for l in range(n_lay)]
                     for t in range(n_tok)])  # [T, L]: sets compared as sorted tuples
    assert metric(at, "Matched tokens") == f"{n_tok:,}"
    assert metric(at, "Tokens with ≥ 1 differing layer") == f"{100 * (~same.all(1)).mean():.2f}%"
    bars = {t["name"]: arr(t["y"]) for t in chart(at, "Routing agreement per layer")["data"]}
    np.testing.assert_allclose(bars["same expert set"], same.mean(0))
    first = (ra["index"][:, :, 0] == rb["index"][:, :, 0]).mean(0)
    np.testing.assert_allclose(bars["same first choice"], first)
    hist = chart(at, "Layers whose expert set differs")["data"][0]
    np.testing.assert_array_equal(arr(hist["y"]), np.bincount((~same).sum(1), minlength=n_lay + 1))
    sw = chart(at, "Swaps in layer 0")["data"][0]
    want = np.zeros((8, 8))
    for t in range(n_tok):
        oa = [e for e in ra["index"][t, 0] if e not in rb["index"][t, 0]]
        ob = [e for e in rb["index"][t, 0] if e not in ra["index"][t, 0]]
        for x, y in zip(oa, ob):
            want[x, y] += 1
    np.testing.assert_array_equal(np.asarray(arr(sw["z"]), dtype=float).reshape(8, 8), want)
    assert chart(at, "by layer and position")
    # the new sections: log checks pass, no margins recorded here (said), every token's phase unknown (said)
    assert "Log checks: ok" in texts(at, "caption")
    assert "Neither side has margins" in texts(at, "caption")
    phase = chart(at, "Prompt against generated")["data"]
    assert [list(t["x"]) for t in phase] == [["unknown"], ["unknown"]]
    assert f"{n_tok:,} matched token(s) have no known prompt length" in texts(at, "caption")
    # the token view: the most disagreeing sequence first, each token's count of differing layers drawn
    import re

    html = " ".join(str(h.proto.body) for h in at.html)
    drawn = [int(x) for x in re.findall(r'data-differing="(\d+)"', html)]
    seq_of = ra["steps"] * 100 + ra["seqs"]
    per_seq = {q: (~same[seq_of == q]).sum(1) for q in np.unique(seq_of)}
    worst = max(per_seq.values(), key=lambda d: (d > 0).mean())
    assert drawn == [int(x) for x in worst], (drawn, per_seq)
    label = at.selectbox(key="agree_seq").format_func(0)
    assert f"{100 * (worst > 0).mean():.0f}% of {len(worst)} tokens differ" in label
    # two step windows of run A hold other tokens: a message saying what keys each side has, not an error
    at.radio(key="agree_mode").set_value("Two step windows of this run").run()
    assert not at.exception and not at.error, texts(at, "error")
    assert "no token of selection a matches" in texts(at, "info")


def test_agreement_page_with_margins_and_prompt_lengths(tmp_path):
    """B carries margins (from its own logits) and A's sequences a prompt length of 5: the margin chart and the
    prompt/generated bars draw the numbers a loop over the arrays gives."""
    ra = synthetic_routing(n_steps=2, n_layers=3, n_experts=8, top_k=2, seqs_per_step=3, seq_len=8, seed=4)
    rb = dict(ra, steps=ra["steps"] + 10)
    rb["logits"] = ra["logits"] + np.random.default_rng(1).normal(0, 0.7, ra["logits"].shape)
    rb["index"] = np.argsort(-rb["logits"], axis=-1, kind="stable")[..., :2]
    p = np.sort(softmax(rb["logits"]), axis=-1)[..., ::-1]
    rb["margins"] = p[..., 1] - p[..., 2]  # [T, L]: last chosen minus best unchosen
    write_run_dir(tmp_path / "A", dict(ra, prompt_tokens=np.full(len(ra["steps"]), 5)), run_id="A")
    write_run_dir(tmp_path / "B", rb, run_id="B")
    at = open_app(tmp_path, run="A", page="agreement")
    assert not at.exception and not at.error, texts(at, "error")
    same = np.array([[sorted(ra["index"][t, l]) == sorted(rb["index"][t, l]) for l in range(3)]
                     for t in range(len(ra["steps"]))])
    edges = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3]  # moeviz.agreement.MARGIN_EDGES
    bucket = np.searchsorted(edges, rb["margins"], side="right")  # [T, L]
    bars = chart(at, "Disagreement by margin (B's margins)")["data"][0]
    want = [1 - same[bucket == b].mean() for b in sorted(set(bucket.ravel()))]
    np.testing.assert_allclose(arr(bars["y"]), want, atol=1e-6)
    phase = {t["name"]: dict(zip(t["x"], arr(t["y"]))) for t in chart(at, "Prompt against generated")["data"]}
    prompt = ra["pos"] < 5
    got = phase["decisions with the same set"]
    assert got["prompt"] == pytest.approx(same[prompt].mean()) and got["generated"] == pytest.approx(same[~prompt].mean())


def test_agreement_page_on_runs_without_common_tokens(store):
    at = open_app(store, page="agreement")  # main vs small: no sequence in common
    assert "no token of selection a matches" in texts(at, "info") and "distinct seq_key" in texts(at, "info")
