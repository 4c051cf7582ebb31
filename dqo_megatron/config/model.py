"""The model and parallel-layout sections, and the checks that need both (but not the world size).

`ModelConfig.__post_init__` fills family defaults (fields left as None) and checks what one section can;
`validate_model_layout` checks the model against the layout; `data_parallel_size` checks the layout
against the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from dqo_megatron.config.loader import ConfigError, raise_problems

Family = Literal["llama", "qwen2", "gemma"]

# Architecture traits of each family (what differs between them), used where a field is None.
FAMILY_DEFAULTS: dict[str, dict] = {
    "llama": dict(
        rotary_base=10000.0, norm_epsilon=1e-5, tie_embeddings=False, add_qkv_bias=False, activation="swiglu"
    ),
    "qwen2": dict(
        rotary_base=1000000.0, norm_epsilon=1e-6, tie_embeddings=False, add_qkv_bias=True, activation="swiglu"
    ),
    "gemma": dict(rotary_base=10000.0, norm_epsilon=1e-6, tie_embeddings=True, add_qkv_bias=False, activation="geglu"),
}


@dataclass
class ModelConfig:
    """A decoder-only transformer of one of the supported families."""

    family: Family = "llama"
    """Architecture family: llama (SwiGLU, RMSNorm, RoPE, optional GQA), qwen2 (llama + QKV bias,
    RoPE theta 1e6, untied head), gemma (GeGLU, zero-centred RMSNorm gamma, embeddings scaled by
    sqrt(hidden), tied head, head_dim may differ from hidden/heads)."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 172
    """Width of the gated MLP's intermediate layer."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads (grouped-query attention). None: equal to num_attention_heads (MHA)."""
    kv_channels: Optional[int] = None
    """Per-head dimension. None: hidden_size // num_attention_heads."""
    vocab_size: int = 512
    """Tokenizer vocabulary size (the embedding is padded for tensor parallelism, see
    make_vocab_size_divisible_by)."""
    make_vocab_size_divisible_by: int = 1
    """Pad the embedding rows to a multiple of this times the TP size (Megatron's convention; 128 is
    usual on GPU). 1 keeps the vocabulary as is when TP divides it."""
    seq_length: int = 128
    """Maximum sequence length (RoPE table size)."""
    rotary_base: Optional[float] = None
    """RoPE theta. None: family default (llama/gemma 1e4, qwen2 1e6)."""
    norm_epsilon: Optional[float] = None
    """RMSNorm epsilon. None: family default (llama 1e-5, qwen2/gemma 1e-6)."""
    tie_embeddings: Optional[bool] = None
    """Share the input embedding and the output layer. None: family default (gemma tied)."""
    add_qkv_bias: Optional[bool] = None
    """Bias on the Q/K/V projections. None: family default (qwen2 true)."""
    init_method_std: float = 0.02
    """Std of the normal initialization of weights."""

    def __post_init__(self) -> None:
        if self.family not in FAMILY_DEFAULTS:
            raise ConfigError(f"model.family={self.family!r} is not supported; choose one of {sorted(FAMILY_DEFAULTS)}")
        for name, value in FAMILY_DEFAULTS[self.family].items():
            if name != "activation" and getattr(self, name) is None:
                setattr(self, name, value)
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None and self.num_attention_heads > 0:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        problems = []
        positive = (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "kv_channels",
            "vocab_size",
            "seq_length",
            "make_vocab_size_divisible_by",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"model.{name}={getattr(self, name)} must be positive")
        if not problems and self.num_attention_heads % self.num_query_groups:
            problems.append(
                f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"model.num_query_groups={self.num_query_groups} (each KV head serves a whole group)"
            )
        if self.family != "gemma" and not problems:
            if self.kv_channels * self.num_attention_heads != self.hidden_size:
                # Allowed by Megatron, but for llama/qwen2 checkpoints it means a typo.
                problems.append(
                    f"model.kv_channels={self.kv_channels} x num_attention_heads="
                    f"{self.num_attention_heads} != hidden_size={self.hidden_size}; only the gemma "
                    "family uses a head dimension other than hidden_size/num_attention_heads"
                )
        if self.kv_channels is not None and self.kv_channels % 2:
            problems.append(f"model.kv_channels={self.kv_channels} must be even for RoPE")
        raise_problems(problems)

    @property
    def activation(self) -> str:
        """Gated MLP activation of the family: 'swiglu' (SiLU gate) or 'geglu' (tanh-GELU gate)."""
        return FAMILY_DEFAULTS[self.family]["activation"]

    def padded_vocab_size(self, tensor_parallel_size: int) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of make_vocab_size_divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)


