"""Readers for routers of training frameworks other than transformers, one module per framework.

Each module exposes `auto_adapter(module, n_experts, top_k) -> (adapter, kind) | None`, which recognises the
framework's router by its class and defining module (never importing the framework: a model built with it has
already imported it) and returns the adapter that reads the router's output. `collectors.routers.find_routers`
asks these before its generic rules, so these routers need no predicate and no adapter.
"""

from __future__ import annotations

from collectors.frameworks import megatron, torchtitan

FRAMEWORKS = (megatron, torchtitan)


def auto_adapter(module, n_experts: int | None, top_k: int | None):
    """(adapter, kind) of the first framework that knows `module`, else None."""
    for framework in FRAMEWORKS:
        found = framework.auto_adapter(module, n_experts, top_k)
        if found is not None:
            return found
    return None
