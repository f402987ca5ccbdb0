"""The dashboard on runs imported from engine logs: every page opens without an exception, and the pages that
need what such a log lacks (probabilities, logits, slot order, token counts) show why instead of a chart."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from moeviz.importers import import_megatron, import_sglang, import_vllm  # noqa: E402
from tests import engine_logs as gen  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
# every page of the dashboard, so that a page added later is opened on imported runs too
PAGES = sorted(p.stem for p in (Path(APP).parent / "views").glob("*.py") if p.stem != "__init__")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    src, runs = root / "src", root / "runs"
    gen.write_sglang(src / "per_token", "per_token")
    import_sglang(src / "per_token", runs / "sglang_tokens")
    gen.write_sglang(src / "per_pass", "per_pass")
    import_sglang(src / "per_pass", runs / "sglang_counts")
    gen.write_vllm(src / "v.jsonl", "lists")
    import_vllm(src / "v.jsonl", runs / "vllm")
    gen.write_megatron(src / "trace")
    import_megatron(src / "trace", runs / "megatron")
    return runs


def _open(store, run: str, page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["store_path"] = str(store)
    at.session_state["run_id"] = run
    at.switch_page(f"views/{page}.py")
    at.run()
    return at


@pytest.mark.parametrize("run", ["sglang_tokens", "sglang_counts", "vllm", "megatron"])
def test_every_page_opens_on_an_imported_run(store, run):
    for page in PAGES:
        at = _open(store, run, page)
        assert not at.exception, (run, page, [e.value for e in at.exception])
        shown = " ".join(str(e.value) for e in at.error)
        assert not shown or page == "overview", (run, page, shown)  # the Overview's health findings are errors
        assert "Traceback" not in shown and "needs" not in shown, (run, page, shown)  # what is unknown is an info


@pytest.mark.parametrize("run, engine", [("vllm", "vLLM routed experts"), ("megatron", "Megatron-LM routing trace"),
                                         ("sglang_counts", "SGLang expert-distribution dumps")])
def test_the_aux_loss_page_says_why_it_has_no_chart(store, run, engine):
    at = _open(store, run, "aux_loss")
    errors = " | ".join(str(e.value) for e in at.info)
    assert not at.get("plotly_chart") and not at.error
    assert "router's probabilities" in errors and "router's logits" in errors and engine in errors


def test_count_dumps_say_capacity_needs_token_counts(store):
    at = _open(store, "sglang_counts", "capacity")
    assert "needs the number of tokens that reached each layer" in " ".join(str(e.value) for e in at.info)


def test_per_token_imports_say_first_choices_are_unknown(store):
    at = _open(store, "megatron", "specialization")
    shown = " ".join(str(e.value) for e in list(at.error) + list(at.info))
    assert "top choice" in shown and "Megatron-LM routing trace" in shown
    assert at.get("plotly_chart")  # what needs no slot order (co-activation, ...) is still drawn


def test_the_tokens_page_says_colours_are_not_top_choices(store):
    at = _open(store, "vllm", "tokens")
    assert "not necessarily its top choice" in " ".join(str(e.value) for e in at.info)
    bodies = [str(h.proto.body) for h in at.get("html")]
    assert bodies and " nan" not in " ".join(bodies)  # an unknown weight is left out of the hover, not 'nan'

