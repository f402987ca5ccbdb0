"""Readers for routers of training frameworks other than transformers, one module per framework.

Each module exposes `recognises(module) -> bool` and `auto_adapter(module, n_experts, top_k) -> (adapter, kind) |
None`, which recognise the framework's router by its class and defining module (never importing the framework: a
model built with it has already imported it) and returns the adapter that reads the router's output.
`collectors.routers.find_routers` asks these before its generic rules, so these routers need no predicate and no
adapter; the adapter's `n_experts` and `top_k` are the site's (DeepSpeed calls its top-k `k`).
"""

from __future__ import annotations

from collectors.frameworks import deepspeed_moe, megatron, torchtitan

FRAMEWORKS = (megatron, torchtitan, deepspeed_moe)


def recognises(module) -> bool:
    """Whether a framework module here knows `module` as its router."""
    return any(framework.recognises(module) for framework in FRAMEWORKS)


def auto_adapter(module, n_experts: int | None, top_k: int | None):
    """(adapter, kind) of the first framework that knows `module`, else None."""
    for framework in FRAMEWORKS:
        found = framework.auto_adapter(module, n_experts, top_k)
        if found is not None:
            return found
    return None
