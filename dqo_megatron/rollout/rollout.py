"""`dqo-megatron rollout`: N sampled responses per problem, written as trajectory records (JSON Lines).

For each problem of a GSM8K / MATH / any-JSONL file (`tasks.datasets.load_problems`), `n` samples are
drawn from a `GenerationBackend` and written as records that `dqo-megatron label` and `preprocess`
accept (`data.records.parse_record(require_reward=False)`; with `label: true` they already carry
`reward`/`correct`). Field by field, see docs/rollout.md.

Behavior log-probs. By default a record's `behavior_logprobs` are the sampler model's own log-probs
(``raw``: temperature 1, full vocabulary), not those of the truncated distribution it sampled from
(``sampled``: after temperature / top-k / top-p). The trainer's importance weight is
w = min(exp(sum_h log pi_theta - behavior), c); when its initial policy is the model that sampled, raw
log-probs make w == 1 at step 0 (up to float rounding), as the paper's behavior policy (the reference)
requires, whereas sampled log-probs (those of a truncated, renormalized distribution: higher than the
raw ones on the tokens a sampler mostly draws) make w < 1 by a factor that compounds per token, i.e.
depends on response length (reported: 0.73-0.92 on 23-token answers, ~0.1 expected at 300 tokens).
`sampled` and `none` remain options; the kind not written goes to metadata.

They are written only when they line up with the tokens preprocessing will write: encoding the decoded
response reproduces the generated ids, and the sample ended either with the tokenizer's EOS (then one
value per response token plus EOS) or at the length limit (`finish_reason` "length": one value per
generated token, no EOS). A length-truncated sample is written with the top-level field
``truncated: true``, so preprocessing appends no EOS and the trainer can tell the cut from an end.
Samples stopped by a stop string (`no_eos`) or by another stop token of the model (`eos_differs`) keep
their text without log-probs, as does a sample that fails the re-encoding check; the record names the
reason in `metadata.logprobs_omitted` (the trainer then uses the reference's log-probs for it) and the
summary counts them. A sample whose response decodes to the empty string cannot be a record
(`empty_response`) and is dropped, counted.

Resumability. All the samples of one problem go to the output in one write, then flush + fsync. Each
record carries `metadata.problem_index` and `metadata.group_size` (the problem's record count), so a
restart can tell complete problems from a torn or partial last one, which it truncates away. Seeds
depend on (seed, problem id) only, so regenerating a lost problem reproduces it. Settings that shape
the samples are stored in ``<output>.meta.json``; resuming with other settings is refused.

Modules: `config.py` (`RolloutConfig`), `records.py` (a problem's records, `RolloutSummary`),
`resume.py` (the settings sidecar, the scan of an existing output, the staged overwrite); this one
runs them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from dqo_megatron.config.loader import ConfigError
from dqo_megatron.outputs import check_apart, naming_full_disk, refuse_special
from dqo_megatron.rollout.backend import GenerationBackend, SamplingParams
from dqo_megatron.rollout.config import RolloutConfig
from dqo_megatron.rollout.records import RolloutSummary, build_records
from dqo_megatron.rollout.resume import check_settings, drop_if_empty, prepare_output, replace_output, settings_of
from dqo_megatron.rollout.sampling import derive_seed

# check_settings: tests/reliability imports it from here
__all__ = ["RolloutConfig", "RolloutSummary", "check_settings", "run_rollout"]

logger = logging.getLogger(__name__)


def run_rollout(cfg: RolloutConfig, backend: GenerationBackend | None = None) -> RolloutSummary:
    """Sample `cfg.n` responses per problem and append them to `cfg.output` (resuming it).

    Args:
        cfg: the run.
        backend: a ready backend (not closed here); None = `build_backend` from cfg (closed at the end).
    Returns:
        A `RolloutSummary`. Raises ConfigError (settings), FileNotFoundError / ValueError (inputs).
    """
    problems = _load_checked_problems(cfg)
    own = backend is None
    if own:
        backend = _build_backend(cfg)
    write_to = None  # before the try: a bad prompt format must reach the caller as its ConfigError
    try:
        fmt = _prompt_format(cfg, backend)
        summary = RolloutSummary(output=cfg.output, problems=len(problems), backend=backend.name)
        done, write_to = prepare_output(cfg, settings_of(cfg, problems, backend, fmt), problems, summary)
        summary.resumed_problems = len(done)
        todo = [k for k in range(len(problems)) if k not in done]
        start = time.perf_counter()
        _sample_all(write_to, cfg, backend, problems, todo, fmt, summary)
        if write_to != Path(cfg.output):
            replace_output(write_to, cfg.output)
        write_to = None  # complete
        summary.seconds = time.perf_counter() - start
    finally:
        if write_to is not None:
            drop_if_empty(write_to, cfg.output)
        if own:
            backend.close()
    logger.info("rollout done: %s", summary.report().replace("\n", "; "))
    return summary


def _load_checked_problems(cfg: RolloutConfig) -> list:
    """The problems of the (offset/limit) selection, once the output is known to be safe to write and
    its settings to match, all before a model is loaded."""
    from dqo_megatron.tasks.datasets import load_problems

    problems = load_problems(cfg.problems, None if cfg.task == "auto" else cfg.task, limit=cfg.limit, offset=cfg.offset)
    check_apart(
        [cfg.output, cfg.output + ".meta.json"], [cfg.problems, cfg.model, cfg.tokenizer, cfg.run_config]
    )  # in every mode
    refuse_special(cfg.output)
    check_settings(cfg, settings_of(cfg, problems))  # before a model is loaded
    return problems


def _build_backend(cfg: RolloutConfig) -> GenerationBackend:
    """The backend `cfg` names (the caller closes it)."""
    if not cfg.model:
        raise ConfigError("model is empty: give an HF model directory or a dqo-megatron checkpoint")
    from dqo_megatron.rollout.factory import build_backend

    passed = ("device", "dtype", "tensor_parallel", "tokenizer_name", "batch_size", "chat_template")
    passed += ("use_chat_template", "eos_token", "trust_remote_code", "run_config")
    return build_backend(cfg.backend, cfg.model, cfg.tokenizer, **{name: getattr(cfg, name) for name in passed})


def _prompt_format(cfg: RolloutConfig, backend: GenerationBackend) -> str:
    """The prompt format, chat or text: `cfg.prompt_format`, auto resolved by the tokenizer's chat template."""
    templated = bool(getattr(backend, "templated", False))
    fmt = cfg.prompt_format if cfg.prompt_format != "auto" else ("chat" if templated else "text")
    if fmt == "chat" and not templated and hasattr(backend, "templated"):
        raise ConfigError(
            "prompt_format=chat, but the tokenizer has no chat template (give chat_template, or use prompt_format text)"
        )
    if cfg.system_prompt is not None and fmt != "chat":
        raise ConfigError("system_prompt needs chat prompts, and this tokenizer has no chat template")
    return fmt


