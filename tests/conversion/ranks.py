"""Rank bodies and model factories for the conversion tests.

Rank bodies run in processes forked by `tests.helpers.distributed.run_distributed` (Megatron's global
state and the CPU patch never touch the pytest process). Those processes are daemons, and Megatron's
checkpoint writer starts helper processes, which daemons may not: `_allow_children` lifts that.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch

from dqo_megatron.config import ParallelConfig

PROMPTS = [[1, 5, 9, 2, 33, 17, 4, 60, 7, 11, 3], [2, 40, 41, 42, 8, 0, 90, 13]]
"""Token ids fed to both frameworks (< the smallest test vocabulary)."""


def _allow_children() -> None:
    multiprocessing.current_process().daemon = False


# ------------------------------------------------------------------------------------------ HF models
def tiny_hf_model(variant: str, seed: int = 0):
    """A small random transformers model (fp32, eager attention) of one of the test variants.

    Every parameter, norms and biases included, is drawn from N(0, 0.25) (norm weights around 1 for
    Llama/Qwen2, around 0 for Gemma's zero-centred ones) so that logits are O(1) and a wrong layout
    anywhere changes them.
    """
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    if variant == "llama_gqa_untied":
        model = LlamaForCausalLM(
            LlamaConfig(
                **common, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=5000.0, rms_norm_eps=1e-5
            )
        )
    elif variant == "llama_mha_tied":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=4, tie_word_embeddings=True))
    elif variant == "qwen2_gqa_bias_untied":
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False))
    elif variant == "qwen2_gqa_bias_tied":
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True))
    elif variant == "gemma_headdim24_gqa":
        model = GemmaForCausalLM(GemmaConfig(**common, num_key_value_heads=2, head_dim=24))
    else:
        raise ValueError(variant)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.25
            centre = 1.0 if name.endswith("norm.weight") and not variant.startswith("gemma") else 0.0
            param.copy_(centre + noise)
    return model.float().eval()


def hf_reference_logits(model, prompts=PROMPTS) -> list[torch.Tensor]:
    """transformers' logits ``[len, vocab]`` for each prompt."""
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].clone() for p in prompts]


# ------------------------------------------------------------------------------------------ rank bodies
def convert_rank(hf_dir: str, meg_dir: str, **kwargs):
    """hf_to_megatron in a fresh single-process world; returns the parity report (or None)."""
    _allow_children()
    from dqo_megatron.conversion import hf_to_megatron

    report = hf_to_megatron(hf_dir, meg_dir, progress=False, **kwargs)
    return report.parity


def to_hf_rank(meg_dir: str, hf_dir: str, **kwargs):
    """megatron_to_hf in a fresh single-process world; returns the parity report (or None)."""
    _allow_children()
    from dqo_megatron.conversion import megatron_to_hf

    return megatron_to_hf(meg_dir, hf_dir, progress=False, **kwargs).parity


def full_cycle_rank(hf_dir: str, meg_dir: str, back_dir: str, max_shard_size: str = "100KB"):
    """One process does HF -> Megatron (verified), Megatron -> HF (verified) and the TP=1 logits of the
    Megatron checkpoint (fewer forks: each costs a second)."""
    to_megatron = convert_rank(hf_dir, meg_dir, verify=True)
    to_hf = to_hf_rank(meg_dir, back_dir, verify=True, max_shard_size=max_shard_size)
    tp1 = layout_logits(meg_dir, ParallelConfig())
    return {"to_megatron": to_megatron, "to_hf": to_hf, "tp1_logits": tp1["logits"]}


def _load(meg_dir: str, layout: ParallelConfig):
    from dqo_megatron import parallel
    from dqo_megatron.conversion.megatron_io import build_empty_chunks, load_chunks, read_metadata

    cfg, _info = read_metadata(meg_dir)
    parallel.initialize(layout)
    chunks = build_empty_chunks(cfg, layout, torch.float32)
    load_chunks(chunks, Path(meg_dir) / "weights")
    return cfg, chunks


def _forward_step(data_iterator, model):
    ids = next(data_iterator)
    tokens = torch.tensor([ids])
    logits = model(tokens, torch.arange(len(ids)).unsqueeze(0), None)
    return logits, lambda output, non_loss_data=False: output.detach().clone()


def layout_logits(meg_dir: str, layout: ParallelConfig, prompts=PROMPTS, save_to: str | None = None):
    """Load `meg_dir` under `layout`, run `prompts` through Megatron's forward-only schedule, and return
    (on every rank) the full logits ``[len, vocab]`` per prompt as seen by the last pipeline stage of TP
    rank 0 -- or None on other ranks -- plus this rank's parameters in full names. Optionally saves the
    loaded model again under this layout into `save_to` (the resharding test)."""
    _allow_children()
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dqo_megatron.conversion.megatron_io import save_chunks
    from dqo_megatron.models.weights import local_to_global_names

    cfg, chunks = _load(meg_dir, layout)
    for chunk in chunks:
        chunk.eval()
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            out = get_forward_backward_func()(
                forward_step_func=_forward_step,
                data_iterator=iter([ids]),
                model=chunks,
                num_microbatches=1,
                seq_length=len(ids),
                micro_batch_size=1,
                forward_only=True,
                collect_non_loss_data=True,
            )
            if ps.is_pipeline_last_stage():
                local = out[0][0]  # [s, vocab/tp]
                parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
                torch.distributed.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
                outputs.append(torch.cat(parts, dim=-1)[:, : cfg.vocab_size])
    if save_to is not None:
        save_chunks(chunks, save_to)
    names = local_to_global_names(chunks[0])
    params = {names[n]: p.detach().clone() for n, p in chunks[0].named_parameters()}
    keep = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    return {
        "logits": outputs if keep else None,
        "params": params,
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
    }


