"""The Recorder's own CPU time on the training thread, per training step: a measure that a shared machine's load
disturbs far less than bench_recorder.py's wall-clock ratio (±5% and worse there).

A transformers `MixtralForCausalLM` (hidden 256, 2 layers, 8 experts, top-2, sequences of 128) trains with AdamW;
the Recorder's hooks (`_on_model_call`, `_on_router`, `_on_model_return`) and `step()` are timed with
`time.thread_time()` (CPU of the calling thread: the flush's copy included, the writer thread not) and compared
with the whole step's CPU time on the same thread. 22 steps, one flush every 10; the first step includes the
one-time check of each router's first output.

`--family deepseek_v3` trains a DeepSeek-V3 of the same size instead (`DeepseekV3ForCausalLM`: a dense block, then
2 MoE blocks of --experts routed experts (64), top-8, 8 groups, sigmoid + `e_score_correction_bias`), whose margin
the hook takes from the router's scores on every forward; `--sample-every N` keeps routes on every N-th step only.

    python bench/bench_recorder_cpu.py [--batch 4] [--no-margin] [--family deepseek_v3] [--sample-every 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    import collectors.recorder as recorder_module
    from collectors import Recorder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=22)
    ap.add_argument("--no-margin", action="store_true", help="skip routes.margin (written NULL), to see its cost")
    ap.add_argument("--family", choices=("mixtral", "deepseek_v3"), default="mixtral")
    ap.add_argument("--experts", type=int, default=64, help="--family deepseek_v3: routed experts")
    ap.add_argument("--sample-every", type=int, default=1, help="Recorder(sample_every=...)")
    ap.add_argument("--max-tokens-per-step", type=int, default=None, help="Recorder(max_tokens_per_step=...)")
    args = ap.parse_args()
    if args.no_margin:
        recorder_module.kept_margin = lambda *a, **k: None
        recorder_module.routing_margin = lambda *a, **k: None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.family == "mixtral":
        cfg = MixtralConfig(vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                            max_position_embeddings=128)
        model = MixtralForCausalLM(cfg).train()
    else:
        from collectors.testing import tiny_model

        model, _ = tiny_model("deepseek_v3", vocab_size=2000, hidden_size=256, intermediate_size=512,
                              moe_intermediate_size=64, num_attention_heads=8, num_key_value_heads=8,
                              max_position_embeddings=128, n_routed_experts=args.experts, num_experts_per_tok=8,
                              n_group=8, topk_group=4, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                              v_head_dim=32)
        model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 2000, (args.batch, 128))
    spent = [0.0]

    class Timed(Recorder):
        def _timed(self, fn, *a, **k):
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.thread_time() - t0

        def _on_router(self, *a):
            return self._timed(super()._on_router, *a)

        def _on_model_call(self, *a):
            return self._timed(super()._on_model_call, *a)

        def _on_model_return(self, *a):
            return self._timed(super()._on_model_return, *a)

        def step(self, *a, **k):
            return self._timed(super().step, *a, **k)

    steps = []
    with tempfile.TemporaryDirectory(prefix="moeviz-bench-") as run_dir, \
            Timed(model, run_dir, flush_every=10, sample_every=args.sample_every,
                  max_tokens_per_step=args.max_tokens_per_step) as rec:  # the run folder is deleted after
        for i in range(args.steps):
            t0 = time.thread_time()
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec.step(i, token_ids=ids)
            steps.append(time.thread_time() - t0)
    step_ms, rec_ms = statistics.median(steps[2:]) * 1e3, spent[0] / args.steps * 1e3
    print(f"{args.family}, tokens/step {ids.numel()}, sample_every {args.sample_every}, "
          f"max_tokens_per_step {args.max_tokens_per_step}"
          f"{' (no margin)' if args.no_margin else ''}: step {step_ms:.1f} ms CPU, "
          f"Recorder hooks + step() {rec_ms:.2f} ms CPU ({100 * rec_ms / step_ms:.2f}% of the step)")


if __name__ == "__main__":
    main()
