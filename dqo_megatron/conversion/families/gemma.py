"""Gemma (GemmaForCausalLM, Gemma 1 / 1.1): tanh-GELU gate, tied head, head_dim independent of
hidden/heads, embeddings scaled by sqrt(hidden) and RMSNorm gamma = 1 + w.

Both frameworks store the norm's ``w`` (HF ``GemmaRMSNorm`` computes ``x_hat * (1 + w)``, Megatron with
``layernorm_zero_centered_gamma`` the same), and both scale embeddings in the forward pass, so the tensors
carry over unchanged: only the config differs. The tests check this numerically.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from dqo_megatron.config import ModelConfig
from dqo_megatron.conversion.registry import ConversionError, Family, register


@register
class Gemma(Family):
    """Gemma 1 dense models (not Gemma 2/3: soft-capping, sandwich norms and local attention differ)."""

    name = "gemma"
    architectures = ("GemmaForCausalLM",)
    model_type = "gemma"
    # "gelu" is the legacy value of the official releases, meant (and remapped by transformers) as tanh GELU.
    hidden_acts = ("gelu_pytorch_tanh", "gelu")

    def check_hf_config(self, hf: Mapping[str, Any], where: str) -> None:
        act = hf.get("hidden_activation") or hf.get("hidden_act") or self.hidden_acts[0]
        if act not in self.hidden_acts:
            raise ConversionError(f"{where}: Gemma activation {act!r} is not supported (tanh GELU only)")
        if hf.get("attention_bias"):
            raise ConversionError(f"{where}: attention_bias=true is not supported for gemma")

    def default_tie(self) -> bool:
        return True

    def config_to_hf(self, cfg: ModelConfig, base: Optional[Mapping[str, Any]], dtype: torch.dtype) -> dict:
        out = super().config_to_hf(cfg, base, dtype)
        out["hidden_activation"] = self.hidden_acts[0]  # what transformers 4 reads for Gemma
        return out