@dataclass
class ParallelConfig:
    """How the model is split across processes. Data parallelism takes the remaining ranks."""

    tensor_model_parallel_size: int = 1
    """TP: split attention heads and MLP columns across this many ranks."""
    pipeline_model_parallel_size: int = 1
    """PP: split the layers into this many stages."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved PP: model chunks per pipeline stage (None: no interleaving)."""
    context_parallel_size: int = 1
    """CP: split each sequence into 2*CP chunks (load-balanced) across this many ranks."""
    sequence_parallel: bool = False
    """SP: shard activations outside attention/MLP along the sequence across the TP group (needs TP>1)."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                problems.append(f"parallel.{name}={getattr(self, name)} must be >= 1")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            if vpp < 1:
                problems.append(f"parallel.virtual_pipeline_model_parallel_size={vpp} must be >= 1")
            elif vpp > 1 and self.pipeline_model_parallel_size < 2:
                problems.append(
                    "parallel.virtual_pipeline_model_parallel_size needs parallel.pipeline_model_parallel_size >= 2"
                )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            problems.append(
                "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1 "
                "(SP shards activations across the TP group); set sequence_parallel=false or raise TP"
            )
        raise_problems(problems)

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one replica of the model: TP * PP * CP."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
"""Transformer Engine FP8 recipes, as megatron-core's `TransformerConfig.fp8_recipe` names them."""

FP8_DEFAULT_FORMAT = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3", "mxfp8": "e4m3"}
"""Each recipe's default `fp8_format`: Transformer Engine's own default for the recipe's class
(DelayedScaling / Float8CurrentScaling: HYBRID; Float8BlockScaling / MXFP8BlockScaling: E4M3)."""


def data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    """world_size / (TP*PP*CP), or ConfigError naming the fields when it does not divide."""
    mp = parallel.model_parallel_size
    if world_size % mp:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size="
            f"{parallel.tensor_model_parallel_size} x parallel.pipeline_model_parallel_size="
            f"{parallel.pipeline_model_parallel_size} x parallel.context_parallel_size="
            f"{parallel.context_parallel_size} = {mp}"
        )
    return world_size // mp


def validate_model_layout(model: ModelConfig, parallel: ParallelConfig, seq_length: int) -> None:
    """Checks that involve both the model and the layout (independent of the world size)."""
    tp = parallel.tensor_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    cp = parallel.context_parallel_size
    problems = []
    if model.num_attention_heads % tp:
        problems.append(
            f"parallel.tensor_model_parallel_size={tp} must divide model.num_attention_heads="
            f"{model.num_attention_heads}"
        )
    if model.num_query_groups % tp:
        problems.append(
            f"parallel.tensor_model_parallel_size={tp} must divide model.num_query_groups="
            f"{model.num_query_groups} (KV heads are not replicated across TP ranks)"
        )
    if model.ffn_hidden_size % tp:
        problems.append(
            f"parallel.tensor_model_parallel_size={tp} must divide model.ffn_hidden_size={model.ffn_hidden_size}"
        )
    chunks = pp * (parallel.virtual_pipeline_model_parallel_size or 1)
    if model.num_layers % chunks:
        problems.append(
            f"model.num_layers={model.num_layers} must be divisible by parallel.pipeline_model_parallel_size"
            f"={pp} x virtual_pipeline_model_parallel_size={parallel.virtual_pipeline_model_parallel_size or 1}"
        )
    why = []
    if cp > 1:
        why.append(f"2 x parallel.context_parallel_size={cp} load-balanced chunks")
    if parallel.sequence_parallel:
        why.append(f"parallel.tensor_model_parallel_size={tp} sequence-parallel shards")
    divisor = (2 * cp if cp > 1 else 1) * (tp if parallel.sequence_parallel else 1)
    if seq_length % divisor:
        problems.append(f"train.seq_length={seq_length} must be divisible by {divisor} ({' x '.join(why)})")
    raise_problems(problems)
