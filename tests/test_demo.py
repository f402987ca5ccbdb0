"""`moeviz demo`: a short demo (tiny model, small corpus) recorded into a temporary store, checked through SQL
against what the model itself computed; expert specialisation by domain against a shuffled-label baseline."""

from __future__ import annotations

import numpy as np
import pytest

from moeviz.demo import run as D
from moeviz.demo.corpus import DOMAINS

STEPS = 80


def tiny_config(tmp_cache, **kw) -> D.DemoConfig:
    base = dict(
        steps=STEPS, n_layer=2, n_embd=48, n_head=4, expert_hidden=96, n_experts=4, top_k=2, seq_len=64,
        batch_size=16, vocab_size=512, chars_per_domain=60_000, cache_dir=str(tmp_cache), progress=False,
        checkpoints=2, lr=1e-2, warmup=10, aux_loss_coef=0.1, eval_seqs_per_domain=8, probe_seqs_per_domain=2,
        threads=1,  # a tiny model: one thread is faster, and kinder to a busy machine
    )
    base.update(kw)
    return D.DemoConfig(**base)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Corpus and tokenizer cache shared by this module's trainings (built on first use)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, cache):
    """Both demo runs, trained and recorded once for the module: (config, results by name, store connection)."""
    store = pytest.importorskip("moeviz.store", reason="moeviz.store (the run store) is not in this checkout yet")
    pytest.importorskip("collectors.recorder", reason="collectors.recorder (the Recorder) is not in this checkout yet")
    cfg = tiny_config(cache)
    out = tmp_path_factory.mktemp("runs")
    results = {r.name: r for r in D.run_demo(cfg, out)}
    con = store.open_store(out)
    yield cfg, results, con
    con.close()


def nmi(table: np.ndarray) -> float:
    """Normalised mutual information I(X;Y) / ((H(X) + H(Y)) / 2) of a contingency table (numpy only)."""
    p = table / table.sum()
    px, py = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float(np.sum(p[nz] * np.log(p[nz] / np.outer(px, py)[nz])))
    h = lambda q: -float(np.sum(q[q > 0] * np.log(q[q > 0])))  # noqa: E731
    return mi / ((h(px) + h(py)) / 2)


def test_nmi_reference_cases():
    assert nmi(np.eye(4) * 10) == pytest.approx(1.0)
    assert nmi(np.ones((4, 3))) == pytest.approx(0.0, abs=1e-12)


def test_store_holds_both_runs_with_domains_tags_and_probe_steps(demo):
    cfg, results, con = demo
    runs = con.sql("SELECT run_id, status, n_layers, n_experts, top_k FROM runs ORDER BY run_id").fetchall()
    assert runs == [("aux", "finished", 2, 4, 2), ("noaux", "finished", 2, 4, 2), ("probe-bf16", "finished", 2, 4, 2),
                    ("probe-fp32", "finished", 2, 4, 2)]
    rows = con.sql("""SELECT run_id, tag, count(DISTINCT step), count(*), list(DISTINCT domain ORDER BY domain)
                      FROM sequences GROUP BY ALL ORDER BY ALL""").fetchall()
    n_cp = len(D.checkpoint_steps(cfg))  # 0, 40, 80
    assert n_cp == 3
    for run in ("probe-fp32", "probe-bf16"):  # the probe batch once, routed in float32 and in bf16 (issue 22)
        assert {r[1]: r[2:] for r in rows if r[0] == run} == {"probe": (1, 4 * cfg.probe_seqs_per_domain,
                                                                       sorted(DOMAINS))}
    for run in ("aux", "noaux"):
        got = {r[1]: r[2:] for r in rows if r[0] == run}
        assert got["train"] == (STEPS, STEPS * cfg.batch_size, sorted(DOMAINS))
        assert got["eval"] == (n_cp, n_cp * 4 * cfg.eval_seqs_per_domain, sorted(DOMAINS))
        assert got["probe"] == (n_cp, n_cp * 4 * cfg.probe_seqs_per_domain, sorted(DOMAINS))
    # one timeline: no step number has two tags, and every recorded batch holds the four domains equally
    clash = con.sql("SELECT run_id, step FROM sequences GROUP BY ALL HAVING count(DISTINCT tag) > 1").fetchall()
    assert clash == []
    uneven = con.sql("""SELECT run_id, step FROM (SELECT run_id, step, domain, count(*) AS n FROM sequences
                        GROUP BY ALL) GROUP BY ALL HAVING min(n) <> max(n) OR count(*) <> 4""").fetchall()
    assert uneven == []


