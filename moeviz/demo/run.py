"""`moeviz demo`: train a small MoE on the four-domain corpus twice (with and without the Switch auxiliary loss),
record both runs with the Recorder, and hand them to the dashboard.

Why two runs: the aux-loss pages of the dashboard compare load balance with and without the loss; everything else
(data order, initial weights, seed) is the same in both, so the difference is the loss alone.

Step numbers: one timeline per run. Every recorded forward pass gets the next step number: training batches
(tag 'train'), and at each checkpoint first a fixed held-out batch of every domain (tag 'eval', the per-domain
eval loss and routing) and then a fixed probe batch (tag 'probe', the same tokens every time, for router
saturation). Every recorded batch holds the four domains in equal numbers, so per-step aggregates never show one
domain alone; `sequences.domain` labels every row. The run's config JSON says which optimizer step each
checkpoint followed (`demo.checkpoints`).

torch is imported inside functions: `import moeviz` stays light.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moeviz.demo.corpus import DOMAINS, build_corpus, default_cache_dir, token_arrays, train_tokenizer
from moeviz.errors import MoevizError


class DemoError(MoevizError):
    """The demo was asked for something it cannot do (no CUDA, a batch that does not split into domains, ...)."""


@dataclass
class DemoConfig:
    steps: int = 240  # optimizer steps per run
    n_experts: int = 8  # E
    top_k: int = 2  # k
    n_layer: int = 4  # transformer blocks (each with an MoE feed-forward)
    n_embd: int = 128  # model width
    n_head: int = 4  # attention heads
    expert_hidden: int = 256  # hidden width of one expert
    seq_len: int = 128  # tokens per sequence
    batch_size: int = 16  # sequences per step: equal numbers of each of the 4 domains
    vocab_size: int = 2048  # byte-level BPE vocabulary
    lr: float = 3e-3  # peak AdamW learning rate (linear warmup, cosine decay to 10%)
    warmup: int = 20  # warmup steps
    aux_loss_coef: float = 0.01  # Switch aux-loss weight of the 'aux' run ('noaux' uses 0)
    z_loss_coef: float = 0.0  # router z-loss weight of both runs
    capacity_factor: float | None = None  # None: no token dropping
    noisy_gating: bool = False  # Shazeer-style noisy top-k gating
    checkpoints: int = 4  # eval + probe passes, evenly spread (plus one before training)
    eval_seqs_per_domain: int = 8  # held-out sequences per domain in each eval pass
    probe_seqs_per_domain: int = 2  # held-out sequences per domain in the fixed probe batch
    chars_per_domain: int = 1_200_000  # corpus size per domain (train + eval)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads while training (None: torch's default, one per core)
    cache_dir: str | None = None  # corpus and tokenizer cache (default ~/.cache/moeviz or $MOEVIZ_CACHE)
    runs: tuple[str, ...] = ("aux", "noaux")  # which runs to train
    record: bool = True  # False: train without recording (tests of the loop alone)
    progress: bool = True  # tqdm progress bar
    parallel: bool = False  # train the runs at once, one process each, when the CPU has a core per run
    precision_pair: bool = True  # after the first run, its probe batch in float32 and bf16 (moeviz.demo.precision)


@dataclass
class DemoData:
    tokenizer: object
    train: dict[str, np.ndarray]  # domain -> uint16 token ids
    eval_batch: np.ndarray  # [4 * eval_seqs_per_domain, seq_len + 1] fixed held-out windows, domain-major
    eval_domains: list[str]
    probe_batch: np.ndarray  # [4 * probe_seqs_per_domain, seq_len + 1]
    probe_domains: list[str]


@dataclass
class RunResult:
    name: str
    path: str | None
    wall_s: float
    final_loss: float  # mean training cross-entropy over the last 10% of steps
    final_aux: float  # mean Switch aux loss (whether or not it was trained on) over the same steps
    eval_loss: dict[str, float]  # held-out cross-entropy per domain after training
    counts: np.ndarray  # [layer, domain, expert] first-choice counts on the held-out eval batch after training
    assigned: np.ndarray  # [layer, expert] top-k assignments on the held-out eval batch after training
    history: list[dict] = field(default_factory=list)  # per step: step, loss, aux

    def imbalance(self) -> np.ndarray:
        """max/mean of top-k assignments per expert, per layer (1 = perfectly balanced, E = one expert)."""
        return self.assigned.max(axis=1) / self.assigned.mean(axis=1)

    def summary(self) -> dict:
        return {
            "run": self.name, "wall_s": round(self.wall_s, 1), "final_loss": round(self.final_loss, 4),
            "final_aux": round(self.final_aux, 4), "eval_loss": {k: round(v, 4) for k, v in self.eval_loss.items()},
            "imbalance_max_over_mean": [round(float(x), 3) for x in self.imbalance()],
            "nmi_expert_domain": [round(normalized_mutual_information(c), 3) for c in self.counts],
            "top_experts_by_domain": top_experts_by_domain(self.counts),
            **busiest_gpu(self.assigned),
        }


def busiest_gpu(assigned: np.ndarray, gpus: int = 4, redundant: int = 2) -> dict:
    """Busiest of `gpus` expert-parallel GPUs over the mean GPU per layer, for the load `assigned` [layer, expert]:
    contiguous placement (expert e on GPU e*G/E) and `moeviz.analyses.placement.balanced_placement` of that load
    with `redundant` replicas (fitted on the same load, as a rebalancer fed recent counts would be). Empty when the
    layers have fewer experts than GPUs."""
    from moeviz.analyses.placement import PlacementError, balanced_placement, fixed_placement

    n_layers, n_experts = assigned.shape
    if n_experts < gpus:
        return {}
    gpu_of = fixed_placement(n_experts, gpus, "contiguous")  # [E]
    contiguous = np.stack([np.bincount(gpu_of, weights=a, minlength=gpus) for a in assigned])  # [L, G]
    try:
        table = balanced_placement(assigned, gpus, redundant=redundant)  # rows: layer, gpu, expert, share
    except PlacementError:
        return {}
    balanced = np.zeros((n_layers, gpus))
    np.add.at(balanced, (table.layer.to_numpy(), table.gpu.to_numpy()),
              assigned[table.layer.to_numpy(), table.expert.to_numpy()] * table.share.to_numpy())
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = {"contiguous": contiguous.max(1) / contiguous.mean(1),
                 f"balanced_{redundant}_replicas": balanced.max(1) / balanced.mean(1)}
    return {f"busiest_of_{gpus}_gpus": {k: [round(float(x), 3) for x in v] for k, v in ratio.items()}}


def normalized_mutual_information(table: np.ndarray) -> float:
    """NMI of a [domain, expert] count table: I(domain; expert) / mean(H(domain), H(expert)); 0 = experts ignore
    the domain, 1 = each domain has its own experts."""
    p = table / table.sum()
    pd, pe = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float(np.sum(p[nz] * np.log(p[nz] / np.outer(pd, pe)[nz])))
    hd, he = (-float(np.sum(q[q > 0] * np.log(q[q > 0]))) for q in (pd, pe))
    return mi / ((hd + he) / 2) if hd + he > 0 else 0.0


def top_experts_by_domain(counts: np.ndarray, n: int = 2) -> dict[str, list[list[int]]]:
    """For each domain, per layer, the `n` experts that take most of its tokens' first choices."""
    return {d: [list(map(int, np.argsort(-counts[l, i])[:n])) for l in range(counts.shape[0])] for i, d in enumerate(DOMAINS)}


