"""Model building: Megatron-Core GPT models for the Llama, Qwen2 and Gemma families."""

from dqo_megatron.models.builder import build_gpt_model, build_model_chunks, select_backend, transformer_config
from dqo_megatron.models.params import expected_parameter_count

__all__ = ["build_gpt_model", "build_model_chunks", "select_backend", "transformer_config", "expected_parameter_count"]
