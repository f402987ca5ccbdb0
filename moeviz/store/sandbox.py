"""User SQL in worker processes: a fresh store connection per query, a hard time limit, a memory cap.

Why processes. DuckDB cannot interrupt every function (`SELECT length(repeat('x', 3e9))` ignores
`interrupt()`), and a connection shared by the dashboard's sessions can be changed by a statement that a parser
let through (`EXPLAIN ANALYZE UPDATE runs ...` runs the UPDATE on the views' TEMP tables). So the guarantees come
from the operating system and from DuckDB's own lock-down, not from reading the statement:

- *nothing one query does is seen by another*: each query opens the store afresh in the worker
  (`open_store`: read-only, no file access, configuration locked) and closes it after; a TEMP table, a dropped
  view or an UPDATE dies with that connection. No user query runs on a connection anything else uses.
- *every query stops by its time limit*: the parent waits for the answer until the deadline, then SIGKILLs the
  worker (the worker ignores SIGINT: Ctrl-C reaches the parent, which kills it).
- *memory is capped*: DuckDB's `memory_limit` (its buffer manager fails cleanly), and under it the worker's
  address space (RLIMIT_AS, soft, set per query to what the worker maps already + the cap + a slack for thread
  stacks), which also stops what DuckDB does not count (`repeat`, `list(range(...))`): the allocation fails and
  the query ends with SqlMemoryError; the worker lives on.

`SqlSandbox` is a small pool: each query gets an idle worker, or a new one up to `max_workers`; one idle worker
is kept started (`spare`) so an ordinary query does not wait for a Python interpreter to start. A runaway query
of one dashboard session holds only its own worker until its own deadline.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from moeviz.errors import MoevizError
from moeviz.store.sql import SqlError, SqlMemoryError, SqlTimeoutError

MiB = 1 << 20
GiB = 1 << 30
MIN_MEMORY = 64 * MiB  # below this DuckDB cannot even open the store's views
TIMEOUT_ENV, MEMORY_ENV, MAX_ROWS_ENV = "MOEVIZ_SQL_TIMEOUT", "MOEVIZ_SQL_MEMORY", "MOEVIZ_SQL_MAX_ROWS"
_STARTUP_S = 30.0  # a worker that has not said "ready" by then is broken (a cold interpreter takes ~0.5-1 s)
_SLACK = 256 * MiB  # address space a query may map besides its cap: thread stacks, malloc arenas, the result


@dataclass(frozen=True)
class SqlLimits:
    """The most a user query may take: rows returned, seconds, memory. Set by whoever runs the server
    (`moeviz dashboard --sql-timeout/--sql-memory`, `moeviz sql --timeout/--memory`); users may only lower them."""

    max_rows: int | None = 100_000  # None: every row (`moeviz sql --max-rows 0`)
    timeout_s: float = 60.0
    memory_bytes: int = 4 * GiB

    def __post_init__(self) -> None:
        if self.max_rows is not None and self.max_rows < 1:
            raise SqlError(f"the row limit must be at least 1, got {self.max_rows}")
        if not self.timeout_s > 0:
            raise SqlError(f"the time limit must be more than 0 s, got {self.timeout_s:g}")
        if self.memory_bytes < MIN_MEMORY:
            raise SqlError(f"the memory cap must be at least {format_size(MIN_MEMORY)}, got {format_size(self.memory_bytes)}")

    def lowered(self, max_rows: int | None = None, timeout_s: float | None = None,
                memory_bytes: int | None = None) -> "SqlLimits":
        """These limits where the user asks for less; asking for more gets these (never more)."""
        rows = self.max_rows if max_rows is None else int(max_rows) if self.max_rows is None \
            else min(int(max_rows), self.max_rows)
        return replace(self, max_rows=rows,
                       timeout_s=self.timeout_s if timeout_s is None else min(float(timeout_s), self.timeout_s),
                       memory_bytes=self.memory_bytes if memory_bytes is None else min(int(memory_bytes),
                                                                                        self.memory_bytes))

    @classmethod
    def from_env(cls, environ=None) -> "SqlLimits":
        """Limits from $MOEVIZ_SQL_TIMEOUT (seconds), $MOEVIZ_SQL_MEMORY (a size: 2GB, 512MiB) and
        $MOEVIZ_SQL_MAX_ROWS, each defaulting to SqlLimits()'s: how `moeviz dashboard` hands its flags to the app."""
        env = os.environ if environ is None else environ
        d = cls()
        try:
            return cls(max_rows=int(env.get(MAX_ROWS_ENV) or d.max_rows),
                       timeout_s=float(env.get(TIMEOUT_ENV) or d.timeout_s),
                       memory_bytes=parse_size(env.get(MEMORY_ENV) or d.memory_bytes))
        except ValueError as e:
            raise SqlError(f"bad SQL limit in the environment: {e}") from None


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": MiB,
          "g": 1000**3, "gb": 1000**3, "gib": GiB, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}


