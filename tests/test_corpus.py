"""The demo corpus: shipped extracts, generated arithmetic, the train/eval split, caching and the tokenizer."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from moeviz.demo import corpus as C

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small corpus (60k characters per domain) and its 512-token BPE, built once for this module."""
    cache = tmp_path_factory.mktemp("corpus-cache")
    corpus = C.build_corpus(cache, chars_per_domain=60_000)
    tok = C.train_tokenizer(corpus, 512)
    return cache, corpus, tok


def test_shipped_extracts_are_small_and_what_they_claim():
    sizes = {p.name: p.stat().st_size for p in DATA.iterdir() if p.is_file()}
    assert sum(sizes.values()) < 5_000_000  # the repository's data budget
    for name in (C.EN_EXTRACT, C.IT_EXTRACT):
        assert sizes[name] < 1_500_000
        with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
        assert docs and all({"source", "title", "text"} <= set(d) for d in docs)
    en = " ".join(d.text for d in C.english_documents())
    it = " ".join(d.text for d in C.italian_documents())
    assert "Hamlet" in en and "To be, or not to be" in en

    def share(text, words):  # share of lower-case word tokens that are among `words`
        toks = re.findall(r"[a-z']+", text.lower())
        return sum(t in words for t in toks) / len(toks)

    italian, english = {"che", "non", "di", "il", "la", "e'", "per", "un"}, {"the", "and", "of", "to", "i", "you", "my"}
    assert share(it, italian) > 0.10 and share(it, english) < 0.02
    assert share(en, english) > 0.10 and share(en, italian) < 0.02
    assert not any("%" == line.strip() for d in C.italian_documents() for line in d.text.splitlines())


def test_math_is_deterministic_and_correct():
    a = C.math_documents(20_000, seed=3)
    assert [d.text for d in a] == [d.text for d in C.math_documents(20_000, seed=3)]
    assert [d.text for d in a] != [d.text for d in C.math_documents(20_000, seed=4)]
    checked = 0
    for line in "\n".join(d.text for d in a).splitlines():
        m = re.fullmatch(r"(-?\d+) ([-+*/x]) (-?\d+) = (-?\d+)", line)
        if not m:
            continue
        x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
        expected = {"+": x + y, "-": x - y, "*": x * y, "x": x * y, "/": x // y if y else None}[op]
        assert z == expected, line
        if op == "/":
            assert x % y == 0, line
        checked += 1
    assert checked > 500


def test_chunks_keep_paragraphs_whole():
    text = "\n\n".join(f"para {i} " + "x" * (i * 7 % 50) for i in range(200))
    pieces = C.chunks(text, 300)
    assert "\n\n".join(pieces) == text
    assert all(len(p) < 300 + 70 for p in pieces)


def test_split_is_deterministic_disjoint_and_near_the_fraction():
    docs = [C.Document("x", f"doc{i}", "w" * (50 + i % 30)) for i in range(300)]
    train, held = C.split_documents(docs, 0.1)
    again = C.split_documents(list(reversed(docs)), 0.1)
    assert [d.source for d in held] == [d.source for d in again[1]]  # input order does not matter
    assert not {d.source for d in train} & {d.source for d in held}
    assert len(train) + len(held) == len(docs)
    share = sum(len(d.text) for d in held) / sum(len(d.text) for d in docs)
    assert 0.1 <= share < 0.12


def test_code_documents_are_stdlib_sources_without_tests():
    docs = C.code_documents()
    assert len(docs) > 100
    assert not any("/test/" in d.source or "/tests/" in d.source for d in docs)
    assert any(d.source == "stdlib/json/decoder.py#0" for d in docs)


def test_built_corpus_is_balanced_held_out_and_reused(small):
    cache, corpus, _ = small
    doms = corpus.manifest["domains"]
    assert set(doms) == set(C.DOMAINS)
    totals = [doms[d]["train"]["chars"] + doms[d]["eval"]["chars"] for d in C.DOMAINS]
    assert max(totals) / min(totals) < 1.6  # capped per domain (a document may overshoot the cap)
    for d in C.DOMAINS:
        train, held = corpus.text("train", d), corpus.text("eval", d)
        assert 0.05 < len(held) / (len(train) + len(held)) < 0.3
        # held-out documents never appear in the training text
        for doc in held.split("\n\n")[:20]:
            if len(doc) > 200:
                assert doc not in train
    stamp = (corpus.root / "manifest.json").stat().st_mtime_ns
    again = C.build_corpus(cache, chars_per_domain=60_000)
    assert again.root == corpus.root and (again.root / "manifest.json").stat().st_mtime_ns == stamp


def test_tokenizer_is_byte_level_bpe_roundtrips_and_is_cached(small):
    _, corpus, tok = small
    assert tok.get_vocab_size() == 512
    for d in C.DOMAINS:
        text = corpus.text("eval", d)[:3000]
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.decode(tok.encode("Ciò è più così – ☃").ids) == "Ciò è più così – ☃"  # unseen bytes still encode
    path = corpus.root / "tokenizer-512.json"
    stamp = path.stat().st_mtime_ns
    C.train_tokenizer(corpus, 512)
    assert path.stat().st_mtime_ns == stamp


def test_token_arrays_match_the_tokenizer(small):
    _, corpus, tok = small
    arrays = C.token_arrays(corpus, tok, 512)
    for split in ("train", "eval"):
        for d in C.DOMAINS:
            a = arrays[split][d]
            assert a.dtype == np.uint16 and len(a) > 1000 and int(a.max()) < 512
    text = corpus.text("eval", "it")
    assert tok.decode(arrays["eval"]["it"].tolist()) == text  # paragraph-aligned pieces lose nothing
    with pytest.raises(C.CorpusError, match="uint16"):
        C.token_arrays(corpus, tok, 70_000)


def test_missing_extract_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEVIZ_DATA_DIR", str(tmp_path))
    with pytest.raises(C.CorpusError, match="MOEVIZ_DATA_DIR"):
        C.english_documents()
    (tmp_path / C.IT_EXTRACT).write_bytes(b"not gzip")
    with pytest.raises(C.CorpusError, match="unreadable"):
        C.italian_documents()
