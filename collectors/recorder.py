"""Record the routing of a PyTorch Mixture-of-Experts model into a moeviz store while it trains or evaluates.

    with Recorder(model, "runs/exp1", run_name="exp1", tokenizer=tok) as rec:
        for step, batch in enumerate(loader):
            model(**batch).loss.backward(); opt.step(); opt.zero_grad()
            rec.step(step)                       # everything routed since the last step() belongs to `step`

How it stays out of the way of training:
- A forward hook on each router calls the adapter's `extract` and appends the detached device tensors to a
  buffer: no `.item()`, `.tolist()`, `.cpu()`, `print`, boolean indexing or data-sized ops, which would each
  make the CPU wait for the GPU on every layer of every step.
- A forward pre-hook on the model keeps references to the `input_ids` / `attention_mask` of each forward, so
  gradient accumulation (several forwards per step) and padding are handled without the user passing them.
  A forward given a KV cache continues the sequences of the step's forward it extends (generate(): the
  prefill, then one forward per new token), read from shapes only (`_layout`): its tokens keep their batch row and
  true position, and the prefill's tokens are the prompt (`sequences.prompt_tokens`). An encoder-decoder model's
  encoder, which generate() calls by itself, has a pre-hook of its own.
- At `step()` the exact aggregates (counts, router-probability sums, z-loss and entropy sums) and the kept
  per-token detail are computed on the device with fixed-size ops (`collectors.aggregates`).
- Every `flush_every` steps the buffered results are concatenated into one byte tensor and copied to the host
  once: the only CPU-GPU sync point. A background thread turns the arrays into rows and writes them with
  `moeviz.store.RunWriter`, behind a bounded queue, so that slow disks slow training down instead of filling
  memory.
- Hooks are removed in `finally`, whatever happened; the run is closed as finished, or failed with the
  exception text, and the user's exception always propagates.
- Under `torch.compile` the router hooks are traced into the model's graph (no graph break; they leave their
  outputs in a `_Sink`, which needs no recompilation per forward) and the model's pre/post hooks run outside it.
  Hooks attached or removed after something was compiled reset torch.compile's caches (one recompilation),
  since Dynamo does not notice new module hooks by itself.
- Each router's first output is checked (`collectors.routers.check_router_output`: one host sync per router,
  once per run) at the end of the first forward, before anything of it can be stored; a run whose router
  hooks never fired warns at close.
- Recording never stops training: a flush that cannot be written (a full disk, a failed conversion), a step
  whose aggregates cannot be computed, is lost on its own, with one RecordingWarning that says which steps, and
  the run is marked degraded (`runs.recording_errors`, `runs.recording_error`); later steps are still written.
  Router outputs that are NaN or infinite are counted per layer and step (`layer_stats.nonfinite_tokens`, on the
  device like every other count) and left out of the sums, so that one bad token cannot turn them into NaN.
  `Recorder(strict=True)` raises RecorderError instead of each such warning (for tests).

What the recorded numbers mean, where model families differ:
- `routes.weight` is the gate weight after the model's renormalisation but before a constant routed scaling
  factor (DeepSeek-V2/V3, GLM-4-MoE `routed_scaling_factor`, in `runs.config`): the model multiplies the
  expert output by weight * routed_scaling_factor. So weights stay in [0, 1] and compare with Megatron-LM's
  routing probabilities.
- `step_stats.prob_sum` and the entropy / z-loss sums are computed from softmax / logsumexp of the router
  logits in float32 (bf16 logits are upcast first), for every family, so that load-balancing losses compare
  across runs. For routers that score with a sigmoid (DeepSeek-V3, GLM-4-MoE), this softmax is not the score
  the model chose on; their choice (with the correction bias) is in `assigned` / `first_choice` / `routes`.
- `runs.capacity_factor` for Switch Transformers (a fixed `expert_capacity` tokens per expert and sequence) is
  expert_capacity * n_experts / sequence length of the first recorded step (the encoder's); NULL for models
  that never drop tokens.
- `routes.dropped` is the model's own drop of that assignment (the adapter's `dropped`), false for routers that
  never drop; it travels through the flush's copy in the sign of the expert id (-(e + 1)), at no extra byte.
- `routes.margin` is the weakest chosen expert's score minus the best unchosen one's (`aggregates.routing_margin`):
  from the full softmax of the kept tokens' logits at step() for softmax routers, in the hook from the adapter's
  `scores` (sigmoid + bias) for the others, since a bias may be updated between the forward and step(). One
  float32 per kept token and layer in the flush's copy; written in steps of 2^-16 (MARGIN_QUANTUM).
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import json
import operator
import queue
import threading
import traceback
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from collectors import balance
from collectors.aggregates import (
    EXPERT_VECTORS,
    LAYER_SCALARS,
    finite_tokens,
    flow_counts,
    kept_margin,
    kept_token_slots,
    layer_aggregates,
    packed_routes,
    pair_counts,
    router_lse,
    routing_margin,
)
from moeviz.errors import MoevizError
from moeviz.text import steps_text
from moeviz.store import layout

__all__ = ["Recorder", "RecorderError", "RecordingWarning"]

FLOW_CHOICES = ("adjacent", "all", None)  # Recorder(flow_stats=...): which pairs of layers get flow counts
# routes.margin is written rounded to steps of 2^-16, the resolution of the stored gate weight (weight_q): a float32
# margin at full precision costs ~3.5 bytes per route on disk (zstd's matches cannot see the k identical 4-byte
# values of a token's slot rows), rounded ~1.5 (bench/bench_store.py, docs/benchmarks.md)
MARGIN_QUANTUM = 1 << 16


class RecorderError(MoevizError, RuntimeError):
    """The Recorder was misused (bad arguments, use after close), or, with strict=True, recording failed."""


class RecordingWarning(RuntimeWarning):
    """Recording lost data or saw data it could not use (a flush not written, NaN router outputs, a step number
    given twice) and training went on; the message says what was lost and where the run records it. Each kind is
    warned once per Recorder. `Recorder(strict=True)` raises RecorderError instead."""


def _in_backward() -> bool:
    """True while autograd runs a backward pass: activation checkpointing then re-runs router forwards, which
    must not be counted twice.

    Under torch.compile this is False without asking autograd: Dynamo cannot trace the query (a graph break at
    every router), and a compiled region's backward runs AOT-traced graphs, which call no Python hooks."""
    if torch.compiler.is_compiling():
        return False
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # very old torch: no recomputation detection
        return False


_SINK_ATTR = "_moeviz_sink"  # attribute of a hooked router module: its _Sink, while a Recorder records it


class _Sink:
    """Where a router hook leaves its outputs until the Recorder collects them, outside any compiled graph.

    Under torch.compile the router hooks are traced into the model's graph. Appending to a list there makes
    Dynamo guard on the list's length (a recompile for every forward of a step, then a fallback to eager once
    the cache limit is hit) and lift the tensors already in it into graph inputs. A hook instead replaces
    `out` with a longer tuple, which Dynamo replays after the graph; the Recorder empties it after every model
    forward (a hook on the model that Dynamo does not trace), so each compiled forward starts from `()` and the
    guards hold."""

    __slots__ = ("out", "extract")

    def __init__(self, extract: Callable | None = None):
        self.extract = extract  # the site's RouterSite.extract
        self.out: tuple = ()  # ((logits [T, E], index [T, k], weights [T, k], dropped [T, k] | None,
        #                        margin [T] | None), ...)


# --------------------------------------------------------------------------------------------------------------
# The tokens of a step, as the routers see them
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Segment:
    """The inputs of one forward of the model: what the router of a layer sees, flattened batch-major."""

    ids: Tensor | None  # [B, S] token ids, None if the forward got embeddings
    mask: Tensor | None  # [B, S] attention mask of this forward's tokens, None = every token counts
    batch: int
    seq_len: int
    past: int = 0  # tokens of its sequences before this forward's (a KV cache's length: generate()'s decode steps)
    cached: bool = False  # the forward was given a KV cache: with past 0 its tokens are a prompt (generate()'s prefill)


def _segment(ids: Any, mask: Any, embeds: Any = None, like: Any = None, cache: Any = None) -> _Segment | None:
    """A _Segment from a forward's keyword values; None when its token layout is unknown.

    `cache` is the forward's KV cache (transformers' `cache` / `past_key_values`), if any: with it, the forward's
    tokens continue sequences of `past` tokens (read from shapes: the attention mask is wider than the ids, as
    generate() passes the mask of the whole prefix, or the cache's own `get_seq_length()`)."""
    if isinstance(ids, Tensor) and ids.dim() in (1, 2) and not ids.is_floating_point():
        ids = ids.detach()
        ids = ids[None] if ids.dim() == 1 else ids  # [B, S]
        b, s = ids.shape
    elif isinstance(embeds, Tensor) and embeds.dim() == 3:
        ids, (b, s) = None, embeds.shape[:2]
    elif isinstance(like, Tensor) and like.dim() == 2:  # labels of a seq2seq model: decoder ids made from them
        ids, (b, s) = None, like.shape
    else:
        return None
    past = 0
    if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[0] == b and mask.shape[1] >= s:
        past = int(mask.shape[1] - s)  # generation passes the mask of the whole prefix: [B, past + S]
        mask = mask.detach()[:, past:]  # [B, S]
    else:
        mask = None
    if past == 0 and cache is not None:
        past = _cache_length(cache)
    return _Segment(ids, mask, int(b), int(s), past=past, cached=cache is not None)


def _cache_length(cache: Any) -> int:
    """Tokens already in a KV cache, from shapes only (no sync): transformers' `Cache.get_seq_length()` when it
    returns a Python int (dynamic caches), or the key tensor's length of a legacy tuple cache; else 0 (a static
    cache counts its filled slots on the device: its forwards are then laid out as new sequences)."""
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        try:
            n = get()
        except Exception:  # noqa: BLE001 - a cache we do not know: its length stays unknown
            return 0
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        key = cache[0][0]
        if isinstance(key, Tensor) and key.dim() >= 2:
            return int(key.shape[-2])  # [B, heads, past, head_dim]
    return 0


@dataclass
class _Group:
    """The sequences of one batch of a step: one forward, or a forward and those that continue its sequences from a
    KV cache (generate(): the prefill, then one decode forward per new token). Its rows are sequences `row` ..
    `row + batch - 1` of the step; `segments` are its forwards, each placed at column `cols[i]`."""

    row: int
    batch: int
    segments: list[_Segment]
    cols: list[int]
    width: int  # columns covered so far: the next forward that continues it has past == width
    prompt: bool  # its first forward was given a KV cache and started at column 0: that forward's tokens are the prompt


