"""A tiny random `transformers` Llama written to disk and converted to a dqo-megatron checkpoint."""

from __future__ import annotations

from pathlib import Path


def _convert(hf_dir: str, out: str) -> str:
    from dqo_megatron.conversion.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out, progress=False)
    return out


def tiny_llama_checkpoint(root: Path, *, seq: int, tied: bool, seed: int):
    """Write ``root/hf`` (safetensors) and convert it to ``root/megatron`` in a forked rank.

    Returns ``(megatron_dir, hf_model)``: vocab 256, hidden 64, 2 layers, 4 heads, 2 KV heads.
    """
    import torch
    import transformers

    from tests.helpers.distributed import run_distributed

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "hf", safe_serialization=True)
    run_distributed(_convert, 1, str(root / "hf"), str(root / "megatron"))
    return str(root / "megatron"), model
