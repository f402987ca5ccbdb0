"""Module paths from before the store, the analyses, the CLI and the demo became packages.

Users' notebooks and scripts import `moeviz.capacity`, `moeviz.schema`, `moeviz.queries`, ... An import of an old
path gives the module at its new path: the same module object (not a copy), so exception classes, `isinstance`
and monkeypatching see one module. New code imports the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "moeviz.load": "moeviz.analyses.load",
    "moeviz.aux_loss": "moeviz.analyses.aux_loss",
    "moeviz.capacity": "moeviz.analyses.capacity",
    "moeviz.probability_drops": "moeviz.analyses.probability_drops",
    "moeviz.specialization": "moeviz.analyses.specialization",
    "moeviz.health": "moeviz.analyses.health",
    "moeviz.bounds": "moeviz.analyses.bounds",
    "moeviz.toy": "moeviz.analyses.toy",
    # not an old path: the short name issue 17 gives the expert-parallel analyses (`moeviz.placement`)
    "moeviz.placement": "moeviz.analyses.placement",
    # nor this: issue 22's name for the routing agreement of two executions (`moeviz.agreement`)
    "moeviz.agreement": "moeviz.analyses.agreement",
    "moeviz.schema": "moeviz.store.schema",
    "moeviz.segments": "moeviz.store.layout",
    "moeviz.store_reader": "moeviz.store.reader",
    "moeviz.duckdb_compat": "moeviz.store.duckdb_compat",
    "moeviz.queries": "moeviz.store.catalog",
    "moeviz.corpus": "moeviz.demo.corpus",
    "moeviz.dashboard_process": "moeviz.cli.dashboard_process",
    "moeviz.cli_store": "moeviz.cli.store",
    "moeviz.cli_collect": "moeviz.cli.collect",
    "moeviz.cli_analysis": "moeviz.cli.check",
    "moeviz.cli_bounds": "moeviz.cli.bound",
    "moeviz.cli_demo": "moeviz.cli.demo",
    "moeviz.cli_dashboard": "moeviz.cli.dashboard",
}


class OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path in MOVED and loads it as the module at the new path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])  # keeps its own __name__ and __spec__

    def exec_module(self, module) -> None:
        pass  # already executed at its new path


def install() -> None:
    if not any(isinstance(f, OldPathFinder) for f in sys.meta_path):
        sys.meta_path.append(OldPathFinder())
