"""The CPU demo: the whole DQO loop on a synthetic addition task (`dqo-megatron demo`)."""

from dqo_megatron.demo.pipeline import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
