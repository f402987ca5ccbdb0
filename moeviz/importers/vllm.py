"""vLLM's routed experts (`vllm serve --enable-return-routed-experts`) from a JSONL of saved responses.

vLLM writes no file: each response carries the experts every token was routed to, and users save the response
bodies, one per line. Two layouts exist, by version:
- nested lists: `prompt_routed_experts` at the response level ([prompt tokens][layers][top_k]) and
  `choices[i].routed_experts` ([generated tokens - 1][layers][top_k]), int ids;
- a base64 `.npy` per choice: `choices[i].routed_experts` = base64 of an array [prompt + generated - 1, layers,
  top_k] (uint8/uint16), with `prompt_token_ids` (response or choice) and `choices[i].token_ids` beside it.
Row i is position i of prompt + generated tokens; the last generated token was never fed back, so it has no row.
The layer axis counts either every hidden layer (dense ones all zero) or the MoE layers only, by version: a layer
whose every row is all zeros is a placeholder and is left out (a real top-k layer with k >= 2 never picks expert
0 twice). There is no step, rank, weight or probability: the run has one step (0) and rank 0, each choice one
sequence (the first choice carries the prompt's rows, later choices only their generated tokens, so the prompt
is counted once), and `sample_id` is the response id (`id#i` for choice i when a response has several).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np

from moeviz.importers.jsonl import read_jsonl
from moeviz.importers.source import ImportSummary, SourceError, n_experts_of
from moeviz.importers.staging import StagedRun
from moeviz.importers.tokens import Chunk, layer_has_experts, top_k_of, write_chunks
from moeviz.store.layout import sequence_key

UNKNOWN = ["routes.weight", "step_stats.prob_sum", "step_stats.first_choice",
           "layer_stats.z_loss_sum", "layer_stats.entropy_sum"]


def import_vllm(source, out, *, run_name: str | None = None, num_experts: int | None = None,
                progress=None) -> ImportSummary:
    """Import a JSONL of vLLM responses (one response body per line) into a new run at `out`.

    `num_experts`: the model's routed experts per layer (default: the largest id seen + 1, which misses experts
    that no token chose). Raises SourceError (file, line, what) on a source it cannot read; nothing is left at
    `out` then."""
    path = Path(source)
    if not path.is_file():
        raise SourceError(path, "is not a file: give the JSONL of saved vLLM responses")
    warnings: list[str] = []
    chunks, layouts, shape = [], set(), None
    for lineno, obj in read_jsonl(path, warnings, progress=progress):
        body = _response_body(obj)
        choices = body.get("choices")
        if not isinstance(choices, list):
            raise SourceError(path, f"line {lineno} has no 'choices' list: not a vLLM response body")
        for ci, choice in enumerate(choices):
            got = _choice_rows(path, lineno, body, choice if isinstance(choice, dict) else {}, first=ci == 0)
            if got is None:
                continue
            layout, ids, tokens, n_prompt, all_ids, first_pos = got
            layouts.add(layout)
            if shape is None:
                shape = ids.shape[1:]
            elif ids.shape[1:] != shape:
                raise SourceError(path, f"line {lineno}: routed experts of shape [tokens, {ids.shape[1]}, "
                                        f"{ids.shape[2]}], but earlier lines have [tokens, {shape[0]}, {shape[1]}] "
                                        f"(layers, top_k): inconsistent shapes")
            seq = len(chunks)
            # later choices: their generated rows only (when the prompt's rows are there to skip)
            start = 0 if ci == 0 or first_pos else n_prompt or 0
            rows = ids[start:]
            sid = str(body.get("id", f"line{lineno}")) + (f"#{choice.get('index', ci)}" if len(choices) > 1 else "")
            chunks.append(Chunk(
                step=np.zeros(len(rows), np.int64), rank=np.zeros(len(rows), np.int32),
                seq=np.full(len(rows), seq, np.int32),
                pos=np.arange(first_pos + start, first_pos + start + len(rows), dtype=np.int32),
                token_id=tokens[start:], ids=rows,
                sequences=[{"step": 0, "rank": 0, "seq": seq, "tag": "serve", "n_tokens": len(rows),
                            "seq_key": sequence_key(all_ids) if all_ids is not None else None, "sample_id": sid,
                            "pos_offset": 0, "prompt_tokens": n_prompt}]))
    if not chunks:
        raise SourceError(path, "holds no response with routed experts: start vLLM with "
                                "--enable-return-routed-experts and save the response bodies")
    n_layers = shape[0]
    placeholder = _placeholder_layers(chunks, n_layers)
    for c in chunks:
        c.ids[:, placeholder, :] = -1
    keep = layer_has_experts(chunks, n_layers, path)
    top = max(int(c.ids.max()) for c in chunks if c.ids.size)
    n_experts = n_experts_of(path, num_experts, top)
    ks = top_k_of(chunks, keep)
    layout = "+".join(sorted(layouts))
    with StagedRun(out, run_name=run_name) as run:
        run.write_meta({
            "model_class": "vllm-import", "n_layers": int(keep.sum()), "n_experts": n_experts, "top_k": int(ks.max()),
            "config": {"source": "vllm", "layout": layout, "path": str(path.absolute()),
                       "source_layers": n_layers, "placeholder_layers": np.flatnonzero(~keep).tolist(),
                       "num_experts_given": num_experts, "unknown": UNKNOWN}},
            [{"layer": i, "module_name": f"layers.{int(b)}", "n_experts": n_experts,
              "top_k": int(ks[i]), "block_index": int(b), "stack": "decoder"}
                                 for i, b in enumerate(np.flatnonzero(keep))])
        routes, seqs, assigned = write_chunks(run, chunks, keep, n_experts)
        run.publish()
    return ImportSummary(run.out, f"vllm-{layout}", 1, 1, seqs, routes, assigned, np.flatnonzero(keep).tolist(),
                         np.flatnonzero(~keep).tolist(), n_experts, int(ks.max()), UNKNOWN, warnings)


def _response_body(obj: dict) -> dict:
    """The response body itself, or the one an OpenAI batch-output line wraps (`{"response": {"body": ...}}`)."""
    if "choices" not in obj and isinstance(obj.get("response"), dict):
        inner = obj["response"]
        return inner.get("body", inner) if isinstance(inner.get("body", inner), dict) else obj
    return obj


def _ids_array(path: Path, lineno: int, value, what: str) -> np.ndarray:
    """[rows, layers, top_k] int16 from nested lists or a base64 .npy string."""
    if isinstance(value, str):
        try:
            payload = base64.b64decode(value, validate=True)
            if not payload.startswith(b"\x93NUMPY"):
                raise ValueError("no .npy header")
            a = np.load(io.BytesIO(payload), allow_pickle=False)
        except (binascii.Error, ValueError, EOFError, OSError) as e:
            raise SourceError(path, f"line {lineno}: {what} is a string but not a base64 .npy array ({e})") from None
    else:
        try:
            a = np.asarray(value)
        except ValueError:
            a = np.asarray([], dtype=object)
        if a.dtype == object or (a.size and a.dtype.kind not in "iu"):
            raise SourceError(path, f"line {lineno}: {what} is not a [tokens][layers][top_k] list of integer ids "
                                    f"(rows of different lengths: inconsistent shapes)")
    if a.size == 0 and a.ndim < 3:
        a = a.reshape(0, 0, 0)
    if a.ndim != 3 or a.dtype.kind not in "iu":
        raise SourceError(path, f"line {lineno}: {what} has shape {list(a.shape)} ({a.dtype}); expected "
                                f"[tokens, layers, top_k] integer ids")
    if a.size and (int(a.min()) < 0 or int(a.max()) > np.iinfo(np.int16).max):
        raise SourceError(path, f"line {lineno}: {what} holds expert ids outside [0, 32767]")
    return a.astype(np.int16)


def _choice_rows(path: Path, lineno: int, body: dict, choice: dict, *, first: bool):
    """(layout, ids [rows, layers, k], token ids [rows], prompt length or None, all token ids or None, position of
    row 0) of one choice, or None when it carries no routed experts. Row 0 is position 0, except in the lists
    layout without `prompt_routed_experts`: its rows are the generated tokens, from position len(prompt)."""
    value = choice.get("routed_experts")
    if value is None:
        return None
    prompt_ids = choice.get("prompt_token_ids", body.get("prompt_token_ids"))
    gen_ids = choice.get("token_ids")
    prompt_value = None  # the lists layout's prompt rows, when the response carries them
    if isinstance(value, str):
        layout = "npy"
        ids = _ids_array(path, lineno, value, "choices[].routed_experts")
        n_prompt = len(prompt_ids) if isinstance(prompt_ids, list) else None
        if n_prompt is not None and isinstance(gen_ids, list) and len(ids) != n_prompt + len(gen_ids) - 1:
            raise SourceError(path, f"line {lineno}: routed_experts has {len(ids)} rows for {n_prompt} prompt + "
                                    f"{len(gen_ids)} generated tokens (expected {n_prompt + len(gen_ids) - 1}): "
                                    f"inconsistent shapes")
    else:
        layout = "lists"
        gen = _ids_array(path, lineno, value, "choices[].routed_experts")
        prompt_value = body.get("prompt_routed_experts")
        prompt = _ids_array(path, lineno, prompt_value, "prompt_routed_experts") if prompt_value is not None \
            else np.zeros((0, *gen.shape[1:]), np.int16)
        if len(prompt) and len(gen) and prompt.shape[1:] != gen.shape[1:]:
            raise SourceError(path, f"line {lineno}: prompt_routed_experts is [tokens, {prompt.shape[1]}, "
                                    f"{prompt.shape[2]}] but routed_experts [tokens, {gen.shape[1]}, {gen.shape[2]}]: "
                                    f"inconsistent shapes")
        if isinstance(prompt_ids, list) and prompt_value is not None and len(prompt) != len(prompt_ids):
            raise SourceError(path, f"line {lineno}: prompt_routed_experts has {len(prompt)} rows for "
                                    f"{len(prompt_ids)} prompt tokens: inconsistent shapes")
        if isinstance(gen_ids, list) and len(gen) not in (len(gen_ids) - 1, len(gen_ids)):
            raise SourceError(path, f"line {lineno}: routed_experts has {len(gen)} rows for {len(gen_ids)} "
                                    f"generated tokens: inconsistent shapes")
        ids = np.concatenate([prompt, gen]) if len(prompt) else gen
        n_prompt = len(prompt) if prompt_value is not None else (len(prompt_ids) if isinstance(prompt_ids, list)
                                                                  else None)
    first_pos = n_prompt if layout == "lists" and prompt_value is None and n_prompt else 0
    all_ids = None
    tokens = np.full(len(ids), -1, np.int32)
    if isinstance(prompt_ids, list) and isinstance(gen_ids, list):
        all_ids = np.asarray(list(prompt_ids) + list(gen_ids), np.int64)
        tokens[:] = all_ids[first_pos: first_pos + len(ids)]
    return layout, ids, tokens, n_prompt, all_ids, first_pos


def _placeholder_layers(chunks: list[Chunk], n_layers: int) -> np.ndarray:
    """[source layers] bool: layers whose every row is all zeros (vLLM's rows for dense layers)."""
    nonzero = np.zeros(n_layers, bool)
    for c in chunks:
        if len(c.ids):
            nonzero |= (c.ids != 0).any(axis=(0, 2))
    return ~nonzero


