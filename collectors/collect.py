"""Record a saved Hugging Face MoE model reading text files: `moeviz collect` without writing a training loop.

    collect("models/tiny-mixtral", ["code.py", "essay.txt"], "runs/mixtral-eval", seq_len=128)

Each text file is one domain (its file stem unless named), tokenized whole and cut into sequences of `seq_len`
tokens (the last one padded and masked); batches never mix files, and every batch is one eval step
(tag 'eval'), recorded by a `collectors.Recorder`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from moeviz.errors import MoevizError

__all__ = ["collect", "CollectError", "CollectSummary"]


class CollectError(MoevizError):
    """Bad input to `moeviz collect` (missing model folder, config, tokenizer or text)."""


@dataclass
class CollectSummary:
    run_dir: Path
    steps: int = 0
    sequences: int = 0
    tokens_per_domain: dict[str, int] = field(default_factory=dict)


def collect(
    hf_model: str | Path,
    texts: Sequence[str | Path],
    out: str | Path,
    *,
    domains: Sequence[str] | None = None,
    seq_len: int = 128,
    batch_size: int = 8,
    max_tokens: int | None = None,
    max_tokens_per_step: int | None = None,
    run_name: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> CollectSummary:
    """Run eval forwards of the model in folder `hf_model` over `texts` and record them into run folder `out`.

    max_tokens: read at most this many tokens of each file. max_tokens_per_step: the Recorder's per-token
    detail cap (the aggregates always cover every token).
    """
    model_dir, paths, labels = _checked_inputs(hf_model, texts, domains, seq_len, batch_size, max_tokens)
    _check_out(Path(out))
    import torch
    from tqdm.auto import tqdm

    from collectors.recorder import Recorder

    dev = _device(device)
    tokenizer = _load_tokenizer(model_dir)
    model = _load_model(model_dir).to(dev).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    per_file = []
    for path, label in zip(paths, labels):
        ids = _token_ids(tokenizer, path, max_tokens)
        per_file.append((label, _chunks(ids, seq_len)))
    n_batches = sum(-(-len(chunks) // batch_size) for _, chunks in per_file)

    summary = CollectSummary(Path(out))
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    with Recorder(model, out, run_name=run_name, tokenizer=tokenizer, max_tokens_per_step=max_tokens_per_step) as rec:
        bar = tqdm(total=n_batches, desc="moeviz collect", unit="batch", disable=not progress, file=sys.stderr)
        with torch.no_grad():
            for label, chunks in per_file:
                for start in range(0, len(chunks), batch_size):
                    ids, mask = _padded(chunks[start : start + batch_size], seq_len, pad_id)  # [B, S] each
                    n_tokens = int(mask.sum())  # counted on the host copy: no device sync per batch
                    ids, mask = ids.to(dev), mask.to(dev)
                    if seq2seq:  # the decoder reads the same text (teacher forcing), so both stacks see it
                        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                              decoder_attention_mask=mask)
                    else:
                        model(input_ids=ids, attention_mask=mask)
                    rec.step(summary.steps, domain=label, tag="eval")
                    summary.steps += 1
                    summary.sequences += ids.shape[0]
                    summary.tokens_per_domain[label] = summary.tokens_per_domain.get(label, 0) + n_tokens
                    bar.update(1)
        bar.close()
    return summary


def _checked_inputs(hf_model, texts, domains, seq_len, batch_size, max_tokens):
    """Validate everything before loading anything heavy, with messages that say what to do."""
    model_dir = Path(hf_model)
    if not model_dir.is_dir():
        raise CollectError(f"model folder {model_dir} does not exist; give the folder written by model.save_pretrained()")
    if not (model_dir / "config.json").is_file():
        raise CollectError(
            f"{model_dir} has no config.json: it is not a saved Hugging Face model; save one with "
            "model.save_pretrained(DIR)"
        )
    if not texts:
        raise CollectError("no text file given: pass --text FILE [FILE ...]")
    paths = [Path(t) for t in texts]
    for p in paths:
        if not p.is_file():
            raise CollectError(f"text file {p} does not exist")
        size = p.stat().st_size
        if size == 0 or (size < (1 << 20) and not p.read_text(encoding="utf-8", errors="replace").strip()):
            raise CollectError(f"text file {p} is empty: give files with text to route")
    if domains:
        if len(domains) != len(paths):
            raise CollectError(
                f"{len(domains)} --domain names for {len(paths)} text files: give none (the file stems are used) "
                "or one per --text file, in the same order"
            )
        labels = [str(d) for d in domains]
    else:
        labels = [p.stem for p in paths]
    if seq_len < 1 or batch_size < 1:
        raise CollectError(f"--seq-len and --batch-size must be >= 1 (got {seq_len}, {batch_size})")
    if max_tokens is not None and max_tokens < 1:
        raise CollectError(f"--max-tokens must be >= 1 (got {max_tokens})")
    return model_dir, paths, labels


def _check_out(out: Path) -> None:
    """--out must be a new run folder: collecting twice into one run would count every step twice."""
    if out.exists() and not out.is_dir():
        raise CollectError(f"--out {out} is a file: give a folder path for the run (it is created)")
    if (out / "moeviz.json").exists():
        raise CollectError(f"--out {out} already holds a recorded run: give a new folder (a second collect into "
                           "the same run would count its steps twice)")


def _device(device: str):
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CollectError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return torch.device(device)


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:
        raise CollectError(
            f"no usable tokenizer in {model_dir} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "moeviz collect needs one to turn text into token ids: save it beside the model with "
            "tokenizer.save_pretrained(DIR)"
        ) from e


def _load_model(model_dir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(model_dir)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        return cls.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise CollectError(f"could not load the model in {model_dir} with {cls.__name__}: {e}") from e


def _token_ids(tokenizer, path: Path, max_tokens: int | None) -> list[int]:
    ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    if not ids:
        raise CollectError(f"text file {path} gives no tokens with this tokenizer")
    return ids[:max_tokens] if max_tokens is not None else ids


def _chunks(ids: list[int], seq_len: int) -> list[list[int]]:
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]


def _padded(chunks: list[list[int]], seq_len: int, pad_id: int):
    """(ids, mask) [B, S], S = the longest chunk (only the last chunk of a file is short)."""
    import torch

    width = min(seq_len, max(len(c) for c in chunks))
    ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for row, c in enumerate(chunks):
        ids[row, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[row, : len(c)] = 1
    return ids, mask
