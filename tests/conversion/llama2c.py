"""Test utility: import a llama2.c checkpoint (legacy binary format) into a Hugging Face Llama directory.

Only for tests (the real trained stories260K model). Layout (see the shared data README): a header of
7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a positive vocab_size means
the output layer shares the embedding), then float32 tensors: token embedding [V, d]; attention norm
[L, d]; wq [L, d, d]; wk [L, kv, d]; wv [L, kv, d]; wo [L, d, d]; FFN norm [L, d]; w1 [L, f, d];
w2 [L, d, f]; w3 [L, f, d]; final norm [d]; RoPE tables (unused); then wcls [V, d] only when unshared.

llama2.c rotates interleaved pairs (0,1), (2,3), ... of each head, HF rotates halves (i, i + d/2); the
rows of wq and wk are permuted so that HF's rotation acts on the same pairs (the permutation of HF's own
Meta-to-HF conversion script). w1 is the gate, w3 the up projection, w2 the down projection.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch


def read_llama2c(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header dict, tensors) of a legacy llama2.c checkpoint; raises ValueError when the size disagrees."""
    data = Path(path).read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("7i", data[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    head_dim = dim // heads
    kv_dim = kv_heads * head_dim
    floats = np.frombuffer(data, dtype=np.float32, offset=28)
    shapes = [
        ("tok_embeddings", (vocab, dim)),
        ("attention_norm", (layers, dim)),
        ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_dim, dim)),
        ("wv", (layers, kv_dim, dim)),
        ("wo", (layers, dim, dim)),
        ("ffn_norm", (layers, dim)),
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("norm", (dim,)),
        ("freq_cis_real", (seq_len, head_dim // 2)),
        ("freq_cis_imag", (seq_len, head_dim // 2)),
    ]
    if not shared:
        shapes.append(("output", (vocab, dim)))
    tensors, offset = {}, 0
    for name, shape in shapes:
        count = int(np.prod(shape))
        if offset + count > floats.size:
            raise ValueError(f"{path}: file too short for {name} {shape}")
        tensors[name] = torch.from_numpy(floats[offset : offset + count].copy()).reshape(shape)
        offset += count
    if offset != floats.size:
        raise ValueError(f"{path}: {floats.size - offset} trailing floats (not the legacy llama2.c layout?)")
    header = dict(
        dim=dim,
        hidden_dim=hidden,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv_heads,
        vocab_size=vocab,
        seq_len=seq_len,
        shared_classifier=shared,
    )
    return header, tensors


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection ``[n_heads*d, in]`` reordered from interleaved RoPE pairs to HF's halves."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def llama2c_to_hf(bin_path: str | Path, out_dir: str | Path, tokenizer_model: str | Path | None = None) -> Path:
    """Write an HF LlamaForCausalLM directory (fp32 safetensors, config.json, tokenizer.model) for the
    llama2.c checkpoint `bin_path`; returns `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, t = read_llama2c(bin_path)
    config = LlamaConfig(
        vocab_size=h["vocab_size"],
        hidden_size=h["dim"],
        intermediate_size=h["hidden_dim"],
        num_hidden_layers=h["n_layers"],
        num_attention_heads=h["n_heads"],
        num_key_value_heads=h["n_kv_heads"],
        max_position_embeddings=h["seq_len"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=h["shared_classifier"],
        bos_token_id=1,
        eos_token_id=2,
    )
    state = {"model.embed_tokens.weight": t["tok_embeddings"], "model.norm.weight": t["norm"]}
    for i in range(h["n_layers"]):
        p = f"model.layers.{i}."
        state.update(
            {
                p + "input_layernorm.weight": t["attention_norm"][i],
                p + "self_attn.q_proj.weight": interleaved_to_halves(t["wq"][i], h["n_heads"]),
                p + "self_attn.k_proj.weight": interleaved_to_halves(t["wk"][i], h["n_kv_heads"]),
                p + "self_attn.v_proj.weight": t["wv"][i],
                p + "self_attn.o_proj.weight": t["wo"][i],
                p + "post_attention_layernorm.weight": t["ffn_norm"][i],
                p + "mlp.gate_proj.weight": t["w1"][i],
                p + "mlp.up_proj.weight": t["w3"][i],
                p + "mlp.down_proj.weight": t["w2"][i],
            }
        )
    if not h["shared_classifier"]:
        state["lm_head.weight"] = t["output"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if h["shared_classifier"] else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(f"llama2.c import: missing {missing}, unexpected {unexpected}")
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if tokenizer_model is not None:
        (out_dir / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    return out_dir
