"""The demo's routing-agreement pair (issue 22): the trained model's probe batch routed once in float32 and once
by a bfloat16 copy of the same checkpoint, recorded as two runs (`probe-fp32`, `probe-bf16`) beside the training
runs, so that `moeviz agree` and the dashboard's Agreement page have two executions of the same tokens to compare.

Why bf16: it is what rollout engines serve in while trainers keep float32 routers, and the near-ties it flips
are the disagreements that break RL of MoE models (R3, arXiv 2510.11370). Two forward passes of the 8-sequence
probe batch: a second or two of the demo's time.

torch is imported inside functions: `import moeviz` stays light.
"""

from __future__ import annotations

from pathlib import Path

PAIR = ("probe-fp32", "probe-bf16")


def record_precision_pair(model, probe_batch, probe_domains: list[str], out: Path, tokenizer, config: dict,
                          device, step: int) -> list[Path]:
    """Record the probe batch (token windows [B, S+1]; the first S tokens are routed) through `model` in float32
    and through a bfloat16 copy of it, as runs PAIR[0] and PAIR[1] under `out`, both at recorded step `step` with
    tag 'probe'. Returns the two run folders."""
    import copy

    import torch

    from collectors.recorder import Recorder
    from moeviz.demo.run import _fresh_run_dir

    x = torch.as_tensor(probe_batch, device=device)[:, :-1]
    paths = []
    for name, dtype in zip(PAIR, (torch.float32, torch.bfloat16)):
        m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        path = Path(out) / name
        _fresh_run_dir(path)
        was_training = m.training
        m.eval()
        try:
            with Recorder(m, path, run_name=name, run_id=name, tokenizer=tokenizer,
                          config={**config, "precision": str(dtype).replace("torch.", "")}) as rec:
                with torch.no_grad():
                    m(x)
                rec.step(step, token_ids=x, domain=probe_domains, tag="probe")
        finally:
            m.train(was_training)
        paths.append(path)
    return paths
