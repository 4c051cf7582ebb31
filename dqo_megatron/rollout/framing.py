"""What every backend shares around the model: prompt framing, stop conditions, decoding a row.

Prompts are framed by `dqo_megatron.data.tokenize.Tokenizer`, the very code preprocessing uses (chat
template with the generation prompt, or BOS + text for sentencepiece / template-less tokenizers), so
the ids a backend conditions on are the prompt ids preprocessing will write, and the generated ids
are (when they survive a decode / encode round trip, see records.logprob_check) the response ids it will write.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dqo_megatron.config.dtypes import torch_dtype
from dqo_megatron.config.loader import ConfigError
from dqo_megatron.data.tokenize import Tokenizer, TokenizerConfig
from dqo_megatron.rollout.backend import Completion
from dqo_megatron.tokenizer_files import holds_tokenizer as has_tokenizer  # noqa: F401 (re-exported for the backends)


def load_tokenizer(
    path: str | Path,
    *,
    name: str | None = None,
    chat_template: str | None = None,
    use_chat_template: bool = True,
    eos_token: str | None = None,
) -> Tokenizer:
    """The preprocessing `Tokenizer` for `path` (an HF tokenizer directory or a sentencepiece .model).

    `name` is what records carry as `behavior_tokenizer`; None = the basename of `path`, the same
    default as `dqo-megatron preprocess -t PATH`.
    """
    return Tokenizer(
        TokenizerConfig(
            path=str(path),
            name=name,
            chat_template=chat_template,
            use_chat_template=use_chat_template,
            eos_token=eos_token,
        )
    )


def stop_token_ids(tok: Tokenizer, model_dir: str | Path | None = None) -> set[int]:
    """The ids that end a response: the tokenizer's EOS (what preprocessing appends) plus the model's
    own `eos_token_id`s from generation_config.json / config.json (e.g. Llama-3's <|eot_id|>), so a
    model never runs past its end of turn. A response that ends with one of the latter is flagged by
    the rollout (its log-probs do not line up with the EOS preprocessing appends)."""
    ids = {int(tok.eos_id)}
    if model_dir is not None:
        for fname in ("generation_config.json", "config.json"):
            f = Path(model_dir) / fname
            if not f.is_file():
                continue
            try:
                value = json.loads(f.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, OSError):
                continue
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value if isinstance(v, int))
    return ids


def encode_prompts(
    tok: Tokenizer, prompts: Sequence, prefixes: Sequence[str] | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each framed prompt and of its response prefix.

    Args:
        prompts: text (the single user turn) or chat messages, as in records.
        prefixes: optional response text per prompt that generation continues (encoded like a response).
    Returns:
        ``(prompt_ids, prefix_ids)``, one list per prompt; prefix_ids are empty without prefixes.
    Raises:
        RecordError (a ValueError) for chat messages without a chat template.
    """
    if prefixes is not None and len(prefixes) != len(prompts):
        raise ValueError(f"{len(prefixes)} prefixes for {len(prompts)} prompts")
    if tok.templated:
        rendered = tok.render_chat_batch(list(prompts))
    else:
        rendered = [tok.render_prompt(p, {"file": "<prompt>", "line": i}) for i, p in enumerate(prompts)]
    prompt_ids = [list(ids) for ids in tok.encode_prompts(rendered)]
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} gives no tokens")
    if not prefixes:
        return prompt_ids, [[] for _ in prompts]
    texts = [p or "" for p in prefixes]
    nonempty = [i for i, t in enumerate(texts) if t]
    enc, _ = tok.encode_responses([texts[i] for i in nonempty], [False] * len(nonempty))
    prefix_ids: list[list[int]] = [[] for _ in prompts]
    for i, ids in zip(nonempty, enc):
        prefix_ids[i] = list(ids)
    return prompt_ids, prefix_ids


def decode_continuation(tok: Tokenizer, prefix_ids: list[int], ids: list[int]) -> str:
    """Text of `ids` generated after `prefix_ids`: the decoded whole minus the decoded prefix (so that a
    sentencepiece word boundary at the join keeps its space), or `ids` alone without a prefix."""
    if not prefix_ids:
        return tok.decode(ids)
    head = tok.decode(prefix_ids)
    whole = tok.decode(list(prefix_ids) + list(ids))
    return whole[len(head) :] if whole.startswith(head) else tok.decode(ids)


@dataclass
class RowDecoder:
    """Stop conditions of one call and turning a finished row into a `Completion`."""

    tok: Tokenizer
    stop_ids: set[int]
    """Token ids that end a row (finish reason "eos"); kept in `token_ids`."""
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    """Stop strings, searched in the generated text (not the prefix)."""

    def text(self, prefix_ids: list[int], ids: list[int]) -> str:
        """Decoded continuation without a final stop token."""
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return decode_continuation(self.tok, prefix_ids, ids)

    def finished(self, prefix_ids: list[int], ids: list[int]) -> bool:
        """True when the row ends after its last token (EOS, a completed stop string, or the length limit)."""
        if ids[-1] in self.stop_ids or len(ids) >= self.max_new_tokens:
            return True
        return bool(self.stop) and any(s in self.text(prefix_ids, ids) for s in self.stop)

    def completion(
        self, prefix_ids: list[int], ids: list[int], logprobs: list[float], sampled: list[float]
    ) -> Completion:
        """The `Completion` of a finished row (text without the final stop token; ids and log-probs with it)."""
        text = self.text(prefix_ids, ids)
        if ids and ids[-1] in self.stop_ids:
            reason = "eos"
        elif self.stop and any(s in text for s in self.stop):
            reason = "stop"
        else:
            reason = "length"
        return Completion(
            text=text,
            token_ids=[int(t) for t in ids],
            logprobs=[float(x) for x in logprobs],
            sampled_logprobs=[float(x) for x in sampled],
            finish_reason=reason,
        )


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when available, else "cpu"; other values are returned as given."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}: no CUDA GPU is usable here (torch {torch.__version__}, CUDA "
                f"{torch.version.cuda or 'not compiled in'}); use --device cpu or auto"
            )
    return device


def resolve_dtype(dtype: str, device: str):
    """torch dtype for "auto" (bfloat16 on CUDA, float32 elsewhere), any spelling of `config.dtypes`
    ("float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16") or "float64" (tests: exact comparisons without
    float32 rounding)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype == "float64":
        return torch.float64
    try:
        return torch_dtype(dtype)
    except ConfigError:
        raise ValueError(f"dtype={dtype!r}: choose auto, float32, bfloat16, float16 or float64") from None


def prepare_call(
    tok: Tokenizer, stop_ids, prompts: Sequence, prefixes: Sequence[str] | None, seeds: Sequence[int], params
) -> tuple[list[list[int]], list[list[int]], "RowDecoder", list[tuple[int, int]]]:
    """What every backend's `generate` starts with: the prompts' and prefixes' ids, the row decoder, and
    the rows ``(prompt index, sample index)`` (``len(prompts) * params.n``, prompt-major)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    prompt_ids, prefix_ids = encode_prompts(tok, prompts, prefixes)
    decoder = RowDecoder(tok, stop_ids, params.max_new_tokens, tuple(params.stop))
    rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
    return prompt_ids, prefix_ids, decoder, rows
