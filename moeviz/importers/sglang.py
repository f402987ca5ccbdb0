"""SGLang's expert distribution dumps (`ExpertDistributionRecorder`, python/sglang/srt/eplb/expert_distribution.py).

The server is started with `--expert-distribution-recorder-mode stat|per_pass|per_token`; `POST
/start_expert_distribution_record`, traffic, then `POST /dump_expert_distribution_record` writes `torch.save`
files into `SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`. Tensors may have been saved on a GPU: they are loaded with
`map_location="cpu", weights_only=True` (so reading a dump needs PyTorch, imported only here, when it is read).

- `stat`: one file from rank 0, `dict(rank, logical_count, average_utilization_rate_over_window)`; `logical_count`
  is int32 [buffer rows, layers, logical experts], summed over ranks, one row per forward pass of a circular
  buffer (unfilled rows are zero; rows are not in time order once it wrapped). Each non-zero row is a step;
  no token counts, no routes.
- `per_pass`, `per_token`: one file per rank, `dict(records=[...], last_physical_to_logical_map)`; the map is int64
  [layers, physical experts], logical = map[layer, physical] (redundant experts are replicas of one logical
  expert; the map is the last one, so a rebalance during recording maps earlier passes with the new layout). A
  per_pass record holds `forward_pass_id`, `rank`, `global_physical_count` int32 [layers, physical]: counts only.
  A per_token record holds `input_ids`, `positions`, `extend_seq_lens` (None when decoding: one token per
  request), `forward_mode` (EXTEND 1, DECODE 2, MIXED 3, IDLE 4) and `topk_ids_of_layer` int32 [layers, tokens, 8],
  -1 padded, physical ids. Each forward pass is a step (`forward_pass_id`), each request chunk of it a sequence
  (tag 'extend', 'decode' or 'mixed'), `pos` the token's position in its request. Requests are not identified
  across passes, so `seq_key`, `sample_id` and `prompt_tokens` stay NULL: `moeviz agree` pairs such a run only
  by order (match_by='order'), or by `sample_ids` given at import (a file, one id per request chunk, in (pass,
  rank, chunk) order, as `sequences.sample_id`).
The layer axis counts every hidden layer; dense ones hold -1 (per_token) or zeros (counts) and are left out.
Slot order is the kernel's, not guaranteed by score: first_choice stays NULL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moeviz.importers.source import ImportSummary, SourceError, n_experts_of
from moeviz.importers.staging import StagedRun
from moeviz.importers.tokens import (
    Chunk,
    apply_keys,
    layer_has_experts,
    layer_stats_of,
    step_stats_from_counts,
    top_k_of,
    write_chunks,
)

FORWARD_MODES = {1: "extend", 2: "decode", 3: "mixed", 4: "idle"}
UNKNOWN_COUNTS = ["routes", "sequences", "step_stats.tokens", "step_stats.prob_sum", "step_stats.first_choice",
                  "layer_stats.tokens", "layer_stats.z_loss_sum", "layer_stats.entropy_sum"]
UNKNOWN_TOKENS = ["routes.weight", "sequences.seq_key", "step_stats.prob_sum", "step_stats.first_choice",
                  "layer_stats.z_loss_sum", "layer_stats.entropy_sum"]


def import_sglang(source, out, *, run_name: str | None = None, num_experts: int | None = None,
                  sample_ids=None, progress=None) -> ImportSummary:
    """Import SGLang expert-distribution dumps (a folder of `.pt` files, or one file) into a new run at `out`.

    The mode (stat, per_pass, per_token) is read from the files; all must be of one mode. `num_experts`: logical
    experts per layer (default: from the dump). `sample_ids`: per_token only, a file of one id per sequence (a
    request chunk of a forward pass) in (step, rank, seq) order. Raises SourceError naming the file on a bad
    source."""
    files = _dump_files(Path(source))
    try:
        return _import(files, out, run_name, num_experts, progress, sample_ids)
    except (KeyError, TypeError, AttributeError) as e:  # a record without a field of the layout, or of another type
        raise SourceError(Path(source), f"a dump record lacks or mistypes {type(e).__name__}: {e}: not an SGLang "
                                        f"expert-distribution dump of a known layout") from None


def _import(files, out, run_name, num_experts, progress, sample_ids=None) -> ImportSummary:
    loaded = []
    for i, path in enumerate(files):
        loaded.append((path, _load(path)))
        if progress:
            progress(i + 1, len(files) * 2)
    modes = {path: _mode(path, obj) for path, obj in loaded}
    if len(set(modes.values())) > 1:
        raise SourceError(files[0].parent, "holds dumps of different modes ("
                          + ", ".join(f"{p.name}: {m}" for p, m in modes.items()) + "): import one mode at a time")
    mode = next(iter(modes.values()))
    if sample_ids is not None and mode != "per_token":
        raise SourceError(sample_ids, f"gives sample ids, but the dumps are {mode} mode: only per_token dumps hold "
                                      f"sequences")
    if mode == "stat":
        return _import_counts(files, *_stat_counts(loaded), mode, out, run_name, num_experts)
    if mode == "per_pass":
        return _import_counts(files, *_per_pass_counts(loaded, num_experts), mode, out, run_name, num_experts)
    return _import_per_token(files, loaded, out, run_name, num_experts, progress, sample_ids)


def _dump_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(source.glob("*.pt"))
        if files:
            return files
        raise SourceError(source, "holds no .pt file: give SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR or a dump file")
    raise SourceError(source, "does not exist")


def _load(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise SourceError(path, "is a torch.save file: reading SGLang dumps needs PyTorch (pip install torch)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file; all mean the same here
        raise SourceError(path, f"cannot be read as a torch.save file ({type(e).__name__}: {str(e)[:120]}): it is "
                                f"truncated or not an SGLang expert-distribution dump") from None
    if not isinstance(obj, dict):
        raise SourceError(path, f"holds a {type(obj).__name__}, not an SGLang expert-distribution dump (a dict)")
    return obj


def _mode(path: Path, obj: dict) -> str:
    if "logical_count" in obj:
        return "stat"
    if "records" in obj and "last_physical_to_logical_map" in obj:
        records = obj["records"]
        if not isinstance(records, list) or not records:
            raise SourceError(path, "holds no records")
        if all(isinstance(r, dict) and "topk_ids_of_layer" in r for r in records):
            return "per_token"
        if all(isinstance(r, dict) and "global_physical_count" in r for r in records):
            return "per_pass"
        raise SourceError(path, "records hold neither topk_ids_of_layer (per_token) nor global_physical_count "
                                "(per_pass)")
    raise SourceError(path, f"has keys {sorted(map(str, obj))[:6]}, not those of an SGLang dump (logical_count, or "
                            f"records and last_physical_to_logical_map)")


def _array(path: Path, value, what: str, ndim: int) -> np.ndarray:
    a = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    if a.ndim != ndim or a.dtype.kind not in "iu":
        raise SourceError(path, f"{what} has shape {list(a.shape)} ({a.dtype}); expected {ndim} dimensions of "
                                f"integers")
    return a


def _stat_counts(loaded):
    """(step, rank, counts [rows, layers, experts]) of stat dumps: each non-zero buffer row a step, rank 0."""
    parts, steps = [], []
    offset = 0
    shape = None
    for path, obj in loaded:
        c = _array(path, obj["logical_count"], "logical_count", 3)  # [buffer rows, layers, logical experts]
        if shape is not None and c.shape[1:] != shape:
            raise SourceError(path, f"logical_count is [rows, {c.shape[1]}, {c.shape[2]}] but another dump's is "
                                    f"[rows, {shape[0]}, {shape[1]}]: inconsistent shapes")
        shape = c.shape[1:]
        filled = np.flatnonzero(c.reshape(len(c), -1).any(axis=1))  # unfilled rows of the buffer are zero
        parts.append(c[filled])
        steps.append(offset + filled)
        offset += len(c)
    counts = np.concatenate(parts)
    return np.concatenate(steps), np.zeros(len(counts), np.int32), counts


def _logical(path: Path, mapping: np.ndarray, physical: np.ndarray, what: str) -> np.ndarray:
    """Physical expert counts [..., layers, physical] -> logical [..., layers, logical] by the map [layers, P]."""
    if physical.shape[-2:] != mapping.shape:
        raise SourceError(path, f"{what} is [.., {physical.shape[-2]}, {physical.shape[-1]}] but "
                                f"last_physical_to_logical_map is {list(mapping.shape)}: inconsistent shapes")
    n_logical = int(mapping.max()) + 1
    out = np.zeros((*physical.shape[:-1], n_logical), np.int64)
    for layer in range(mapping.shape[0]):
        onehot = np.zeros((mapping.shape[1], n_logical), np.int64)  # [physical, logical]
        onehot[np.arange(mapping.shape[1]), mapping[layer]] = 1
        out[..., layer, :] = physical[..., layer, :].astype(np.int64) @ onehot
    return out


def _map(path: Path, obj: dict) -> np.ndarray:
    m = _array(path, obj["last_physical_to_logical_map"], "last_physical_to_logical_map", 2)  # [layers, physical]
    if m.size == 0 or int(m.min()) < 0:
        raise SourceError(path, "last_physical_to_logical_map is empty or holds negative ids")
    return m.astype(np.int64)


def _per_pass_counts(loaded, num_experts):
    steps, ranks, counts = [], [], []
    n_logical = 0
    for path, obj in loaded:
        mapping = _map(path, obj)
        n_logical = max(n_logical, int(mapping.max()) + 1)
        for i, rec in enumerate(obj["records"]):
            gpc = _array(path, rec["global_physical_count"], f"records[{i}].global_physical_count", 2)
            counts.append(_logical(path, mapping, gpc, f"records[{i}].global_physical_count"))
            steps.append(int(rec["forward_pass_id"]))
            ranks.append(int(rec.get("rank", 0)))
    width = max(c.shape[-1] for c in counts)
    counts = np.stack([np.pad(c, ((0, 0), (0, width - c.shape[-1]))) for c in counts])  # [records, layers, E]
    return np.asarray(steps), np.asarray(ranks), counts


def _import_counts(files, step, rank, counts, mode, out, run_name, num_experts) -> ImportSummary:
    """A count-only dump: step_stats.assigned per (step, rank, layer, logical expert); nothing else is known."""
    n_experts = n_experts_of(files[0], num_experts, counts.shape[2] - 1)
    if n_experts > counts.shape[2]:
        counts = np.pad(counts, ((0, 0), (0, 0), (0, n_experts - counts.shape[2])))
    keep = counts.any(axis=(0, 2))  # dense layers have zero counts throughout
    if not keep.any():
        raise SourceError(files[0], "holds no expert counts (every buffer row is zero): record some traffic between "
                                    "/start_expert_distribution_record and /dump_expert_distribution_record")
    kept = np.flatnonzero(keep)
    with StagedRun(out, run_name=run_name, ranks=np.unique(rank).tolist()) as run:
        run.write_meta({
            "model_class": "sglang-import", "n_layers": int(keep.sum()), "n_experts": int(n_experts), "top_k": None,
            "config": {"source": "sglang", "mode": mode, "files": [f.name for f in files],
                       "path": str(files[0].parent.absolute()), "source_layers": int(counts.shape[1]),
                       "placeholder_layers": np.flatnonzero(~keep).tolist(), "unknown": UNKNOWN_COUNTS}},
            [{"layer": i, "module_name": f"model.layers.{int(b)}.mlp", "n_experts": int(n_experts),
              "top_k": None, "block_index": int(b), "stack": "decoder"} for i, b in enumerate(kept)])
        for r in np.unique(rank):
            mine = np.flatnonzero(rank == r)
            for a in range(0, len(mine), 4096):  # bounded flushes for long per_pass dumps
                rows = mine[a:a + 4096]
                stats = step_stats_from_counts(step[rows], rank[rows], counts[rows], keep)
                run.writer_for(int(r)).write_flush({"step_stats": stats,
                                                    "layer_stats": layer_stats_of(stats, int(n_experts))})
        run.publish()
    return ImportSummary(run.out, f"sglang-{mode}", len(files), len(np.unique(step)), 0, 0,
                         int(counts[:, keep, :].sum()), kept.tolist(), np.flatnonzero(~keep).tolist(),
                         int(n_experts), None, UNKNOWN_COUNTS)


def _import_per_token(files, loaded, out, run_name, num_experts, progress, sample_ids=None) -> ImportSummary:
    chunks: list[Chunk] = []
    n_layers = None
    n_logical = 0
    for fi, (path, obj) in enumerate(loaded):
        mapping = _map(path, obj)  # [layers, physical]
        n_logical = max(n_logical, int(mapping.max()) + 1)
        if n_layers is None:
            n_layers = mapping.shape[0]
        elif mapping.shape[0] != n_layers:
            raise SourceError(path, f"maps {mapping.shape[0]} layers, another dump {n_layers}: inconsistent shapes")
        for i, rec in enumerate(obj["records"]):
            chunk = _pass_chunk(path, i, rec, mapping)
            if chunk is not None:
                chunks.append(chunk)
        if progress:
            progress(len(files) + fi + 1, len(files) * 2)
    if not chunks:
        raise SourceError(files[0], "holds no tokens (every forward pass is idle)")
    n_experts = n_experts_of(files[0], num_experts, n_logical - 1)
    apply_keys(chunks, sample_ids=sample_ids)
    keep = layer_has_experts(chunks, n_layers, files[0])
    ks = top_k_of(chunks, keep)
    kept = np.flatnonzero(keep)
    ranks = sorted({int(c.rank[0]) for c in chunks})
    with StagedRun(out, run_name=run_name, ranks=ranks) as run:
        run.write_meta({
            "model_class": "sglang-import", "n_layers": int(keep.sum()), "n_experts": int(n_experts),
            "top_k": int(ks.max()),
            "config": {"source": "sglang", "mode": "per_token", "files": [f.name for f in files],
                       "path": str(files[0].parent.absolute()), "source_layers": int(n_layers),
                       "placeholder_layers": np.flatnonzero(~keep).tolist(), "slot_order": "kernel order",
                       "unknown": UNKNOWN_TOKENS}},
            [{"layer": i, "module_name": f"model.layers.{int(b)}.mlp", "n_experts": int(n_experts),
              "top_k": int(ks[i]), "block_index": int(b), "stack": "decoder"}
                                 for i, b in enumerate(kept)])
        routes, seqs, assigned = write_chunks(run, chunks, keep, int(n_experts))
        run.publish()
    steps = {int(c.step[0]) for c in chunks}
    return ImportSummary(run.out, "sglang-per_token", len(files), len(steps), seqs, routes, assigned, kept.tolist(),
                         np.flatnonzero(~keep).tolist(), int(n_experts), int(ks.max()), UNKNOWN_TOKENS)


def _pass_chunk(path: Path, i: int, rec: dict, mapping: np.ndarray) -> Chunk | None:
    """One forward pass of one rank: its tokens, split into request chunks, with logical expert ids."""
    where = f"records[{i}] (forward pass {rec.get('forward_pass_id')})"
    topk = _array(path, rec["topk_ids_of_layer"], f"{where}.topk_ids_of_layer", 3)  # [layers, tokens, 8], physical
    input_ids = np.asarray(rec.get("input_ids") or [], np.int64)  # [tokens]
    positions = np.asarray(rec.get("positions") or [], np.int64)  # [tokens]
    n = len(input_ids)
    if topk.shape[0] != mapping.shape[0] or topk.shape[1] != n or len(positions) != n:
        raise SourceError(path, f"{where}: topk_ids_of_layer is {list(topk.shape)} for {n} input_ids, "
                                f"{len(positions)} positions and a map of {mapping.shape[0]} layers: inconsistent shapes")
    if n == 0:
        return None
    if int(topk.max()) >= mapping.shape[1] or int(topk.min()) < -1:
        raise SourceError(path, f"{where}: physical expert ids outside [-1, {mapping.shape[1]})")
    layer = np.arange(mapping.shape[0])[:, None, None]
    logical = np.where(topk >= 0, mapping[layer, np.maximum(topk, 0)], -1)  # [layers, tokens, 8]
    ids = np.ascontiguousarray(logical.transpose(1, 0, 2)).astype(np.int16)  # [tokens, layers, 8]
    lens = rec.get("extend_seq_lens")
    lens = [1] * n if lens is None else [int(x) for x in lens]  # decode: one token per request
    if sum(lens) != n or any(x < 0 for x in lens):
        raise SourceError(path, f"{where}: extend_seq_lens sum to {sum(lens)} for {n} tokens: inconsistent shapes")
    seq = np.repeat(np.arange(len(lens)), lens)  # [tokens]
    step, rank = int(rec["forward_pass_id"]), int(rec.get("rank", 0))
    tag = FORWARD_MODES.get(int(rec.get("forward_mode") or 0), "unknown")
    return Chunk(step=np.full(n, step, np.int64), rank=np.full(n, rank, np.int32), seq=seq.astype(np.int32),
                 pos=positions.astype(np.int32), token_id=input_ids.astype(np.int32), ids=ids,
                 sequences=[{"step": step, "rank": rank, "seq": j, "tag": tag, "n_tokens": x, "pos_offset": 0}
                            for j, x in enumerate(lens) if x > 0])
