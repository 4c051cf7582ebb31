"""The CPU demo: the whole DQO loop on a synthetic addition task (`dqo-megatron demo`).

Imports go down this list, never up:

  pipeline  run_demo: every stage in order, in a fresh run directory (MARKER, fresh_run_dir)
  seeds     several seeds with mean +- std (calls run_demo)
  stages    Context: each stage, returning a one-line summary and what it wrote
  report    report.md, training_curves.png, the summary paragraph
  runs      the Megatron runs' configs, the `dqo-megatron` subprocesses, what their run directories hold
  task      the synthetic column-addition task, its problems, demonstrations and tokenizer
  config    DemoConfig, the trained rows, the tiny model
"""

from dqo_megatron.demo.config import DemoConfig
from dqo_megatron.demo.pipeline import run_demo

__all__ = ["DemoConfig", "run_demo"]