def last_stage_logits(results) -> list[torch.Tensor]:
    """The logits reported by the one rank that kept them."""
    kept = [r["logits"] for r in results if r["logits"] is not None]
    assert len(kept) == 1, f"{len(kept)} ranks reported logits"
    return kept[0]


def value_rank(meg_dir: str, layout_tp: int = 1):
    """Load a value checkpoint into a GPT + ValueHead under TP=`layout_tp`; return the head's tensors, the
    values it gives on a prompt, and the trunk's parameters (full names)."""
    _allow_children()
    from dqo_megatron import parallel
    from dqo_megatron.conversion.megatron_io import build_empty_chunks, load_chunks, read_metadata
    from dqo_megatron.conversion.value import attach_value_head
    from dqo_megatron.models.value_head import FinalHiddenStates
    from dqo_megatron.models.weights import local_to_global_names

    cfg, info = read_metadata(meg_dir)
    layout = ParallelConfig(tensor_model_parallel_size=layout_tp)
    parallel.initialize(layout)
    (chunk,) = build_empty_chunks(cfg, layout, torch.float32)
    head = attach_value_head(chunk, cfg)
    with torch.no_grad():
        head.weight.fill_(123.0)  # must be overwritten by the load
    load_chunks([chunk], Path(meg_dir) / "weights")
    chunk.eval()
    with torch.no_grad(), FinalHiddenStates(chunk) as captured:
        ids = PROMPTS[0]
        chunk(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), None)
        values = head(captured.hidden)
    names = local_to_global_names(chunk)
    trunk = {names[n]: p.detach().clone() for n, p in chunk.named_parameters() if not n.startswith("value_head.")}
    return {
        "kind": info.kind,
        "weight": head.weight.detach().clone(),
        "bias": head.bias.detach().clone(),
        "values": values,
        "trunk": trunk,
    }


def write_value_ckpt_with_head(policy_dir: str, out: str, fill: float):
    """A value checkpoint from `policy_dir` whose head weight is `fill` everywhere and bias -fill (to test
    taking the head from another checkpoint)."""
    _allow_children()
    from dqo_megatron.conversion.value import value_from_megatron

    value_from_megatron(policy_dir, out)
    from dqo_megatron import parallel
    from dqo_megatron.conversion.megatron_io import (
        build_empty_chunks,
        load_chunks,
        read_metadata,
        save_chunks,
        write_metadata,
    )
    from dqo_megatron.conversion.value import attach_value_head

    cfg, info = read_metadata(out)
    parallel.initialize(ParallelConfig())
    (chunk,) = build_empty_chunks(cfg, ParallelConfig(), torch.float32)
    head = attach_value_head(chunk, cfg)
    load_chunks([chunk], Path(out) / "weights")
    with torch.no_grad():
        head.weight.fill_(fill)
        head.bias.fill_(-fill)
    import shutil

    shutil.rmtree(Path(out) / "weights")
    save_chunks([chunk], Path(out) / "weights")
    write_metadata(Path(out), cfg, info)


def convert_with_broken_qkv_rank(hf_dir: str, meg_dir: str):
    """hf_to_megatron with verify, where the QKV rule concatenates [q; k; v] without the per-group
    interleave (the classic conversion bug): must raise ConversionError. Returns the error message."""
    _allow_children()
    import torch as _torch

    from dqo_megatron.conversion import ConversionError, hf_to_megatron, registry

    original = registry.Family.rules

    def broken(self, cfg):
        rules = original(self, cfg)
        return [
            registry.TensorRule(r.megatron, r.hf, (lambda q, k, v: _torch.cat([q, k, v])), r.to_hf)
            if "linear_qkv" in r.megatron
            else r
            for r in rules
        ]

    registry.Family.rules = broken
    try:
        hf_to_megatron(hf_dir, meg_dir, verify=True, progress=False)
    except ConversionError as exc:
        return str(exc)
    return None


def convert_expecting_error_rank(hf_dir: str, meg_dir: str, **kwargs):
    """hf_to_megatron that must fail inside the conversion; returns the ConversionError message."""
    _allow_children()
    from dqo_megatron.conversion import ConversionError, hf_to_megatron

    try:
        hf_to_megatron(hf_dir, meg_dir, progress=False, **kwargs)
    except ConversionError as exc:
        return str(exc)
    return None


def cli_rank(args: list[str]):
    """Invoke the `convert` CLI in a fresh process; returns (exit code, output)."""
    _allow_children()
    from typer.testing import CliRunner

    from dqo_megatron.cli.convert import convert_app

    result = CliRunner().invoke(convert_app, args)
    return result.exit_code, result.output
