"""Parameter counts from the architecture formula (independent of how Megatron builds the model)."""

from __future__ import annotations

from dqo_megatron.config import ModelConfig


def expected_parameter_count(model: ModelConfig, padded_vocab_size: int | None = None) -> int:
    """Total parameters of the unsharded model.

    With V = vocab rows, h = hidden, d = head dim, n = query heads, g = KV heads, f = FFN width,
    L = layers:
      embeddings  V*h (+ V*h for an untied output layer)
      per layer   attention  h*(n*d + 2*g*d) [+ n*d + 2*g*d bias (qwen2)]  +  n*d*h
                  gated MLP  h*2f + f*h
                  two RMSNorms 2h
      final norm  h
    """
    vocab = padded_vocab_size or model.vocab_size
    h, d, n, g, f = (
        model.hidden_size,
        model.kv_channels,
        model.num_attention_heads,
        model.num_query_groups,
        model.ffn_hidden_size,
    )
    qkv = h * (n * d + 2 * g * d) + ((n * d + 2 * g * d) if model.add_qkv_bias else 0)
    per_layer = qkv + n * d * h + 3 * h * f + 2 * h
    embeddings = vocab * h * (1 if model.tie_embeddings else 2)
    return embeddings + model.num_layers * per_layer + h
