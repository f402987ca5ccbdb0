"""Reading a JSONL source line by line, with the one kind of damage an importer forgives: a partial last line.

A job killed while writing (a Megatron run stopped mid-flush, a client script interrupted) leaves a last line
without its newline that does not parse: it is dropped with a warning and the rest is imported. A line that does
not parse anywhere else means the file is damaged or not JSONL: that is an error naming the file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from moeviz.importers.source import SourceError


def read_jsonl(path: Path, warnings: list[str], progress=None, done_before: int = 0,
               total: int | None = None) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-empty line; appends to `warnings` when it drops a partial last
    line. `progress(bytes done, total bytes)` is called every few MB."""
    size = os.path.getsize(path)
    total = total if total is not None else size
    done, next_report = 0, 0
    with open(path, "rb") as f:
        lineno = 0
        for raw in f:
            lineno += 1
            done += len(raw)
            if progress and done >= next_report:
                progress(done_before + done, total)
                next_report = done + (8 << 20)
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as e:
                if not raw.endswith(b"\n") and done == size:  # the partial last line of a killed writer
                    warnings.append(f"{path}: line {lineno} is incomplete (the writer was stopped mid-line); "
                                    f"it was left out and the lines before it imported")
                    if progress:
                        progress(done_before + done, total)
                    return
                raise SourceError(path, f"line {lineno} is not JSON ({e.msg} at column {e.colno}): the file is "
                                        f"damaged or not JSONL") from None
            if not isinstance(obj, dict):
                raise SourceError(path, f"line {lineno} is a JSON {type(obj).__name__}, not an object")
            yield lineno, obj
    if progress:
        progress(done_before + done, total)
