"""Generation for the data pipeline: rollouts, synthetic process scores (see backend.py for the interface)."""

from dqo_megatron.rollout.backend import Completion, GenerationBackend, SamplingParams

__all__ = ["Completion", "GenerationBackend", "SamplingParams"]
