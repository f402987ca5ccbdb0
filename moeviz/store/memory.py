"""How much memory a compaction's DuckDB may use, so that folding a large run cannot take the machine with it.

Why: DuckDB's default memory_limit is 80% of the machine's RAM, per connection. Compaction runs in the training
process (the last rank's `RunWriter.close`) or beside other jobs (`moeviz compact`), and at a billion routes its
groupings want more than any machine has; two such processes, or one beside a training job, were OOM-killed at
15-19 GB on a 24 GB machine (docs/benchmarks.md, #19/#22). Under a limit DuckDB spills what it can to disk (a
compaction's connections are file databases: DuckDB's temp folder is `<file>.tmp` beside them, in the run folder)
and fails cleanly with an out-of-memory error where it cannot, which compaction reports without losing any
recorded data (the segments stay until a compaction publishes).

The limit: `MOEVIZ_COMPACT_MEMORY` ("8GB", "512MB", or a plain number of bytes) if set, else a quarter of the
memory this process may use (the machine's RAM, or the cgroup's limit in a container when lower), at least 1 GiB.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from moeviz.errors import StoreError

ENV = "MOEVIZ_COMPACT_MEMORY"
SHARE = 0.25  # of the usable memory, by default
FLOOR = 1 << 30  # bytes: below this DuckDB cannot group even one batch of routes
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "TB": 1000 ** 4,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def parse_bytes(text: str) -> int:
    """'8GB' / '512 MiB' / '1073741824' -> bytes (DuckDB's spelling of sizes); StoreError saying what to write."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise StoreError(f"the compaction memory limit {text!r} (moeviz compact --memory-limit, or {ENV}) is not "
                         f"a size: write a number of bytes or one with a unit, for example 8GB, 512MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def usable_memory() -> int:
    """Bytes this process may use: the machine's RAM, or a container's cgroup limit when that is lower."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for f in CGROUP_FILES:
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, int(text))  # "max" (no limit) and absurd v1 values (2**63) leave RAM
    return ram


def compaction_memory_limit() -> int:
    """The memory_limit, in bytes, of the DuckDB connections a compaction opens (see the module docstring)."""
    if os.environ.get(ENV, "").strip():
        return parse_bytes(os.environ[ENV])
    return max(FLOOR, int(usable_memory() * SHARE))


def compaction_config() -> dict:
    """DuckDB config of a compaction's connections: the memory limit, in DuckDB's KiB spelling."""
    return {"memory_limit": f"{compaction_memory_limit() // 1024}KiB"}
