"""Qwen2 (Qwen2ForCausalLM): Llama plus a bias on Q/K/V (always present in Qwen2, no config switch),
RoPE theta usually 1e6, tied head in the small models. Sliding-window attention is refused."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from dqo_megatron.config import ModelConfig
from dqo_megatron.conversion.registry import ConversionError, Family, register


@register
class Qwen2(Family):
    """Qwen2 / Qwen2.5 dense models."""

    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    model_type = "qwen2"

    def check_hf_config(self, hf: Mapping[str, Any], where: str) -> None:
        super().check_hf_config(hf, where)
        if hf.get("use_sliding_window"):
            raise ConversionError(f"{where}: use_sliding_window=true is not supported (full causal attention only)")

    def qkv_bias(self, hf: Mapping[str, Any]) -> bool:
        return True

    def config_to_hf(self, cfg: ModelConfig, base: Optional[Mapping[str, Any]], dtype: torch.dtype) -> dict:
        if not cfg.add_qkv_bias:
            raise ConversionError("a qwen2 model without QKV bias has no Qwen2ForCausalLM equivalent")
        out = super().config_to_hf(cfg, base, dtype)
        out.setdefault("use_sliding_window", False)
        out["max_window_layers"] = cfg.num_layers
        return out
