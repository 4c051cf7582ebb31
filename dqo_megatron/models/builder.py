"""Llama, Qwen2 and Gemma as Megatron-Core `GPTModel`s, built from a `ModelConfig` and layer specs.

The three families differ only in a few switches (see `FAMILY_DEFAULTS` in the config):
  llama  SwiGLU MLP, RMSNorm, RoPE (theta 1e4), optional GQA, tied or untied head
  qwen2  llama + bias on Q/K/V, RoPE theta 1e6, untied head
  gemma  GeGLU (tanh GELU), RMSNorm with zero-centred gamma (x_hat * (1 + w)), input embeddings
         scaled by sqrt(hidden), tied head, head_dim independent of hidden/heads

Layer spec: Transformer Engine's when TE is importable and CUDA is present (fused layernorm-linears,
TE attention, FP8 through `precision.fp8`); otherwise the CPU-capable local spec (`local_spec.py`),
with one log line saying why. Both carry the same checkpoint keys. What each precision needs is
checked first (`dqo_megatron.models.precision`).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from dqo_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, dtypes

logger = logging.getLogger(__name__)

Backend = Literal["auto", "te", "local"]


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: Optional[PrecisionConfig] = None,
    *,
    backend: Optional[str] = None,
    **overrides,
):
    """Megatron `TransformerConfig` for `model` under `parallel`/`precision` on layer spec `backend`.

    `backend`: 'te' or 'local' (what `select_backend` returned); None picks as `select_backend("auto")`.
    Raises `ConfigError` naming the field when this machine cannot train in `precision`
    (`dqo_megatron.models.precision`).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from dqo_megatron.models.precision import check_precision_supported

    precision = precision or PrecisionConfig()
    chosen = select_backend("auto") if backend is None else backend
    dtype_name = precision.resolved_dtype(torch.cuda.is_available())
    check_precision_supported(precision, dtype_name, backend=chosen, model=model, parallel=parallel)
    kwargs = transformer_config_kwargs(model, parallel, precision, backend=chosen, cuda=torch.cuda.is_available())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def transformer_config_kwargs(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    *,
    backend: str,
    cuda: bool,
) -> dict:
    """The `TransformerConfig` fields of `transformer_config` (no checks; testable without a GPU).

    One group per concern: the architecture (the family switches), the parallel layout, the numerical
    formats (FP8's own fields from `dqo_megatron.models.precision`) and the kernel fusions. The loss
    contract is per-token (`calculate_per_token_loss=True`: loss functions return sums and token counts,
    and Megatron divides by the global count once).
    """
    from dqo_megatron.compat.megatron_api import no_cuda_graph_kwargs
    from dqo_megatron.models.precision import fp8_transformer_config_kwargs

    return {
        **_architecture_kwargs(model),
        **_parallel_kwargs(parallel, cuda),
        **_dtype_kwargs(precision.resolved_dtype(cuda)),
        **_fusion_kwargs(model, backend, cuda),
        "calculate_per_token_loss": True,
        **fp8_transformer_config_kwargs(precision),
        **no_cuda_graph_kwargs(),
    }


def _architecture_kwargs(model: ModelConfig) -> dict:
    """Shapes, norm, activation, biases, dropout and init of `model`'s family.

    Per family: Qwen2's QKV bias is `add_qkv_bias` (Megatron gives linear_qkv a bias, TE's fused
    layernorm-linear too); Gemma's zero-centred gamma is `layernorm_zero_centered_gamma` (read by our
    RMSNorm and by TE's `TENorm` / `TELayerNormColumnParallelLinear` as `zero_centered_gamma`), its
    tanh GeGLU is the activation Megatron's MLP applies on either spec, and its embedding scale is a
    hook on the embedding (`build_gpt_model`), independent of the spec.
    """
    swiglu = model.activation != "geglu"
    return dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        layernorm_zero_centered_gamma=model.family == "gemma",
        gated_linear_unit=True,
        activation_func=F.silu if swiglu else partial(F.gelu, approximate="tanh"),
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
    )


def _parallel_kwargs(parallel: ParallelConfig, cuda: bool) -> dict:
    """The TP/PP/VPP/CP/SP layout, and how ranks initialize and exchange pipeline activations."""
    return dict(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=not cuda,
        # gloo matches a batched isend/irecv between the same pair of ranks out of order (PP=2 with
        # virtual stages sends activations and gradients both ways): measured wrong losses. NCCL is fine.
        batch_p2p_comm=cuda,
    )


def _dtype_kwargs(dtype_name: str) -> dict:
    """Parameter and pipeline-message dtype for 'fp32', 'bf16' or 'fp16'; softmax always in fp32."""
    dtype = dtypes.torch_dtype(dtype_name)
    return dict(
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype_name == "bf16",
        fp16=dtype_name == "fp16",
        attention_softmax_in_fp32=True,
    )


