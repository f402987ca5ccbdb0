"""The demo behind `moeviz demo`: a real four-domain corpus, a small MoE transformer, training with and without
the Switch auxiliary loss, each run recorded by the Recorder into a store the dashboard opens.

    corpus  the corpus (Python code, Shakespeare, Italian, arithmetic) and its BPE tokenizer, built offline
    model   the MoE transformer (torch; imported only when the demo trains)
    run     the schedule: train, evaluate, probe and record both runs

torch is imported inside functions (and by `model`), so `import moeviz.demo` stays light.
"""

from moeviz.demo.run import DemoConfig, DemoError, run_demo

__all__ = ["DemoConfig", "DemoError", "run_demo"]