def test_probe_batch_is_the_same_tokens_at_every_checkpoint(demo):
    _, _, con = demo
    per_step = con.sql("""SELECT r.step, list(r.token_id ORDER BY r.seq, r.pos) AS ids FROM routes r
                          JOIN sequences s USING (run_id, step, rank, seq)
                          WHERE r.run_id = 'aux' AND s.tag = 'probe' AND r.layer = 0 AND r.slot = 0
                          GROUP BY r.step ORDER BY r.step""").fetchall()
    assert len(per_step) == 3
    assert per_step[0][1] == per_step[1][1] == per_step[2][1]
    assert len(per_step[0][1]) == 8 * 64  # 2 sequences of each domain, 64 tokens each


def test_the_precision_pair_routes_the_last_probe_batch_and_agrees_as_a_numpy_loop_says(demo):
    """probe-fp32 is the trained aux model on the probe batch: the same routes as aux's last probe step (agreement
    1 everywhere); probe-bf16 is a bf16 copy of it: its agreement with probe-fp32 is what a loop over the raw
    routes of both runs gives (sets compared as sorted tuples)."""
    from moeviz.analyses import agreement as ag
    from moeviz.selection import Selection

    _, _, con = demo
    last = con.sql("SELECT max(step) FROM sequences WHERE run_id = 'aux' AND tag = 'probe'").fetchone()[0]
    fp32, bf16 = Selection(run_ids=("probe-fp32",)), Selection(run_ids=("probe-bf16",))
    same = ag.layer_agreement(con, Selection(run_ids=("aux",), steps=(last, last)), fp32)
    assert (same["set_agreement"] == 1.0).all() and (same["tokens"] == 8 * 64).all()

    def sets(run):
        rows = con.sql(f"SELECT seq, pos, layer, list(expert ORDER BY slot) FROM routes WHERE run_id = '{run}' "
                       "GROUP BY ALL").fetchall()
        return {(q, p, l): tuple(sorted(e)) for q, p, l, e in rows}

    a, b = sets("probe-fp32"), sets("probe-bf16")
    assert a.keys() == b.keys()  # one batch, the same rows
    got = ag.summary(con, fp32, bf16)
    for layer in (0, 1):
        keys = [k for k in a if k[2] == layer]
        want = np.mean([a[k] == b[k] for k in keys])
        assert got["layers"].set_index("layer").loc[layer, "set_agreement"] == pytest.approx(want)
    assert got["matched"]["matched"].item() == 8 * 64


def test_final_eval_in_the_store_matches_the_model(demo):
    """The last eval pass, read back through SQL, equals the routing computed from the trained model's routers."""
    _, results, con = demo
    for run, res in results.items():
        last = con.sql("SELECT max(step) FROM sequences WHERE run_id = ? AND tag = 'eval'", params=[run]).fetchall()[0][0]
        counts = np.zeros_like(res.counts)
        for layer, domain, expert, n in con.sql(
            """SELECT r.layer, s.domain, r.expert, count(*) FROM routes r JOIN sequences s USING (run_id, step, rank, seq)
               WHERE r.run_id = ? AND r.step = ? AND r.slot = 0 GROUP BY ALL""", params=[run, last]).fetchall():
            counts[layer, DOMAINS.index(domain), expert] = n
        np.testing.assert_array_equal(counts, res.counts)
        assigned = np.zeros_like(res.assigned)
        for layer, expert, n in con.sql("SELECT layer, expert, assigned FROM step_stats WHERE run_id = ? AND step = ?",
                                        params=[run, last]).fetchall():
            assigned[layer, expert] = n
        np.testing.assert_array_equal(assigned, res.assigned)


