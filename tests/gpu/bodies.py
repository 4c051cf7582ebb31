"""Rank bodies of the GPU tests, run by `tests.gpu.support.run_spawned` (module-level: spawned ranks
import them by name). Each initializes its own parallel state on `cuda:LOCAL_RANK`."""

from __future__ import annotations

import torch

from dqo_megatron import parallel
from dqo_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig

TE_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
"""Local-spec parameter -> TE-spec parameter (TE fuses each pre-norm into the following linear); every
other parameter has the same name in both (and both specs write the TE names to checkpoints)."""


def exact_fp32() -> None:
    """fp32 means fp32: no TF32 in matmuls or convolutions (the references below rely on it)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _gpt(chunk):
    from dqo_megatron.models.value_head import unwrap_gpt

    return unwrap_gpt(chunk)


def to_te_names(full: dict) -> dict:
    """A full (TP=1) state in local-spec names, renamed for a TE-spec model."""
    out = {}
    for name, tensor in full.items():
        for local, te in TE_NORM_NAMES.items():
            if name.endswith(local):
                name = name[: -len(local)] + te
        out[name] = tensor
    return out


# ------------------------------------------------------------------------------ TE spec vs local spec
def te_vs_local_logits(model_cfg: ModelConfig, tokens: torch.Tensor, with_te: bool = True) -> dict:
    """Logits of the same weights under: local spec fp32 (the reference), local spec bf16, and (with_te)
    TE spec bf16."""
    from dqo_megatron.models import build_model_chunks, expected_parameter_count
    from dqo_megatron.models.weights import full_state_of_unsharded, load_full_state

    info = parallel.initialize(ParallelConfig(), seed=11)
    exact_fp32()
    tokens = tokens.to(info.device)
    positions = torch.arange(tokens.shape[1], device=info.device).expand_as(tokens)
    (ref,) = build_model_chunks(model_cfg, ParallelConfig(), PrecisionConfig(dtype="fp32"), backend="local")
    full = full_state_of_unsharded(_gpt(ref))
    (local,) = build_model_chunks(model_cfg, ParallelConfig(), PrecisionConfig(dtype="bf16"), backend="local")
    load_full_state(_gpt(local), full)
    if not with_te:
        with torch.no_grad():
            logits = {name: m(tokens, positions, None).float() for name, m in (("fp32", ref), ("local", local))}
        return {"logits": logits}
    (te,) = build_model_chunks(model_cfg, ParallelConfig(), PrecisionConfig(dtype="bf16"), backend="te")
    te_full = to_te_names(full)
    te_params = {n for n, _ in _gpt(te).named_parameters()}
    if te_params != set(te_full):
        raise AssertionError(
            f"TE-spec parameters differ from the local spec's (renamed): only TE "
            f"{sorted(te_params - set(te_full))[:6]}, only local {sorted(set(te_full) - te_params)[:6]}"
        )
    load_full_state(_gpt(te), te_full)
    with torch.no_grad():
        logits = {name: m(tokens, positions, None).float() for name, m in (("fp32", ref), ("local", local), ("te", te))}
    layer = _gpt(te).decoder.layers[0]
    qkv, fc1 = layer.self_attention.linear_qkv, layer.mlp.linear_fc1
    return {
        "logits": logits,
        "n_params_te": sum(p.numel() for p in _gpt(te).parameters()),
        "n_params_expected": expected_parameter_count(model_cfg),
        "backend": _gpt(te).backend,
        "qkv_class": type(qkv).__name__,
        "core_attention_class": type(layer.self_attention.core_attention).__name__,
        "final_norm_class": type(_gpt(te).decoder.final_layernorm).__name__,
        "zero_centered_gamma": [getattr(m, "zero_centered_gamma", None) for m in (qkv, fc1)],
        "qkv_has_bias": any(n.endswith("linear_qkv.bias") for n in te_params),
    }


def te_spec_summary(model_cfg: ModelConfig) -> dict:
    """Build `model_cfg` on the TE spec (bf16) and run one forward/backward; what was built."""
    from dqo_megatron.models import build_model_chunks, expected_parameter_count

    info = parallel.initialize(ParallelConfig(), seed=5)
    (chunk,) = build_model_chunks(model_cfg, ParallelConfig(), PrecisionConfig(dtype="bf16"), backend="auto")
    gpt = _gpt(chunk)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 64), device=info.device)
    logits = chunk(tokens, torch.arange(64, device=info.device).expand(2, 64), None)
    logits.float().pow(2).mean().backward()
    layer = gpt.decoder.layers[0]
    return {
        "backend": gpt.backend,
        "classes": sorted({type(m).__name__ for m in gpt.modules()}),
        "n_params": sum(p.numel() for p in gpt.parameters()),
        "n_params_expected": expected_parameter_count(model_cfg),
        "zero_centered_gamma": getattr(layer.self_attention.linear_qkv, "zero_centered_gamma", None),
        "qkv_bias": any(n.endswith("linear_qkv.bias") for n, _ in gpt.named_parameters()),
        "finite": bool(torch.isfinite(logits).all()),
        "all_grads": all(p.grad is not None for p in gpt.parameters() if p.requires_grad),
    }


# ------------------------------------------------------------------------------------ FP8 vs bf16 curve
def pattern_batch(vocab: int, rows: int, seq: int, step: int, seed: int = 0) -> dict:
    """A learnable synthetic batch: each row follows ``t[i+1] = (a * t[i] + b) mod vocab`` with (a, b) one
    of 8 maps, picked per row; the model must infer the map from context (loss falls from ln(vocab)
    towards ~0 after a few tokens of each row)."""
    gen = torch.Generator().manual_seed(seed * 100003 + step)
    maps = torch.tensor([[3, 1], [5, 7], [7, 3], [11, 5], [13, 2], [17, 9], [19, 4], [23, 8]])
    pick = maps[torch.randint(0, len(maps), (rows,), generator=gen)]
    tokens = torch.empty(rows, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (rows,), generator=gen)
    for i in range(seq):
        tokens[:, i + 1] = (pick[:, 0] * tokens[:, i] + pick[:, 1]) % vocab
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(rows, seq),
        "position_ids": torch.arange(seq).expand(rows, seq).contiguous(),
    }


def lm_training_curve(
    model_cfg: ModelConfig,
    precision: PrecisionConfig,
    steps: int,
    rows: int,
    seq: int,
    lr: float = 1e-3,
    seed: int = 0,
    backend: str = "te",
) -> list[float]:
    """Losses of `steps` optimizer steps (Adam, constant LR) on `pattern_batch` data; one GPU."""
    from dqo_megatron.models import build_model_chunks
    from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, wrap_with_ddp
    from dqo_megatron.training.step import lm_forward_step, train_step

    info = parallel.initialize(ParallelConfig(), seed=1234)  # same init weights in every run
    chunks = build_model_chunks(model_cfg, ParallelConfig(), precision, backend=backend)
    ddp = wrap_with_ddp(chunks)
    attach_finalize(ddp)
    optimizer = build_optimizer(ddp, lr=lr, clip_grad=1.0)
    losses = []
    for step in range(steps):
        batch = {k: v.to(info.device) for k, v in pattern_batch(model_cfg.vocab_size, rows, seq, step, seed).items()}
        result = train_step(
            ddp,
            optimizer,
            iter([batch]),
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=rows,
            forward_step=lm_forward_step,
        )
        losses.append(result.loss)
    return losses


# ------------------------------------------------------------------------------- layouts under NCCL
def _setup_fp32(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, full_state=None):
    from dqo_megatron.models import build_model_chunks
    from dqo_megatron.models.weights import load_full_state
    from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, wrap_with_ddp
    from tests.helpers.layouts import LR, SEED

    info = parallel.initialize(parallel_cfg, seed=SEED)
    exact_fp32()
    chunks = build_model_chunks(model_cfg, parallel_cfg, PrecisionConfig(dtype="fp32"))
    if full_state is not None:
        for chunk in chunks:
            load_full_state(chunk, full_state)
    ddp = wrap_with_ddp(chunks)
    attach_finalize(ddp)
    return info, chunks, ddp, build_optimizer(ddp, lr=LR, clip_grad=1.0, optimizer="sgd")


def layout_reference(model_cfg: ModelConfig, batch: dict, micro_batch_size: int = 1) -> dict:
    """One GPU, fp32: initial weights, logits, loss, grad norm, weights after one SGD step."""
    from dqo_megatron.models.weights import full_state_of_unsharded
    from dqo_megatron.training.step import lm_forward_step, train_step
    from tests.helpers.layouts import _collect_logits, micro_batches

    info, chunks, ddp, optimizer = _setup_fp32(model_cfg, ParallelConfig())
    (chunk,) = chunks
    initial = full_state_of_unsharded(chunk)
    seq = batch["tokens"].shape[1]
    mbs = [{k: v.to(info.device) for k, v in mb.items()} for mb in micro_batches(batch, 0, 1, micro_batch_size)]
    logits = torch.cat(_collect_logits(ddp, mbs, seq, micro_batch_size))
    result = train_step(
        ddp,
        optimizer,
        iter(mbs),
        num_microbatches=len(mbs),
        seq_length=seq,
        micro_batch_size=micro_batch_size,
        forward_step=lm_forward_step,
    )
    return {
        "initial": initial,
        "logits": logits.cpu(),
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "after": full_state_of_unsharded(chunk),
    }


def layout_deviation(
    model_cfg: ModelConfig, parallel_cfg: ParallelConfig, batch: dict, reference: dict, micro_batch_size: int = 1
) -> dict:
    """One step of `parallel_cfg` (NCCL) from the reference's weights; the largest deviations this rank
    sees on its own shards (compared on the CPU)."""
    from megatron.core import parallel_state as ps

    from dqo_megatron.models.weights import local_to_global_names, shard_tensor_for_rank
    from tests.helpers.layouts import _collect_logits, lm_train_step, logits_deviation, micro_batches

    info, chunks, ddp, optimizer = _setup_fp32(model_cfg, parallel_cfg, reference["initial"])
    seq = batch["tokens"].shape[1]
    mbs = [
        {k: v.to(info.device) for k, v in mb.items()}
        for mb in micro_batches(batch, info.dp_rank, info.dp_size, micro_batch_size)
    ]
    dev = {"logits": 0.0, "after": 0.0, "backend": torch.distributed.get_backend()}
    logits = _collect_logits(ddp, mbs, seq, micro_batch_size)
    if ps.is_pipeline_last_stage():
        dev.update(logits_deviation(torch.cat(logits).cpu(), reference["logits"], info))
    result = lm_train_step(ddp, optimizer, mbs, seq, micro_batch_size)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        names = local_to_global_names(chunk)
        for local_name, param in chunk.named_parameters():
            value = param.data.detach().cpu()
            want = shard_tensor_for_rank(
                reference["after"][names[local_name]], value, param, names[local_name], tp_rank, tp_size
            )
            dev["after"] = max(dev["after"], (value - want).abs().max().item())
    dev["loss"], dev["grad_norm"] = result.loss, result.grad_norm
    return dev


# ---------------------------------------------------------------------------------- a DQO step on GPU
def dqo_steps(
    model_cfg: ModelConfig,
    dtype: str,
    steps: int,
    rows: int,
    seq: int,
    value_mode: str = "separate",
    distributed_optimizer: bool = False,
) -> dict:
    """`steps` DQO optimizer steps through the trainer's pieces (PolicyValueModel, Megatron DDP and
    optimizer, `train_step` + `rl_forward_step`) on one fixed batch, the same on every (data-parallel)
    rank; with Megatron's distributed optimizer when asked. Reports the dtypes of the model's and of
    the optimizer's (master) parameters."""
    from functools import partial

    from dqo_megatron.config import LossConfig, RunConfig, TrainConfig, ValueConfig
    from dqo_megatron.training.algorithms import rl_forward_step
    from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, wrap_with_ddp
    from dqo_megatron.training.policy_value import (
        build_policy_value_chunks,
        finalize_policy_value_grads,
        pipeline_micro_batch_size,
    )
    from dqo_megatron.training.step import train_step
    from tests.helpers.rl_layouts import make_rl_batch

    run = RunConfig(
        model=model_cfg,
        algorithm="dqo",
        loss=LossConfig(beta=0.1, lam=0.9),
        precision=PrecisionConfig(dtype=dtype),
        value=ValueConfig(mode=value_mode, head_init_std=0.02),
        train=TrainConfig(micro_batch_size=rows, global_batch_size=rows, seq_length=seq, lr=1e-4),
    )
    info = parallel.initialize(run.parallel, seed=run.train.seed)
    exact_fp32()
    chunks = build_policy_value_chunks(run, with_value=True, with_reference=False)
    ddp = wrap_with_ddp(chunks, use_distributed_optimizer=distributed_optimizer)
    attach_finalize(ddp, finalize_policy_value_grads)
    optimizer = build_optimizer(ddp, lr=run.train.lr, clip_grad=1.0, use_distributed_optimizer=distributed_optimizer)
    megatron_optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    inner = [o.optimizer for o in megatron_optimizers]
    batch = {k: v.to(info.device) for k, v in make_rl_batch(model_cfg.vocab_size, rows, seq, with_ref=True).items()}
    with torch.no_grad():
        output, _ = rl_forward_step(run, iter([batch]), ddp[0])
    results = []
    for _ in range(steps):
        r = train_step(
            ddp,
            optimizer,
            iter([batch]),
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=pipeline_micro_batch_size(ddp[0], rows),
            forward_step=partial(rl_forward_step, run),
            metric_key="loss",
        )
        results.append(
            {
                "loss": r.loss,
                "grad_norm": r.grad_norm,
                "ok": r.update_successful,
                **{k: r.metrics[k] for k in ("policy_loss", "value_loss") if k in r.metrics},
            }
        )
    return {
        "steps": results,
        "output_dtype": output.dtype,
        "device": str(output.device),
        "param_dtypes": sorted({str(p.dtype) for p in chunks[0].policy.parameters()}),
        "optimizer_param_dtypes": sorted({str(p.dtype) for o in inner for g in o.param_groups for p in g["params"]}),
        "optimizer_classes": sorted({type(o).__name__ for o in megatron_optimizers}),
        "finite_output": bool(torch.isfinite(output).all()),
        "nccl": torch.distributed.get_backend(),
    }