def resolve_device(name: str):
    """torch.device for 'cpu' or 'cuda'; a clear error when CUDA was asked for and is absent."""
    import torch

    if name == "cuda":
        if not torch.cuda.is_available():
            raise DemoError("--device cuda was asked for but torch sees no CUDA device; run with --device cpu "
                            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'})")
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    raise DemoError(f"unknown device {name!r}; use cpu or cuda")


def fixed_windows(ids: np.ndarray, n: int, length: int) -> np.ndarray:
    """`n` windows of `length` tokens spread evenly over `ids` (the same ones every time). [n, length]"""
    if len(ids) < length + n:
        raise DemoError(f"held-out text of {len(ids)} tokens is too short for {n} windows of {length}; "
                        "raise chars_per_domain or lower seq_len")
    starts = np.linspace(0, len(ids) - length, n).astype(np.int64)
    return np.stack([ids[s : s + length].astype(np.int64) for s in starts])


def prepare_data(cfg: DemoConfig) -> DemoData:
    """Build or reuse corpus, tokenizer and token arrays; cut the fixed eval and probe batches."""
    corpus = build_corpus(cfg.cache_dir or default_cache_dir(), chars_per_domain=cfg.chars_per_domain, seed=cfg.seed)
    tok = train_tokenizer(corpus, cfg.vocab_size)
    arrays = token_arrays(corpus, tok, cfg.vocab_size)
    n_eval, n_probe = cfg.eval_seqs_per_domain, cfg.probe_seqs_per_domain
    eval_rows, probe_rows = [], []
    for d in DOMAINS:
        windows = fixed_windows(arrays["eval"][d], n_eval + n_probe, cfg.seq_len + 1)  # [n_eval + n_probe, S+1]
        eval_rows.append(windows[:n_eval])
        probe_rows.append(windows[n_eval:])
    return DemoData(
        tokenizer=tok,
        train=arrays["train"],
        eval_batch=np.concatenate(eval_rows),
        eval_domains=[d for d in DOMAINS for _ in range(n_eval)],
        probe_batch=np.concatenate(probe_rows),
        probe_domains=[d for d in DOMAINS for _ in range(n_probe)],
    )


def training_batch(train: dict[str, np.ndarray], batch_size: int, seq_len: int, rng: np.random.Generator):
    """(windows [B, seq_len+1] int64, domains [B]): batch_size/4 random windows of each domain, domain-major."""
    per = batch_size // len(DOMAINS)
    rows, labels = [], []
    for d in DOMAINS:
        ids = train[d]
        starts = rng.integers(0, len(ids) - seq_len - 1, size=per)
        rows += [ids[s : s + seq_len + 1].astype(np.int64) for s in starts]
        labels += [d] * per
    return np.stack(rows), labels


def learning_rate(step: int, cfg: DemoConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to 10% of it at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def model_config(cfg: DemoConfig, aux_loss_coef: float):
    from moeviz.demo.model import DemoMoEConfig

    return DemoMoEConfig(
        vocab_size=cfg.vocab_size, block_size=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_embd=cfg.n_embd, n_experts=cfg.n_experts, top_k=cfg.top_k, expert_hidden=cfg.expert_hidden,
        capacity_factor=cfg.capacity_factor, noisy_gating=cfg.noisy_gating, aux_loss_coef=aux_loss_coef,
        z_loss_coef=cfg.z_loss_coef,
    )


def checkpoint_steps(cfg: DemoConfig) -> list[int]:
    """Optimizer steps before which eval and probe passes run: 0, evenly spread ones, and the end (cfg.steps)."""
    if cfg.checkpoints <= 0:
        return []
    return sorted({round(i * cfg.steps / cfg.checkpoints) for i in range(cfg.checkpoints + 1)})


def schedule(cfg: DemoConfig) -> list[tuple[int, str, int]]:
    """The recorded passes in order: (recorded step number, tag, optimizer step).

    A checkpoint before optimizer step s records an 'eval' pass then a 'probe' pass; each training step records
    one 'train' pass. Recorded step numbers count passes, so they grow with time across all three tags.
    """
    cps = set(checkpoint_steps(cfg))
    plan: list[tuple[str, int]] = []
    for s in range(cfg.steps + 1):
        if s in cps:
            plan += [("eval", s), ("probe", s)]
        if s < cfg.steps:
            plan.append(("train", s))
    return [(i, tag, s) for i, (tag, s) in enumerate(plan)]


def routing_counts(model, windows: np.ndarray, domains: list[str], device) -> tuple[np.ndarray, np.ndarray, dict]:
    """First-choice counts [layer, domain, expert], assignments [layer, expert] and per-domain loss on `windows`.

    Read straight from the model's routers (not from the store), so that tests and reports can compare the two.
    """
    import torch
    import torch.nn.functional as F

    routers = model.routers()
    seen: list = [None] * len(routers)
    handles = [r.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[2].detach())) for i, r in enumerate(routers)]
    was_training = model.training
    model.eval()
    try:
        x = torch.as_tensor(windows, device=device)
        with torch.no_grad():
            logits, _, _ = model(x[:, :-1])  # [B, S, V]
            nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(dim=1).cpu().numpy()  # [B]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    b, s = windows.shape[0], windows.shape[1] - 1
    n_exp = model.config.n_experts
    dom_idx = np.repeat([DOMAINS.index(d) for d in domains], s)  # [B*S]
    counts = np.zeros((len(routers), len(DOMAINS), n_exp), dtype=np.int64)
    assigned = np.zeros((len(routers), n_exp), dtype=np.int64)
    for layer, index in enumerate(seen):
        idx = index.cpu().numpy().reshape(b * s, -1)  # [T, k]
        np.add.at(counts[layer], (dom_idx, idx[:, 0]), 1)
        assigned[layer] = np.bincount(idx.reshape(-1), minlength=n_exp)
    losses = {d: float(np.mean([nll[i] for i in range(b) if domains[i] == d])) for d in DOMAINS if d in domains}
    return counts, assigned, losses


