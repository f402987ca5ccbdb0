"""Routing generated here, written out in each engine's own layout, with the tables an import must give back.

Each writer returns the expected routes (a DataFrame: step, rank, seq, pos, token_id, layer, slot, expert, in
moeviz's MoE-layer numbering) and expected counts (step, rank, layer, expert, assigned, tokens), computed from
the generated routing, never from an import.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

HIDDEN = 5  # hidden layers of the generated model
DENSE = (0, 3)  # dense (non-MoE) hidden layers: the engines list them as placeholders or not at all
MOE = tuple(h for h in range(HIDDEN) if h not in DENSE)  # hidden index of each MoE layer, in order
E, K = 8, 2  # logical experts, top-k


def draw(rng, tokens: int) -> np.ndarray:
    """[tokens, MoE layers, K] distinct logical experts per token and layer, in the order a router chose them."""
    return np.stack([np.stack([rng.choice(E, K, replace=False) for _ in MOE]) for _ in range(tokens)]).astype(np.int64)


def _routes(rows: list[dict]) -> pd.DataFrame:
    cols = ["step", "rank", "seq", "pos", "token_id", "layer", "slot", "expert"]
    return pd.DataFrame(rows, columns=cols).sort_values(cols[:7]).reset_index(drop=True)


def _token_rows(step, rank, seq, pos, token_id, ids) -> list[dict]:
    return [{"step": step, "rank": rank, "seq": seq, "pos": pos, "token_id": token_id, "layer": li, "slot": s,
             "expert": int(ids[li, s])} for li in range(ids.shape[0]) for s in range(ids.shape[1])]


def counts_from_routes(routes: pd.DataFrame) -> pd.DataFrame:
    """Expected step_stats: assigned per (step, rank, layer, expert) over every expert, tokens per layer."""
    tokens = routes.groupby(["step", "rank", "layer"])[["seq", "pos"]].apply(
        lambda d: len(d.drop_duplicates())).rename("tokens").reset_index()
    grid = tokens.merge(pd.DataFrame({"expert": range(E)}), how="cross")
    assigned = routes.groupby(["step", "rank", "layer", "expert"]).size().rename("assigned").reset_index()
    out = grid.merge(assigned, how="left", on=["step", "rank", "layer", "expert"]).fillna({"assigned": 0})
    out["assigned"] = out["assigned"].astype(int)
    return out.sort_values(["step", "rank", "layer", "expert"]).reset_index(drop=True)


# ------------------------------------------------------------------------------------------------------ SGLang


def physical_map(rng, n_physical: int) -> np.ndarray:
    """[HIDDEN, P] logical expert of each physical slot: a permutation of the E experts plus redundant replicas."""
    rows = [np.concatenate([rng.permutation(E), rng.integers(0, E, n_physical - E)]) for _ in range(HIDDEN)]
    return np.stack(rows).astype(np.int64)


def sglang_passes(rng, ranks: int = 2, requests: int = 3, decode_steps: int = 3):
    """Forward passes of a DP-attention server: per rank one EXTEND pass of its requests' prompts, then DECODE
    passes of one token per request. Returns [(pass_id, rank, mode, input_ids, positions, extend_seq_lens,
    logical ids [T, MoE, K])]."""
    out = []
    for rank in range(ranks):
        prompts = [int(rng.integers(2, 6)) for _ in range(requests)]
        ids = rng.integers(0, 1000, sum(prompts))
        positions = np.concatenate([np.arange(n) for n in prompts])
        out.append((0, rank, 1, ids, positions, prompts, draw(rng, len(ids))))
        for d in range(decode_steps):
            out.append((1 + d, rank, 2, rng.integers(0, 1000, requests), np.array(prompts) + d, None,
                        draw(rng, requests)))
    return out


def _physical_ids(rng, mapping: np.ndarray, logical: np.ndarray) -> np.ndarray:
    """[HIDDEN, T, 8] physical ids (-1 padded, dense layers all -1) that map back to `logical` [T, MoE, K]."""
    t = logical.shape[0]
    out = np.full((HIDDEN, t, 8), -1, np.int32)
    for li, h in enumerate(MOE):
        for i in range(t):
            for s in range(K):
                replicas = np.flatnonzero(mapping[h] == logical[i, li, s])
                out[h, i, s] = rng.choice(replicas)
    return out


@contextlib.contextmanager
def saved_as_on_gpu():
    """torch.save inside this block records every tensor as stored on 'cuda:0', as a dump written by a GPU server
    does: loading such a file on a machine without CUDA fails unless map_location says where to put it."""
    import torch.serialization as ser

    registry = list(ser._package_registry)
    ser._package_registry[:] = [(0, lambda obj: "cuda:0", lambda obj, location: None)] + registry
    try:
        yield
    finally:
        ser._package_registry[:] = registry


def write_sglang(folder: Path, mode: str, seed: int = 0, n_physical: int = 12, on_gpu: bool = False):
    """SGLang dumps of `mode` into `folder` (tensors tagged as saved on a GPU when `on_gpu`); returns (expected
    routes or None, expected counts)."""
    with saved_as_on_gpu() if on_gpu else contextlib.nullcontext():
        return _write_sglang(folder, mode, seed, n_physical)


def _write_sglang(folder: Path, mode: str, seed: int, n_physical: int):
    import torch

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    mapping = physical_map(rng, n_physical)
    passes = sglang_passes(rng)
    rows = []
    for pid, rank, mode_id, ids, positions, lens, logical in passes:
        seqs = np.repeat(np.arange(len(lens)), lens) if lens is not None else np.arange(len(ids))
        for i in range(len(ids)):
            rows += _token_rows(pid, rank, int(seqs[i]), int(positions[i]), int(ids[i]), logical[i])
    routes = _routes(rows)
    counts = counts_from_routes(routes)
    if mode == "stat":  # summed over ranks, one buffer row per pass id, then two unfilled rows
        n_pass = max(p[0] for p in passes) + 1
        buf = np.zeros((n_pass + 2, HIDDEN, E), np.int32)
        for r in routes.itertuples():
            buf[r.step, MOE[r.layer], r.expert] += 1
        torch.save({"rank": 0, "logical_count": torch.from_numpy(buf), "average_utilization_rate_over_window": None},
                   folder / "expert_distribution_recorder_1700000000.0.pt")
        summed = counts.groupby(["step", "layer", "expert"], as_index=False)["assigned"].sum()
        summed["rank"] = 0
        return None, summed
    for rank in sorted({p[1] for p in passes}):
        records = []
        for pid, r, mode_id, ids, positions, lens, logical in passes:
            if r != rank:
                continue
            physical = _physical_ids(rng, mapping, logical)  # [HIDDEN, T, 8]
            if mode == "per_pass":
                gpc = np.zeros((HIDDEN, n_physical), np.int32)
                for h in range(HIDDEN):
                    valid = physical[h][physical[h] >= 0]
                    gpc[h] = np.bincount(valid, minlength=n_physical)
                records.append({"forward_pass_id": pid, "rank": rank, "gatherer_key": "primary",
                                "global_physical_count": torch.from_numpy(gpc)})
            else:
                records.append({"forward_pass_id": pid, "rank": rank, "gatherer_key": "primary",
                                "input_ids": ids.tolist(), "positions": positions.tolist(),
                                "extend_seq_lens": list(lens) if lens is not None else None, "forward_mode": mode_id,
                                "topk_ids_of_layer": torch.from_numpy(physical), "misc_objects": []})
        torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(mapping)},
                   folder / f"expert_distribution_recorder_1700000000.{rank}_{rank}.pt")
    return (routes if mode == "per_token" else None), counts


# ------------------------------------------------------------------------------------------------------ vLLM


def write_vllm(path: Path, layout: str, seed: int = 0, responses: int = 4):
    """A JSONL of vLLM response bodies in `layout` ('lists': every hidden layer, dense ones zero; 'npy': MoE layers
    only, uint8, two choices in the first response). Returns (expected routes, expected counts, sequences)."""
    rng = np.random.default_rng(seed)
    rows, seqs, lines = [], [], []
    seq = 0
    for r in range(responses):
        prompt = rng.integers(0, 1000, int(rng.integers(2, 6))).tolist()
        n_choices = 2 if layout == "npy" and r == 0 else 1
        body = {"id": f"cmpl-{r}", "object": "text_completion", "choices": [], "prompt_token_ids": prompt}
        for c in range(n_choices):
            gen = rng.integers(0, 1000, int(rng.integers(2, 5))).tolist()
            all_ids = prompt + gen
            logical = draw(rng, len(all_ids) - 1)  # [rows, MoE, K]: the last generated token has no row
            start = 0 if c == 0 else len(prompt)
            for i in range(start, len(all_ids) - 1):
                rows += _token_rows(0, 0, seq, i, all_ids[i], logical[i])
            seqs.append({"seq": seq, "n_tokens": len(all_ids) - 1 - start, "prompt_tokens": len(prompt),
                         "all_ids": all_ids, "sample_id": f"cmpl-{r}" + (f"#{c}" if n_choices > 1 else "")})
            seq += 1
            if layout == "lists":
                full = np.zeros((len(all_ids) - 1, HIDDEN, K), np.int64)
                full[:, list(MOE), :] = logical
                body["prompt_routed_experts"] = full[: len(prompt)].tolist()
                body["choices"].append({"index": c, "text": "...", "token_ids": gen,
                                        "routed_experts": full[len(prompt):].tolist()})
            else:
                buf = io.BytesIO()
                np.save(buf, logical.astype(np.uint8))
                body["choices"].append({"index": c, "text": "...", "token_ids": gen,
                                        "routed_experts": base64.b64encode(buf.getvalue()).decode()})
        lines.append(json.dumps(body))
    path.write_text("\n".join(lines) + "\n")
    routes = _routes(rows)
    return routes, counts_from_routes(routes), seqs


# ------------------------------------------------------------------------------------------------------ Megatron


def write_megatron(folder: Path, seed: int = 0, ranks: int = 2, steps: int = 2, micro_batches: int = 2,
                   bsz: int = 2, seq_len: int = 3, partial_last_line: bool = True):
    """router_trace_rank{r}.jsonl per rank: per step, per micro-batch, one record per MoE layer (decoder.layers.N,
    N = hidden index; dense layers write nothing) with ascending ids per row; rows s * bsz + b. The last rank's
    file ends in a partial line (a killed job) when asked. Returns (routes as micro-batch sequences, routes split
    by bsz, counts)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows_mb, rows_bsz = [], []
    for rank in range(ranks):
        lines = []
        for step in range(steps):
            for mb in range(micro_batches):
                n = seq_len * bsz
                logical = np.sort(draw(rng, n), axis=2)  # training: the routing map's ids, ascending
                for i in range(n):
                    s, b = divmod(i, bsz)
                    rows_mb += _token_rows(step, rank, mb, i, -1, logical[i])
                    rows_bsz += _token_rows(step, rank, mb * bsz + b, s, -1, logical[i])
                for li, h in enumerate(MOE):
                    lines.append(json.dumps({"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": h,
                                             "rank": rank, "num_tokens": n, "topk": K,
                                             "top_indices": logical[:, li, :].tolist()}))
        text = "\n".join(lines) + "\n"
        if partial_last_line and rank == ranks - 1:
            text += json.dumps({"step": steps, "stage": "pre_dispatch", "block": "decoder", "layer": MOE[0],
                                "rank": rank, "num_tokens": 2, "topk": K, "top_indices": [[0, 1], [2, 3]]})[:40]
        (folder / f"router_trace_rank{rank}.jsonl").write_text(text)
    routes_mb = _routes(rows_mb)
    return routes_mb, _routes(rows_bsz), counts_from_routes(routes_mb)


