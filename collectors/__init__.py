"""Collector hooks: attach to a PyTorch MoE model and record its routing into a moeviz store.

    from collectors import Recorder
    with Recorder(model, "runs/exp1") as rec:
        ...
        rec.step(step)

Names are imported lazily so that `import collectors` stays cheap (torch and transformers load on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Recorder", "RecorderError", "RecordingWarning", "find_routers", "RouterOutput", "RouterSite", "MoevizCallback"]

_WHERE = {
    "Recorder": "collectors.recorder",
    "RecorderError": "collectors.recorder",
    "RecordingWarning": "collectors.recorder",
    "find_routers": "collectors.routers",
    "RouterOutput": "collectors.routers",
    "RouterSite": "collectors.routers",
    "MoevizCallback": "collectors.hf_trainer",
}

if TYPE_CHECKING:  # pragma: no cover
    from collectors.hf_trainer import MoevizCallback
    from collectors.recorder import Recorder, RecorderError, RecordingWarning
    from collectors.routers import RouterOutput, RouterSite, find_routers


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'collectors' has no attribute {name!r}")
