"""What every importer shares: the error a bad source raises, the summary an import returns, progress reporting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moeviz.errors import MoevizError

# progress(done, total): how far the import has read its source (bytes of a JSONL, records of a dump); the CLI
# draws it as a bar on stderr
Progress = Callable[[int, int], None]


class SourceError(MoevizError, ValueError):
    """A source that cannot be imported (truncated, inconsistent shapes, not the format named): the message names
    the file and says what was wrong. Nothing is left at the import's `out` folder."""

    def __init__(self, path, what: str):
        self.path = str(path)
        super().__init__(f"{path}: {what}")


def n_experts_of(path, given: int | None, top: int) -> int:
    """Experts per MoE layer of a source that does not say (vLLM, Megatron): the user's `--num-experts`, checked
    against the largest id seen, else that id + 1 (experts above the largest id any token chose are then
    missing: give --num-experts)."""
    if given is None:
        return top + 1
    if given <= top:
        raise SourceError(path, f"holds expert id {top}, but num_experts={given}: give the model's number of "
                                f"routed experts (> {top})")
    return int(given)


@dataclass
class ImportSummary:
    """What an import wrote, for the CLI's report and for tests."""

    run_dir: Path
    format: str  # 'sglang-stat', 'sglang-per_pass', 'sglang-per_token', 'vllm-lists', 'vllm-npy', 'megatron'
    files: int  # source files read
    steps: int  # distinct (step) values written
    sequences: int  # sequences rows written (0 for count-only sources)
    routes: int  # routes rows written (0 for count-only sources)
    assigned: int  # sum of step_stats.assigned over the run
    layers: list[int]  # hidden-layer (block) index of each MoE layer kept, in `layers.layer` order
    skipped_layers: list[int]  # placeholder (dense) layers left out, by hidden-layer index
    n_experts: int
    top_k: int | None
    unknown: list[str]  # columns the source does not hold, stored NULL
    warnings: list[str] = field(default_factory=list)  # what was dropped or guessed (a partial last line, ...)
