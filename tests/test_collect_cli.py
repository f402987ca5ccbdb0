"""`moeviz collect` end to end: a tiny Mixtral and a trained WordLevel tokenizer saved with save_pretrained, two
text files, the CLI run in-process; the store's domains, token counts and token ids against the texts."""

from __future__ import annotations

import pytest
import torch

from moeviz.cli import main
from moeviz.store import query

CODE = "def f ( x ) : return x + 1\n" * 7  # 10 words a line
PROSE = "the cat sat on the mat and the dog ran off quickly " * 5  # 12 words a repeat


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from collectors.testing import tiny_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("hf") / "tiny-mixtral"
    model, _ = tiny_model("mixtral")
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([CODE, PROSE], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(folder)
    yield folder, fast
    torch.set_num_threads(before)


def test_collect_records_each_file_as_a_domain(saved_model, tmp_path):
    folder, tok = saved_model
    code, prose = tmp_path / "code.py", tmp_path / "essay.txt"
    code.write_text(CODE)
    prose.write_text(PROSE)
    out = tmp_path / "run"
    rc = main(["collect", "--hf-model", str(folder), "--text", str(code), str(prose), "--out", str(out),
               "--domain", "code", "--domain", "prose", "--seq-len", "16", "--batch-size", "2",
               "--run-name", "eval1", "--no-progress"])
    assert rc == 0
    n_code, n_prose = len(CODE.split()), len(PROSE.split())  # 70 and 60 words: one token each
    per_domain = query(out, "SELECT domain, sum(n_tokens) AS n, count(*) AS seqs FROM sequences GROUP BY domain ORDER BY domain")
    assert per_domain.domain.tolist() == ["code", "prose"]
    assert per_domain.n.tolist() == [n_code, n_prose]
    assert per_domain.seqs.tolist() == [-(-n_code // 16), -(-n_prose // 16)]  # 5 and 4 sequences of <= 16
    # one step per batch of 2 sequences, never mixing files: 3 + 2 steps
    steps = query(out, "SELECT step, min(domain) AS d, max(domain) AS d2 FROM sequences GROUP BY step ORDER BY step")
    assert steps.step.tolist() == [0, 1, 2, 3, 4] and (steps.d == steps.d2).all()
    totals = query(out, "SELECT layer, sum(tokens) AS n FROM layer_stats GROUP BY layer ORDER BY layer")
    assert totals.n.tolist() == [n_code + n_prose] * 2
    # the routes of the first code sequence carry the tokenizer's ids of its first words, in order
    first = query(out, "SELECT token_id FROM routes WHERE step = 0 AND seq = 0 AND layer = 0 AND slot = 0 ORDER BY pos")
    assert first.token_id.tolist() == tok.convert_tokens_to_ids(CODE.split()[:16])
    run = query(out, "SELECT run_name, model_class, status FROM runs").iloc[0].tolist()
    assert run == ["eval1", "MixtralForCausalLM", "finished"]
    tags = query(out, "SELECT DISTINCT tag FROM sequences")
    assert tags.tag.tolist() == ["eval"]
    vocab = query(out, f"SELECT text FROM vocab WHERE token_id = {int(tok.convert_tokens_to_ids('cat'))}")
    assert vocab.text.tolist() == ["cat"]


def test_collect_uses_file_stems_and_max_tokens(saved_model, tmp_path):
    folder, _ = saved_model
    code = tmp_path / "snippets.py"
    code.write_text(CODE)
    out = tmp_path / "run"
    assert main(["collect", "--hf-model", str(folder), "--text", str(code), "--out", str(out), "--max-tokens", "20",
                 "--seq-len", "8", "--no-progress"]) == 0
    seqs = query(out, "SELECT domain, n_tokens FROM sequences ORDER BY step, seq")
    assert seqs.domain.tolist() == ["snippets"] * 3 and seqs.n_tokens.tolist() == [8, 8, 4]


@pytest.mark.parametrize("case", ["no-folder", "no-config", "no-text", "empty-text", "domains", "no-tokenizer"])
def test_collect_bad_input_is_a_clear_error(saved_model, tmp_path, capsys, case):
    folder, _ = saved_model
    text = tmp_path / "a.txt"
    text.write_text(PROSE)
    model = folder
    args = []
    if case == "no-folder":
        model, expect = tmp_path / "missing", "does not exist"
    elif case == "no-config":
        (tmp_path / "empty").mkdir()
        model, expect = tmp_path / "empty", "no config.json"
    elif case == "no-text":
        text, expect = tmp_path / "nope.txt", "nope.txt does not exist"
    elif case == "empty-text":
        text.write_text("  \n")
        expect = "is empty"
    elif case == "domains":
        args, expect = ["--domain", "a", "--domain", "b"], "2 --domain names for 1 text files"
    else:
        import shutil

        model = tmp_path / "no-tok"
        model.mkdir()
        for f in ("config.json", "model.safetensors"):
            shutil.copy(folder / f, model / f)
        expect = "tokenizer.save_pretrained"
    rc = main(["collect", "--hf-model", str(model), "--text", str(text), "--out", str(tmp_path / "run"),
               "--no-progress", *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert "moeviz collect: error:" in err and expect in err
    assert not (tmp_path / "run").exists()


def test_collect_refuses_an_out_folder_that_already_holds_a_run(saved_model, tmp_path, capsys):
    folder, _ = saved_model
    text = tmp_path / "a.txt"
    text.write_text(PROSE)
    out = tmp_path / "run"
    args = ["collect", "--hf-model", str(folder), "--text", str(text), "--out", str(out), "--no-progress",
            "--max-tokens", "8", "--seq-len", "8"]
    assert main(args) == 0
    before = query(out, "SELECT count(*) AS n FROM layer_stats").n[0]
    assert main(args) == 2
    assert "already holds a recorded run" in capsys.readouterr().err
    assert query(out, "SELECT count(*) AS n FROM layer_stats").n[0] == before  # nothing appended
