"""`moeviz dashboard` as a background process that a caller starts, waits for and stops: the browser tests,
the dashboard benchmark, a notebook that wants the dashboard beside it.

Why a process group: the CLI starts Streamlit as its child, and stopping only the CLI would leave the server
running on its port. The server's output goes to a temporary file, so a chatty server never blocks on a full
pipe, and an early exit reports its last lines.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _output_tail(proc: subprocess.Popen, n_chars: int = 2000) -> str:
    log = getattr(proc, "_moeviz_log", None)
    if log is None:
        return ""
    log.seek(0)
    return log.read().decode(errors="replace")[-n_chars:]


def start(path, port: int, host: str = "127.0.0.1") -> subprocess.Popen:
    """`moeviz dashboard PATH --port PORT --host HOST` in its own process group; `stop` ends it."""
    log = tempfile.TemporaryFile()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeviz.cli", "dashboard", str(path), "--port", str(port), "--host", host],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    proc._moeviz_log = log  # read by _output_tail when the server exits early
    return proc


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Return once Streamlit's health endpoint answers 200; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited with {proc.returncode}: {_output_tail(proc)}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)  # polling the server's health endpoint, not waiting for a page
    raise TimeoutError(f"the dashboard did not answer at {url} within {timeout_s:g} s")


def stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM to the process group (the CLI and its Streamlit child), SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the CLI, else it lingers in the group as a zombie
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)  # polling for the group to exit
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(5)
    log = getattr(proc, "_moeviz_log", None)
    if log is not None:
        log.close()


@contextmanager
def serving(path, *, port: int | None = None, host: str = "127.0.0.1", timeout_s: float = 120.0) -> Iterator[str]:
    """The dashboard on `path`, served in the background while the block runs: yields its URL."""
    port = port or free_port()
    proc = start(path, port, host)
    try:
        wait_until_healthy(f"http://{host}:{port}", proc, timeout_s)
        yield f"http://{host}:{port}"
    finally:
        stop(proc)
