"""`moeviz dashboard PATH`: open the Streamlit dashboard on a run folder or a folder of runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from moeviz.errors import StoreNotFoundError


def app_main_path() -> Path:
    """app/main.py of the installed moeviz (the `app` package ships beside `moeviz`)."""
    import importlib.util

    spec = importlib.util.find_spec("app")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "main.py" for p in spec.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parents[2] / "app" / "main.py")
    for c in candidates:
        if c.is_file() and (c.parent / "views").is_dir():
            return c
    raise FileNotFoundError(f"the dashboard's app/main.py is missing (looked at {', '.join(map(str, candidates))}); "
                            "reinstall moeviz")


def dashboard_command(path: str | os.PathLike, port: int = 8501, host: str = "127.0.0.1") -> list[str]:
    """The `streamlit run` command line that serves the dashboard on `path`.

    `runner.postScriptGC false`: Streamlit otherwise runs a full garbage collection after every script and
    fragment run, 0.12-0.22 s of CPU while the browser draws the charts that run sent (2 cores).
    `client.toolbarMode minimal`: the menu without Streamlit's "Deploy" button (also in .streamlit/config.toml,
    for `streamlit run app/main.py` from the repository root)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(app_main_path()),
        "--server.port", str(int(port)), "--server.address", host, "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none", "--runner.postScriptGC", "false",
        "--client.toolbarMode", "minimal",  # no "Deploy" button: this is a local tool
        "--", str(Path(path).resolve()),
    ]


def _check_path(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise StoreNotFoundError(
            f"no run folder or folder of runs at {str(p)!r}: record a run first (`moeviz demo`, or a Recorder in "
            "your training script), or give the folder that holds it"
        )
    return p


def launch(path: str | os.PathLike, port: int = 8501, host: str = "127.0.0.1", block: bool = True,
           sql_timeout: float | None = None, sql_memory: str | None = None):
    """Serve the dashboard on `path` at http://host:port.

    block=True runs until the server exits (Ctrl-C) and returns its exit code; block=False returns the
    `subprocess.Popen` of the server, for callers that go on working (the demo) and stop it themselves.
    `sql_timeout` (seconds) and `sql_memory` (a size: 2GB) are the most a query of the SQL page may take; the
    app reads them from $MOEVIZ_SQL_TIMEOUT and $MOEVIZ_SQL_MEMORY (moeviz.store.sandbox.SqlLimits.from_env).
    """
    from moeviz.store.sandbox import MEMORY_ENV, TIMEOUT_ENV, SqlLimits

    _check_path(path)
    cmd = dashboard_command(path, port, host)
    root = str(app_main_path().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if sql_timeout is not None:
        env[TIMEOUT_ENV] = str(sql_timeout)
    if sql_memory is not None:
        env[MEMORY_ENV] = str(sql_memory)
    SqlLimits.from_env(env)  # a bad value is refused here, with its message, not in the app
    proc = subprocess.Popen(cmd, env=env)
    if not block:
        return proc
    return _wait_forwarding_signals(proc)


def _stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Terminate the server, and kill it if it has not exited after `timeout_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_forwarding_signals(proc: subprocess.Popen) -> int:
    """Wait for the server; Ctrl-C or SIGTERM to this process stops the server too (never leaves it orphaned)."""
    import signal
    import threading

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _handle(args) -> int:
    try:
        _check_path(args.path)
    except StoreNotFoundError as e:
        print(f"moeviz dashboard: error: {e}", file=sys.stderr)
        return 2
    from moeviz.errors import MoevizError

    busy = port_in_use(args.host, args.port)
    if busy:
        print(f"moeviz dashboard: error: cannot serve at {args.host}:{args.port}: {busy}; pick another port with "
              "--port", file=sys.stderr)
        return 2
    print(f"moeviz dashboard: serving {Path(args.path).resolve()} at http://{args.host}:{args.port}", file=sys.stderr)
    try:
        return int(launch(args.path, port=args.port, host=args.host, block=True, sql_timeout=args.sql_timeout,
                          sql_memory=args.sql_memory) or 0)
    except MoevizError as e:
        print(f"moeviz dashboard: error: {e}", file=sys.stderr)
        return 2


def port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound (e.g. "[Errno 98] Address already in use"), or None when it can: checked
    before saying "serving", which Streamlit would otherwise contradict a moment later."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return str(e)
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Tornado binds: a port in TIME_WAIT is free
        try:
            s.bind(addr)
        except OSError as e:
            return str(e)
    return None


def register(subparsers) -> None:
    p = subparsers.add_parser("dashboard", help="open the browser dashboard on a run or a folder of runs",
                              description="Serve the moeviz Streamlit dashboard on PATH (a run folder or a folder of runs).")
    p.add_argument("path", metavar="PATH", help="run folder or folder of runs")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 to share)")
    p.add_argument("--sql-timeout", type=float, default=None, metavar="SECONDS",
                   help="the longest a query of the SQL page may run (default 60); users may choose less")
    p.add_argument("--sql-memory", default=None, metavar="SIZE",
                   help="the most memory a query of the SQL page may use, e.g. 2GB (default 4GiB); users may choose less")
    p.set_defaults(func=_handle)