# ------------------------------------------------------------------------------------------------ two engines


def shared_routing(seed: int = 0, sequences: int = 5) -> list[dict]:
    """The routing of `sequences` sequences that two engines are to log: per sequence its id (`cmpl-<i>`), prompt
    and generated token ids, and the logical experts [len(ids) - 1, MoE layers, K] of every token but the last
    (which no forward routed)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(sequences):
        prompt = rng.integers(0, 1000, int(rng.integers(2, 6))).tolist()
        gen = rng.integers(0, 1000, int(rng.integers(2, 5))).tolist()
        out.append({"id": f"cmpl-{i}", "prompt": prompt, "gen": gen, "experts": draw(rng, len(prompt) + len(gen) - 1)})
    return out


def swapped(seqs: list[dict], seed: int, share: float = 0.3):
    """A copy of `seqs` in which a `share` of (token, layer) decisions replaced their last chosen expert by one not
    chosen; returns (the copy, {layer: Counter((expert_a, expert_b))}: the swap matrix it must give)."""
    from collections import Counter

    rng = np.random.default_rng(seed)
    swaps: dict[int, Counter] = {li: Counter() for li in range(len(MOE))}
    out = []
    for q in seqs:
        e = q["experts"].copy()
        for t in range(e.shape[0]):
            for li in range(e.shape[1]):
                if rng.random() < share:
                    new = int(rng.choice([x for x in range(E) if x not in e[t, li]]))
                    swaps[li][(int(e[t, li, -1]), new)] += 1
                    e[t, li, -1] = new
        out.append({**q, "experts": e})
    return out, swaps


def write_vllm_of(path: Path, seqs: list[dict]) -> None:
    """`seqs` as a JSONL of vLLM responses (lists layout: every hidden layer, dense ones zero; one choice each)."""
    lines = []
    for q in seqs:
        full = np.zeros((len(q["prompt"]) + len(q["gen"]) - 1, HIDDEN, K), np.int64)
        full[:, list(MOE), :] = q["experts"]
        n = len(q["prompt"])
        lines.append(json.dumps({"id": q["id"], "object": "text_completion", "prompt_token_ids": q["prompt"],
                                 "prompt_routed_experts": full[:n].tolist(),
                                 "choices": [{"index": 0, "text": "...", "token_ids": q["gen"],
                                              "routed_experts": full[n:].tolist()}]}))
    path.write_text("\n".join(lines) + "\n")


def write_sglang_of(folder: Path, seqs: list[dict], seed: int = 0, per_pass: int = 2, n_physical: int = 12) -> Path:
    """`seqs` as an SGLang per_token dump of one rank: EXTEND passes of `per_pass` whole sequences each (every
    token but the last: a prefill that scores given sequences, as a trainer-side recompute does), physical ids
    through a map with redundant replicas. Returns the file of sample ids (one per sequence, in pass order) that
    the dump itself cannot carry."""
    import torch

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    mapping = physical_map(rng, n_physical)
    records = []
    for pid, lo in enumerate(range(0, len(seqs), per_pass)):
        part = seqs[lo:lo + per_pass]
        ids = [x for q in part for x in (q["prompt"] + q["gen"])[:-1]]
        positions = [p for q in part for p in range(len(q["prompt"]) + len(q["gen"]) - 1)]
        logical = np.concatenate([q["experts"] for q in part])  # [T, MoE, K]
        records.append({"forward_pass_id": pid, "rank": 0, "gatherer_key": "primary", "input_ids": ids,
                        "positions": positions, "extend_seq_lens": [len(q["experts"]) for q in part],
                        "forward_mode": 1, "topk_ids_of_layer": torch.from_numpy(_physical_ids(rng, mapping, logical)),
                        "misc_objects": []})
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(mapping)},
               folder / "expert_distribution_recorder_1700000000.0_0.pt")
    ids_file = folder.parent / f"{folder.name}.sample_ids"
    ids_file.write_text("".join(f"{q['id']}\n" for q in seqs))
    return ids_file


def write_megatron_of(folder: Path, seqs: list[dict], bsz: int) -> None:
    """`seqs` (all of one length) as a Megatron trace of one rank and step: micro-batches of `bsz` sequences, rows
    s * bsz + b, ids ascending within a row (as training's routing map lists them)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for mb, lo in enumerate(range(0, len(seqs), bsz)):
        part = seqs[lo:lo + bsz]
        n = part[0]["experts"].shape[0]
        rows = np.stack([q["experts"] for q in part], axis=1).reshape(n * len(part), len(MOE), K)  # [s * bsz + b]
        for li, h in enumerate(MOE):
            lines.append(json.dumps({"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": h, "rank": 0,
                                     "num_tokens": len(rows), "topk": K,
                                     "top_indices": np.sort(rows[:, li, :], axis=1).tolist()}))
    (folder / "router_trace_rank0.jsonl").write_text("\n".join(lines) + "\n")
