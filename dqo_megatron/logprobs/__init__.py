"""Token log-probs ``log pi(label)`` from logits or from hidden states, under TP / SP / CP.

    from dqo_megatron.logprobs import token_logprobs_from_logits, token_logprobs_from_hidden

    # full or vocab-parallel logits [b, s, V/tp] -> [b, s] fp32; chunked with recompute in backward
    lp = token_logprobs_from_logits(logits, labels, tp_group=tp_group, chunk_size=512)
    # fused with the output layer: hidden [s, b, h] (or [s/tp, b, h] under SP) and weight [V/tp, h]
    lp = token_logprobs_from_hidden(hidden, weight, labels, tp_group=tp_group, sequence_parallel=sp)
    # under CP: [b, s/cp] in the load-balanced layout -> [b, s] in natural order on every CP rank
    lp_full = gather_from_context_parallel(lp, cp_group)

Three paths, same numbers (see docs/algorithms.md, "Log-probs from logits"): naive
``log_softmax`` + gather keeps ~3 fp32 copies of the logits; `token_logprobs_from_logits` keeps one
chunk; `token_logprobs_from_hidden` never builds the ``[s, b, V]`` logits at all. Only torch (and
torch.distributed) is needed; Megatron is imported lazily for default process groups and CP order.
"""

from dqo_megatron.logprobs.from_hidden import (
    DEFAULT_CHUNK_BYTES,
    auto_chunk_size,
    output_weight,
    token_logprobs_from_hidden,
)
from dqo_megatron.logprobs.from_logits import token_logprobs_from_logits
from dqo_megatron.logprobs.gather import (
    copy_to_tensor_parallel,
    gather_from_context_parallel,
    gather_from_sequence_parallel,
    gather_per_token,
    split_for_context_parallel,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "auto_chunk_size",
    "copy_to_tensor_parallel",
    "gather_from_context_parallel",
    "gather_from_sequence_parallel",
    "gather_per_token",
    "output_weight",
    "split_for_context_parallel",
    "token_logprobs_from_hidden",
    "token_logprobs_from_logits",
]
