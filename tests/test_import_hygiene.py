"""`import moeviz` and every moeviz module stay free of torch and streamlit (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "streamlit")


def test_moeviz_modules_do_not_import_torch_or_streamlit():
    modules = ["moeviz", "moeviz.store", "moeviz.cli"] + sorted(
        f"moeviz.{p.stem}" for p in (ROOT / "moeviz").glob("*.py") if p.stem not in ("__init__", "demo"))
    code = f"""
import importlib, json, sys
found = {{}}
for name in {modules!r}:
    importlib.import_module(name)
    heavy = [m for m in {HEAVY!r} if m in sys.modules]
    if heavy:
        found[name] = heavy
        break
print(json.dumps(found))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    found = json.loads(p.stdout)
    assert found == {}, f"importing {next(iter(found))} pulled in {found[next(iter(found))]}: import it inside a function"
    assert len(modules) > 5
