"""The rooms of the tree and the arrows between them (see docs/architecture.md):

    collectors/ (torch)  ->  moeviz/store/  ->  moeviz/analyses/  ->  moeviz/charts.py  ->  app/, moeviz/cli/, moeviz/demo/

- `import moeviz`, `import moeviz.store` and every library module load neither torch nor streamlit (checked in a
  fresh interpreter, the way a user's notebook imports them);
- each room imports only the rooms before it (checked on every import statement, also those inside functions);
- app/ calls analyses by reference: no importlib dispatch by dotted strings;
- the module paths from before the packages still import, as the same module objects.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "streamlit")

# room -> the moeviz/collectors/app modules (prefixes) its files may import. Third-party imports are not limited
# here, except torch and streamlit, which the fresh-interpreter test below keeps out of the library.
ROOMS = {
    "moeviz/text.py": (),
    "moeviz/store": ("moeviz.errors", "moeviz.store"),
    "moeviz/analyses": ("moeviz.errors", "moeviz.text", "moeviz.selection", "moeviz.store", "moeviz.analyses"),
    "moeviz/charts.py": ("moeviz.errors",),
    "moeviz/selection.py": (),
    "moeviz/errors.py": (),
    "moeviz/testing.py": ("moeviz.errors", "moeviz.store"),
    "moeviz/importers": ("moeviz.errors", "moeviz.store", "moeviz.text", "moeviz.importers"),
    "collectors": ("moeviz.errors", "moeviz.text", "moeviz.store", "collectors"),
}
OURS = ("moeviz", "collectors", "app")


def _imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every module an import statement in `path` names (absolute; relative imports resolved), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]  # `from moeviz import capacity`
    return out


def _is_module(name: str, root: Path) -> bool:
    """`name` is a module or package under `root` (not a function or class imported by name)."""
    rel = Path(*name.split("."))
    return (root / rel).is_dir() or (root / rel).with_suffix(".py").is_file()


def wrong_way_imports(room: str, allowed: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """`file:line imports module` for each import in `room` of a module of ours outside `allowed`."""
    p = root / room
    bad = []
    for f in [p] if p.suffix == ".py" else sorted(p.rglob("*.py")):
        for line, name in _imported_modules(f, root):
            if name.split(".")[0] not in OURS or not _is_module(name, root) or name == "moeviz":
                continue
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                bad.append(f"{f.relative_to(root)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_each_room_imports_only_the_rooms_before_it(room):
    bad = wrong_way_imports(room, ROOMS[room])
    assert not bad, f"{room} may import only {', '.join(ROOMS[room]) or 'no module of ours'}:\n" + "\n".join(bad)


def test_the_check_catches_an_arrow_the_wrong_way(tmp_path):
    """The check must be able to fail: a store module importing an analysis inside a function, or the charts
    by `from moeviz import charts`, is caught; a function imported by name from an allowed module is not."""
    (tmp_path / "moeviz" / "store").mkdir(parents=True)
    (tmp_path / "moeviz" / "analyses").mkdir()
    for f in ("moeviz/__init__.py", "moeviz/store/__init__.py", "moeviz/analyses/__init__.py",
              "moeviz/analyses/load.py", "moeviz/charts.py", "moeviz/errors.py"):
        (tmp_path / f).touch()
    (tmp_path / "moeviz" / "store" / "reader.py").write_text(
        "from moeviz.errors import MoevizError\n"
        "def f():\n    from moeviz.analyses.load import expert_load\n    from moeviz import charts\n")
    bad = wrong_way_imports("moeviz/store", ROOMS["moeviz/store"], tmp_path)
    assert bad == ["moeviz/store/reader.py:3 imports moeviz.analyses.load",
                   "moeviz/store/reader.py:4 imports moeviz.charts"]


def _library_modules() -> list[str]:
    """Every module of the moeviz package, except the demo's model, which is torch by design (and only the demo
    imports it)."""
    names = []
    for p in sorted((ROOT / "moeviz").rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name in ("moeviz.demo.model", "moeviz.cli.__main__"):
            continue
        names.append(name)
    return names


def test_moeviz_modules_do_not_import_torch_or_streamlit():
    modules = _library_modules()
    assert {"moeviz", "moeviz.store", "moeviz.analyses.capacity", "moeviz.cli"} <= set(modules)
    code = f"""
import importlib, json, sys
found = {{}}
for name in ["moeviz", "moeviz.store"] + {modules!r}:
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


def _torch_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, inside a function) of every import of torch in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(fn)}
    out = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n == "torch" or n.startswith("torch.") for n in names):
            out.append((node.lineno, id(node) in inside))
    return out


def test_importers_read_torch_only_inside_the_sglang_loader():
    """SGLang dumps are torch.save files, so their loader imports torch, inside its function (a clear error when
    torch is missing); no other importer module imports it, and none at module level."""
    found = {f.relative_to(ROOT).as_posix(): _torch_imports(f) for f in sorted((ROOT / "moeviz" / "importers").rglob("*.py"))}
    found = {f: hits for f, hits in found.items() if hits}
    assert set(found) == {"moeviz/importers/sglang.py"}, found
    assert all(inside for _, inside in found["moeviz/importers/sglang.py"]), found


def test_importing_moeviz_and_the_store_loads_no_analysis():
    code = """
import json, sys
import moeviz, moeviz.store
from moeviz.store import open_store, RunWriter, compact, query
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("moeviz.analyses", "moeviz.cli", "moeviz.charts", "app")))))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == []


def test_no_code_imports_a_module_by_its_old_path():
    """Old paths are for users' scripts; our own code imports the new ones (an old path hides a wrong arrow from
    the room check above, which sees only the files that exist)."""
    from moeviz._old_paths import MOVED

    offenders = []
    for folder in ("moeviz", "collectors", "app", "bench", "tests"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            if f.name == "test_import_hygiene.py":
                continue
            for line, name in _imported_modules(f):
                old = next((o for o in MOVED if name == o or name.startswith(o + ".")), None)
                if old:
                    offenders.append(f"{f.relative_to(ROOT)}:{line} imports {old} (now {MOVED[old]})")
    assert not offenders, "\n".join(offenders)


def test_app_calls_analyses_by_reference():
    """No importlib dispatch in app/: views pass functions, so a rename breaks at import, not on a page."""
    offenders = [f"{f.relative_to(ROOT)}:{line}" for f in sorted((ROOT / "app").rglob("*.py"))
                 for line, name in _imported_modules(f) if name.split(".")[0] == "importlib"]
    assert not offenders, offenders


def test_public_import_paths_and_old_module_paths():
    """What users' notebooks import keeps working; an old module path is the module at its new path."""
    import importlib

    import moeviz
    from moeviz import Selection, aux_loss, bounds, capacity, health, load, specialization, toy  # noqa: F401
    from moeviz._old_paths import MOVED
    from moeviz.store import RunWriter, compact, open_store, query  # noqa: F401

    assert capacity is importlib.import_module("moeviz.analyses.capacity")
    assert specialization.domain_share is importlib.import_module("moeviz.analyses.specialization.domains").domain_share
    for old, new in MOVED.items():
        assert not (ROOT / Path(*old.split("."))).with_suffix(".py").exists(), f"{old} exists as a file again"
        assert importlib.import_module(old) is importlib.import_module(new), old
    from moeviz.capacity import capacity_drops
    from moeviz.load import AnalysisError

    assert capacity_drops is importlib.import_module("moeviz.analyses.capacity").capacity_drops
    assert AnalysisError is importlib.import_module("moeviz.analyses.load").AnalysisError
    assert moeviz.SCHEMA_VERSION >= 1
