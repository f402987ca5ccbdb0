"""The Agreement page offers matching by order where a side has no keys (issue 22): it says so instead of
matching nothing, and by order shows the figures of a numpy loop and the warning that the order vouches for them."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("streamlit")

from moeviz.testing import softmax, store_from_routing, synthetic_routing
from tests.test_agreement import write_run_folder
from tests.test_app import metric, open_app, texts


def test_a_keyless_side_is_compared_by_order_when_asked(tmp_path):
    ra = synthetic_routing(n_steps=2, n_layers=3, n_experts=8, top_k=2, seqs_per_step=3, seq_len=8, seed=4)
    ra["token_ids"] = np.random.default_rng(0).integers(0, 50, len(ra["steps"]))
    rb = dict(ra, steps=ra["steps"] + 10, token_ids=np.full(len(ra["steps"]), -1))  # no ids: no seq_key
    rb["logits"] = ra["logits"] + np.random.default_rng(1).normal(0, 0.7, ra["logits"].shape)
    rb["index"] = np.argsort(-rb["logits"], axis=-1, kind="stable")[..., :2]
    rb["weights"] = np.take_along_axis(softmax(rb["logits"]), rb["index"], axis=-1)
    con = store_from_routing(**{k: v for k, v in ra.items() if k != "logits"}, run_id="A")
    store_from_routing(**{k: v for k, v in rb.items() if k != "logits"}, run_id="B", con=con)
    write_run_folder(tmp_path / "A", con, "A")
    write_run_folder(tmp_path / "B", con, "B")
    at = open_app(tmp_path, run="A", page="agreement")
    assert "Side b has no sequence key" in texts(at, "info") and "choose 'order' above" in texts(at, "info")
    at.selectbox(key="agree_match_by").set_value("order").run()
    assert not at.exception and not at.error
    n_tok, n_lay = ra["index"].shape[:2]
    same = np.array([[sorted(ra["index"][t, l]) == sorted(rb["index"][t, l]) for l in range(n_lay)]
                     for t in range(n_tok)])  # [T, L]
    assert metric(at, "Matched tokens") == f"{n_tok:,}"
    assert metric(at, "Tokens with ≥ 1 differing layer") == f"{100 * (~same.all(1)).mean():.2f}%"
    assert "matched by order: no token ids on side b" in texts(at, "warning")