def _layout(segments: Sequence[_Segment], seq_offset: int) -> tuple[list[_Group], list[tuple[_Segment, int, int]]]:
    """Place a step's forwards: (groups in row order, [(segment, first row, first column)] in forward order).

    A forward whose tokens come after `past` tokens of a KV cache continues the latest group of the same batch size
    that covers exactly `past` columns: its tokens keep their batch row and get their true positions. Any other
    forward starts new sequences (at column `past`: a cache filled before the step gives true positions too).
    Shapes only: no tensor is read."""
    groups: list[_Group] = []
    placed: list[tuple[_Segment, int, int]] = []
    row = seq_offset
    for sg in segments:
        group = None
        if sg.past > 0:
            group = next((g for g in reversed(groups) if g.batch == sg.batch and g.width == sg.past), None)
        if group is None:
            group = _Group(row, sg.batch, [], [], sg.past, prompt=sg.cached and sg.past == 0)
            groups.append(group)
            row += sg.batch
        group.segments.append(sg)
        group.cols.append(group.width)
        placed.append((sg, group.row, group.width))
        group.width += sg.seq_len
    return groups, placed


class _Stream:
    """Token layout of one step (one or more forwards, concatenated in forward order, each batch-major): seq, pos,
    token_id and mask per token [N], on the device. Sequence indices continue across forwards (gradient
    accumulation); a forward that continues sequences from a KV cache (generate()'s decode steps) keeps their rows
    and true positions (`_layout`).

    `ids_for_keys` [R, L] / `mask_for_keys` [R, L] (optional, one row per sequence): the sequences' full token ids,
    when the caller gave them (generate()'s output holds the last new token, which no forward saw); they replace
    the captured ids in `sequences.seq_key` and `n_tokens`."""

    def __init__(self, segments: Sequence[_Segment], device: torch.device, seq_offset: int = 0,
                 ids_for_keys: Tensor | None = None, mask_for_keys: Tensor | None = None):
        groups, placed = _layout(segments, seq_offset)
        # each forward's ids and mask on the device, once: the per-token stream and the per-sequence rows below both
        # read them (a generate() step has a forward per new token)
        seg_ids = {id(sg): self._ids(sg, device) for sg in segments}  # [B, S] each
        seg_mask = {id(sg): self._mask(sg, device) for sg in segments}  # [B, S] each
        seqs, poss, tids, masks = [], [], [], []
        for sg, row, col in placed:
            b, s = sg.batch, sg.seq_len
            rows = torch.arange(b, device=device)[:, None].expand(b, s) + row  # [B, S]
            cols = torch.arange(s, device=device)[None, :].expand(b, s) + col  # [B, S]
            seqs.append(rows.reshape(-1))
            poss.append(cols.reshape(-1))
            tids.append(seg_ids[id(sg)].reshape(-1))
            masks.append(seg_mask[id(sg)].reshape(-1))
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        self.seq = torch.cat(seqs) if seqs else empty  # [N]
        self.pos = torch.cat(poss) if poss else empty  # [N]
        self.token_id = torch.cat(tids) if tids else empty  # [N]
        self.mask = torch.cat(masks) if masks else empty.bool()  # [N]
        self.n = int(sum(sg.batch * sg.seq_len for sg in segments))
        self.n_seqs = sum(g.batch for g in groups)
        self.has_ids = ids_for_keys is not None or (bool(segments) and all(sg.ids is not None for sg in segments))
        self.seq_len = segments[0].seq_len if segments else 0  # of the first forward (a capacity group, Switch)
        self.groups = groups
        # per sequence: tokens inside the mask, tokens of the prompt (-1 = not a generation), full ids for seq_key
        n_tok, prompt, key_ids, self.key_shapes = [], [], [], []
        for g in groups:
            g_mask = torch.cat([seg_mask[id(sg)] for sg in g.segments], dim=1)  # [B, W]
            n_tok.append(g_mask.sum(1))  # [B]
            if g.prompt:
                prompt.append(seg_mask[id(g.segments[0])].sum(1))  # [B]
            else:
                prompt.append(torch.full((g.batch,), -1, dtype=torch.int64, device=device))
            if self.has_ids and ids_for_keys is None:
                g_ids = torch.cat([seg_ids[id(sg)] for sg in g.segments], dim=1)  # [B, W]
                key_ids.append(torch.where(g_mask, g_ids, torch.full_like(g_ids, -1)).reshape(-1))
                self.key_shapes.append((g.batch, g.width - g.cols[0]))
        if ids_for_keys is not None:  # the caller's full sequences, one row per sequence
            k_ids = ids_for_keys.to(device=device, dtype=torch.int64, non_blocking=True)  # [R, L]
            k_mask = (torch.ones_like(k_ids, dtype=torch.bool) if mask_for_keys is None
                      else mask_for_keys.to(device, non_blocking=True) != 0)  # [R, L]
            key_ids = [torch.where(k_mask, k_ids, torch.full_like(k_ids, -1)).reshape(-1)]
            self.key_shapes = [tuple(k_ids.shape)]
            n_tok = [k_mask.sum(1)]
        self.n_per_seq = torch.cat(n_tok) if n_tok else empty  # [B_total]
        self.prompt_tokens = torch.cat(prompt) if prompt else empty  # [B_total], -1 = unknown
        self.key_ids = torch.cat(key_ids).to(torch.int32) if key_ids else None  # [sum of R * L], -1 outside the mask
        # adjacency needs each sequence's tokens in position order; decode forwards interleave them
        self.order = self._position_order(groups) if any(len(g.segments) > 1 for g in groups) else None
        self._moved: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._kept: dict[tuple[torch.device, int | None], tuple[Tensor, Tensor]] = {}

    @staticmethod
    def _ids(sg: _Segment, device: torch.device) -> Tensor:
        if sg.ids is None:
            return torch.full((sg.batch, sg.seq_len), -1, dtype=torch.int64, device=device)
        return sg.ids.to(device=device, dtype=torch.int64, non_blocking=True)  # [B, S]

    @staticmethod
    def _mask(sg: _Segment, device: torch.device) -> Tensor:
        if sg.mask is None:
            return torch.ones((sg.batch, sg.seq_len), dtype=torch.bool, device=device)
        return sg.mask.to(device, non_blocking=True) != 0  # [B, S]

    def _position_order(self, groups: list[_Group]) -> Tensor:
        """[N] stream indices sorted by (sequence, position): one stable sort of a key made from seq and pos on the
        device, the key's width known from shapes (no data read)."""
        width = max(g.width for g in groups) + 1
        return torch.argsort(self.seq * width + self.pos, stable=True)  # [N]

    def on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(seq, pos, token_id, mask) on `device` (layers of a pipeline-split model live on several GPUs)."""
        if device not in self._moved:
            self._moved[device] = tuple(
                t.to(device, non_blocking=True) for t in (self.seq, self.pos, self.token_id, self.mask)
            )
        return self._moved[device]

    def kept(self, device: torch.device, max_tokens: int | None) -> tuple[Tensor, Tensor]:
        """The kept-token selection, shared by every layer so that a token's routes cover all layers."""
        key = (device, max_tokens)
        if key not in self._kept:
            self._kept[key] = kept_token_slots(self.on(device)[3], max_tokens)
        return self._kept[key]


