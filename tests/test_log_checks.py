"""moeviz.analyses.log_checks (issue 22): each check of an engine log on a hand-built store whose faults are
known (sentinel ids, an id past n_experts, one expert twice in a set, a dense layer logged as zeros, routes
shifted by one position), read from the routes and, where the ids allow, from token_sets as compaction builds it."""

from __future__ import annotations

import numpy as np
import pytest

from moeviz.analyses import log_checks as lc
from moeviz.selection import Selection
from moeviz.store.compaction import token_sets_sql
from moeviz.testing import store_from_routing

A, B = Selection(run_ids=("A",)), Selection(run_ids=("B",))


def clean_run(con=None, run_id="A", n_tok=12, layers=3, seed=0):
    """One sequence of n_tok tokens, `layers` layers of 8 experts, top-2, distinct experts per token."""
    rng = np.random.default_rng(seed)
    index = np.stack([rng.permutation(8)[:2] for _ in range(n_tok * layers)]).reshape(n_tok, layers, 2)
    tok = np.arange(100, 100 + n_tok)
    return store_from_routing(index, n_experts=8, token_ids=tok, run_id=run_id, con=con, extra_stats=False), index


def with_token_sets(con, run_id="A"):
    """token_sets of the run from its (edited) routes, as compaction builds them, and the run marked compacted."""
    cols = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                      "WHERE table_name = 'routes'").fetchall()}
    con.execute(f"INSERT INTO token_sets {token_sets_sql('SELECT * FROM routes WHERE run_id = ?', 'margin' in cols)}",
                [run_id])
    con.execute("UPDATE runs SET route_stats_complete = true WHERE run_id = ?", [run_id])


def table(con, sel=A):
    df = lc.log_checks(con, sel)
    assert list(df.columns) == lc.CHECK_COLUMNS
    return {r.check: (r.status, r.count, r.total) for r in df.itertuples()}


def test_a_clean_log_passes_every_check_from_routes_and_token_sets():
    con, _ = clean_run()
    want = {"sentinel_ids": ("ok", 0, 72), "out_of_range": ("ok", 0, 72), "dense_layers": ("ok", 0, 36),
            "duplicate_ids": ("ok", 0, 36)}
    assert table(con) == want
    with_token_sets(con)
    from moeviz.analyses.agreement import _sets_cover

    assert _sets_cover(con, (A,), "auto")
    assert table(con) == want


def test_sentinel_ids_are_counted_per_route():
    con, _ = clean_run()
    # three padding slots: -1 twice (layer 0), 255 once (layer 2; the layer has 8 <= 255 experts)
    con.execute("UPDATE routes SET expert = -1 WHERE layer = 0 AND pos IN (1, 4) AND slot = 1")
    con.execute("UPDATE routes SET expert = 255 WHERE layer = 2 AND pos = 7 AND slot = 0")
    with_token_sets(con)  # the sets of those tokens hold an id outside 0-63: NULL, so the routes are read
    got = table(con)
    assert got["sentinel_ids"] == ("fail", 3, 72)
    assert got["out_of_range"] == ("ok", 0, 72)
    detail = lc.log_checks(con, A).set_index("check").loc["sentinel_ids", "detail"]
    assert "layer(s) 0, 2" in detail
    # the agreement of such a log still runs (lists, not bitmasks) and counts the padding id as an expert
    from moeviz.analyses import agreement as ag

    assert ag.layer_agreement(con, A, A)["set_agreement"].eq(1.0).all()


def test_ids_past_n_experts_are_out_of_range():
    con, _ = clean_run()
    con.execute("UPDATE routes SET expert = 9 WHERE layer = 1 AND pos = 3 AND slot = 0")
    con.execute("UPDATE routes SET expert = 70 WHERE layer = 1 AND pos = 5 AND slot = 1")
    assert table(con)["out_of_range"] == ("fail", 2, 72)
    with_token_sets(con)
    assert table(con)["out_of_range"] == ("fail", 2, 72)


def test_duplicate_ids_within_one_set():
    con, index = clean_run()
    # token 2 of layer 1 and token 6 of layer 2 name their first expert twice
    for layer, pos in ((1, 2), (2, 6)):
        con.execute("UPDATE routes SET expert = ? WHERE layer = ? AND pos = ? AND slot = 1",
                    [int(index[pos, layer, 0]), layer, pos])
    assert table(con)["duplicate_ids"] == ("warn", 2, 36)
    with_token_sets(con)
    assert table(con)["duplicate_ids"] == ("warn", 2, 36)