def _fusion_kwargs(model: ModelConfig, backend: str, cuda: bool) -> dict:
    """Which kernels are fused on layer spec `backend` ('te' or 'local').

    RoPE is fused: TE's kernel when TE is installed (and a GPU is there to run it), else ours
    (`dqo_megatron.models.rope`, one autograd op instead of Megatron's chunk/cat/cat; put in Megatron's
    empty fused-RoPE slot here, since `TransformerConfig` refuses ``apply_rope_fusion`` without one).
    SwiGLU is fused on both specs: on the TE spec by Megatron's fused bias-SwiGLU (there is no bias; it
    fuses the gate), Megatron-LM's default with TE; on the local spec by the spec's `SwiGLU` module
    (`use_te_activation_func`, the flag under which Megatron's MLP applies a spec's activation
    module). Gemma's tanh GeGLU stays unfused: Megatron fuses only `F.gelu`/`F.silu`. The other
    fusions need apex, TE or custom kernels and are off on the local spec.
    `gradient_accumulation_fusion` stays off: it makes TE write weight gradients into `main_grad`,
    which exists only under Megatron DDP, and models are also run without it (conversion checks, tests).
    """
    from dqo_megatron.models.rope import install_rope_kernel

    swiglu = model.activation != "geglu"
    te = backend == "te"
    return dict(
        bias_activation_fusion=te and swiglu,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=install_rope_kernel(cuda),
        # On the local spec, SwiGLU runs as the spec's activation module (`local_spec.SwiGLU`); Megatron
        # reads the module only under this flag (named for TE's modules, which fill it on TE specs).
        use_te_activation_func=not te and swiglu,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )


def select_backend(requested: Backend = "auto") -> str:
    """'te' or 'local'. 'auto' picks TE when it is usable here and logs why when it is not."""
    from dqo_megatron.compat import transformer_engine_status

    usable, reason = transformer_engine_status()
    if requested == "te" and not usable:
        raise RuntimeError(f"Transformer Engine layer spec requested but unusable: {reason}")
    if requested == "local" or (requested == "auto" and not usable):
        if requested == "auto":
            _log_once(
                f"Transformer Engine not used ({reason}); using the local layer spec "
                "(torch SDPA attention, fp32 RMSNorm)"
            )
        return "local"
    return "te"


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.warning(message)


def block_spec(config, backend: str, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """`TransformerBlockSubmodules` for this pipeline stage (layers + final norm) on `backend`."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if backend == "te":
        # Megatron's TE spec as is: the family switches live in the TransformerConfig (see
        # `transformer_config_kwargs`), which TE's modules read.
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer, final_norm = get_gpt_layer_with_transformer_engine_spec(), TENorm
    else:
        from dqo_megatron.models.local_spec import RMSNorm, get_local_layer_spec

        layer, final_norm = get_local_layer_spec(), RMSNorm
    n_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n_layers, layer_norm=final_norm)


def build_gpt_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: Optional[PrecisionConfig] = None,
    *,
    backend: Backend = "auto",
    vp_stage: Optional[int] = None,
    config_overrides: Optional[dict] = None,
):
    """One `GPTModel` chunk for this rank's pipeline stage (and virtual stage `vp_stage`).

    Needs Megatron's parallel state (`dqo_megatron.parallel.initialize`). The model outputs
    vocab-parallel logits ``[batch, seq, padded_vocab/tp]`` (or per-token loss with `labels`).
    """
    from megatron.core import parallel_state

    from dqo_megatron.compat.megatron_api import gpt_model_class

    GPTModel = gpt_model_class()
    chosen = select_backend(backend)
    config = transformer_config(model, parallel, precision, backend=chosen, **(config_overrides or {}))
    vpp = parallel.virtual_pipeline_model_parallel_size
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=vpp is None, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=vpp is None, vp_stage=vp_stage)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, chosen, vp_stage=vp_stage),
        vocab_size=model.padded_vocab_size(parallel.tensor_model_parallel_size),
        max_sequence_length=model.seq_length,
        pre_process=first,
        post_process=last,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
    )
    if model.family == "gemma" and first:
        gpt.embedding.register_forward_hook(_scale_embeddings_by_sqrt_hidden(model.hidden_size))
    gpt.backend = chosen
    return gpt


def build_model_chunks(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: Optional[PrecisionConfig] = None,
    *,
    backend: Backend = "auto",
    config_overrides: Optional[dict] = None,
) -> list:
    """All model chunks of this rank: one, or `virtual_pipeline_model_parallel_size` under VPP.

    Chunks are on this process's device, in the configured dtype (bf16/fp16 chunks are wrapped in
    Megatron's `Float16Module`, which casts inputs and keeps outputs in fp32).
    """
    from megatron.core.transformer.module import Float16Module

    from dqo_megatron.parallel import device_for_this_process

    vpp = parallel.virtual_pipeline_model_parallel_size
    stages = [None] if vpp is None else list(range(vpp))
    chunks = []
    for vp_stage in stages:
        gpt = build_gpt_model(
            model, parallel, precision, backend=backend, vp_stage=vp_stage, config_overrides=config_overrides
        )
        gpt = gpt.to(device_for_this_process())
        if gpt.config.bf16 or gpt.config.fp16:
            gpt = Float16Module(gpt.config, gpt)
        chunks.append(gpt)
    return chunks


def _scale_embeddings_by_sqrt_hidden(hidden_size: int):
    """Gemma multiplies input embeddings by sqrt(hidden), rounded to the activation dtype (as HF)."""

    def hook(_module, _inputs, output):
        return output * torch.tensor(math.sqrt(hidden_size), dtype=output.dtype, device=output.device)

    return hook