def _as_2d(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as e:
            raise RecorderError(f"{name} must be a [batch, seq] tensor or array (rows of equal length): {e}") from None
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise RecorderError(f"{name} must have shape [batch, seq]; got shape {tuple(t.shape)}")
    return t.detach()


def _compiled_code_exists() -> bool:
    """Whether torch.compile has compiled any frame in this process (without importing Dynamo if it was not)."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return False
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
        from torch._dynamo.convert_frame import input_codes

        codes = [ref() for ref in input_codes.seen]  # the code objects Dynamo has compiled frames of (weak refs)
        return any(code is not None and _debug_get_cache_entry_list(code) for code in codes)
    except (ImportError, AttributeError, TypeError):  # another torch: assume there may be compiled code
        return True


def _reset_compiled_code() -> bool:
    """Drop torch.compile's compiled code (torch.compiler.reset) if there is any, so that the next call of a
    compiled model retraces it with the hooks attached (or removed) now; True if it did. Dynamo does not guard
    on nn.Module hooks (`skip_nnmodule_hook_guards`), so without this a model compiled and warmed up before
    Recorder.start() would never call the Recorder's hooks and the run would record nothing."""
    if not _compiled_code_exists():
        return False
    torch.compiler.reset()
    return True


# --------------------------------------------------------------------------------------------------------------
# Buffers and host-side decoding of a flush
# --------------------------------------------------------------------------------------------------------------


_REDUCED_KINDS = ("agg", "pairs", "flow")  # the step aggregates Recorder(reduce_ranks=True) sums over ranks


def _layout_signature(keys: list) -> int:
    """A number in [1, 2^20] naming what a rank's flush sums (its steps, kinds, layers and shapes, in order): small
    enough that s^2 times the group size stays exact in float64."""
    import zlib

    return 1 + zlib.crc32(repr(keys).encode()) % (1 << 20)


def _same_over_ranks(summed: np.ndarray, mine: tuple[float, ...], ranks: int) -> bool:
    """Whether every rank had this rank's values, from their sums and sums of squares over `ranks` ranks
    (`summed` = [sum x, sum x^2] per value): (W x, W x^2) holds only if the ranks' mean is x and variance 0."""
    pairs = np.asarray(summed, dtype=np.float64).reshape(-1, 2)
    return all(p[0] == ranks * x and p[1] == ranks * x * x for p, x in zip(pairs, mine))


def _collective_device(group: Any) -> torch.device:
    """Where a rank with nothing recorded puts its part of a sum: the current GPU for NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class _Piece:
    kind: str  # 'agg' (layer aggregates), 'pairs' (co-activation counts), 'flow' (layer-to-layer counts),
    # 'route_ints' / 'route_weights' (per-token detail), 'seqs'
    layer: int | None  # MoE layer index (site.layer); None for 'seqs'
    shape: tuple[int, ...]  # shape of the packed tensor
    dtype: str  # its numpy dtype name: the host reads the flush's bytes back with it
    tensor: Tensor | None = None  # dropped before the layout goes to the writer thread
    layer_b: int | None = None  # 'flow': the layer the tokens flow to

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _piece(kind: str, layer: int | None, tensor: Tensor, layer_b: int | None = None) -> _Piece:
    dtype = str(tensor.dtype).removeprefix("torch.")
    return _Piece(kind, layer, tuple(tensor.shape), dtype, tensor, layer_b)


@dataclass
class _StepRecord:
    step: int
    tag: str
    domains: list[str | None]
    pieces: list[_Piece] = field(default_factory=list)
    seq_offset: int = 0  # sequences recorded before under the same step number (a repeated step)
    sample_ids: list[str | None] | None = None  # the user's key per sequence (step(sample_ids=...)), or None
    seq_shapes: list[tuple[int, int]] | None = None  # (rows, columns) of each batch of sequences of a 'seq_ids' piece
    ranks_summed: int | None = None  # reduce_ranks: its aggregates are the sums over this many ranks (None: own)


def _tables_from_host(host: np.ndarray, records: list[_StepRecord], rank: int, layer_experts: dict[int, int]) -> dict:
    """Turn one flush's host copy back into the store's column arrays (runs in the writer thread)."""
    cols: dict[str, dict[str, list]] = {t: {} for t in ("step_stats", "layer_stats", "routes", "sequences",
                                                         "pair_stats", "flow_stats", "expert_bias", "balance_stats")}

    def add(table: str, **arrays) -> None:
        for name, arr in arrays.items():
            cols[table].setdefault(name, []).append(arr)

    off = 0
    for rec in records:
        route_ints = seq_ids = None
        for pc in rec.pieces:
            arr = host[off : off + pc.nbytes].view(pc.dtype).reshape(pc.shape)
            off += pc.nbytes
            if pc.kind == "agg":
                n_exp = layer_experts[pc.layer]
                tokens, z, ent, dropped, adj, same, first_in, overlap, nonfinite = arr[: len(LAYER_SCALARS)]
                vec = arr[len(LAYER_SCALARS) :].reshape(len(EXPERT_VECTORS), n_exp)  # [4, E]
                add("layer_stats", step=np.array([rec.step]), layer=np.array([pc.layer]), tokens=np.array([tokens]),
                    z_loss_sum=np.array([z]), entropy_sum=np.array([ent]), dropped=np.array([dropped]),
                    adjacent_pairs=np.array([adj]), same_first=np.array([same]),
                    first_in_topk=np.array([first_in]), topk_overlap=np.array([overlap]),
                    coactive_pairs=np.array([np.nan]),  # set by the 'pairs' piece that follows, if recorded
                    nonfinite_tokens=np.array([nonfinite]),
                    ranks_summed=np.array([np.nan if rec.ranks_summed is None else rec.ranks_summed]))
                add("step_stats", step=np.full(n_exp, rec.step), layer=np.full(n_exp, pc.layer),
                    expert=np.arange(n_exp), tokens=np.full(n_exp, tokens), assigned=vec[0], first_choice=vec[1],
                    prob_sum=vec[2], dropped=vec[3])
            elif pc.kind == "pairs":  # [E(E-1)/2] upper triangle of the layer's co-activation counts
                cols["layer_stats"]["coactive_pairs"][-1] = np.array([arr.sum(dtype=np.int64)], dtype=np.float64)
                i, j = np.triu_indices(layer_experts[pc.layer], k=1)
                nz = np.flatnonzero(arr)
                add("pair_stats", step=np.full(len(nz), rec.step), layer=np.full(len(nz), pc.layer),
                    expert_i=i[nz], expert_j=j[nz], tokens=arr[nz])
            elif pc.kind == "flow":  # [2, E_a * E_b]: first-choice tokens, then top-k pairs
                n_b = layer_experts[pc.layer_b]
                nz = np.flatnonzero(arr[1])  # a cell with first-choice tokens has pairs too
                add("flow_stats", step=np.full(len(nz), rec.step), layer_a=np.full(len(nz), pc.layer),
                    layer_b=np.full(len(nz), pc.layer_b), expert_a=nz // n_b, expert_b=nz % n_b,
                    first_tokens=arr[0][nz], topk_pairs=arr[1][nz])
            elif pc.kind == "route_ints":
                route_ints = arr  # [M, 4 + k]; its weights and margin come next
            elif pc.kind == "route_weights":
                k = pc.shape[1] - 1
                keep = route_ints[:, 0] > 0
                rows, w = route_ints[keep], arr[keep]  # [M_valid, 4 + k], [M_valid, k + 1]
                m = rows.shape[0]
                experts = rows[:, 4:].reshape(-1)  # [M_valid * k]; -(e + 1) where the model dropped it
                add("routes", step=np.full(m * k, rec.step), seq=np.repeat(rows[:, 1], k),
                    pos=np.repeat(rows[:, 2], k), token_id=np.repeat(rows[:, 3], k), layer=np.full(m * k, pc.layer),
                    slot=np.tile(np.arange(k), m), expert=np.where(experts < 0, -experts - 1, experts),
                    weight=w[:, :k].reshape(-1), dropped=experts < 0,
                    margin=np.repeat(np.round(w[:, k] * MARGIN_QUANTUM) / np.float32(MARGIN_QUANTUM), k))
            elif pc.kind in balance.PIECE_KINDS:  # expert_bias, balance_stats (collectors.balance)
                balance.add_rows(add, pc.kind, pc.layer, arr, rec.step)
            elif pc.kind == "seq_ids":  # [N] token ids, -1 outside the attention mask (rows of rec.seq_shapes)
                seq_ids = arr
            elif pc.kind == "seqs":
                n = pc.shape[0]  # [n, 2]: n_tokens, prompt_tokens (-1 = not a generation)
                keys, offsets = (_sequence_keys(seq_ids, rec.seq_shapes, n) if seq_ids is not None
                                 else ([None] * n, np.full(n, np.nan)))
                add("sequences", step=np.full(n, rec.step), seq=np.arange(n) + rec.seq_offset,
                    domain=np.array(rec.domains, dtype=object), tag=np.array([rec.tag] * n, dtype=object),
                    n_tokens=arr[:, 0], seq_key=np.array(keys, dtype=object), pos_offset=offsets,
                    prompt_tokens=np.where(arr[:, 1] >= 0, arr[:, 1], np.nan),
                    sample_id=np.array(rec.sample_ids if rec.sample_ids is not None else [None] * n, dtype=object))
    dtypes = {
        "step": np.int64, "layer": np.int16, "expert": np.int16, "tokens": np.int64, "assigned": np.int64,
        "first_choice": np.int64, "prob_sum": np.float64, "dropped": np.int64, "z_loss_sum": np.float64,
        "entropy_sum": np.float64, "seq": np.int32, "pos": np.int32, "token_id": np.int32, "slot": np.int8,
        "expert_i": np.int16, "expert_j": np.int16,
        "layer_a": np.int16, "layer_b": np.int16, "expert_a": np.int16, "expert_b": np.int16, "first_tokens": np.int64,
        "topk_pairs": np.int64, "adjacent_pairs": np.float64, "same_first": np.float64,
        "first_in_topk": np.float64, "topk_overlap": np.float64, "coactive_pairs": np.float64,  # NaN = NULL
        "nonfinite_tokens": np.float64, "ranks_summed": np.float64,
        "weight": np.float64, "n_tokens": np.int32, "margin": np.float32,
        "domain": object, "tag": object,
        ("routes", "dropped"): np.bool_,  # a count in step_stats/layer_stats, a flag per assignment in routes
        "seq_key": object, "sample_id": object,  # Python ints (full 64 bits) or None; strings or None
        "pos_offset": np.float64, "prompt_tokens": np.float64,  # NaN = NULL
        **balance.COLUMN_DTYPES,
    }
    tables: dict[str, dict[str, np.ndarray]] = {}
    for table, arrays in cols.items():
        if not arrays:
            continue
        out = {name: np.concatenate(parts).astype(dtypes.get((table, name), dtypes[name]))
               for name, parts in arrays.items()}
        n_rows = len(out["step"])
        if n_rows == 0:
            continue
        out["rank"] = np.full(n_rows, rank, dtype=np.int32)
        tables[table] = out
    return tables


def _host_copy(pieces: list[_Piece]) -> np.ndarray:
    """The pieces' bytes, concatenated on the device and copied to the host at once: the flush's sync point."""
    device = pieces[0].tensor.device
    flat = torch.cat(
        [pc.tensor.contiguous().reshape(-1).view(torch.uint8).to(device, non_blocking=True) for pc in pieces]
    )  # [total bytes]
    return flat.cpu().numpy()


def _group_size(group: Any = None) -> int:
    """Ranks in the reduce group (None: the whole world)."""
    import torch.distributed as dist

    return dist.get_world_size(group)


AUTO_REDUCE_WORLD = 8  # Recorder(reduce_ranks=None) sums the step aggregates over ranks past one 8-GPU node


def _own_group() -> Any:
    """A process group over the whole world for the Recorder's collectives alone (every rank must call this)."""
    import torch.distributed as dist

    return dist.new_group()


def reduce_by_default(world_size: int) -> bool:
    """Whether Recorder(reduce_ranks=None) sums the step aggregates over the ranks: when torch.distributed runs more
    than AUTO_REDUCE_WORLD ranks (and the Recorder records for all of them). The Recorder's own default is False,
    because its sums are collectives: a rank that builds no Recorder (one made on rank 0 alone, a pipeline stage
    without MoE layers) would leave the others waiting at their first flush. `MoevizCallback`, which the Trainer
    runs on every rank, passes None.

    Why: per-rank rows cost world-size times the reduced rows in the store and in every query over steps
    (64 ranks of a 58 x 256 model: 594 MB against 13.6 MB for 50 steps, `health_summary` 7.95 s against 0.28,
    docs/benchmarks.md), against a head and one all_reduce per dtype per flush (bench/bench_reduce_ranks.py: 1-3 ms
    a step for a 58 x 256 model's step_stats/layer_stats sums on CPUs; the pair and flow counts cost more). Up to
    one node the
    per-rank rows cost at most 8 times as much and keep what only they can answer: the rank filter, per-rank
    load, and capacity drops grouped per rank and step (`capacity_drops(group='step')` reads `step_stats` per
    rank). The routes and sequences, which `dispatch_traffic` reads per rank, stay per rank either way."""
    _, dist_world = _distributed_rank_and_size()
    return dist_world > AUTO_REDUCE_WORLD and world_size == dist_world


def _sequence_keys(ids: np.ndarray, shapes: list[tuple[int, int]], n: int) -> tuple[list[int | None], np.ndarray]:
    """sequences.seq_key and pos_offset of each sequence of a step, on the host (writer thread): the hash of its
    token ids inside the attention mask (`moeviz.store.layout.sequence_key`) and the column of the first of them
    (left padding); None / NaN for a sequence with no known id."""
    keys: list[int | None] = []
    offsets: list[float] = []
    off = 0
    for b, s in shapes:
        rows = ids[off : off + b * s].reshape(b, s)
        off += b * s
        for row in rows:
            inside = np.flatnonzero(row >= 0)
            keys.append(layout.sequence_key(row[inside]) if len(inside) else None)
            offsets.append(float(inside[0]) if len(inside) else np.nan)
    if len(keys) != n:
        return [None] * n, np.full(n, np.nan)
    return keys, np.array(offsets, dtype=np.float64)


class _WriterThread:
    """Runs writer jobs in order on one background thread, behind a bounded queue (back-pressure).

    Each job says what it would lose if it failed (`what`). A failed job is appended to `failures` (read and
    warned about by the training thread, which owns the warnings) and, unless strict, counted in the run
    (`RunWriter.record_error`) while later jobs go on: one bad flush costs only its own steps.
    With strict=True, after a job fails later jobs are skipped (but still taken off the queue, so producers never
    block forever) except the final close; the error is kept for the Recorder to raise on its next call.
    """

    def __init__(self, writer: Any, max_pending: int, strict: bool = False):
        self.writer = writer
        self.strict = strict
        self.error: BaseException | None = None  # strict only: the first failure, raised by the Recorder
        self.error_trace = ""
        self.failures: list[tuple[str, BaseException]] = []  # (what was lost, why); appended by this thread only
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._thread = threading.Thread(target=self._run, name="moeviz-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[Any], None], what: str, *, always: bool = False) -> None:
        self._queue.put((job, what, always))

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, what, always = item
            if self.error is not None and not always:
                continue
            try:
                job(self.writer)
            except BaseException as e:  # reported by the training thread: warned (default) or raised (strict)
                self.failures.append((what, e))
                if self.strict:
                    if self.error is None:
                        self.error, self.error_trace = e, traceback.format_exc()
                    continue
                try:
                    self.writer.record_error(f"{what}: {_error_text(e)}")
                except BaseException:  # noqa: BLE001 - a full disk fails this too; close() tries the row again
                    pass


# --------------------------------------------------------------------------------------------------------------
# The Recorder
# --------------------------------------------------------------------------------------------------------------


class Recorder:
    """Records a model's routing into the run folder `path` (see the module docstring for the how).

    model: the model whose routers are hooked (found by `collectors.routers.find_routers`, or by your
      `predicate` / `adapter`). tokenizer: stores the text of every vocabulary id. sample_every: keep per-token
      detail on steps whose number is a multiple of it. max_tokens_per_step: keep per-token detail for at most
      the first M tokens (in sequence, position order) of a step on this rank; the per-step aggregates always
      cover every token. flush_every: steps between two device-to-host copies. rank/world_size: default from
      torch.distributed when initialised. domain: default domain label of every sequence. config: a dict
      stored as the run's config (default `model.config.to_dict()`). pair_stats: count, per layer and step, the
      tokens that chose each pair of experts together (`pair_stats`, for co-activation without reading routes):
      E(E-1)/2 int32 per layer and step copied off the device (130 KiB for E = 256), so switch it off for very
      wide layers on long runs if that matters. flow_stats: count, per step, how tokens go from the experts of
      one MoE layer to those of another (`flow_stats`, for the layer-flow Sankey without reading routes):
      "adjacent" (default) for each layer and the next, "all" for every pair of layers (L(L-1)/2 pairs: for
      small models), None for none; 2 x E_a x E_b int32 per pair and step (512 KiB for E = 256).
      strict: raise RecorderError where the default warns (RecordingWarning) and goes on: a flush or step that
      could not be recorded, NaN/inf router outputs, a repeated step number. For tests; in training, a recording
      problem should cost the steps it concerns, never the run (they are listed in `recording_errors`).
      reduce_ranks: sum the step aggregates (step_stats, layer_stats, pair_stats, flow_stats) over the
      data-parallel group `reduce_group` (default the whole world) at each flush, written once by its first rank;
      routes and sequences stay per rank. Every rank of the group must build a Recorder with it (the sums are
      collectives, on a process group of the Recorder's own), so it is off by default; None: on when
      torch.distributed runs more than 8 ranks (`reduce_by_default` says why: per-rank rows cost world-size times
      the store and the queries; up to a node they keep the rank filter, per-rank load and capacity per rank),
      which `MoevizCallback` passes, as the Trainer runs it on every rank. Every analysis but
      `capacity_drops(group='step')` (which refuses summed steps: `layer_stats.ranks_summed`) answers the same
      either way. Each rank must make the same number of step() calls (flushes follow calls, recorded or not);
      ranks whose steps differ write that flush per rank, a rank that cannot build its part makes every rank write
      per rank, and a rank closing early ends the sums (see `_reduced_flush`): no deadlock, nothing else lost.
      compact_on_close: the last rank's close() folds the run's segments into run.duckdb and Parquet files
      ("auto": while they hold at most 1 GiB, `MOEVIZ_COMPACT_AT_CLOSE_MAX`; past it close() warns with the
      `moeviz compact` command instead of keeping the training process for the minutes it takes; True: always;
      False: never). Readers see the segments either way.

    Memory: until step(), the router outputs of the step's forwards stay on the device (per layer: tokens x
    (experts + 2k) values, small next to the activations); pending flushes hold only the aggregates and the
    kept routes ((4 + 2k) x 4 bytes per kept token and layer): set max_tokens_per_step on large runs.
    Use `paused()` or `discard()` for forwards that belong to no step (evaluation inside training).
    The step numbers seen are kept (to notice a repeated one): about 100 bytes per step.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | Path,
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        predicate: Callable | None = None,
        adapter: Any = None,
        tokenizer: Any = None,
        sample_every: int = 1,
        max_tokens_per_step: int | None = None,
        flush_every: int = 10,
        rank: int | None = None,
        world_size: int | None = None,
        domain: str | None = None,
        config: dict | None = None,
        max_pending_flushes: int = 4,
        pair_stats: bool = True,
        flow_stats: str | None = "adjacent",
        strict: bool = False,
        reduce_ranks: bool | None = False,
        reduce_group: Any = None,
        compact_on_close: bool | str = "auto",
    ):
        if not isinstance(model, nn.Module):
            raise RecorderError(f"Recorder needs a torch.nn.Module; got {type(model).__name__}")
        if int(sample_every) < 1:
            raise RecorderError(f"sample_every must be >= 1 (1 = every step); got {sample_every}")
        if max_tokens_per_step is not None and int(max_tokens_per_step) < 0:
            raise RecorderError(f"max_tokens_per_step must be >= 0 or None (all tokens); got {max_tokens_per_step}")
        if int(flush_every) < 1:
            raise RecorderError(f"flush_every must be >= 1; got {flush_every}")
        if flow_stats not in FLOW_CHOICES:
            raise RecorderError(f"flow_stats must be one of {FLOW_CHOICES}; got {flow_stats!r}")
        if domain is not None and not isinstance(domain, str):
            raise RecorderError("Recorder(domain=...) takes one label; give per-sequence labels to step(domain=[...])")
        self.model = model
        self.path = Path(path)
        self.run_name = run_name
        self.run_id = run_id
        self.predicate = predicate
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.sample_every = int(sample_every)
        self.max_tokens_per_step = None if max_tokens_per_step is None else int(max_tokens_per_step)
        self.flush_every = int(flush_every)
        dist_rank, dist_world = _distributed_rank_and_size()
        self.rank = dist_rank if rank is None else int(rank)
        self.world_size = dist_world if world_size is None else int(world_size)
        self.domain = domain
        self.config = config
        self.max_pending_flushes = max_pending_flushes
        self.pair_stats = bool(pair_stats)
        self.flow_stats = flow_stats
        self.strict = bool(strict)
        if not (compact_on_close is True or compact_on_close is False or compact_on_close == "auto"):
            raise RecorderError(f"compact_on_close must be True, False or 'auto'; got {compact_on_close!r}")
        self.compact_on_close = compact_on_close
        # reduce_ranks: the step aggregates summed over the data-parallel group at each flush (see flush and the
        # class docstring); None decides by world size (`reduce_by_default`)
        if reduce_ranks is not None and not isinstance(reduce_ranks, bool):
            raise RecorderError(f"reduce_ranks must be True, False or None (decide by world size); got {reduce_ranks!r}")
        self.reduce_ranks = (reduce_by_default(self.world_size) if reduce_ranks is None
                             else reduce_ranks and self.world_size > 1)
        if self.reduce_ranks and not _distributed_rank_and_size()[1] > 1:
            raise RecorderError("reduce_ranks=True needs torch.distributed initialised with more than one rank; "
                                "call init_process_group first, or pass reduce_ranks=False")
        # the recorder's own communicator (made here, where every rank of a reducing run constructs its Recorder):
        # its heads and sums never interleave with training's collectives on the default group
        self.reduce_group = reduce_group if reduce_group is not None or not self.reduce_ranks else _own_group()

        self.sites: list = []
        self._handles: list = []
        self._writer_thread: _WriterThread | None = None
        self._started = False
        self._closed = False
        self._paused = False
        self._is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self._forward_params: list[str] = []
        self._calls: list[list] = []  # per site: RouterOutputs captured since the last step()
        self._sinks: list[_Sink] = []  # per site: outputs of the current forward, not yet collected
        self._checked: set[int] = set()  # sites whose first output passed check_router_output
        self._router_calls = 0  # router outputs collected over the run (0 at close: the hooks never fired)
        self._model_calls = 0  # forwards of the model seen by its pre-hook
        self._reset_compiled = False  # torch.compile caches were reset so that compiled code traces our hooks
        self._forwards: list[tuple[_Segment | None, _Segment | None]] = []  # (main, decoder) per forward
        self._in_model = False  # inside a forward of the model (its pre-hook ran, its post-hook not yet)
        self._pending: list[_StepRecord] = []
        self._steps_since_flush = 0  # step() calls since the last flush (recorded or not)
        self._warned_layers: set[int] = set()
        self._capacity_known = False  # runs.capacity_factor of fixed-capacity routers written (see step())
        self.steps_recorded = 0
        self.flushes = 0
        self.recording_errors: list[str] = []  # what each recording failure lost, in the order they were seen
        self._failures_seen = 0  # of the writer thread's failures
        self._nonfinite: list[tuple[int, int, int]] = []  # (step, layer, tokens) found by the writer thread
        self._nonfinite_seen = 0
        self._warned: set[str] = set()  # kinds of RecordingWarning already given: each is given once
        self._step_seqs: dict[int, int] = {}  # step number -> sequences recorded under it (repeated steps)
        self._biases = balance.BiasSnapshots([])  # the routers' selection bias, copied once per step

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> "Recorder":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._finish(exc)
        return False  # never swallow the user's exception

    def start(self) -> "Recorder":
        """Find the routers, open the run, write its metadata and attach the hooks."""
        if self._started:
            raise RecorderError("this Recorder was already started; make a new one for a new run")
        from collectors.routers import find_routers
        from moeviz.store import RunWriter

        # a torch.compile result (OptimizedModule) routes through its original module: name the routers as in
        # an uncompiled run (no `_orig_mod.` prefix), so that runs compare layer by layer
        inner = self.model._orig_mod if isinstance(getattr(self.model, "_orig_mod", None), nn.Module) else self.model
        sites = list(find_routers(inner, predicate=self.predicate, adapter=self.adapter))
        if not sites:
            raise RecorderError(
                f"no MoE router found in {type(self.model).__name__}: pass predicate=(name, module) -> bool "
                "to pick the router modules, or adapter= for a custom MoE layer (see collectors.routers)"
            )
        self.sites = sites
        self._biases = balance.BiasSnapshots(sites)
        self._calls = [[] for _ in sites]
        self._sinks = [_Sink(s.extract) for s in sites]
        stacks = {s.stack for s in sites}
        self._is_encoder_decoder |= {"encoder", "decoder"} <= stacks  # also when a wrapper hides the config
        try:
            writer = RunWriter(
                self.path, run_id=self.run_id, run_name=self.run_name, rank=self.rank, world_size=self.world_size,
                compact_on_close=self.compact_on_close,
            )
        except OSError as e:  # before training starts: the caller can fix it (a read-only or full filesystem)
            raise RecorderError(f"cannot record into {self.path}: {_error_text(e)}; give a folder on a writable "
                                "filesystem with free space") from e
        self._writer_thread = _WriterThread(writer, self.max_pending_flushes, strict=self.strict)
        self._started = True
        _OPEN_RECORDERS.add(self)
        try:
            meta, layers = self._run_metadata(), self._layer_rows()
            self._writer_thread.submit(lambda w: w.write_run(meta), "the run's metadata (its runs row) was not written")
            self._writer_thread.submit(lambda w: w.write_layers(layers), "the layers table was not written")
            if self.tokenizer is not None:
                ids, texts = _vocab_texts(self.tokenizer)
                self._writer_thread.submit(lambda w: w.write_vocab(ids, texts), "the vocabulary was not written")
            self._attach_hooks()
        except BaseException as e:
            self._finish(e)
            raise
        return self

    def close(self) -> None:
        """Flush what is left, remove the hooks and close the run as finished (idempotent)."""
        self._finish(None)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside this block are not recorded (e.g. an evaluation in the middle of training)."""
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was

    def discard(self) -> None:
        """Drop whatever the hooks captured since the last step() (e.g. evaluation forwards between steps)."""
        for sink in self._sinks:
            sink.out = ()
        self._calls = [[] for _ in self.sites]
        self._forwards = []
        self._biases.clear()

    # -- hooks -------------------------------------------------------------------------------------------------

    def _attach_hooks(self) -> None:
        """The model's pre- and post-hook run eagerly (torch.compiler.disable: under `torch.compile(model)` they
        are frames of their own, outside the model's graph, so this costs no graph break); the router hooks are
        traceable and are compiled into the graph. Code that torch.compile built before the hooks existed does
        not call them (Dynamo does not guard on module hooks), so its caches are reset here: one recompile."""
        inner = getattr(self.model, "_orig_mod", self.model)  # a torch.compile result: its module's signature
        self._forward_params = _positional_params(inner.forward)
        self._handles.append(
            self.model.register_forward_pre_hook(torch.compiler.disable(self._on_model_call), with_kwargs=True)
        )
        self._handles.append(
            self.model.register_forward_hook(torch.compiler.disable(self._on_model_return), always_call=True)
        )
        encoder = self._encoder_module()
        if encoder is not None:
            self._handles.append(
                encoder.register_forward_pre_hook(torch.compiler.disable(self._on_encoder_call), with_kwargs=True)
            )
        for i, site in enumerate(self.sites):
            # one hook for every router, which finds its sink on the module: a per-router hook (a partial holding
            # the site's index) is a constant Dynamo guards on, so a frame shared by the MoE layers (DeepSpeed's
            # MOELayer after its own graph break) would be recompiled for every layer
            other = getattr(site.module, _SINK_ATTR, None)
            if other is not None and any(other in r._sinks for r in list(_OPEN_RECORDERS) if r is not self):
                raise RecorderError(f"router {site.name} is already recorded by another open Recorder: close it "
                                    "before recording the model again")
            setattr(site.module, _SINK_ATTR, self._sinks[i])
            self._handles.append(site.module.register_forward_hook(self._on_router))
        self._reset_compiled = _reset_compiled_code()

    def _encoder_module(self) -> nn.Module | None:
        """The encoder stack of an encoder-decoder model (transformers' `get_encoder()`), whose routers' tokens
        generate() feeds without calling the model; None for decoder-only models."""
        if not self._is_encoder_decoder:
            return None
        inner = getattr(self.model, "_orig_mod", self.model)
        get = getattr(inner, "get_encoder", None)
        try:
            encoder = get() if callable(get) else None
        except Exception:  # noqa: BLE001 - a model without a separate encoder module
            return None
        return encoder if isinstance(encoder, nn.Module) and encoder is not inner else None

    def _remove_hooks(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        for site, sink in zip(self.sites, self._sinks):
            if site.module.__dict__.get(_SINK_ATTR) is sink:
                delattr(site.module, _SINK_ATTR)
        if self._reset_compiled or _compiled_code_exists():
            _reset_compiled_code()  # compiled graphs that call our router hooks would keep calling them

    def _collect(self, check: bool = True) -> None:
        """Move the router outputs the hooks left in the sinks into this step's buffers; check each router's
        first output (check_router_output: a one-time host sync per router) before it can be stored."""
        for i, sink in enumerate(self._sinks):
            outs, sink.out = sink.out, ()
            if not outs:
                continue
            self._router_calls += len(outs)
            if check and i not in self._checked:
                self._check_first_output(i, outs[0])
            self._calls[i].extend(outs)

    def _check_first_output(self, site_index: int, captured: tuple) -> None:
        from collectors.routers import RouterOutput, check_router_output

        logits, index, weights, dropped = captured[:4]
        try:
            check_router_output(self.sites[site_index], RouterOutput(logits, index, weights, dropped))
        except Exception:
            self.discard()  # nothing of a wrong reading is kept, let alone stored
            raise
        self._checked.add(site_index)

    def _on_model_return(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook on the model: collect what its routers left (eager, outside any compiled graph). Also
        called when the forward raised (`always_call`)."""
        self._in_model = False
        self._collect()

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: keep references to this forward's token ids and mask (no copy, no sync)."""
        self._collect()  # outputs of router calls made outside a model forward (submodules called directly)
        self._in_model = True
        if self._paused or _in_backward():
            return
        self._model_calls += 1
        self._biases.take()  # the selection bias the routers rank with in this step (first forward wins)
        bound = dict(zip(self._forward_params, args))
        bound.update(kwargs)
        if bound.get("input_ids") is None and bound.get("inputs_embeds") is None and args:
            bound["input_ids"] = args[0]  # wrappers (DDP: forward(*inputs, **kwargs)) hide the names
        cache = _kv_cache(bound)
        dec = None
        if self._is_encoder_decoder:
            # a forward given encoder_outputs did not run the encoder (generate()'s decode steps): no encoder tokens
            main = None if bound.get("encoder_outputs") is not None else _segment(
                bound.get("input_ids"), bound.get("attention_mask"), bound.get("inputs_embeds"))
            dec = _segment(
                bound.get("decoder_input_ids"),
                bound.get("decoder_attention_mask"),
                bound.get("decoder_inputs_embeds"),
                like=bound.get("labels"),
                cache=cache,
            )
        else:
            main = _segment(bound.get("input_ids"), bound.get("attention_mask"), bound.get("inputs_embeds"),
                            cache=cache)
        self._forwards.append((main, dec))

    def _on_encoder_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on an encoder-decoder model's encoder: generate() runs the encoder by itself, outside
        any forward of the model, so its tokens (and mask) are captured here as a forward of their own. Inside a
        model forward the model's pre-hook has them already."""
        if self._paused or self._in_model or _in_backward():
            return
        bound = dict(zip(_positional_params(module.forward), args))
        bound.update(kwargs)
        main = _segment(bound.get("input_ids"), bound.get("attention_mask"), bound.get("inputs_embeds"))
        if main is not None:
            self._forwards.append((main, None))

    def _on_router(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        """Forward hook on a router: extract its routing and buffer the detached device tensors (no sync)."""
        if self._paused or _in_backward():
            return
        sink = getattr(module, _SINK_ATTR)  # this router's _Sink (see _attach_hooks)
        out = sink.extract(module, inputs, output)
        captured = (
            out.logits.detach(),  # [tokens, E]
            out.index.detach(),  # [tokens, k]
            out.weights.detach(),  # [tokens, k]
            None if out.dropped is None else out.dropped.detach(),  # [tokens, k]
            # routes.margin in the router's own score space (sigmoid + bias): taken here, since the bias may be
            # updated before step(); softmax routers' margins come from the logits at step(), kept tokens only.
            # A run that keeps no routes (max_tokens_per_step=0) needs none (a constant: no recompile)
            None if out.scores is None or self.max_tokens_per_step == 0
            else routing_margin(out.scores, out.index),  # [tokens]
        )
        sink.out = sink.out + (captured,)  # a new tuple, not an append: see _Sink

    # -- steps -------------------------------------------------------------------------------------------------

    def step(
        self,
        step: int,
        token_ids: Any = None,
        attention_mask: Any = None,
        domain: str | Sequence[str | None] | None = None,
        tag: str = "train",
        sample_ids: Sequence[Any] | None = None,
    ) -> None:
        """Close step `step`: everything routed since the previous step() belongs to it.

        token_ids / attention_mask [batch, seq] describe the step's tokens when given (the rows of all its
        forwards, in order); otherwise those captured from each forward's `input_ids` / `attention_mask` are
        used. domain: one label, or one per sequence. sample_ids: the user's key of each sequence (a request or
        dataset id; stored as text in sequences.sample_id), one per sequence or None. Every sequence whose token ids
        are known also gets sequences.seq_key, a hash of its token ids computed on the host by the writer thread
        (the ids travel with the flush's one device-to-host copy, 4 bytes per token of the step).
        No host sync unless this step triggers a flush.
        A bad argument raises RecorderError and keeps the step's forwards buffered: call step() again, corrected.
        A step number given before adds to that step (warned once): its counts and sums then include both calls,
        and this call's sequences are numbered after the earlier ones', as for two forwards of one step.
        If the step's aggregates cannot be computed (say, the device runs out of memory), the step is lost, with a
        RecordingWarning, and training goes on (strict=True: the error propagates).
        """
        self._check_usable()
        step = _step_number(step)
        self._collect()
        calls, forwards = self._calls, self._forwards
        if not any(calls):
            self.discard()
            self._count_step_and_flush()
            return
        seq_offset = self._step_seqs.get(step)
        if seq_offset is not None:
            self._recording_problem("repeat", f"step {step} was given to step() twice: the store keeps both as one "
                                    "step (its counts and sums include both calls, counted twice if it was the same "
                                    "batch; the second call's sequences are numbered after the first's). Give each "
                                    "step() call its own step number")
        # built before discarding: if an argument is wrong, the step's routing stays buffered for a corrected call
        try:
            record = self._step_record(step, calls, forwards, token_ids, attention_mask, domain, str(tag),
                                       seq_offset or 0, sample_ids)
        except (RecorderError, AssertionError):  # misuse, or a test's guard (a host-sync detector): never hidden
            raise
        except Exception as e:
            if self.strict:
                raise
            self.discard()
            self._recording_failed(f"step {step} was not recorded (its aggregates could not be computed)", e)
            self._count_step_and_flush()
            return
        self.discard()
        self._step_seqs[step] = (seq_offset or 0) + len(record.domains)
        self._pending.append(record)
        self.steps_recorded += 1
        self._count_step_and_flush()

    def _count_step_and_flush(self) -> None:
        """Flushes follow completed step() calls, not recorded steps: with reduce_ranks every rank must reach its
        flush (a collective) at the same call, also when a step of its own could not be recorded or had no
        forwards. A call that raised RecorderError (a bad argument, retried corrected) is not counted."""
        self._steps_since_flush += 1
        if self._steps_since_flush >= self.flush_every:
            self.flush()

    def _step_record(self, step, calls, forwards, token_ids, attention_mask, domain, tag,
                     seq_offset: int = 0, sample_ids: Any = None) -> _StepRecord:
        device = next(c[0][0].device for c in calls if c)
        main = self._main_stream([f[0] for f in forwards], token_ids, attention_mask, device, seq_offset)
        dec_segments = self._known([f[1] for f in forwards])
        dec = _Stream(dec_segments, device, seq_offset) if dec_segments else None
        sampled = step % self.sample_every == 0
        n_seqs = main.n_seqs if main is not None else 0
        record = _StepRecord(step, tag, self._domains(domain, n_seqs, step), seq_offset=seq_offset,
                             sample_ids=self._sample_ids(sample_ids, n_seqs, step))
        concatenated = [_concat_calls(c) if c else None for c in calls]
        routed: list[tuple] = []  # (site, stream, index, keep) of the layers that saw a known token stream
        balances = balance.SequenceBalance()  # per-sequence balance losses, pooled per stream for Switch
        for i, site in enumerate(self.sites):
            if concatenated[i] is None:
                continue
            logits, index, weights, dropped, margin = concatenated[i]
            stream = self._stream_for(site, logits.shape[0], main, dec)
            if stream is not None and site.expert_capacity is not None and not self._capacity_known:
                self._write_capacity_factor(site, stream.seq_len)
            dev = logits.device
            if stream is not None:
                seq, pos, tid, mask = stream.on(dev)
            else:  # no token layout: every token counts, adjacency is unknown (NULL)
                seq = pos = tid = None
                mask = torch.ones(logits.shape[0], dtype=torch.bool, device=dev)
            # NaN/inf logits or weights: counted in the aggregates, left out of everything else (no sync here)
            lse = router_lse(logits)  # [N]
            finite = finite_tokens(logits, weights, lse=lse)  # [N]
            keep = mask & finite  # [N]
            if stream is not None:
                routed.append((site, stream, index, keep))
                sums = balances.layer(id(stream), logits, index, keep, seq - seq_offset, stream.n_seqs, lse)
                record.pieces.append(_piece(balance.BALANCE_PIECE, site.layer, sums))
            order = None if stream is None or stream.order is None else stream.order.to(dev, non_blocking=True)
            agg = layer_aggregates(logits, index, dropped, mask, seq, pos, finite=finite, lse=lse, order=order)
            record.pieces.append(_piece("agg", site.layer, agg))
            if self.pair_stats:
                record.pieces.append(_piece("pairs", site.layer, pair_counts(index, keep, int(site.n_experts))))
            if sampled and stream is not None and self.max_tokens_per_step != 0:
                sel, valid = stream.kept(dev, self.max_tokens_per_step)  # [M], [M]: the same tokens in every layer
                ints, w = packed_routes(sel, valid & finite[sel], seq, pos, tid, index, weights, site.weight_scale,
                                        dropped=dropped, margin=kept_margin(logits, index, sel, margin, lse))
                record.pieces += [_piece("route_ints", site.layer, ints), _piece("route_weights", site.layer, w)]
        record.pieces += [_piece(kind, layer, t) for kind, layer, t in self._biases.pieces()]
        for (a, _, index_a, keep_a), (b, _, index_b, keep_b) in self._flow_pairs(routed):
            both = keep_a & keep_b.to(keep_a.device, non_blocking=True)  # [N]: finite in both layers
            counts = flow_counts(index_a, index_b, both, int(a.n_experts), int(b.n_experts))
            record.pieces.append(_piece("flow", a.layer, counts, layer_b=b.layer))
        if main is not None:
            if main.has_ids and main.key_ids is not None:  # ids inside the mask, for sequences.seq_key (hashed later)
                record.pieces.append(_piece("seq_ids", None, main.key_ids))
                record.seq_shapes = main.key_shapes
            prompt = main.prompt_tokens if dec is None else dec.prompt_tokens  # enc-dec: the decoder's prompt
            if prompt.shape[0] != main.n_seqs:
                prompt = torch.full_like(main.n_per_seq, -1)
            seqs = torch.stack([main.n_per_seq.to(torch.int64), prompt.to(main.n_per_seq.device, torch.int64)], 1)
            record.pieces.append(_piece("seqs", None, seqs))  # [n_seqs, 2]: n_tokens, prompt_tokens (-1 = NULL)
        return record

    def _flow_pairs(self, routed: list[tuple]) -> list[tuple[tuple, tuple]]:
        """The pairs of layers (in model order) whose flow is counted: both routed the same tokens in the same
        order (one stream: an encoder's layers pair among themselves, a decoder's among themselves)."""
        if self.flow_stats is None:
            return []
        same = [(x, y) for i, x in enumerate(routed) for y in routed[i + 1 :]
                if x[1] is y[1] and x[2].shape[0] == y[2].shape[0]]
        if self.flow_stats == "all":
            return same
        nxt = {id(x[0]): y[0] for x, y in zip(routed, routed[1:])}
        return [(x, y) for x, y in same if nxt.get(id(x[0])) is y[0]]

    def _main_stream(self, segments, token_ids, attention_mask, device, seq_offset: int = 0) -> _Stream | None:
        """The step's token layout: explicit token_ids/attention_mask win, else the captured forwards.

        Given rows that match the captured sequences (one row per sequence, as wide as the forwards covered; wider
        when the step was a generate() call, whose output holds the last new token that no forward saw), each
        forward's part of them replaces what was captured, so decode tokens keep their rows and positions; the full
        rows are what `sequences.seq_key` hashes."""
        captured = self._known(segments)
        if token_ids is None and attention_mask is None:
            return _Stream(captured, device, seq_offset) if captured else None
        ids = _as_2d(token_ids, "token_ids") if token_ids is not None else None
        mask = _as_2d(attention_mask, "attention_mask") if attention_mask is not None else None
        if ids is not None and mask is not None and ids.shape != mask.shape:
            raise RecorderError(
                f"token_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must have the same shape"
            )
        n_rows, width = tuple((ids if ids is not None else mask).shape)
        if captured:
            groups, placed = _layout(captured, seq_offset)
            ends = {g.width for g in groups}
            generation = any(g.prompt or len(g.segments) > 1 for g in groups)
            if (sum(g.batch for g in groups) == n_rows and len(ends) == 1 and all(g.cols[0] == 0 for g in groups)
                    and (width == min(ends) or (generation and width > min(ends)))):
                covered = min(ends)
                given = []
                for sg, row, col in placed:
                    r = slice(row - seq_offset, row - seq_offset + sg.batch)
                    c = slice(col, col + sg.seq_len)
                    given.append(dataclasses.replace(sg, ids=sg.ids if ids is None else ids[r, c],
                                                     mask=sg.mask if mask is None else mask[r, c]))
                if width == covered:
                    return _Stream(given, device, seq_offset)
                if mask is None:  # the forwards' masks, then the columns no forward saw (inside: generated)
                    seen = torch.cat([torch.cat([_Stream._mask(sg, device) for sg in g.segments], dim=1)
                                      for g in groups])  # [R, covered]
                    mask = torch.cat([seen, torch.ones((n_rows, width - covered), dtype=torch.bool, device=device)], 1)
                return _Stream(given, device, seq_offset, ids_for_keys=ids, mask_for_keys=mask)
        return _Stream([_Segment(ids, mask, n_rows, width)], device, seq_offset)

    def _known(self, segments) -> list[_Segment] | None:
        """The forwards whose token layout is known, or None. An encoder-decoder model's forwards that did not run
        the encoder (generate()'s decode steps get `encoder_outputs`) have no encoder segment and are skipped; the
        encoder's own call (generate() calls it directly) brought one. Elsewhere one unknown forward makes the
        layout unknown."""
        if self._is_encoder_decoder:
            known = [sg for sg in segments if sg is not None]
            return known or None
        return list(segments) if segments and all(sg is not None for sg in segments) else None

    def _write_capacity_factor(self, site, seq_len: int) -> None:
        """runs.capacity_factor for fixed-capacity routers (Switch: expert_capacity tokens per expert and
        sequence), known once the first step's sequence length is: expert_capacity * n_experts / seq_len."""
        self._capacity_known = True
        factor = site.capacity_factor_for(seq_len)
        if factor is None:
            return
        meta = dict(self._run_metadata(), capacity_factor=float(factor))
        self._writer_thread.submit(lambda w: w.write_run(meta),  # replaces the runs row written at start()
                                   "runs.capacity_factor was not written")

    def _stream_for(self, site, n_tokens: int, main: _Stream | None, dec: _Stream | None) -> _Stream | None:
        """The token stream whose layout matches what this router saw, or None (warned once per layer)."""
        if self._is_encoder_decoder and site.stack == "decoder":  # never align decoder tokens to encoder inputs
            main = dec
        if main is not None and main.n == n_tokens:
            return main
        if site.layer not in self._warned_layers:
            self._warned_layers.add(site.layer)
            known = f"{main.n}" if main is not None else "none captured"
            warnings.warn(
                f"moeviz: router {site.name} saw {n_tokens} tokens in a step, which matches no input batch "
                f"(tokens per step: {known}); its aggregates count every token it saw (no mask) and no per-token "
                "detail is kept for it. Pass token_ids/attention_mask to step() if the model reshapes its inputs.",
                stacklevel=3,
            )
        return None

    def _sample_ids(self, sample_ids, n_seqs: int, step: int) -> list[str | None] | None:
        if sample_ids is None:
            return None
        if isinstance(sample_ids, (str, bytes)):
            raise RecorderError(f"step {step}: sample_ids must be a list with one id per sequence, got a string")
        ids = [None if x is None else str(x) for x in sample_ids]
        if len(ids) != n_seqs:
            raise RecorderError(
                f"step {step}: sample_ids has {len(ids)} ids but the step has {n_seqs} sequences; give one id per "
                "sequence (all forwards of the step, in order)"
            )
        return ids

    def _domains(self, domain, n_seqs: int, step: int) -> list[str | None]:
        d = self.domain if domain is None else domain
        if d is None or isinstance(d, str):
            return [d] * n_seqs
        labels = [None if x is None else str(x) for x in d]
        if len(labels) != n_seqs:
            raise RecorderError(
                f"step {step}: domain has {len(labels)} labels but the step has {n_seqs} sequences; give one "
                "label per sequence (all forwards of the step, in order) or a single string"
            )
        return labels

    # -- flushing ----------------------------------------------------------------------------------------------

    def flush(self, *, closing: bool = False) -> None:
        """Copy the buffered steps to the host (one copy) and hand them to the writer thread.

        If the copy fails, or later the writer thread cannot write them, these steps are lost on their own: one
        RecordingWarning, the run marked degraded, training goes on (strict=True: the copy's error propagates, the
        writer thread's is raised as RecorderError at the next call). `closing`: the last flush of close(), which
        with reduce_ranks tells the other ranks that this one takes part in no more sums.
        """
        self._raise_writer_error()
        records, self._pending = self._pending, []
        self._steps_since_flush = 0
        if not self.reduce_ranks and not any(rec.pieces for rec in records):
            return
        steps = steps_text([rec.step for rec in records])
        try:
            if self.reduce_ranks:  # every rank joins the collective, even with nothing to flush
                records, host = self._reduced_flush(records, closing)
            else:
                host = _host_copy([pc for rec in records for pc in rec.pieces])
        except AssertionError:  # a test's guard: never hidden
            raise
        except Exception as e:
            if self.strict:
                raise
            self._recording_failed(f"the flush of {steps} could not be copied off the device ({steps} lost)", e)
            return
        finally:
            for rec in records:
                for pc in rec.pieces:
                    pc.tensor = None  # the layout travels to the writer thread, the device memory is freed here
        if host is None:  # reduce_ranks: a rank with nothing of its own to write (its sums are the first rank's)
            return
        layer_experts = {site.layer: int(site.n_experts) for site in self.sites}
        rank = self.rank
        nonfinite = self._nonfinite

        def write(writer) -> None:
            tables = _tables_from_host(host, records, rank, layer_experts)
            nonfinite.extend(_nonfinite_rows(tables.get("layer_stats")))  # warned by the training thread
            writer.write_flush(tables)

        self._writer_thread.submit(write, f"the flush of {steps} was not written ({steps} lost)")
        self.flushes += 1

    def _reduced_flush(self, records: list[_StepRecord], closing: bool) -> tuple[list[_StepRecord], np.ndarray | None]:
        """reduce_ranks: sum the flush's step aggregates over the group and copy to the host what this rank writes.
        Returns the records this rank writes and their host bytes (None: nothing to write).

        First every rank sums a fixed-size head: (x, x^2) of a signature s of what it would sum (steps, kinds,
        layers, shapes) and of its size n, and whether it is closing. The sums equal (W x, W x^2) only if every
        rank's s and n equal this one's (their mean is s, their variance 0), and every rank reads the same sums,
        so all take the same path: the aggregates are summed (one all_reduce per dtype, of buffers of one size:
        the float64 layer aggregates, the int32 pair and flow counts, which stay below 2^31 as long as a step of the
        whole group routes fewer than 2^31 tokens) and written by the group's first rank alone; or, when the ranks' steps differ, each rank writes
        its own aggregates for this flush (no data lost: a step holds either the group's sums or every rank's rows,
        and each analysis, which sums over ranks, gives the same answer). A sum that a closing rank joined ends the
        reduction on every rank: the later flushes of the ranks still stepping are per rank, so no collective waits
        for a rank that will never join it. Costs one more host sync per flush (the head's verdict)."""
        import torch.distributed as dist

        reducible = [pc for rec in records for pc in rec.pieces if pc.kind in _REDUCED_KINDS]
        own = [pc for rec in records for pc in rec.pieces]
        device = own[0].tensor.device if own else _collective_device(self.reduce_group)
        sig = float(self._signature(records))
        n = sum(int(np.prod(pc.shape)) for pc in reducible)
        mine = (sig, float(n % (1 << 20)), float(n >> 20))  # n in two parts: each one's square x W stays exact
        # the buffers to sum, built before the first collective; a rank that fails here (out of memory) still joins
        # the head, with its failure flag set, so every rank writes this flush per rank and no collective is left
        # waiting (its own steps are lost, its error raised after the head)
        kinds = {dtype: [pc for pc in reducible if pc.tensor.dtype == dtype]  # float64 sums; int32 counts as int32
                 for dtype in dict.fromkeys(pc.tensor.dtype for pc in reducible)}  # same kinds, order on every rank
        try:
            bufs = {dtype: torch.cat([pc.tensor.reshape(-1).to(device) for pc in same])
                    for dtype, same in kinds.items()}
            failure = None
        except Exception as e:  # noqa: BLE001 - re-raised after the head
            bufs, failure = {}, e
        head = torch.tensor([v for x in mine for v in (x, x * x)] + [float(closing), float(failure is not None)],
                            dtype=torch.float64).to(device)  # [8]
        dist.all_reduce(head, op=dist.ReduceOp.SUM, group=self.reduce_group)
        summed = head.cpu().numpy()  # note: a host sync (the verdict every rank must read before the data's sum)
        if failure is not None:
            raise failure
        # a closing rank joined this sum: the later flushes are per rank (said after this flush's collectives, as
        # strict=True raises it: a raise before the data's sum would leave the closing rank waiting in it)
        ended = summed[6] > 0 and not closing
        if ended:
            self.reduce_ranks = False
        flushed = f"{steps_text([r.step for r in records]) if records else 'no steps'} on rank {self.rank}"
        if summed[7] > 0:
            if ended:
                self._say_reduce_ended()
            self._recording_problem("reduce_failed", "a rank of the reduce group could not build its part of the "
                                    f"sum of a flush ({flushed}): each other rank wrote its own aggregates for that "
                                    "flush instead (no data of theirs lost)")
            return records, (_host_copy(own) if own else None)
        if not _same_over_ranks(summed[:6], mine, _group_size(self.reduce_group)):
            if ended:
                self._say_reduce_ended()
            self._recording_problem("reduce_mismatch", "the ranks of the reduce group flushed different steps, "
                                    f"layers or shapes ({flushed}), so their sums would mix them: each rank wrote its "
                                    "own aggregates for that flush instead (no data lost). Give every rank the same "
                                    "forwards and step() calls")
            return records, (_host_copy(own) if own else None)
        summed_of: dict[int, Tensor] = {}
        for dtype, buf in bufs.items():  # [n of this dtype]
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.reduce_group)
            off = 0
            for pc in kinds[dtype]:
                size = int(np.prod(pc.shape))
                summed_of[id(pc)] = buf[off:off + size].reshape(pc.shape)
                off += size
        leader = min(dist.get_process_group_ranks(self.reduce_group)) if self.reduce_group is not None else 0
        if dist.get_rank() == leader:  # the sums in place of its own aggregates
            ranks = _group_size(self.reduce_group)
            reduced = [dataclasses.replace(rec, pieces=[dataclasses.replace(pc, tensor=summed_of[id(pc)])
                                                        if id(pc) in summed_of else pc for pc in rec.pieces],
                                           ranks_summed=ranks)
                       for rec in records]
        else:  # its routes and sequences only
            reduced = [dataclasses.replace(rec, pieces=[pc for pc in rec.pieces if pc.kind not in _REDUCED_KINDS])
                       for rec in records]
        pieces = [pc for rec in reduced for pc in rec.pieces]
        host = _host_copy(pieces) if pieces else None
        if ended:
            self._say_reduce_ended()
        return reduced, host

    def _say_reduce_ended(self) -> None:
        self._recording_problem("reduce_end", f"rank {self.rank} stepped on after a rank of the reduce group closed "
                                "its Recorder; its later step aggregates are written per rank (no data lost; every "
                                "analysis sums the ranks). Give every rank the same number of step() calls to keep "
                                "one summed row per step")

    @staticmethod
    def _signature(records: list[_StepRecord]) -> int:
        """What a flush sums (steps, kinds, layers, shapes, in order), as `_layout_signature`."""
        return _layout_signature([(rec.step, pc.kind, pc.layer, pc.layer_b, pc.shape)
                                  for rec in records for pc in rec.pieces if pc.kind in _REDUCED_KINDS])

    # -- recording problems: warned once (or raised, strict) and kept in the run -------------------------------

    def _recording_problem(self, kind: str, message: str) -> None:
        """One RecordingWarning per kind of problem (strict: RecorderError every time)."""
        text = f"moeviz: {message} (run {self.path})."
        if self.strict:
            raise RecorderError(text + " Raised because Recorder(strict=True); by default this is a warning")
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(text + " Further such problems of this Recorder are not warned about.", RecordingWarning,
                          stacklevel=_caller_stacklevel())

    def _recording_failed(self, what: str, error: BaseException) -> None:
        """Data of a failed step or flush (on the training thread) is lost: count it in the run, warn once."""
        message = f"{what}: {_error_text(error)}"
        self._writer_thread.submit(lambda w: w.record_error(message), "a recording error was not saved in the run")
        self._lost(message)

    def _lost(self, message: str) -> None:
        self.recording_errors.append(message)
        self._recording_problem(
            "lost", f"recording failed and training goes on without it: {message}. The run is marked degraded "
            "(runs.recording_errors, runs.recording_error; rec.recording_errors lists each failure); later steps "
            "are still written when possible")

    def _report(self) -> None:
        """Warn about (or, strict, raise for) what the writer thread found since the last call: failed jobs and
        non-finite router outputs. The writer thread only appends to lists; warnings belong to this thread."""
        wt = self._writer_thread
        if wt is None:
            return
        failures = wt.failures[self._failures_seen :]
        self._failures_seen += len(failures)
        for what, e in failures:
            if not self.strict:  # strict: wt.error is raised by _raise_writer_error
                self._lost(f"{what}: {_error_text(e)}")
        found = self._nonfinite[self._nonfinite_seen :]
        self._nonfinite_seen += len(found)
        if found:
            step, layer, n = found[0]
            more = len(found) - 1
            self._recording_problem(
                "nonfinite", f"router logits or gate weights were NaN or infinite for {n} token(s) of layer {layer} "
                f"at step {step}" + (f" (and in {more} more layer-step(s))" if more else "") + "; those tokens are "
                "left out of the recorded sums, counts and routes, and counted in layer_stats.nonfinite_tokens "
                "(`moeviz check` flags them)")

    def _check_usable(self) -> None:
        if not self._started:
            raise RecorderError("Recorder not started: use `with Recorder(...) as rec:` or call rec.start() first")
        if self._closed:
            raise RecorderError("Recorder is closed; make a new one to record again")
        self._raise_writer_error()
        self._report()

    def _raise_writer_error(self) -> None:
        wt = self._writer_thread
        if wt is not None and wt.error is not None:
            raise RecorderError(
                f"moeviz could not write the run at {self.path}: {wt.error!r}. What was written before is "
                f"intact and readable. Writer traceback:\n{wt.error_trace}"
            ) from wt.error

    def _finish(self, error: BaseException | None) -> None:
        """Remove hooks (always), flush, close the run as finished or failed; raise our own error only when the
        user's code did not raise one."""
        if self._closed:
            return
        self._closed = True
        _OPEN_RECORDERS.discard(self)
        own_error: BaseException | None = None
        try:
            self._remove_hooks()
            self._collect(check=False)
            if error is None and self._router_calls == 0:
                warnings.warn(self._never_fired_message(), stacklevel=3)
            if error is None and any(self._calls):
                warnings.warn(
                    f"moeviz: {max(len(c) for c in self._calls)} forward(s) since the last step() were not "
                    f"recorded (run {self.path}): call rec.step(step) after the forwards of each step, also the "
                    "last one",
                    stacklevel=3,
                )
        finally:
            self.discard()
            if self._writer_thread is not None:
                try:
                    if (self._pending or self.reduce_ranks) and self._writer_thread.error is None:
                        self.flush(closing=True)  # reduce_ranks: the closing sum, also with nothing pending
                except BaseException as e:
                    own_error = e
                wt = self._writer_thread
                failure = error or own_error or wt.error
                status = "failed" if failure is not None else "finished"
                text = None if failure is None else _error_text(failure)
                wt.submit(lambda w: w.close(status=status, error=text), "the run was not closed (its status file "
                          "was not written: it reads as interrupted)", always=True)
                wt.stop()
                try:
                    self._report()  # what the writer thread found after the last step() (its last flush, close)
                except RecorderError as e:  # strict
                    own_error = own_error or e
                already_raised = error is not None and (error is wt.error or error.__cause__ is wt.error)
                if own_error is None and wt.error is not None and not already_raised:
                    own_error = RecorderError(
                        f"moeviz could not write the run at {self.path}: {wt.error!r}. What was written before "
                        f"is intact and readable. Writer traceback:\n{wt.error_trace}"
                    )
                    own_error.__cause__ = wt.error
        if own_error is not None:
            if error is None:
                raise own_error
            warnings.warn(f"moeviz: while closing after an error, the recorder also failed: {own_error!r}")

    def _never_fired_message(self) -> str:
        """Why a run recorded nothing, as far as the Recorder can tell."""
        names = ", ".join(s.name for s in self.sites[:3]) + (", ..." if len(self.sites) > 3 else "")
        if self._model_calls == 0:
            cause = (
                f"{type(self.model).__name__} itself was never called while the Recorder was open (not paused): "
                "call the model you gave the Recorder (a DDP/FSDP wrapper or torch.compile result of it is fine), "
                "inside the `with` block"
            )
        else:
            cause = (
                f"the model ran {self._model_calls} forward(s) but none went through its routers' hooks ({names}): "
                "the routers were called by code that bypasses nn.Module hooks, or by a compiled function built "
                "while torch.compile caches were not reset (call torch.compiler.reset() after Recorder.start() "
                "if you compiled with a backend that keeps its own cache), or the Recorder was given a copy of "
                "the model that is not the one being run"
            )
        return f"moeviz: no router hook fired during run {self.path}, so nothing was recorded: {cause}."

    # -- metadata ----------------------------------------------------------------------------------------------

    def _run_metadata(self) -> dict:
        caps = [s.capacity_factor for s in self.sites if s.capacity_factor is not None]
        return dict(
            model_class=type(self.model).__name__,
            n_layers=len(self.sites),
            n_experts=max(int(s.n_experts) for s in self.sites),
            top_k=max(int(s.top_k) for s in self.sites),
            capacity_factor=float(caps[0]) if caps else None,
            config=_config_dict(self.model, self.config),
            sample_every=self.sample_every,
            max_tokens_per_step=self.max_tokens_per_step,
        )

    def _layer_rows(self) -> list[dict]:
        return [
            dict(
                layer=int(s.layer),
                module_name=s.name,
                n_experts=int(s.n_experts),
                top_k=int(s.top_k),
                block_index=None if s.block_index is None else int(s.block_index),
                stack=s.stack,
                # per layer, so each stack of an encoder-decoder has its own (runs.capacity_factor is one number)
                capacity_factor=None if s.expert_capacity is not None or s.capacity_factor is None
                else float(s.capacity_factor),
                expert_capacity=None if s.expert_capacity is None else int(s.expert_capacity),
            )
            for s in self.sites
        ]


_OPEN_RECORDERS: "weakref.WeakSet[Recorder]" = weakref.WeakSet()


@atexit.register
def _close_open_recorders() -> None:
    """At interpreter exit, close recorders that were started but never closed (a script that raised outside a
    `with` block, or that ended without close()): their buffered steps are flushed and the run is marked failed
    with the unhandled exception (or finished if there was none), instead of losing the last flush_every steps
    and showing as interrupted. (kill -9 runs no exit handler: the run then shows as interrupted, with everything
    flushed before.)"""
    import sys

    crash = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)  # set for an unhandled exception
    for rec in list(_OPEN_RECORDERS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rec._finish(crash)
        except Exception:  # noqa: BLE001 - nothing can be reported at exit; the segments already written stay
            pass


def _step_number(step: Any) -> int:
    """The step as a Python int (numpy and 0-d integer tensors accepted); RecorderError otherwise."""
    if isinstance(step, (bool, float, str)) or step is None:
        raise RecorderError(f"step() takes an integer step number; got {step!r} ({type(step).__name__})")
    try:
        return operator.index(step)
    except TypeError:
        raise RecorderError(f"step() takes an integer step number; got {type(step).__name__}") from None


def _caller_stacklevel() -> int:
    """The warnings.warn stacklevel, for a warn() in the function that calls this, that points at the first frame
    outside this module: the user's step() / with-block line, whichever path inside the Recorder got there."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _nonfinite_rows(layer_stats: dict | None) -> list[tuple[int, int, int]]:
    """(step, layer, tokens) of the layer_stats rows of a flush (host arrays) that counted non-finite tokens."""
    if not layer_stats or "nonfinite_tokens" not in layer_stats:
        return []
    n = np.nan_to_num(layer_stats["nonfinite_tokens"])
    return [(int(layer_stats["step"][i]), int(layer_stats["layer"][i]), int(n[i])) for i in np.flatnonzero(n > 0)]


def _concat_calls(calls: list) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """One layer's router calls of a step (one per forward) as single tensors [N, ...]: logits, index, weights,
    dropped (None if the router never drops), margin (None if the hook left it to step(): softmax routers)."""
    logits = torch.cat([c[0] for c in calls]) if len(calls) > 1 else calls[0][0]  # [N, E]
    index = torch.cat([c[1] for c in calls]) if len(calls) > 1 else calls[0][1]  # [N, k]
    weights = torch.cat([c[2] for c in calls]) if len(calls) > 1 else calls[0][2]  # [N, k]
    if all(c[3] is None for c in calls):
        dropped = None
    else:
        dropped = torch.cat(
            [c[3] if c[3] is not None else torch.zeros(c[1].shape, dtype=torch.bool, device=c[1].device) for c in calls]
        )  # [N, k]
    margin = None if any(c[4] is None for c in calls) else torch.cat([c[4] for c in calls])  # [N]
    return logits, index, weights, dropped, margin


def _kv_cache(bound: dict) -> Any:
    """The KV cache a forward was given (transformers 5 calls it `cache`, 4.x `past_key_values`), or None."""
    for name in ("cache", "past_key_values"):
        value = bound.get(name)
        if value is not None and not isinstance(value, (bool, int, str)):
            return value
    return None


def _positional_params(forward: Callable) -> list[str]:
    """Names of the parameters that positional arguments of `forward` bind to (stops at *args)."""
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return []
    names = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return names


def _distributed_rank_and_size() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _config_dict(model: nn.Module, config: dict | None) -> dict | None:
    """The run's config as JSON-safe data: the user's dict, else the HF config's `to_dict()`, else the fields of a
    dataclass config (Megatron-Core's TransformerConfig: its routing settings, e.g. the scaling factor that
    stored weights were divided by); values JSON cannot hold are stored as their str()."""
    if config is None:
        cfg = getattr(model, "config", None)
        if hasattr(cfg, "to_dict"):
            config = cfg.to_dict()
        elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            config = {f.name: getattr(cfg, f.name, None) for f in dataclasses.fields(cfg)}
    if config is None:
        return None
    return json.loads(json.dumps(config, default=str))


def _vocab_texts(tokenizer: Any) -> tuple[np.ndarray, list[str]]:
    """(token ids, texts) for every id of the tokenizer, added tokens included."""
    try:
        try:
            n = len(tokenizer)
        except TypeError:
            n = int(tokenizer.vocab_size)
        ids = list(range(n))
        if hasattr(tokenizer, "convert_ids_to_tokens"):
            texts = tokenizer.convert_ids_to_tokens(ids)
        else:
            texts = [tokenizer.decode([i]) for i in ids]
    except (AttributeError, TypeError, ValueError) as e:
        raise RecorderError(
            f"tokenizer= must be a tokenizer with len() (or vocab_size) and convert_ids_to_tokens() or decode(), "
            f"e.g. transformers.AutoTokenizer; got {type(tokenizer).__name__} ({e})"
        ) from None
    return np.arange(n, dtype=np.int64), ["" if t is None else str(t) for t in texts]


def _error_text(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()