def test_a_dense_layer_logged_as_zeros_fails_and_stray_zero_rows_warn():
    con, _ = clean_run()
    con.execute("UPDATE routes SET expert = 0 WHERE layer = 0")  # every token of layer 0: [0, 0]
    got = table(con)
    assert got["dense_layers"] == ("fail", 12, 36)
    assert got["duplicate_ids"] == ("ok", 0, 36)  # the zero rows are not counted twice
    con2, _ = clean_run()
    con2.execute("UPDATE routes SET expert = 0 WHERE layer = 2 AND pos IN (0, 1)")
    with_token_sets(con2)
    assert table(con2)["dense_layers"] == ("warn", 2, 36)


def shifted_pair(shift: int):
    """Run A, and run B: the same tokens whose routes are A's routes moved by `shift` positions (B's token at p
    carries A's routing of p - shift; the ends keep their own)."""
    con, index = clean_run(n_tok=40, seed=1)
    moved = index.copy()
    if shift > 0:
        moved[shift:] = index[:-shift]
    elif shift < 0:
        moved[:shift] = index[-shift:]
    store_from_routing(moved, n_experts=8, token_ids=np.arange(100, 140), steps=np.full(40, 5), run_id="B",
                       con=con, extra_stats=False)
    return con, index, moved


@pytest.mark.parametrize("shift", [1, -1])
def test_an_off_by_one_log_is_flagged(shift):
    con, index, moved = shifted_pair(shift)
    al = lc.alignment(con, A, B)
    assert list(al.columns) == lc.ALIGNMENT_COLUMNS and al["shift"].tolist() == [-1, 0, 1]
    # by hand: a's token p against b's token p + s, sets as sorted tuples, over every layer
    for s, n, v in al.itertuples(index=False):
        pairs = [(p, p + s) for p in range(40) if 0 <= p + s < 40]
        same = [tuple(sorted(index[p, l])) == tuple(sorted(moved[q, l])) for p, q in pairs for l in range(3)]
        assert n == len(same) and v == pytest.approx(np.mean(same))
    row = lc.alignment_check(al)
    assert row[0] == "position_shift" and row[1] == "fail" and f"off by {shift:+d}" in row[4]
    df = lc.checks(con, A, B)
    assert df.loc[df["check"] == "position_shift", "status"].item() == "fail"


def test_aligned_logs_pass_the_shift_check():
    con, _, _ = shifted_pair(0)
    row = lc.alignment_check(lc.alignment(con, A, B))
    assert row[1] == "ok" and "+0: 1.000" in row[4]


def test_moeviz_agree_prints_the_failed_check_and_strict_exits_1(tmp_path):
    from tests.test_agreement import moeviz, write_run_folder

    con, _, _ = shifted_pair(1)
    write_run_folder(tmp_path / "A", con, "A")
    write_run_folder(tmp_path / "B", con, "B")
    p = moeviz("agree", tmp_path / "A", tmp_path / "B")
    assert p.returncode == 0, p.stderr
    assert "log check fail: a-b position_shift:" in p.stdout and "off by +1" in p.stdout
    assert "matched tokens: 40" in p.stdout
    p = moeviz("agree", tmp_path / "A", tmp_path / "B", "--strict", "--format", "csv")
    assert p.returncode == 1 and "log check fail: a-b position_shift" in p.stderr
    assert p.stdout.startswith("layer,tokens,set_agreement")
    p = moeviz("agree", tmp_path / "A", tmp_path / "A", "--strict")
    assert p.returncode == 0 and "log checks: ok" in p.stdout, p.stdout + p.stderr


def test_moeviz_agree_breakdowns_print_the_phase_table_and_say_there_are_no_margins(tmp_path):
    from tests.test_agreement import moeviz, write_run_folder

    con, index, _ = shifted_pair(0)
    write_run_folder(tmp_path / "A", con, "A")
    write_run_folder(tmp_path / "B", con, "B")
    p = moeviz("agree", tmp_path / "A", tmp_path / "B", "--breakdowns")
    assert p.returncode == 0, p.stderr
    assert "prompt against generated tokens" in p.stdout
    # the same routing on both sides: every token agrees, and none has a known prompt length
    assert [line.split() for line in p.stdout.splitlines() if line.strip().startswith("unknown")] == \
        [["unknown", "40", "1.0000", "0.0000"]]
    assert "by margin: neither side has margins" in p.stdout
