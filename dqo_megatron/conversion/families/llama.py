"""Llama (LlamaForCausalLM): the base rules, unchanged. No biases (``attention_bias`` would also bias
o_proj, which the Megatron model does not build), SiLU gate, plain RoPE."""

from __future__ import annotations

from dqo_megatron.conversion.registry import Family, register


@register
class Llama(Family):
    """Llama 1/2/3 and Mistral-free Llama-style checkpoints with plain RoPE (no llama3 rope scaling)."""

    name = "llama"
    architectures = ("LlamaForCausalLM",)
    model_type = "llama"
