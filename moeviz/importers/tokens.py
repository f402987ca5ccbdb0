"""Per-token routing read from a source, and how it becomes moeviz tables (routes, sequences, step_stats).

Every per-token importer reduces its source to `Chunk`s: tokens with their (step, rank, seq, pos, token id) and
the experts each chose in every source layer, `ids[token, layer, slot]`, -1 where the slot holds no expert (a
dense layer, padding past top_k). `write_chunks` then keeps the MoE layers, writes the tokens as routes and
sequences, and counts step_stats from the same ids, so that counts and routes cannot disagree.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from moeviz.importers.source import SourceError

FLUSH_ROUTES = 1 << 22  # routes per write_flush: big segments, bounded memory for the flush's columns


@dataclass
class Chunk:
    """Tokens of one source unit (a response, a forward pass, a micro-batch); arrays have one row per token."""

    step: np.ndarray  # [T] int64
    rank: np.ndarray  # [T] int32
    seq: np.ndarray  # [T] int32, unique within (step, rank)
    pos: np.ndarray  # [T] int32, position within the sequence
    token_id: np.ndarray  # [T] int32, -1 where the source has no token ids
    ids: np.ndarray  # [T, source layers, k] int16/int32 expert ids (logical), -1 = no expert in this slot
    sequences: list[dict] = field(default_factory=list)  # `sequences` rows of these tokens (without run_id)


def layer_has_experts(chunks: list[Chunk], n_layers: int, source) -> np.ndarray:
    """[source layers] bool: layers where some token chose an expert. The others are placeholders (dense layers
    that the source lists with -1 or zero rows), left out of the run. A source with none is refused (SourceError
    naming `source`): there would be no MoE layer to import."""
    seen = np.zeros(n_layers, bool)
    for c in chunks:
        if len(c.ids):
            seen |= (c.ids >= 0).any(axis=(0, 2))
    if not seen.any():
        raise SourceError(source, "no token chose an expert in any layer (every id is a placeholder, or no token "
                                  "was logged): no MoE layer to import")
    return seen


def top_k_of(chunks: list[Chunk], keep: np.ndarray) -> np.ndarray:
    """[kept layers] the most experts one token chose in each layer (the layer's top_k)."""
    k = np.zeros(int(keep.sum()), np.int64)
    for c in chunks:
        if len(c.ids):
            k = np.maximum(k, (c.ids[:, keep, :] >= 0).sum(axis=2).max(axis=0))
    return k


def write_chunks(run, chunks: list[Chunk], keep: np.ndarray, n_experts: int, *,
                 tokens_known: bool = True, drops_known: bool = True, progress=None) -> tuple[int, int, int]:
    """Write `chunks` (only the source layers in `keep`, renumbered 0..) as routes, sequences and step_stats, in
    flushes of about FLUSH_ROUTES routes, each rank's by its own writer (`run`: a StagedRun; a chunk holds one
    rank's tokens). Returns (routes, sequences, assigned) written.

    step_stats count the same ids as routes, per (step, rank, layer, expert); `tokens` is the number of tokens
    with at least one expert in the layer (NULL when not `tokens_known`); first_choice and prob_sum are NULL:
    no engine log says which slot was the top choice or what the router's probabilities were. `dropped` is 0 for
    engines that never drop (dropless serving) and NULL when not `drops_known` (Megatron's trace is taken before
    its capacity drop, so a run trained with a capacity factor dropped what the trace cannot say)."""
    layer_map = np.cumsum(keep) - 1  # source layer -> MoE layer
    kept = np.flatnonzero(keep)
    done_routes = done_seqs = done_assigned = 0
    batch: list[Chunk] = []
    size = 0
    chunks = sorted(chunks, key=_rank_of)  # stable: each rank's chunks in source order
    for i, c in enumerate(chunks):
        batch.append(c)
        size += int((c.ids[:, keep, :] >= 0).sum()) if len(c.ids) else 0
        if size >= FLUSH_ROUTES or i == len(chunks) - 1 or _rank_of(chunks[i + 1]) != _rank_of(c):
            writer = run.writer_for(_rank_of(c))
            r, s, a = _write_batch(writer, batch, kept, layer_map, n_experts, tokens_known, drops_known)
            done_routes, done_seqs, done_assigned = done_routes + r, done_seqs + s, done_assigned + a
            batch, size = [], 0
            if progress:
                progress(i + 1, len(chunks))
    return done_routes, done_seqs, done_assigned


def _rank_of(c: Chunk) -> int:
    return int(c.sequences[0]["rank"]) if c.sequences else int(c.rank[0]) if len(c.rank) else 0


def _write_batch(writer, batch: list[Chunk], kept: np.ndarray, layer_map: np.ndarray, n_experts: int,
                 tokens_known: bool, drops_known: bool = True) -> tuple[int, int, int]:
    per_token = [c for c in batch if len(c.ids)]
    seq_rows = [row for c in batch for row in c.sequences]
    if not per_token:
        if seq_rows:
            writer.write_flush({"sequences": _sequence_columns(seq_rows)})
        return 0, len(seq_rows), 0
    step = np.concatenate([c.step for c in per_token]).astype(np.int64)  # [T]
    rank = np.concatenate([c.rank for c in per_token]).astype(np.int32)
    seq = np.concatenate([c.seq for c in per_token]).astype(np.int32)
    pos = np.concatenate([c.pos for c in per_token]).astype(np.int32)
    tok = np.concatenate([c.token_id for c in per_token]).astype(np.int32)
    k = max(c.ids.shape[2] for c in per_token)
    ids = np.concatenate([_pad_slots(c.ids[:, kept, :], k) for c in per_token])  # [T, L, k]
    by_layer = np.ascontiguousarray(ids.transpose(1, 0, 2))  # [L, T, k]: routes are stored layer-major
    layer, t, slot = np.nonzero(by_layer >= 0)  # [R] each, in layer, token, slot order
    expert = by_layer[layer, t, slot].astype(np.int64)
    if expert.size and int(expert.max()) >= n_experts:
        raise ValueError(f"expert id {int(expert.max())} >= n_experts {n_experts}")
    routes = {"step": step[t], "rank": rank[t], "seq": seq[t], "pos": pos[t], "token_id": tok[t],
              "layer": layer.astype(np.int16), "slot": slot.astype(np.int8), "expert": expert.astype(np.int16),
              "weight": None}
    stats = _step_stats(step, rank, by_layer, layer, t, expert, n_experts, tokens_known, drops_known)
    tables = {"routes": routes, "step_stats": stats, "layer_stats": layer_stats_of(stats, n_experts)}
    if seq_rows:
        tables["sequences"] = _sequence_columns(seq_rows)
    writer.write_flush(tables)
    return len(expert), len(seq_rows), len(expert)


def _pad_slots(ids: np.ndarray, k: int) -> np.ndarray:
    if ids.shape[2] == k:
        return ids
    out = np.full((*ids.shape[:2], k), -1, ids.dtype)
    out[:, :, : ids.shape[2]] = ids
    return out


def _step_stats(step, rank, by_layer, layer, t, expert, n_experts: int, tokens_known: bool,
                drops_known: bool = True) -> dict:
    """Counts per (step, rank, layer, expert) of the routes just built; every expert of a step's layer has a row."""
    n_layers = by_layer.shape[0]
    groups, group_of_token = np.unique(np.stack([step, rank.astype(np.int64)]), axis=1, return_inverse=True)
    group_of_token = group_of_token.reshape(-1)  # [T]
    g = groups.shape[1]
    cell = (group_of_token[t] * n_layers + layer) * n_experts + expert
    assigned = np.bincount(cell, minlength=g * n_layers * n_experts)  # [g * L * E]
    reached = (by_layer >= 0).any(axis=2)  # [L, T]: the token reached a MoE expert in this layer
    tokens = np.zeros((g, n_layers), np.int64)
    for li in range(n_layers):
        tokens[:, li] = np.bincount(group_of_token[reached[li]], minlength=g)
    gi, li, ei = np.meshgrid(np.arange(g), np.arange(n_layers), np.arange(n_experts), indexing="ij")
    gi, li, ei = gi.reshape(-1), li.reshape(-1), ei.reshape(-1)
    live = tokens[gi, li] > 0  # a layer no token of the step reached (another pipeline stage) has no rows
    n = int(live.sum())
    return {"step": groups[0][gi][live], "rank": groups[1][gi][live].astype(np.int32),
            "layer": li[live].astype(np.int16), "expert": ei[live].astype(np.int16),
            "tokens": tokens[gi, li][live] if tokens_known else None, "assigned": assigned[live],
            "first_choice": None, "prob_sum": None, "dropped": np.zeros(n, np.int64) if drops_known else None}


def layer_stats_of(stats: dict, n_experts: int) -> dict:
    """layer_stats rows (one per step, rank and layer) of step_stats columns that list every expert of a layer in
    order: the steps the catalog lists come from here. Router logits are unknown: z-loss and entropy sums NULL."""
    first = slice(None, None, n_experts)  # the row of expert 0 of each (step, rank, layer)
    n = len(stats["step"][first])
    return {"step": stats["step"][first], "rank": stats["rank"][first], "layer": stats["layer"][first],
            "tokens": None if stats["tokens"] is None else stats["tokens"][first], "z_loss_sum": None,
            "entropy_sum": None, "dropped": None if stats["dropped"] is None else np.zeros(n, np.int64)}


SEQUENCE_KEYS = ("step", "rank", "seq", "domain", "tag", "n_tokens", "seq_key", "sample_id", "pos_offset",
                 "prompt_tokens")


def _sequence_columns(rows: list[dict]) -> dict:
    out = {}
    for key in SEQUENCE_KEYS:
        values = [r.get(key) for r in rows]
        if key in ("step",):
            out[key] = np.array(values, np.int64)
        elif key in ("rank", "seq", "n_tokens"):
            out[key] = np.array(values, np.int32)
        elif key in ("pos_offset", "prompt_tokens"):
            out[key] = None if all(v is None for v in values) else np.array(
                [np.nan if v is None else v for v in values], np.float64)
        elif key == "seq_key":
            out[key] = None if all(v is None for v in values) else np.array(values, dtype=object)
        else:
            out[key] = values
    return out


def step_stats_from_counts(step: np.ndarray, rank: np.ndarray, counts: np.ndarray, keep: np.ndarray) -> dict:
    """step_stats columns from count-only sources: counts [rows, source layers, experts] of (step[rows],
    rank[rows]); tokens, first_choice and prob_sum unknown (NULL)."""
    counts = counts[:, keep, :]
    rows, n_layers, n_experts = counts.shape
    ri, li, ei = np.meshgrid(np.arange(rows), np.arange(n_layers), np.arange(n_experts), indexing="ij")
    return {"step": np.asarray(step, np.int64)[ri.reshape(-1)], "rank": np.asarray(rank, np.int32)[ri.reshape(-1)],
            "layer": li.reshape(-1).astype(np.int16), "expert": ei.reshape(-1).astype(np.int16), "tokens": None,
            "assigned": counts.reshape(-1).astype(np.int64), "first_choice": None, "prob_sum": None,
            "dropped": np.zeros(counts.size, np.int64)}


# ------------------------------------------------------------------------------------------------ keys given


def read_key_lines(path, what: str) -> list[str]:
    """The lines of a keys file (`--sample-ids`, `--token-ids`): one per sequence; a final newline is optional.
    SourceError naming the file when it cannot be read or has an empty line."""
    from pathlib import Path

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(path, f"cannot be read as the {what} file ({type(e).__name__}: {e})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if empty:
        raise SourceError(path, f"line {empty[0]} is empty: the {what} file needs one line per sequence")
    return [line.strip() for line in lines]


def sequence_order(chunks: list[Chunk]) -> list[tuple[int, int, int]]:
    """The (step, rank, seq) of every sequence of `chunks`, in that order: the order a keys file's lines follow,
    and the order `agreement`'s match_by='order' pairs sequences in."""
    return sorted((int(r["step"]), int(r["rank"]), int(r["seq"])) for c in chunks for r in c.sequences)


def apply_keys(chunks: list[Chunk], *, sample_ids=None, token_ids=None) -> None:
    """Give the sequences of `chunks` the user's keys, line i to the i-th sequence of `sequence_order`:
    `sample_ids` (a file of one id per line) as `sequences.sample_id`; `token_ids` (a file of one sequence's
    token ids per line, space- or comma-separated, in position order) as `routes.token_id` and, hashed,
    `sequences.seq_key`. For sources without keys (Megatron's trace, SGLang's request chunks): without them
    `moeviz agree` can pair such a run only by order. SourceError naming the file when the counts disagree."""
    from moeviz.store.layout import sequence_key

    order = sequence_order(chunks)
    rows = {(int(r["step"]), int(r["rank"]), int(r["seq"])): r for c in chunks for r in c.sequences}
    if sample_ids is not None:
        ids = read_key_lines(sample_ids, "sample ids")
        _check_count(sample_ids, len(ids), len(order), "sample ids")
        if len(set(ids)) != len(ids):  # Counter: one pass (ids.count per id was quadratic)
            dup = next(x for x, n in Counter(ids).items() if n > 1)
            raise SourceError(sample_ids, f"gives sample id {dup!r} to more than one sequence: give each its own")
        for key, sid in zip(order, ids):
            rows[key]["sample_id"] = sid
    if token_ids is not None:
        lines = read_key_lines(token_ids, "token ids")
        _check_count(token_ids, len(lines), len(order), "token ids")
        by_seq = {key: _parse_ids(token_ids, i + 1, line) for i, (key, line) in enumerate(zip(order, lines))}
        line_of = {key: i + 1 for i, key in enumerate(order)}  # once: per chunk it was quadratic in sequences
        for c in chunks:
            _set_token_ids(token_ids, c, by_seq, line_of)
        for key, ids in by_seq.items():
            rows[key]["seq_key"] = sequence_key(ids)


def _check_count(path, got: int, want: int, what: str) -> None:
    if got != want:
        raise SourceError(path, f"has {got} line(s) but the source has {want} sequence(s): the {what} file needs "
                                f"one line per sequence, in (step, rank, seq) order")


def _parse_ids(path, lineno: int, line: str) -> np.ndarray:
    try:
        ids = np.array([int(x) for x in line.replace(",", " ").split()], np.int64)
    except ValueError:
        raise SourceError(path, f"line {lineno} holds something other than integer token ids") from None
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise SourceError(path, f"line {lineno} holds a token id outside [0, {np.iinfo(np.int32).max}]")
    return ids


def _set_token_ids(path, c: Chunk, by_seq: dict, line_of: dict) -> None:
    """Each token of `c` gets the id at its position in its sequence's line (`line_of`: (step, rank, seq) -> its
    line number in the file, for the error)."""
    for r in c.sequences:
        key = (int(r["step"]), int(r["rank"]), int(r["seq"]))
        mine = np.flatnonzero((c.step == key[0]) & (c.rank == key[1]) & (c.seq == key[2]))  # [tokens of it]
        ids = by_seq[key]
        pos = c.pos[mine] - int(r.get("pos_offset") or 0)
        if len(ids) != int(r["n_tokens"]) or (len(pos) and (pos.min() < 0 or pos.max() >= len(ids))):
            raise SourceError(path, f"line {line_of[key]} has {len(ids)} token id(s), but sequence (step {key[0]}, "
                                    f"rank {key[1]}, seq {key[2]}) has {int(r['n_tokens'])} token(s)")
        c.token_id[mine] = ids[pos]
