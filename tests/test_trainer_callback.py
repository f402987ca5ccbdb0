"""MoevizCallback with a real transformers Trainer (CPU, tiny Mixtral, gradient accumulation, padding, an
evaluation after every step): the store holds one step per optimizer step and exactly the tokens inside the
attention masks of its training micro-batches."""

from __future__ import annotations

import pytest
import torch
from moeviz.store import query

# the final evaluation's forwards (after the last optimizer step) belong to no step: closing must not warn
pytestmark = pytest.mark.filterwarnings("error:moeviz:UserWarning")

SEQ = 8
LENGTHS = [8, 3, 5, 8, 2, 7, 6, 8, 4, 1, 8, 5]  # 12 sequences = 3 steps x (batch 2 x accumulation 2)


class PaddedLM(torch.utils.data.Dataset):
    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.rows = []
        for n in LENGTHS:
            ids = torch.zeros(SEQ, dtype=torch.long)
            ids[:n] = torch.randint(2, 128, (n,), generator=gen)
            mask = (torch.arange(SEQ) < n).long()
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_trainer_callback_records_every_optimizer_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    from collectors import MoevizCallback
    from collectors.testing import tiny_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = tiny_model("mixtral")
        model.train()
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=3, learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
            disable_tqdm=True, seed=0, dataloader_num_workers=0, eval_strategy="steps", eval_steps=1,
            per_device_eval_batch_size=4,
        )
        callback = MoevizCallback(tmp_path / "run", run_name="hf", flush_every=2)
        # evaluation after every step: its forwards must not leak into the next training step
        trainer = Trainer(model=model, args=args, train_dataset=PaddedLM(), eval_dataset=PaddedLM(),
                          callbacks=[callback])
        trainer.train()
    finally:
        torch.set_num_threads(before)

    assert callback.recorder is None  # closed at on_train_end
    hooks = [h for m in model.modules() for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]]
    assert not any("Recorder." in repr(h) for h in hooks)  # ours are (partials of) Recorder methods
    run = query(tmp_path / "run", "SELECT run_name, status, model_class FROM runs").iloc[0].tolist()
    assert run == ["hf", "finished", "MixtralForCausalLM"]
    ls = query(tmp_path / "run", "SELECT step, layer, tokens FROM layer_stats ORDER BY step, layer")
    assert ls.step.unique().tolist() == [1, 2, 3]  # state.global_step after each optimizer step
    # one epoch of 12 sequences in 3 steps: every sequence once, padding excluded
    per_layer = ls.groupby("layer").tokens.sum()
    assert per_layer.tolist() == [sum(LENGTHS)] * 2
    seqs = query(tmp_path / "run", "SELECT step, count(*) AS seqs, sum(n_tokens) AS n FROM sequences GROUP BY step ORDER BY step")
    assert seqs.seqs.tolist() == [4, 4, 4]  # both micro-batches of each step
    # sequences and aggregates agree step by step, whatever order the sampler chose
    assert seqs.n.tolist() == ls[ls.layer == 0].tokens.tolist()
    assert sorted(query(tmp_path / "run", "SELECT n_tokens FROM sequences").n_tokens.tolist()) == sorted(LENGTHS)
    routes = query(tmp_path / "run", "SELECT count(*) AS n FROM routes")
    assert routes.n[0] == sum(LENGTHS) * 2 * 2  # every kept token x 2 layers x top-2
