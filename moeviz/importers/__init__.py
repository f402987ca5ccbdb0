"""Routing logs of serving and training engines turned into moeviz runs: `moeviz import sglang | vllm | megatron`.

    from moeviz.importers import import_sglang, import_vllm, import_megatron
    summary = import_vllm("responses.jsonl", "runs/vllm-eval")

Each engine records routing its own way and none can analyse it: SGLang dumps `.pt` files for EPLB, vLLM returns
expert ids per request (routing replay), Megatron-LM writes a JSONL trace per rank. An importer reads one of those
sources and writes a run through `moeviz.store.RunWriter`, built in a temporary folder beside `out` and renamed
into place at the end, so a bad source leaves nothing at `out`.

What a source does not hold stays unknown (NULL) in the run, never a made-up value: no engine log has gate
weights (`routes.weight`) or router probabilities (`step_stats.prob_sum`); none guarantees that slot 0 is the top
choice (`step_stats.first_choice`); SGLang's count dumps do not count tokens (`step_stats.tokens`). The analyses
that need one of them say so instead of answering.

Modules: `source` (the error every importer raises and the shared summary), `staging` (the temporary run folder
and its publication), `layers` (placeholder dense layers), one module per engine.
"""

from moeviz.importers.megatron import import_megatron
from moeviz.importers.sglang import import_sglang
from moeviz.importers.source import ImportSummary, SourceError
from moeviz.importers.vllm import import_vllm

FORMATS = ("sglang", "vllm", "megatron")

__all__ = ["import_sglang", "import_vllm", "import_megatron", "ImportSummary", "SourceError", "FORMATS"]