def parse_size(text) -> int:
    """Bytes from `4GB`, `512MiB`, `1.5g` or a plain number of bytes (decimal and binary units as DuckDB takes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (write e.g. 2GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


# ------------------------------------------------------------------------------------------------ the parent


class _Worker:
    """One worker process and the pipe to it. `ready()` waits for its "ready" message (sent after its imports)."""

    def __init__(self) -> None:
        from multiprocessing.connection import Pipe

        ours, theirs = Pipe(duplex=True)
        root = str(Path(__file__).resolve().parents[2])  # the folder holding this moeviz, found first by the worker
        env = dict(os.environ, MALLOC_ARENA_MAX="2",  # glibc reserves 64 MiB of address space per arena otherwise
                   PYTHONPATH=root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from moeviz.store.sandbox import _serve; _serve({theirs.fileno()})"],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs.close()
        self.conn = ours
        self.is_ready = False

    def ready(self, timeout_s: float) -> bool:
        """Whether the worker has started, waiting up to `timeout_s`; EOFError if it died instead."""
        if not self.is_ready and self.conn.poll(max(0.0, timeout_s)):
            if self.conn.recv() != "ready":
                raise EOFError("an SQL worker failed to start")
            self.is_ready = True
        return self.is_ready

    def kill(self) -> None:
        """SIGKILL, reaped in the background: freeing gigabytes can take the kernel a moment."""
        self.conn.close()
        if self.proc.poll() is None:
            self.proc.kill()
            threading.Thread(target=self.proc.wait, daemon=True).start()


class SqlSandbox:
    """A pool of SQL worker processes; `run` answers one query under limits no higher than `limits`.

    Safe to share between threads (the dashboard keeps one for every session, `st.cache_resource`). `threads`:
    DuckDB threads per query (None: DuckDB's default, one per core)."""

    def __init__(self, limits: SqlLimits | None = None, *, max_workers: int = 4, spare: int = 1,
                 threads: int | None = None) -> None:
        self.limits = limits or SqlLimits()
        self.max_workers, self.spare, self.threads = max(1, max_workers), max(0, spare), threads
        self._idle: list[_Worker] = []
        self._count = 0  # workers alive: idle + busy
        self._cond = threading.Condition()
        self._closed = False
        with self._cond:
            self._top_up()

    def _top_up(self) -> None:
        """Start workers until `spare` are idle (caller holds the lock). Starting is a Popen: it does not wait."""
        while not self._closed and len(self._idle) < self.spare and self._count < self.max_workers:
            self._idle.append(_Worker())
            self._count += 1

    def _take(self, deadline: float) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise SqlError("the SQL sandbox is closed")
                if self._idle:
                    worker = self._idle.pop(0)  # the oldest: the most likely to be ready
                    break
                if self._count < self.max_workers:
                    worker = _Worker()
                    self._count += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SqlTimeoutError(f"all {self.max_workers} SQL workers stayed busy for the whole time "
                                          "limit; try again in a moment")
                self._cond.wait(left)
            self._top_up()
            return worker

    def _give_back(self, worker: _Worker, alive: bool) -> None:
        with self._cond:
            if alive and not self._closed and len(self._idle) <= self.spare:
                self._idle.append(worker)
            else:
                self._count -= 1
                worker.kill()
            self._top_up()
            self._cond.notify()

    def run(self, path, sql: str, *, max_rows: int | None = None, timeout_s: float | None = None,
            memory_bytes: int | None = None, as_rows: bool = False) -> tuple[object, bool, list[str]]:
        """Run `sql` on a fresh connection to the store at `path`: (answer, truncated, the store's warnings).

        The answer is a DataFrame of at most max_rows rows, or (columns, rows as tuples) with `as_rows`.
        `max_rows`, `timeout_s`, `memory_bytes` lower this sandbox's limits, never raise them (`SqlLimits.lowered`).
        Does not check the statement (see moeviz.store.sql.check_statement): the guarantees do not depend on it.
        Raises SqlTimeoutError past the time limit (the worker is killed), SqlMemoryError past the memory cap,
        SqlError for DuckDB's errors, StoreNotFoundError etc. as open_store raises them.
        """
        limits = self.limits.lowered(max_rows, timeout_s, memory_bytes)
        deadline = time.monotonic() + limits.timeout_s
        worker = self._take(deadline)
        alive = True
        try:
            if not worker.ready(min(_STARTUP_S, deadline - time.monotonic())):
                if time.monotonic() < deadline:
                    alive = False
                    raise SqlError(f"an SQL worker did not start within {_STARTUP_S:g} s")
                raise _timeout(limits)  # a starting worker is not broken: it goes back to the pool
            worker.conn.send({"path": str(path), "sql": sql, "max_rows": limits.max_rows, "as_rows": as_rows,
                              "memory_bytes": limits.memory_bytes, "threads": self.threads})
            if not worker.conn.poll(max(0.0, deadline - time.monotonic())):
                alive = False
                raise _timeout(limits)
            answer = worker.conn.recv()
        except (EOFError, OSError):
            alive = False
            code = worker.proc.poll()
            raise SqlError(f"the SQL worker died (exit code {code}) while running the query; if it was large, "
                           f"it may have gone past the memory cap ({format_size(limits.memory_bytes)})") from None
        except BaseException as e:  # KeyboardInterrupt too: the query stops with the caller
            if not isinstance(e, SqlError):  # ours are raised above, having said whether the worker lives
                alive = False
            raise
        finally:
            self._give_back(worker, alive)
        if "error" in answer:
            raise answer["error"]
        return answer["data"], answer["truncated"], answer["warnings"]

    def close(self) -> None:
        """Stop the idle workers now, and each busy one when its query ends."""
        with self._cond:
            self._closed = True
            for w in self._idle:
                w.kill()
            self._count -= len(self._idle)
            self._idle.clear()
            self._cond.notify_all()

    def __enter__(self) -> "SqlSandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _timeout(limits: SqlLimits) -> SqlTimeoutError:
    return SqlTimeoutError(f"the query ran longer than {limits.timeout_s:g} s and was stopped; aggregate with "
                           "GROUP BY, filter with WHERE, query step_stats/layer_stats instead of routes, or, over a "
                           "long compacted run, step_rollups/layer_rollups (blocks of 10/100/1000 steps, same sums) "
                           "instead of step_stats/layer_stats")


# ------------------------------------------------------------------------------------------------ the worker


def _serve(fd: int) -> None:
    """The worker's loop: answer requests from the parent until it closes the pipe (or dies)."""
    import signal
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it kills us
    conn = Connection(fd)
    import duckdb  # noqa: F401  (loaded before "ready": the first query should not pay for it)
    import pandas  # noqa: F401

    from moeviz.store import reader  # noqa: F401

    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        answer = _answer(request)
        try:
            conn.send(answer)
        except (EOFError, OSError):
            return


def _exit_with_parent(parent: int) -> None:
    """A parent killed with SIGKILL cannot stop us: leave when we are orphaned (even mid-query)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _answer(request: dict) -> dict:
    import warnings

    import duckdb
    import pandas as pd

    from moeviz.store.reader import open_store
    from moeviz.store.sql import sql_error_message

    memory = request["memory_bytes"]
    max_rows = request["max_rows"]
    try:
        # the store is opened before the cap: opening maps ~1.2 GiB of address space (DuckDB's threads and
        # allocator, the attached files), which counted inside the cap left DuckDB less than its own memory_limit,
        # so a scan that fills its buffer cache (1.5 B step_stats rows) failed as "needed more memory"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            con = open_store(request["path"], memory_limit=memory, threads=request["threads"])
        with _address_space_cap(memory, request["threads"]):
            try:
                rel = con.sql(request["sql"])
                if rel is None:  # a statement without a result
                    data, n = (([], []) if request["as_rows"] else pd.DataFrame()), 0
                else:
                    if max_rows:
                        rel = rel.limit(max_rows + 1)  # one more row than shown says whether there were more
                    if request["as_rows"]:
                        rows = rel.fetchall()
                        data, n = (list(rel.columns), rows[:max_rows] if max_rows else rows), len(rows)
                    else:
                        frame = rel.df()
                        data, n = (frame.iloc[:max_rows] if max_rows else frame), len(frame)
            finally:
                con.close()
    except (duckdb.OutOfMemoryException, MemoryError):
        return {"error": SqlMemoryError(
            f"the query needed more memory than its cap ({format_size(memory)}) and was stopped; aggregate with "
            "GROUP BY, or return fewer or smaller values")}
    except duckdb.Error as e:
        return {"error": SqlError(sql_error_message(e))}
    except MoevizError as e:
        return {"error": e}
    except Exception as e:  # noqa: BLE001 - anything else is still one line for the user, never a traceback
        return {"error": SqlError(f"{type(e).__name__}: {e}")}
    return {"data": data, "truncated": bool(max_rows) and n > max_rows,
            "warnings": [str(w.message) for w in caught]}


class _address_space_cap:
    """Soft RLIMIT_AS = the address space mapped now + `memory` + a slack, for the duration of one query.

    Linux only (elsewhere DuckDB's memory_limit is the only cap). DuckDB's allocations past it fail with
    std::bad_alloc, which DuckDB reports as an OutOfMemoryException. The slack grows with the cap: DuckDB's address
    space grows past its memory_limit as its buffer cache fills (a scan of a 23 GB table under a limit of 1, 2 and 3
    GiB mapped 1.33, 2.49 and 3.43 GiB more), so a cap equal to the limit failed queries DuckDB would have run."""

    def __init__(self, memory: int, threads: int | None) -> None:
        self.limit = None
        mapped = _mapped_bytes()
        if mapped is not None:
            self.limit = mapped + memory + memory // 4 + _SLACK + 16 * MiB * (threads or os.cpu_count() or 1)

    def __enter__(self):
        if self.limit is not None:
            import resource

            self.saved = resource.getrlimit(resource.RLIMIT_AS)
            hard = self.saved[1]
            soft = self.limit if hard == resource.RLIM_INFINITY else min(self.limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return self

    def __exit__(self, *exc) -> None:
        if self.limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, self.saved)


def _mapped_bytes() -> int | None:
    """This process's address space (VmSize), or None where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