def test_recorded_aux_loss_matches_training_and_is_lower_with_the_loss(demo):
    """Switch loss recomputed from step_stats (E * sum f_i P_i per layer, mean over layers) equals the value the
    model trained with at every train step; the run trained with it ends better balanced than the one without."""
    cfg, results, con = demo
    late = {}
    for run, res in results.items():
        df = con.sql("""SELECT st.step, st.layer, st.expert, st.assigned, st.prob_sum, st.tokens FROM step_stats st
                        WHERE st.run_id = ? AND st.step IN (SELECT step FROM sequences WHERE run_id = ? AND tag = 'train')
                        ORDER BY st.step, st.layer, st.expert""", params=[run, run]).df()
        e, k = cfg.n_experts, cfg.top_k
        df["term"] = (df.assigned / (df.tokens * k)) * (df.prob_sum / df.tokens)
        per_step = (e * df.groupby(["step", "layer"]).term.sum()).groupby("step").mean().to_numpy()  # [steps]
        from_training = np.array([h["aux"] for h in res.history])
        np.testing.assert_allclose(per_step, from_training, rtol=1e-4)
        late[run] = per_step[-STEPS // 4:].mean()
    assert late["aux"] < late["noaux"]


def test_experts_specialise_by_domain_on_held_out_text(demo):
    """NMI between first-choice expert and domain on the final held-out eval pass beats every one of 200
    shuffles of the sequences' domain labels (tokens of a sequence stay together, as in the real data)."""
    _, _, con = demo
    last = con.sql("SELECT max(step) FROM sequences WHERE run_id = 'aux' AND tag = 'eval'").fetchall()[0][0]
    df = con.sql("""SELECT r.layer, r.seq, s.domain, r.expert FROM routes r JOIN sequences s USING (run_id, step, rank, seq)
                    WHERE r.run_id = 'aux' AND r.step = ? AND r.slot = 0""", params=[last]).df()
    rng = np.random.default_rng(0)
    for layer, g in df.groupby("layer"):
        seq_domain = g.groupby("seq").domain.first()  # [sequences]
        dom_of_seq = {s: DOMAINS.index(d) for s, d in seq_domain.items()}

        def table(mapping):
            t = np.zeros((len(DOMAINS), 4))
            np.add.at(t, (g.seq.map(mapping).to_numpy(), g.expert.to_numpy()), 1)
            return t

        observed = nmi(table(dom_of_seq))
        seqs = list(dom_of_seq)
        shuffled = []
        for _ in range(200):
            perm = rng.permutation([dom_of_seq[s] for s in seqs])
            shuffled.append(nmi(table(dict(zip(seqs, perm)))))
        assert observed > max(shuffled), (layer, observed, max(shuffled))
        assert D.normalized_mutual_information(table(dom_of_seq)) == pytest.approx(observed)
        assert observed > 0.1, (layer, observed)


def test_training_without_recording_learns(cache):
    cfg = tiny_config(cache, steps=30, record=False, runs=("noaux",), checkpoints=0)
    (res,) = D.run_demo(cfg, None)
    assert res.path is None and len(res.history) == 30
    assert np.mean([h["loss"] for h in res.history[-5:]]) < res.history[0]["loss"] - 0.5


def test_bad_requests_are_clear_errors(tmp_path):
    with pytest.raises(D.DemoError, match="multiple of 4"):
        D.run_demo(tiny_config(tmp_path, batch_size=10), None)
    with pytest.raises(D.DemoError, match="top_k"):
        D.run_demo(tiny_config(tmp_path, top_k=5), None)
    (tmp_path / "aux").mkdir()
    (tmp_path / "aux" / "notes.txt").write_text("mine")
    with pytest.raises(D.DemoError, match="not a moeviz run folder"):
        D._fresh_run_dir(tmp_path / "aux")


def test_cuda_request_without_cuda_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(D.DemoError, match="--device cuda"):
        D.run_demo(tiny_config(tmp_path, device="cuda"), None)


def test_cli_passes_flags_and_starts_the_dashboard(monkeypatch, tmp_path, capsys):
    import moeviz.cli.dashboard as dash
    from moeviz import cli

    seen = {}

    def fake_run_demo(cfg, out):
        seen["cfg"], seen["out"] = cfg, out
        return []

    monkeypatch.setattr(D, "run_demo", fake_run_demo)
    monkeypatch.setattr(dash, "launch", lambda path, port, host, block: seen.setdefault("launch", (str(path), port, host)) and 0)
    rc = cli.main(["demo", "--steps", "7", "--experts", "6", "--top-k", "3", "--seed", "4", "--out", str(tmp_path),
                   "--port", "8600", "--no-dashboard"])
    assert rc == 0 and "launch" not in seen
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.n_experts, cfg.top_k, cfg.seed, cfg.device) == (7, 6, 3, 4, "cpu")
    assert cfg.runs == ("aux", "noaux")
    assert "moeviz dashboard" in capsys.readouterr().err
    rc = cli.main(["demo", "--steps", "1", "--out", str(tmp_path), "--port", "8600"])
    assert rc == 0 and seen["launch"] == (str(tmp_path), 8600, "127.0.0.1")


def test_demo_modules_import_without_torch():
    import subprocess
    import sys

    code = "import sys, moeviz.demo, moeviz.cli.demo, moeviz.demo.corpus; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
