"""Generation for the data pipeline: the backends (interface in backend.py) and resumable rollouts; process
scores, built on it, are the `process_scores` package."""

from dqo_megatron.rollout.backend import Completion, GenerationBackend, SamplingParams

__all__ = ["Completion", "GenerationBackend", "SamplingParams"]
