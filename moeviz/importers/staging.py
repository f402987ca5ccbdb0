"""A run being imported: written by one RunWriter into a hidden folder beside `out`, renamed to `out` at the end.

Why: an import reads a large source that may turn out bad half-way (a truncated dump, a line of another shape);
the user must then find nothing at `out`, not a run with half the source. The run goes through RunWriter's
commit path like a recorded run (segments, commit records, compaction at close), then one rename publishes it.
Each rank of the source gets its own RunWriter, as in a recorded run (a segment's rank is its folder's
`rank=<r>`, which compaction reads back): ranks 0..max, those the source lacks closed empty.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from moeviz.importers.source import SourceError
from moeviz.store.writer import RunWriter


class StagedRun:
    """`with StagedRun(out, run_name=...) as run: run.writer.write_flush(...); run.publish()`: leaving the block
    without publish() (an exception) removes the hidden folder."""

    def __init__(self, out, *, run_name: str | None = None, ranks=(0,)):
        self.out = Path(out).expanduser().absolute()
        if self.out.exists():
            raise SourceError(self.out, "already exists: give a new folder for the imported run")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.importing-{uuid.uuid4().hex[:8]}"
        world = max(int(r) for r in ranks) + 1 if len(ranks) else 1
        self.writers: list[RunWriter] = []
        self.published = False
        try:
            for r in range(world):
                self.writers.append(RunWriter(self.tmp, run_id=self.out.name, run_name=run_name or self.out.name,
                                              rank=r, world_size=world))
        except BaseException:
            self.discard()
            raise

    @property
    def writer(self) -> RunWriter:
        """Rank 0's writer."""
        return self.writers[0]

    def writer_for(self, rank: int) -> RunWriter:
        return self.writers[int(rank)]

    def write_meta(self, run: dict, layers: list[dict]) -> None:
        """The runs row and the layers, written by every rank (as the Recorder's ranks do)."""
        for w in self.writers:
            w.write_run(run)
            w.write_layers(layers)

    def publish(self) -> Path:
        """Close the writers (the last one compacts the run) and rename the folder to `out`."""
        for w in self.writers:
            w.close("finished")
        if self.out.exists():
            raise SourceError(self.out, "appeared while the import ran: the imported run was not published")
        os.rename(self.tmp, self.out)
        self.published = True
        return self.out

    def discard(self) -> None:
        for w in self.writers:
            w.compact_on_close = False
            try:
                w.close("failed", error="import failed")
            except Exception:  # noqa: BLE001 - the folder is removed below anyway
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StagedRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.published:
            self.discard()
