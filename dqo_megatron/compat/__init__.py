"""Compatibility layers: the CPU patch for megatron-core and optional GPU libraries (TE, apex)."""

from dqo_megatron.compat.cpu import apply_cpu_patches, cpu_patches_applied
from dqo_megatron.compat.optional import apex_available, transformer_engine_status

__all__ = ["apply_cpu_patches", "cpu_patches_applied", "apex_available", "transformer_engine_status"]
