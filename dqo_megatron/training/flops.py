"""Model FLOPs of a training step, for TFLOP/s and MFU in the logs.

Per token of a decoder with N non-embedding parameters (L layers, width h) at sequence length s, a
forward pass costs about 2N (every weight is one multiply-add) plus 4*L*h*s for attention
(QK^T and AV, full square; Megatron's convention), and the output layer 2*h*V; backward costs twice
the forward. So a trained member costs 3x its forward, a frozen reference 1x, and a value network
skips the output layer. Padding tokens are counted (they are computed): a padded step computes a
row of seq_length per document; a packed one fewer rows, which the logger counts from the step's
`rows_per_document` metric.
"""

from __future__ import annotations

from dqo_megatron.config import ModelConfig
from dqo_megatron.models.params import expected_parameter_count

PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "B200": 2250.0,
    "GB200": 2500.0,
}
"""Dense bf16 peak per GPU (vendor figures, TFLOP/s) by a name fragment of `torch.cuda.get_device_name`."""


def forward_flops_per_token(model: ModelConfig, seq_length: int, with_output_layer: bool = True) -> float:
    """FLOPs of one forward pass per token (see the module docstring)."""
    embeddings = model.vocab_size * model.hidden_size * (1 if model.tie_embeddings else 2)
    non_embedding = expected_parameter_count(model) - embeddings
    flops = 2.0 * non_embedding + 4.0 * model.num_layers * model.hidden_size * seq_length
    if with_output_layer:
        flops += 2.0 * model.hidden_size * model.vocab_size
    return flops


def step_flops(
    model: ModelConfig, tokens: int, seq_length: int, *, value_network: bool, reference_model: bool
) -> float:
    """FLOPs of one optimizer step over `tokens` tokens (all ranks together)."""
    per_token = 3.0 * forward_flops_per_token(model, seq_length)
    if value_network:
        per_token += 3.0 * forward_flops_per_token(model, seq_length, with_output_layer=False)
    if reference_model:
        per_token += forward_flops_per_token(model, seq_length)
    return per_token * tokens


def peak_tflops_per_device(configured: float | None) -> float | None:
    """The configured peak, else the bf16 peak of a known GPU, else None (CPU: no MFU)."""
    if configured:
        return configured
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for fragment, peak in PEAK_BF16_TFLOPS.items():
        if fragment in name:
            return peak
    return None
