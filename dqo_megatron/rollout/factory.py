"""`build_backend`: pick and construct a generation backend for a model directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import get_args

from dqo_megatron.rollout.backend import GenerationBackend
from dqo_megatron.rollout.config import BackendKind

logger = logging.getLogger(__name__)

BACKENDS = get_args(BackendKind)
"""Values of `kind` (`rollout.config.BackendKind`, the one list)."""


def resolve_kind(kind: str, model: str) -> str:
    """The backend `kind` means for `model`: "auto" is megatron for a dqo-megatron checkpoint directory
    (conversion or training checkpoint), else vllm when it imports and CUDA is available, else transformers."""
    if kind not in BACKENDS:
        raise ValueError(f"backend={kind!r}: choose one of {list(BACKENDS)}")
    if kind != "auto":
        return kind
    from dqo_megatron.rollout.megatron_backend import is_megatron_checkpoint

    if is_megatron_checkpoint(model):
        return "megatron"
    import torch

    from dqo_megatron.rollout.vllm_backend import vllm_available

    ok, why = vllm_available()
    if ok and torch.cuda.is_available():
        return "vllm"
    logger.info("backend auto -> transformers (%s)", why if not ok else "no CUDA device for vLLM")
    return "transformers"


def build_backend(
    kind: str = "auto",
    model: str = "",
    tokenizer: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    tensor_parallel: int = 1,
    tokenizer_name: str | None = None,
    batch_size: int = 64,
    chat_template: str | None = None,
    use_chat_template: bool = True,
    eos_token: str | None = None,
    trust_remote_code: bool = False,
    run_config: str | None = None,
    **engine_kwargs,
) -> GenerationBackend:
    """A ready `GenerationBackend` (call `.close()` when done).

    Args:
        kind: "auto" | "vllm" | "transformers" | "megatron" (see `resolve_kind`).
        model: HF model directory (vllm, transformers) or dqo-megatron checkpoint directory (megatron:
          a `convert hf-to-megatron` output, or a training checkpoint run_dir/checkpoints/step_N).
        tokenizer: HF tokenizer directory or sentencepiece .model; None = the model's (megatron: its hf/).
        device: transformers: "auto" | "cpu" | "cuda[:i]"; megatron runs where Megatron does (CUDA when
          available); vllm: its GPUs.
        dtype: "auto" | "float32" | "bfloat16" | "float16" (transformers also "float64", for tests).
        tensor_parallel: GPUs per vLLM engine (the other backends use one device).
        tokenizer_name: recorded as `behavior_tokenizer`; must equal preprocessing's tokenizer name
          (default there: the basename of `-t`); None = the same default here (see each backend).
        batch_size: rows (prompt x sample) per forward pass (transformers, megatron).
        chat_template, use_chat_template, eos_token: prompt framing, exactly as `preprocess` will do it.
        trust_remote_code: transformers / vLLM may run code shipped with the model (off by default).
        run_config: megatron with a training checkpoint: the run's config.yaml (default beside it).
        **engine_kwargs: extra `vllm.LLM` arguments (gpu_memory_utilization, max_model_len, ...).
    """
    if not model:
        raise ValueError("model is empty: give an HF model directory or a dqo-megatron checkpoint directory")
    if not Path(model).exists():
        raise FileNotFoundError(f"model {model} does not exist (models are loaded from local paths only)")
    if not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel={tensor_parallel!r}: must be an integer >= 1")
    resolved = resolve_kind(kind, model)
    if engine_kwargs and resolved != "vllm":
        raise ValueError(f"options {sorted(engine_kwargs)} are vLLM engine arguments; backend is {resolved}")
    if tensor_parallel > 1 and resolved != "vllm":
        raise ValueError(f"tensor_parallel={tensor_parallel} needs the vllm backend ({resolved} runs on one device)")
    framing = dict(
        tokenizer_name=tokenizer_name,
        chat_template=chat_template,
        use_chat_template=use_chat_template,
        eos_token=eos_token,
    )
    if resolved == "vllm":
        from dqo_megatron.rollout.vllm_backend import VLLMBackend

        return VLLMBackend(
            model,
            tokenizer,
            tensor_parallel=tensor_parallel,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            **framing,
            **engine_kwargs,
        )
    if resolved == "transformers":
        from dqo_megatron.rollout.transformers_backend import TransformersBackend

        return TransformersBackend(
            model,
            tokenizer,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
            **framing,
        )
    from dqo_megatron.rollout.megatron_backend import MegatronBackend

    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda"):
        raise ValueError(f"device={device!r}: choose auto, cpu or cuda")
    import torch

    where = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "auto" and not str(device).startswith(where):
        raise ValueError(f"device={device!r}: the megatron backend runs where Megatron does here ({where})")
    return MegatronBackend(model, tokenizer, run_config=run_config, dtype=dtype, batch_size=batch_size, **framing)
