"""Checkpoint conversion between Hugging Face (safetensors) and Megatron-Core distributed checkpoints.

Entry points: `hf_to_megatron`, `megatron_to_hf`, `verify_parity`; the family registry
(`registry.family_for_hf_config`, `registry.families`); see docs/checkpoints.md.
Importing this package does not import megatron or transformers (the functions do, when called).
"""

from dqo_megatron.conversion.convert import ConversionReport, check_layouts, hf_to_megatron, megatron_to_hf
from dqo_megatron.conversion.registry import ConversionError, Family, TensorRule, families, family, family_for_hf_config
from dqo_megatron.conversion.verify import DEFAULT_TOLERANCE, ParityReport, verify_parity

__all__ = [
    "ConversionError",
    "ConversionReport",
    "DEFAULT_TOLERANCE",
    "Family",
    "ParityReport",
    "TensorRule",
    "check_layouts",
    "families",
    "family",
    "family_for_hf_config",
    "hf_to_megatron",
    "megatron_to_hf",
    "verify_parity",
]
