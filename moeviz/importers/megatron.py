"""Megatron-LM's routing trace (`--moe-routing-trace-path`, megatron/core/transformer/moe/router_trace.py).

One `router_trace_rank{r}.jsonl` per global rank, one line per router call:
`{"step", "stage", "block", "layer", "rank", "num_tokens", "topk", ["mtp_idx",] "top_indices"}`, where `layer` is N
of the router's module name `decoder.layers.N` (local to a pipeline stage; dense layers write nothing) and
`top_indices` is [num_tokens][topk]. Rows are sequence-major (`s * micro_batch_size + b`). Repeated (step, layer)
records in a file are the step's successive micro-batches: they become one step, with successive sequences. In
training the ids of a row come from the routing map in ascending id order, not by score, so slot 0 is not the
top choice: first_choice stays NULL. There are no token ids, no probabilities and no `num_experts` (the largest id
+ 1 unless given). MTP records (`block` 'mtp') are left out. A trace cut by a killed job ends in a partial line:
it is dropped with a warning.

No token ids and no request ids: `moeviz agree` pairs such a run with another only by order (match_by='order'),
unless the user gives keys at import: `sample_ids` (a file, one id per sequence) and/or `token_ids` (a file, one
sequence's token ids per line), line i for the i-th sequence in (step, rank, seq) order: step by step, within a
step rank by rank, within a rank micro-batch by micro-batch in file order and, with micro_batch_size, batch row
by batch row.

Each rank's file becomes that rank's rows (`rank` column); ranks of one data-parallel group that saw the same
tokens (tensor parallelism without sequence parallelism) are each counted: select one rank to count tokens once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from moeviz.importers.jsonl import read_jsonl
from moeviz.importers.source import ImportSummary, SourceError, n_experts_of
from moeviz.importers.staging import StagedRun
from moeviz.importers.tokens import Chunk, apply_keys, layer_has_experts, top_k_of, write_chunks

UNKNOWN = ["routes.weight", "routes.token_id", "step_stats.prob_sum", "step_stats.first_choice",
           "layer_stats.z_loss_sum", "layer_stats.entropy_sum"]
_RANK_FILE = re.compile(r"router_trace_rank(\d+)\.jsonl$")
_FIELDS = ("step", "layer", "num_tokens", "topk", "top_indices")


def import_megatron(source, out, *, run_name: str | None = None, num_experts: int | None = None,
                    micro_batch_size: int | None = None, sample_ids=None, token_ids=None,
                    progress=None) -> ImportSummary:
    """Import a Megatron-LM routing trace (a folder of `router_trace_rank*.jsonl`, or one such file) into `out`.

    `num_experts`: experts per MoE layer (default: the largest id seen + 1). `micro_batch_size`: splits each
    micro-batch's rows into its sequences (row = s * micro_batch_size + b); without it a micro-batch is one
    sequence whose `pos` is the row. `sample_ids`, `token_ids`: files of keys, one line per sequence (see the
    module docstring). Raises SourceError naming the file and line on a bad source."""
    files = _trace_files(Path(source))
    warnings: list[str] = []
    total = sum(os.path.getsize(f) for f in files)
    done = 0
    # rank -> step -> layer -> [top_indices of each micro-batch, in file order]
    calls: dict[int, dict[int, dict[int, list[np.ndarray]]]] = {}
    mtp = 0
    top = -1
    for path in files:
        m = _RANK_FILE.search(path.name)
        file_rank = int(m.group(1)) if m else None
        for lineno, rec in read_jsonl(path, warnings, progress=progress, done_before=done, total=total):
            missing = [k for k in _FIELDS if k not in rec]
            if missing:
                raise SourceError(path, f"line {lineno} lacks {', '.join(missing)}: not a Megatron routing trace record")
            if rec.get("block", "decoder") != "decoder" or "mtp_idx" in rec:
                mtp += 1
                continue
            try:
                ids = _indices(path, lineno, rec)
                step, layer = int(rec["step"]), int(rec["layer"])
            except SourceError:
                raise
            except (TypeError, ValueError):
                raise SourceError(path, f"line {lineno}: step, layer, num_tokens or topk is not an integer") from None
            top = max(top, int(ids.max()) if ids.size else -1)
            rank = file_rank if file_rank is not None else int(rec.get("rank", 0))
            calls.setdefault(rank, {}).setdefault(step, {}).setdefault(layer, []).append(ids)
        done += os.path.getsize(path)
    if mtp:
        warnings.append(f"{mtp} multi-token-prediction (MTP) records were left out")
    if not calls:
        raise SourceError(files[0], "holds no decoder router records")
    layers = sorted({layer for steps in calls.values() for by_layer in steps.values() for layer in by_layer})
    n_experts = n_experts_of(files[0], num_experts, top)
    unknown = [u for u in UNKNOWN if not (u == "routes.token_id" and token_ids is not None)]
    chunks = _chunks(files, calls, layers, micro_batch_size)
    apply_keys(chunks, sample_ids=sample_ids, token_ids=token_ids)
    keep = layer_has_experts(chunks, len(layers), files[0])
    ks = top_k_of(chunks, keep)
    steps = {s for by_step in calls.values() for s in by_step}
    kept = [layers[i] for i in np.flatnonzero(keep)]
    with StagedRun(out, run_name=run_name, ranks=sorted(calls)) as run:
        run.write_meta({
            "model_class": "megatron-import", "n_layers": int(keep.sum()), "n_experts": n_experts,
            "top_k": int(ks.max()),
            "config": {"source": "megatron", "path": str(Path(source).absolute()), "files": [f.name for f in files],
                       "ranks": sorted(calls), "decoder_layers": layers, "num_experts_given": num_experts,
                       "micro_batch_size": micro_batch_size, "slot_order": "ascending expert id (training)",
                       "sample_ids": None if sample_ids is None else str(Path(sample_ids).absolute()),
                       "token_ids": None if token_ids is None else str(Path(token_ids).absolute()),
                       "unknown": unknown}},
            [{"layer": i, "module_name": f"decoder.layers.{b}.mlp.router", "n_experts": n_experts,
              "top_k": int(ks[i]), "block_index": b, "stack": "decoder"} for i, b in enumerate(kept)])
        routes, seqs, assigned = write_chunks(run, chunks, keep, n_experts, drops_known=False)
        run.publish()
    skipped = [layers[i] for i in np.flatnonzero(~keep)]  # layers whose every record chose no expert
    return ImportSummary(run.out, "megatron", len(files), len(steps), seqs, routes, assigned, kept, skipped, n_experts,
                         int(ks.max()), unknown, warnings)


def _trace_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(source.glob("router_trace_rank*.jsonl"),
                       key=lambda p: int(_RANK_FILE.search(p.name).group(1)) if _RANK_FILE.search(p.name) else -1)
        if files:
            return files
        raise SourceError(source, "holds no router_trace_rank*.jsonl: give the folder of --moe-routing-trace-path")
    raise SourceError(source, "does not exist")


def _indices(path: Path, lineno: int, rec: dict) -> np.ndarray:
    """[num_tokens, topk] int16 of one record, checked against its own num_tokens and topk."""
    try:
        ids = np.asarray(rec["top_indices"])
    except ValueError:
        ids = np.asarray([], dtype=object)
    n, k = rec["num_tokens"], rec["topk"]
    if n == 0 and ids.size == 0:
        return np.zeros((0, int(k)), np.int16)
    if ids.dtype.kind not in "iu" or ids.ndim != 2 or ids.shape != (n, k):
        shape = list(ids.shape) if ids.dtype != object else "rows of different lengths"
        raise SourceError(path, f"line {lineno}: top_indices has shape {shape}, but the record says num_tokens={n}, "
                                f"topk={k}: inconsistent shapes")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > np.iinfo(np.int16).max):
        raise SourceError(path, f"line {lineno}: top_indices holds expert ids outside [0, 32767]")
    return ids.astype(np.int16)


def _chunks(files, calls, layers: list[int], micro_batch_size: int | None) -> list[Chunk]:
    """One Chunk per (rank, step, micro-batch): [tokens, layers, topk] ids, -1 for layers this rank has not."""
    column = {layer: i for i, layer in enumerate(layers)}
    chunks = []
    for rank in sorted(calls):
        for step in sorted(calls[rank]):
            by_layer = calls[rank][step]
            counts = {layer: len(v) for layer, v in by_layer.items()}
            if len(set(counts.values())) > 1:
                raise SourceError(files[0] if len(files) == 1 else f"rank {rank}",
                                  f"step {step} has a different number of micro-batches per layer "
                                  f"({', '.join(f'layer {a}: {b}' for a, b in sorted(counts.items()))}): "
                                  f"inconsistent records")
            seq_base = 0
            for mb in range(next(iter(counts.values()))):
                parts = {layer: v[mb] for layer, v in by_layer.items()}
                sizes = {p.shape[0] for p in parts.values()}
                if len(sizes) > 1:
                    raise SourceError(f"rank {rank}", f"step {step}, micro-batch {mb}: layers saw different numbers "
                                                      f"of tokens {sorted(sizes)}: inconsistent shapes")
                n = sizes.pop()
                k = max(p.shape[1] for p in parts.values())
                ids = np.full((n, len(layers), k), -1, np.int16)  # [T, L, k]
                for layer, p in parts.items():
                    ids[:, column[layer], : p.shape[1]] = p
                row = np.arange(n)
                if micro_batch_size and n % micro_batch_size:
                    raise SourceError(f"rank {rank}", f"step {step}, micro-batch {mb}: {n} token rows are not a "
                                                      f"multiple of --micro-batch-size {micro_batch_size}")
                if micro_batch_size:
                    seq, pos = seq_base + row % micro_batch_size, row // micro_batch_size  # row = s * bsz + b
                    n_seqs = micro_batch_size
                else:
                    seq, pos, n_seqs = np.full(n, seq_base), row, 1
                chunks.append(Chunk(
                    step=np.full(n, step, np.int64), rank=np.full(n, rank, np.int32), seq=seq.astype(np.int32),
                    pos=pos.astype(np.int32), token_id=np.full(n, -1, np.int32), ids=ids,
                    sequences=[{"step": step, "rank": rank, "seq": seq_base + j, "n_tokens": n // n_seqs,
                                "pos_offset": 0} for j in range(n_seqs)]))
                seq_base += n_seqs
    return chunks

