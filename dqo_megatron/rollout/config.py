"""What one rollout run is asked to do: `RolloutConfig`, its settings checked as it is built."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args, get_type_hints

from dqo_megatron.config.loader import ConfigError
from dqo_megatron.rollout.backend import SamplingParams

BackendKind = Literal["auto", "vllm", "transformers", "megatron"]
"""The generation backends `factory.build_backend` can build (a new backend adds its name here)."""


@dataclass
class RolloutConfig:
    """One rollout run. Defaults are the paper's sampling settings (n 20, temperature 1.0, top_p 0.9, top_k 16)."""

    problems: str = ""
    """Problem file: GSM8K / MATH JSONL, any JSONL with a question and an answer field, or a saved
    `datasets` directory (see `tasks.datasets.load_problems`)."""
    output: str = ""
    """Output JSON Lines file; appended to (and resumed) problem by problem."""
    model: str = ""
    """HF model directory, or a dqo-megatron checkpoint directory (megatron backend). May be empty when
    `run_rollout` is given a backend."""
    tokenizer: Optional[str] = None
    """Tokenizer (HF directory or sentencepiece .model); None = the model's."""
    tokenizer_name: Optional[str] = None
    """Written as `behavior_tokenizer`; must equal what `preprocess` calls its tokenizer (its default: the
    basename of `-t`). None = the backend's default (basename of the tokenizer path; megatron: of the HF
    directory the checkpoint was converted from)."""
    backend: BackendKind = "auto"
    """Generation backend; auto: megatron for a dqo-megatron checkpoint, vllm with CUDA when installed,
    else transformers."""
    task: Literal["auto", "gsm8k", "math"] = "auto"
    """Answer format and prompt instruction; auto guesses from the problems path."""
    offset: int = 0
    """Skip this many problems first."""
    limit: Optional[int] = None
    """Use at most this many problems (after offset); None = all."""
    n: int = 20
    """Samples per problem (the paper: 20)."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy (then n must be 1)."""
    top_p: float = 0.9
    """Nucleus sampling threshold (the paper: 0.9); 1.0 = off."""
    top_k: int = 16
    """Top-k sampling (the paper: 16); 0 = off."""
    max_new_tokens: int = 512
    """Longest response in tokens, EOS included."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (generation ends after the token completing one; such samples get no behavior log-probs
    and are not marked truncated)."""
    seed: int = 0
    """Base seed; problem p uses derive_seed(seed, p.id), its sample j sample_seed(that, j)."""
    prompt_format: Literal["auto", "chat", "text"] = "auto"
    """chat: records' prompt = chat messages (`tasks.prompts.build_messages`); text: the prompt string.
    auto: chat when the tokenizer has a chat template, else text. The model sees the same tokens."""
    system_prompt: Optional[str] = None
    """A system turn before the problem (chat format only; the paper uses none)."""
    behavior_logprobs: Literal["raw", "sampled", "none"] = "raw"
    """What `behavior_logprobs` holds: raw = the sampler model's own log-probs (temperature 1, full
    vocabulary: equal to the policy's at training step 0 when the policy starts from the sampler, so the
    importance weight is 1 there); sampled = log-probs under the truncated distribution sampled from
    (after temperature/top-k/top-p: weights then shrink with response length); none = omit. The other
    kind goes to metadata (`sampled_logprobs` / `raw_logprobs`)."""
    label: bool = False
    """Check answers inline: reward/correct/extracted_answer/label_reason as `dqo-megatron label` writes them."""
    label_timeout_s: float = 5.0
    """MATH answer comparison limit per response, seconds (label only)."""
    chat_template: Optional[str] = None
    """Replace the tokenizer's chat template (Jinja string or .jinja file); give preprocess the same."""
    use_chat_template: bool = True
    """False: frame prompts as BOS + text even when the tokenizer has a template (preprocess --no-chat-template)."""
    eos_token: Optional[str] = None
    """The EOS preprocessing appends (preprocess --eos-token); None = the tokenizer's."""
    device: str = "auto"
    """transformers backend: auto | cpu | cuda[:i]."""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16."""
    tensor_parallel: int = 1
    """vLLM tensor_parallel_size."""
    batch_size: int = 64
    """Rows (problem x sample) per forward pass (transformers / megatron); does not change the samples."""
    problems_per_call: Optional[int] = None
    """Problems handed to the backend per generate call; each is written as soon as its call returns.
    None: 256 for vLLM (its scheduler needs many requests to fill a GPU), 8 otherwise."""
    run_config: Optional[str] = None
    """megatron backend with a training checkpoint: its run config (default run_dir/config.yaml)."""
    trust_remote_code: bool = False
    """Allow model code shipped with an HF checkpoint (off by default)."""
    overwrite: bool = False
    """Start over when the output exists (default: resume it, if its settings match)."""
    progress: bool = True
    """Progress bar (samples/s) on stderr."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if not self.problems:
            raise ConfigError("problems is empty: give a problem file (e.g. ../shared/data/gsm8k/train.jsonl)")
        if not self.output:
            raise ConfigError("output is empty: give the output .jsonl path")
        hints = get_type_hints(type(self))
        choices = {name: get_args(hints[name]) for name in ("backend", "task", "prompt_format", "behavior_logprobs")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: choose one of {list(allowed)}")
        for name, low in (
            ("n", 1),
            ("max_new_tokens", 1),
            ("batch_size", 1),
            ("tensor_parallel", 1),
            ("offset", 0),
            ("top_k", 0),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name}={value!r}: must be an integer >= {low}")
        for name in ("limit", "problems_per_call"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name}={value!r}: must be an integer >= 1 (or None)")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature={self.temperature}: must be >= 0")
        if self.temperature == 0 and self.n != 1:
            raise ConfigError(f"n={self.n}: greedy decoding (temperature 0) gives one sample per problem; set n=1")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: must be in (0, 1]")
        if not self.label_timeout_s > 0:
            raise ConfigError(f"label_timeout_s={self.label_timeout_s}: must be > 0")
        if self.system_prompt is not None and self.prompt_format == "text":
            raise ConfigError("system_prompt needs prompt_format chat (or auto with a chat template)")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r}: must be an integer")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ConfigError(
                f"stop={self.stop!r}: stop strings must be non-empty (an empty one ends every sample at once)"
            )
        if os.path.isdir(self.output):
            raise ConfigError(f"output={self.output!r} is a directory: give the output .jsonl file path")

    def sampling_params(self) -> SamplingParams:
        """The backend's `SamplingParams`."""
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            stop=tuple(self.stop),
        )
