"""A Megatron-Core layer spec that runs anywhere (CPU or GPU) without Transformer Engine or apex.

Megatron's own local spec cannot run here: its core attention takes buffers from a CUDA memory pool
and builds its causal mask on "cuda", and its torch norm refuses sequence parallelism. We keep
Megatron's modules (SelfAttention, MLP, Column/RowParallelLinear, TransformerLayer/Block) and swap in
two submodules through the spec, Megatron's intended extension point:

* `SDPACoreAttention`: `F.scaled_dot_product_attention` with grouped-query attention, and context
  parallelism. Under CP the sequence is cut into 2*cp chunks and rank r holds chunks r and
  2*cp-1-r (Megatron's load balancing); each rank all-gathers K/V over the CP group and masks
  causally by the *global* position of every query and key.
* `RMSNorm`: computed in fp32; optional zero-centred gamma (Gemma: y = x_hat * (1 + w)); its weight is
  marked `sequence_parallel` so that Megatron all-reduces its gradient across TP under SP.

and, for SwiGLU models (Llama, Qwen2), the MLP's activation module (`MLPSubmodules.activation_func`,
used when `config.use_te_activation_func` is set; the builder sets it on this spec only):

* `SwiGLU`: ``silu(gate) * up`` over fc1's ``[..., 2F]`` output as one autograd op. Megatron's
  unfused gated path chunks, adds the (zero) linear offset and multiplies, saving three ``[..., F]``
  tensors and `cat`-ing the two halves' gradients in backward; this saves fc1's output only and
  writes each half's gradient in place.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from dqo_megatron.parallel import cp_local_positions


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dim, in fp32: ``y = x / sqrt(mean(x^2) + eps) * gamma``.

    ``gamma = w`` (init 1), or ``1 + w`` (init 0) when `config.layernorm_zero_centered_gamma`.
    Input/output ``[..., hidden]``; output in the input's dtype.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        # Replicated across TP; under SP each rank sees a different slice of the sequence, so the
        # gradient is partial and Megatron's finalize_model_grads all-reduces params marked so.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        gamma = self.weight.float() + 1.0 if self.zero_centered_gamma else self.weight.float()
        return (normed * gamma).to(x.dtype)


class _SwiGLUFunction(torch.autograd.Function):
    """x ``[..., 2F]`` = [gate, up] -> ``silu(gate) * up`` ``[..., F]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(x, 2, dim=-1)
        ctx.save_for_backward(x)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        gate, up = torch.chunk(x, 2, dim=-1)
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        grad_gate, grad_up = torch.chunk(grad_x, 2, dim=-1)
        # d/d gate = grad * up * silu'(gate); d/d up = grad * silu(gate) (recomputed, not saved).
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        torch.mul(grad, F.silu(gate), out=grad_up)
        return grad_x


class SwiGLU(MegatronModule):
    """Gated activation ``silu(x[..., :F]) * x[..., F:]``: ``[..., 2F]`` -> ``[..., F]`` (fc1's output
    under TP is this rank's [gate shard, up shard], so the halves pair up per rank). No parameters;
    a MegatronModule because Megatron's MLP asks each child for its sharded state dict."""

    def __init__(self, config: Optional[TransformerConfig] = None):
        super().__init__(config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwiGLUFunction.apply(x)


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along dim 0 over `group`; backward sums the gradient over ranks and keeps this
    rank's slice (all-reduce + slice, since gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = torch.distributed.get_rank(group)
        ctx.local = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.local : (ctx.rank + 1) * ctx.local], None


class SDPACoreAttention(MegatronModule):
    """Core attention on `torch.nn.functional.scaled_dot_product_attention` (causal, GQA, CP).

    Same constructor and call signature as Megatron's `DotProductAttention`: query
    ``[sq, b, heads/tp, d]``, key/value ``[sk, b, groups/tp, d]`` -> ``[sq, b, heads/tp * d]``.
    `attention_mask`, when given, is Megatron's boolean mask (True = masked out),
    broadcastable to ``[b, heads, sq, sk]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise NotImplementedError(f"SDPACoreAttention supports causal masks only, got {attn_mask_type}")
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels**-0.5
        self.cp_size = config.context_parallel_size

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: packed sequences / attention bias are not supported")
        sq, b, heads, d = query.shape
        mask = None
        if self.cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            cp_rank = parallel_state.get_context_parallel_rank()
            key = _AllGatherSeq.apply(key, group)
            value = _AllGatherSeq.apply(value, group)
            q_pos = cp_local_positions(sq, self.cp_size, cp_rank, query.device)
            k_pos = torch.cat([cp_local_positions(sq, self.cp_size, r, query.device) for r in range(self.cp_size)])
            mask = q_pos[:, None] >= k_pos[None, :]  # True = may attend (SDPA convention)
        if key.shape[2] != heads:  # grouped-query attention: each KV head serves heads/groups queries
            repeat = heads // key.shape[2]
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        if attention_mask is not None:
            allowed = ~attention_mask
            mask = allowed if mask is None else (allowed & mask)
            if self.cp_size == 1:
                causal = torch.ones(sq, key.shape[0], dtype=torch.bool, device=query.device).tril()
                mask = mask & causal
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout_p if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=self.softmax_scale
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * d)


def get_local_layer_spec() -> ModuleSpec:
    """Spec of one transformer layer (pre-norm, self-attention, gated MLP) that runs on CPU and GPU.

    QKV bias, GQA and the activation are read from the TransformerConfig by Megatron's modules; the
    MLP applies `SwiGLU` when the config sets `use_te_activation_func` (SwiGLU models), else
    Megatron's own gated path with `config.activation_func` (Gemma's tanh GeGLU).
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPACoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, activation_func=SwiGLU, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint names as the Transformer Engine spec (norms fused into the linears),
            # so a checkpoint written on CPU loads on GPU and back.
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )
