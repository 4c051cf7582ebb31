"""Move unsharded ("full", as a TP=1 PP=1 model names them) weights into this rank's model chunk.

Used to start every layout from identical weights (layout tests, conversion). Megatron marks each
tensor-parallel parameter with `partition_dim`; the gated MLP's fc1 holds [gate; up] stacked, and TP
splits each half separately, so rank r holds [gate_r; up_r]. Pipeline stages hold a slice of the
layers: a layer's global index is `layer_number - 1`.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def local_to_global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """``{local parameter name: full-model name}`` for a GPTModel chunk (unwrapped)."""
    mapping = {}
    for name, param in chunk.named_parameters():
        match = _LAYER.match(name)
        if match:
            layer = chunk.decoder.layers[int(match.group(1))]
            mapping[name] = f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"
        elif name == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
            mapping[name] = "embedding.word_embeddings.weight"  # last stage's copy of the tied embedding
        else:
            mapping[name] = name
    return mapping


def shard_tensor_for_rank(
    full: torch.Tensor, local: torch.Tensor, param, name: str, tp_rank: int, tp_size: int, gated_fc1: bool = True
) -> torch.Tensor:
    """This TP rank's slice of `full`, shaped like `local` (vocab rows beyond `full` are zero-padded)."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        out = full
    else:
        dim = param.partition_dim
        if gated_fc1 and name.endswith("mlp.linear_fc1.weight"):
            halves = torch.chunk(full, 2, dim=0)
            out = torch.cat([torch.chunk(h, tp_size, dim=0)[tp_rank] for h in halves], dim=0)
        elif "word_embeddings" in name or name.endswith("output_layer.weight"):
            rows = local.shape[0]
            padded = torch.zeros(rows * tp_size, *full.shape[1:], dtype=full.dtype)
            padded[: full.shape[0]] = full
            out = padded[tp_rank * rows : (tp_rank + 1) * rows]
        else:
            out = torch.chunk(full, tp_size, dim=dim)[tp_rank]
    if out.shape != local.shape and out.shape[0] < local.shape[0]:  # TP=1 with a padded vocab
        padded = torch.zeros_like(local, device="cpu")
        padded[: out.shape[0]] = out
        out = padded
    if out.shape != local.shape:
        raise ValueError(f"{name}: full tensor {tuple(full.shape)} does not shard to {tuple(local.shape)}")
    return out


def shard_full_state(chunk: torch.nn.Module, full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{local name: tensor}`` for every parameter of `chunk`, cut from the `full` state."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    gated = chunk.config.gated_linear_unit
    params = dict(chunk.named_parameters())
    out = {}
    for local_name, global_name in local_to_global_names(chunk).items():
        if global_name not in full:
            raise KeyError(f"full state has no '{global_name}' (needed for local '{local_name}')")
        param = params[local_name]
        out[local_name] = shard_tensor_for_rank(
            full[global_name], param.data, param, global_name, tp_rank, tp_size, gated
        )
    return out


@torch.no_grad()
def load_full_state(chunk: torch.nn.Module, full: Mapping[str, torch.Tensor]) -> None:
    """Copy this rank's slices of the `full` weights into `chunk`'s parameters (in place)."""
    params = dict(chunk.named_parameters())
    for name, tensor in shard_full_state(chunk, full).items():
        params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def full_state_of_unsharded(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state of a TP=1 PP=1 chunk: its parameters, cloned to CPU (tied output omitted)."""
    return {name: p.detach().cpu().clone() for name, p in chunk.named_parameters()}
