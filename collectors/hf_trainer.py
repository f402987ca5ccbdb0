"""Record a Hugging Face `Trainer` run: one callback, no change to the training code.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[MoevizCallback("runs/exp1", run_name="exp1")])
    trainer.train()

Every optimizer step becomes one moeviz step (`state.global_step`, 1-based): the Recorder's forward pre-hook
captures the `input_ids` / `attention_mask` of each micro-batch, so gradient accumulation is counted whole and
padding is excluded. Forwards between two training steps (evaluation, logging callbacks) are discarded at the
next `on_step_begin` rather than counted in the next training step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from collectors.recorder import Recorder, RecorderError

__all__ = ["MoevizCallback"]


class MoevizCallback(TrainerCallback):
    """A `transformers.TrainerCallback` that records routing with a `collectors.Recorder`.

    path: the run folder. run_name: defaults to `TrainingArguments.run_name`. recorder_kwargs go to `Recorder`
    (sample_every, max_tokens_per_step, flush_every, domain, ...). The tokenizer given to the Trainer
    (`processing_class`) is stored as the vocabulary unless `tokenizer=` is given.
    If training raises, Trainer calls no callback: call `callback.close(error)` in your `except` to mark the
    run failed and remove the hooks (a process that dies is marked interrupted by the store).
    """

    def __init__(self, path: str | Path, run_name: str | None = None, **recorder_kwargs: Any):
        self.path = Path(path)
        self.run_name = run_name
        self.recorder_kwargs = recorder_kwargs
        self.recorder: Recorder | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RecorderError("MoevizCallback.on_train_begin got no model from the Trainer")
        if self.recorder is not None:  # a second train() call on the same Trainer: close the first run
            self.close()
        kw = dict(self.recorder_kwargs)
        tokenizer = kwargs.get("processing_class") or kwargs.get("tokenizer")
        if "tokenizer" not in kw and hasattr(tokenizer, "convert_ids_to_tokens"):
            kw["tokenizer"] = tokenizer
        kw.setdefault("rank", getattr(args, "process_index", None))
        kw.setdefault("world_size", getattr(args, "world_size", None))
        # every rank runs this callback and steps in lock-step: the step aggregates are summed past one node
        kw.setdefault("reduce_ranks", None)
        run_name = self.run_name or getattr(args, "run_name", None)
        self.recorder = Recorder(model, self.path, run_name=run_name, **kw).start()
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.discard()  # forwards since the last step (evaluation) belong to no training step
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.step(state.global_step, tag="train")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        return control

    def close(self, error: BaseException | None = None) -> None:
        """Close the run: finished, or failed with `error`. Idempotent."""
        rec, self.recorder = self.recorder, None
        if rec is not None:
            rec.discard()  # forwards after the last optimizer step (a final evaluation) belong to no step
            rec._finish(error)