def _sample_all(
    write_to: Path,
    cfg: RolloutConfig,
    backend: GenerationBackend,
    problems: list,
    todo: list[int],
    fmt: str,
    summary: RolloutSummary,
) -> None:
    """Sample the problems `todo` (indices into `problems`), `problems_per_call` per backend call, and
    append each one's records to `write_to` as soon as its call returns (counted in `summary`)."""
    from tqdm import tqdm

    params = cfg.sampling_params()
    per_call = cfg.problems_per_call or (256 if backend.name == "vllm" else 8)
    with (
        naming_full_disk(cfg.output),
        open(write_to, "a", encoding="utf-8") as out,
        tqdm(
            total=len(todo) * cfg.n,
            unit="sample",
            desc="rollout",
            file=sys.stderr,
            disable=not cfg.progress,
            dynamic_ncols=True,
        ) as bar,
    ):
        for first in range(0, len(todo), per_call):
            chunk = todo[first : first + per_call]
            prompts, results = _generate(chunk, problems, cfg, fmt, backend, params)
            for k, prompt, completions in zip(chunk, prompts, results):
                records = build_records(problems[k], k, prompt, completions, cfg, backend, summary)
                _append_group(out, records)
                summary.written += len(records)
                summary.samples += len(completions)
                summary.generated_problems += 1
                bar.update(len(completions))


def _generate(
    chunk: list[int], problems: list, cfg: RolloutConfig, fmt: str, backend: GenerationBackend, params: SamplingParams
) -> tuple[list, list]:
    """(prompts, `cfg.n` completions per prompt) of the problems `chunk`, in one backend call."""
    from dqo_megatron.tasks.prompts import build_messages

    prompts = [
        build_messages(problems[k].task, problems[k].question, cfg.system_prompt)
        if fmt == "chat"
        else problems[k].prompt
        for k in chunk
    ]
    seeds = [derive_seed("problem", cfg.seed, problems[k].id) for k in chunk]
    results = backend.generate(prompts, params, seeds=seeds)
    if len(results) != len(chunk) or any(len(r) != cfg.n for r in results):
        raise RuntimeError(
            f"backend {backend.name!r} returned {[len(r) for r in results]} completions "
            f"for {len(chunk)} prompts x n={cfg.n}"
        )
    return prompts, results


def _append_group(out, records: list[dict]) -> None:
    """Append one problem's records to the open file `out`."""
    if records:  # one write per problem, then flush + fsync: a kill tears at most this group
        out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        out.flush()
        os.fsync(out.fileno())
