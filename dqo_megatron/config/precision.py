"""The precision section (dtype, FP8 recipe) and the FP8 GEMM-alignment check of a model/layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

from dqo_megatron.config.dtypes import canonical_dtype
from dqo_megatron.config.loader import raise_problems

if TYPE_CHECKING:
    from dqo_megatron.config.model import ModelConfig, ParallelConfig


FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
"""Transformer Engine FP8 recipes, as megatron-core's `TransformerConfig.fp8_recipe` names them."""

FP8_DEFAULT_FORMAT = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3", "mxfp8": "e4m3"}
"""Each recipe's default `fp8_format`: Transformer Engine's own default for the recipe's class
(DelayedScaling / Float8CurrentScaling: HYBRID; Float8BlockScaling / MXFP8BlockScaling: E4M3)."""


@dataclass
class PrecisionConfig:
    """Numerical formats. The DQO loss math, log-probs and IS weights are always fp32."""

    dtype: str = "auto"
    """Parameter/activation dtype: auto, fp32, bf16 or fp16 (float32, bfloat16, float16 mean the same).
    auto: bf16 on GPU, fp32 on CPU (the only format Megatron's optimizer supports there)."""
    fp8: Optional[Literal["delayed", "tensorwise", "blockwise", "mxfp8"]] = None
    """FP8 GEMMs in the transformer layers through Transformer Engine (None: off). Recipes: delayed
    (per-tensor scale from an amax history; compute capability >= 8.9), tensorwise (per-tensor current
    scaling; >= 8.9, TE >= 2.2), blockwise (1x128 / 128x128 blocks; >= 9.0 with CUDA >= 12.9, TE >= 2.3),
    mxfp8 (32-element blocks, E8M0 scales; Blackwell, 10.0 <= capability < 12.0). Needs the TE layer
    spec and bf16; every GEMM dimension (model.hidden_size, model.ffn_hidden_size / TP, the QKV and
    attention-output widths heads x model.kv_channels / TP, tokens per micro-batch) a multiple of 16
    (32 for mxfp8). The output layer, log-probs, value head and losses stay in bf16/fp32. See
    docs/gpu.md."""
    fp8_format: Optional[Literal["hybrid", "e4m3"]] = None
    """FP8 formats: hybrid (e4m3 forward, e5m2 gradients) or e4m3 everywhere. None: the recipe's
    default (hybrid for delayed/tensorwise, e4m3 for blockwise/mxfp8)."""
    fp8_param: bool = False
    """Keep the transformer layers' GEMM weights in FP8 (saves memory and the weight cast; needs `fp8`
    and train.distributed_optimizer, as in Megatron-LM)."""
    fp8_amax_history_len: int = 1024
    """delayed recipe: steps of amax history a scale is computed from (Transformer Engine's default)."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """delayed recipe: the amax used for a scale, the history's max or its most recent value."""

    def __post_init__(self) -> None:
        self.dtype = canonical_dtype(self.dtype, "precision.dtype")
        problems = []
        if self.fp8_param and self.fp8 is None:
            problems.append("precision.fp8_param=true needs precision.fp8 set to a recipe")
        if self.fp8_format is not None and self.fp8 is None:
            problems.append(f"precision.fp8_format={self.fp8_format} needs precision.fp8 set to a recipe")
        if self.fp8 is not None and self.dtype in ("fp32", "fp16"):
            problems.append(f"precision.fp8 needs precision.dtype bf16 (or auto), not {self.dtype}")
        if self.fp8 is not None and self.fp8 not in FP8_RECIPES:
            problems.append(f"precision.fp8={self.fp8!r}: choose one of {', '.join(FP8_RECIPES)}")
        if self.fp8_amax_history_len < 1:
            problems.append(f"precision.fp8_amax_history_len={self.fp8_amax_history_len} must be >= 1")
        raise_problems(problems)

    def resolved_dtype(self, cuda_available: bool) -> str:
        """The dtype actually used: 'auto' resolved for this machine."""
        if self.dtype == "auto":
            return "bf16" if cuda_available else "fp32"
        return self.dtype

    @property
    def resolved_fp8_format(self) -> Optional[str]:
        """`fp8_format`, or the recipe's default; None without FP8."""
        if self.fp8 is None:
            return None
        return self.fp8_format or FP8_DEFAULT_FORMAT[self.fp8]

    @property
    def fp8_alignment(self) -> int:
        """What every FP8 GEMM dimension must be a multiple of: 32 for mxfp8 (its scaling blocks),
        else 16 (Transformer Engine's FP8 GEMM alignment)."""
        return 32 if self.fp8 == "mxfp8" else 16


def fp8_dimension_problems(
    precision: PrecisionConfig,
    model: ModelConfig,
    parallel: ParallelConfig,
    micro_batch_size: Optional[int] = None,
    seq_length: Optional[int] = None,
) -> list[str]:
    """Why FP8 GEMMs cannot run on this model/layout (empty when they can, or without FP8).

    Transformer Engine quantizes both operands of every GEMM of a layer: the tokens of a micro-batch
    (``micro_batch_size * seq_length / CP``: the linears see the whole local sequence, SP gathers it
    first), the hidden size, and the per-rank widths of QKV (``(heads + 2 groups) * kv_channels / TP``),
    the attention output (``heads * kv_channels / TP``) and the MLP (``ffn / TP``). Each must be a
    multiple of `precision.fp8_alignment`. (Attention itself stays in bf16, so the head dimension
    matters only through those widths.)
    """
    if precision.fp8 is None:
        return []
    align, tp, cp = precision.fp8_alignment, parallel.tensor_model_parallel_size, parallel.context_parallel_size
    why = f"must be a multiple of {align} for precision.fp8={precision.fp8}"
    problems = []
    if model.hidden_size % align:
        problems.append(f"model.hidden_size={model.hidden_size} {why}")
    if model.ffn_hidden_size % (align * tp):
        problems.append(
            f"model.ffn_hidden_size={model.ffn_hidden_size} / parallel.tensor_model_parallel_size={tp} {why}"
        )
    heads, groups, d = model.num_attention_heads, model.num_query_groups, model.kv_channels
    if d is not None and groups is not None:
        # How each width is made of heads, so the message shows the arithmetic that failed.
        qkv_heads = f"(model.num_attention_heads={heads} + 2 x model.num_query_groups={groups})"
        widths = {
            "attention output": (heads * d, f"model.num_attention_heads={heads}"),
            "QKV": ((heads + 2 * groups) * d, qkv_heads),
        }
        for what, (width, heads_term) in widths.items():
            if width % (align * tp):
                problems.append(
                    f"the {what} width ({heads_term} x model.kv_channels={d} = {width}) / "
                    f"parallel.tensor_model_parallel_size={tp} {why}"
                )
    if micro_batch_size is not None and seq_length is not None:
        tokens = micro_batch_size * seq_length // max(cp, 1)
        if tokens % align:
            per_cp = f" / parallel.context_parallel_size={cp}" if cp > 1 else ""
            problems.append(
                f"train.micro_batch_size={micro_batch_size} x train.seq_length={seq_length}{per_cp} = {tokens} "
                f"tokens per micro-batch {why}"
            )
    return problems