class _VocabView:
    """What the Recorder reads from a tokenizer: len() and decode([id]) for every id (tokenizers.Tokenizer has
    get_vocab_size instead of __len__)."""

    def __init__(self, tok):
        self.tok = tok

    def __len__(self) -> int:
        return self.tok.get_vocab_size()

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def _fresh_run_dir(path: Path) -> None:
    """Remove a previous demo run at `path` (only if it is a moeviz run folder), so that runs never mix."""
    if not path.exists():
        return
    if not (path / "moeviz.json").is_file():
        raise DemoError(f"{path} exists and is not a moeviz run folder; choose another --out or remove it")
    shutil.rmtree(path)


def train_run(cfg: DemoConfig, data: DemoData, name: str, aux_loss_coef: float, out: Path | None) -> RunResult:
    """Train one model from the seed and record every step into `out / name` (when cfg.record and out)."""
    import contextlib

    import torch

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # same data order in both runs
    from moeviz.demo.model import DemoMoE, router_adapter

    mcfg = model_config(cfg, aux_loss_coef)
    model = DemoMoE(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    plan = schedule(cfg)
    run_path = None
    recorder = contextlib.nullcontext()
    if cfg.record and out is not None:
        from collectors.recorder import Recorder

        run_path = Path(out) / name
        _fresh_run_dir(run_path)
        checkpoints = [{"optimizer_step": s, "step": i, "tag": tag} for i, tag, s in plan if tag != "train"]
        config = {"model": mcfg.to_dict(), "demo": {**_json_safe(asdict(cfg)), "run": name,
                                                     "aux_loss_coef": aux_loss_coef, "domains": list(DOMAINS),
                                                     "checkpoints": checkpoints}}
        recorder = Recorder(
            model, run_path, run_name=name, run_id=name, tokenizer=_VocabView(data.tokenizer), config=config,
            adapter=router_adapter(cfg.n_experts, cfg.top_k) if cfg.capacity_factor is not None else None,
        )
    fixed = {"eval": (torch.as_tensor(data.eval_batch, device=device), data.eval_domains),
             "probe": (torch.as_tensor(data.probe_batch, device=device), data.probe_domains)}
    history: list[dict] = []
    bar = _progress(cfg, name)
    start = time.perf_counter()
    with recorder as rec:
        model.train()
        for step_id, tag, step in plan:
            if tag != "train":  # a held-out pass: no gradient, the model in eval mode (no router noise)
                x, domains = fixed[tag]
                model.eval()
                with torch.no_grad():
                    model(x[:, :-1])
                model.train()
                if rec is not None:
                    rec.step(step_id, token_ids=x[:, :-1], domain=domains, tag=tag)
                continue
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, cfg)
            xb, domains = training_batch(data.train, cfg.batch_size, cfg.seq_len, rng)
            x = torch.as_tensor(xb, device=device)
            _, loss, parts = model(x[:, :-1], x[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if rec is not None:
                rec.step(step_id, token_ids=x[:, :-1], domain=domains, tag="train")
            row = {"step": step, "loss": float(parts["lm_loss"]), "aux": float(parts["aux_loss"])}
            history.append(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}", aux=f"{row['aux']:.3f}")
                bar.update(1)
    if bar is not None:
        bar.close()
    if rec is not None and cfg.precision_pair and name == cfg.runs[0]:  # issue 22: two executions of the probe
        from moeviz.demo.precision import record_precision_pair

        record_precision_pair(model, data.probe_batch, data.probe_domains, Path(out), _VocabView(data.tokenizer),
                              config, device, step=plan[-1][0])
    wall = time.perf_counter() - start
    counts, assigned, eval_loss = routing_counts(model, data.eval_batch, data.eval_domains, device)
    tail = history[-max(1, len(history) // 10):] if history else [{"loss": float("nan"), "aux": float("nan")}]
    return RunResult(
        name=name, path=None if run_path is None else str(run_path), wall_s=wall,
        final_loss=float(np.mean([h["loss"] for h in tail])), final_aux=float(np.mean([h["aux"] for h in tail])),
        eval_loss=eval_loss, counts=counts, assigned=assigned, history=history,
    )


def _json_safe(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


_PROGRESS_POSITION = 0  # line of this process's progress bar when runs train in parallel processes


def _progress(cfg: DemoConfig, name: str):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, desc=f"moeviz demo [{name}]", unit="step", file=sys.stderr, dynamic_ncols=True,
                position=_PROGRESS_POSITION)


def _train_in_process(cfg: DemoConfig, name: str, aux_loss_coef: float, out: Path | None, position: int, threads: int):
    """One run in its own process (spawned): the corpus and tokenizer come from the cache the parent built."""
    import torch

    global _PROGRESS_POSITION
    _PROGRESS_POSITION = position
    torch.set_num_threads(threads)
    return train_run(cfg, prepare_data(cfg), name, aux_loss_coef, out)


def _parallel_runs(cfg: DemoConfig, coefs: dict[str, float], out: Path | None) -> list[RunResult]:
    """Train the runs side by side, one process and an equal share of the cores each.

    Why: the runs are independent and the demo's model is small, so two single-threaded processes use two cores
    better than one process with two threads (measured: docs/benchmarks.md); wall time roughly halves.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = cfg.threads or max(1, (os.cpu_count() or 1) // len(cfg.runs))
    ctx = multiprocessing.get_context("spawn")  # fork after torch's thread pools started is unsafe
    with ProcessPoolExecutor(max_workers=len(cfg.runs), mp_context=ctx) as pool:
        futures = [pool.submit(_train_in_process, cfg, name, coefs[name], out, i, threads)
                   for i, name in enumerate(cfg.runs)]
        return [f.result() for f in futures]


def run_demo(cfg: DemoConfig, out: str | Path | None) -> list[RunResult]:
    """Prepare the data once, then train (and record) each run named in cfg.runs: 'aux' and/or 'noaux'."""
    if cfg.batch_size % len(DOMAINS) != 0 or cfg.batch_size <= 0:
        raise DemoError(f"batch_size must be a positive multiple of {len(DOMAINS)} (one share per domain); got {cfg.batch_size}")
    if cfg.top_k > cfg.n_experts or cfg.top_k < 1:
        raise DemoError(f"top_k must be between 1 and the number of experts ({cfg.n_experts}); got {cfg.top_k}")
    if cfg.steps < 1:
        raise DemoError(f"steps must be at least 1; got {cfg.steps}")
    unknown = set(cfg.runs) - {"aux", "noaux"}
    if unknown:
        raise DemoError(f"unknown demo runs {sorted(unknown)}; choose among aux, noaux")
    if cfg.threads is not None and cfg.threads < 1:
        raise DemoError(f"threads must be at least 1; got {cfg.threads}")
    resolve_device(cfg.device)  # fail before building anything
    import torch

    data = prepare_data(cfg)
    coefs = {"aux": cfg.aux_loss_coef, "noaux": 0.0}
    if cfg.parallel and cfg.device == "cpu" and len(cfg.runs) > 1 and (os.cpu_count() or 1) >= len(cfg.runs):
        return _parallel_runs(cfg, coefs, None if out is None else Path(out))
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)  # small models on busy machines run faster on fewer threads
    try:
        return [train_run(cfg, data, name, coefs[name], None if out is None else Path(out)) for name in cfg.runs]
    finally:
        torch.set_num_threads(threads)
