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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from dqo_megatron.config.loader import ConfigError
from dqo_megatron.outputs import atomic_write_text, check_apart, naming_full_disk, refuse_special
from dqo_megatron.rollout.backend import Completion, GenerationBackend, SamplingParams
from dqo_megatron.rollout.identity import identity_difference, model_identity
from dqo_megatron.rollout.sampling import derive_seed

logger = logging.getLogger(__name__)

META_VERSION = 1
"""Version of the ``<output>.meta.json`` layout."""
LOGPROB_DECIMALS = 7
"""Log-probs are written rounded to this many decimals (float32 carries ~7 significant digits)."""


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
    backend: Literal["auto", "vllm", "transformers", "megatron"] = "auto"
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
        choices = {
            "backend": ("auto", "vllm", "transformers", "megatron"),
            "task": ("auto", "gsm8k", "math"),
            "prompt_format": ("auto", "chat", "text"),
            "behavior_logprobs": ("raw", "sampled", "none"),
        }
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


@dataclass
class RolloutSummary:
    """What a rollout run did (`report()` prints it)."""

    output: str = ""
    problems: int = 0
    """Problems in the (offset/limit) selection."""
    resumed_problems: int = 0
    """Problems already complete in the output at start (skipped)."""
    generated_problems: int = 0
    """Problems sampled by this run."""
    samples: int = 0
    """Samples generated by this run (n per problem)."""
    written: int = 0
    """Records written by this run."""
    dropped: Counter = field(default_factory=Counter)
    """Samples not written, by reason (empty_response)."""
    logprobs_omitted: Counter = field(default_factory=Counter)
    """Records written without behavior_logprobs, by reason (no_eos, eos_differs, retokenize_mismatch, unchecked,
    unavailable)."""
    truncated: int = 0
    """Records written with `truncated: true` (the sample hit max_new_tokens without EOS)."""
    finish_reasons: Counter = field(default_factory=Counter)
    tokens: int = 0
    """Generated tokens (EOS included)."""
    labeled: int = 0
    """label: records whose answer was checked."""
    correct: int = 0
    """label: records judged correct."""
    truncated_bytes: int = 0
    """Bytes of a torn / incomplete last problem cut from the output on resume."""
    seconds: float = 0.0
    backend: str = ""

    @property
    def samples_per_s(self) -> float:
        """Samples generated per second of this run."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        """Human-readable summary."""
        lines = [
            f"rollout -> {self.output} (backend {self.backend})",
            f"problems: {self.problems} ({self.resumed_problems} already done, {self.generated_problems} sampled now)",
            f"samples: {self.samples}, records written: {self.written}, tokens: {self.tokens}, "
            f"{self.seconds:.1f} s ({self.samples_per_s:.2f} samples/s, "
            f"{self.tokens / self.seconds if self.seconds > 0 else 0.0:.0f} tokens/s)",
            "finish reasons: " + (", ".join(f"{k} {v}" for k, v in sorted(self.finish_reasons.items())) or "-"),
        ]
        if self.dropped:
            lines.append("dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())))
        if self.truncated:
            lines.append(f"truncated at max_new_tokens (written with truncated: true, no EOS): {self.truncated}")
        if self.logprobs_omitted:
            lines.append(
                "written without behavior_logprobs: "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.logprobs_omitted.items()))
            )
        if self.labeled:
            lines.append(f"correct (label): {self.correct} / {self.labeled} ({self.correct / self.labeled:.4f})")
        if self.truncated_bytes:
            lines.append(f"resume: cut {self.truncated_bytes} bytes of an incomplete last problem")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ records
def _round(values: list[float]) -> list[float]:
    # log-probs are <= 0; a float rounding above 0 would fail the validator's check
    return [round(min(float(v), 0.0), LOGPROB_DECIMALS) for v in values]


def logprob_check(tok, completions: list[Completion]) -> list[Optional[str]]:
    """Why each completion's log-probs cannot be a record's behavior_logprobs, or None when they can.

    They can when the tokenizer encodes the completion's text to exactly the ids preprocessing will
    write for it: the generated ids before EOS for a completion that ended with the tokenizer's EOS
    (preprocessing appends that EOS), all generated ids for one cut at the length limit (finish_reason
    "length": written as `truncated`, preprocessing appends nothing). Reasons: no_eos (a stop string
    ended it), eos_differs (another stop token of the model), retokenize_mismatch, unchecked (the
    backend exposes no tokenizer to check with).

    Args:
        tok: the backend's preprocessing `Tokenizer` (or None).
        completions: N completions.
    Returns:
        N reasons (None = the log-probs line up).
    """
    reasons: list[Optional[str]] = [None] * len(completions)
    todo, want = [], []
    for k, c in enumerate(completions):
        if c.finish_reason not in ("eos", "length") or not c.token_ids:
            reasons[k] = "no_eos"
        elif tok is None:
            reasons[k] = "unchecked"
        elif c.finish_reason == "eos" and c.token_ids[-1] != tok.eos_id:
            reasons[k] = "eos_differs"
        else:
            todo.append(k)
            want.append(c.token_ids[:-1] if c.finish_reason == "eos" else c.token_ids)
    if todo:
        ids, _ = tok.encode_responses([completions[k].text for k in todo], [False] * len(todo))
        for k, enc, expected in zip(todo, ids, want):
            if list(enc) != list(expected):
                reasons[k] = "retokenize_mismatch"
    return reasons


def build_records(
    problem,
    problem_index: int,
    prompt,
    completions: list[Completion],
    cfg: RolloutConfig,
    backend: GenerationBackend,
    summary: RolloutSummary,
) -> list[dict]:
    """The records of one problem's samples (dropped samples counted in `summary`).

    A sample cut at max_new_tokens (finish_reason "length") gets `truncated: true`; its behavior
    log-probs, when they line up (`logprob_check`), hold one value per generated token (no EOS).
    """
    reasons = logprob_check(getattr(backend, "tokenizer", None), completions)
    records = []
    for j, (c, reason) in enumerate(zip(completions, reasons)):
        summary.finish_reasons[c.finish_reason] += 1
        summary.tokens += len(c.token_ids)
        if c.text == "":
            summary.dropped["empty_response"] += 1
            continue
        meta = {
            "sample_index": j,
            "problem_index": problem_index,
            "finish_reason": c.finish_reason,
            "backend": backend.name,
            "num_tokens": len(c.token_ids),
        }
        if problem.metadata:
            meta["problem"] = problem.metadata
        rec = {
            "prompt": prompt,
            "response": c.text,
            "prompt_id": problem.id,
            "id": f"{problem.id}#{j}",
            "reference_answer": problem.reference,
            "task": problem.task,
            "source": cfg.problems,
        }
        if c.finish_reason == "length":
            rec["truncated"] = True  # no EOS was sampled: preprocessing appends none, training does not end here
            summary.truncated += 1
        kinds = {"raw": c.logprobs, "sampled": c.sampled_logprobs}
        kind = cfg.behavior_logprobs
        if reason is None and kind != "none" and len(kinds[kind]) != len(c.token_ids):
            reason = "unavailable"  # the backend did not compute this kind (e.g. vLLM with raw_logprobs=False)
        if reason is not None and kind != "none":
            summary.logprobs_omitted[reason] += 1
            meta["logprobs_omitted"] = reason
            kind = "none"
        if kind != "none":
            rec["behavior_logprobs"] = _round(kinds[kind])
        for name, values in kinds.items():  # the kinds not written stay in the metadata
            if name != kind:
                meta[f"{name}_logprobs"] = _round(values)
        rec["behavior_tokenizer"] = backend.tokenizer_name
        if cfg.label:  # a truncated sample is graded too (it usually has no final answer yet)
            from dqo_megatron.tasks.grading import check_answer

            v = check_answer(problem.task, c.text, problem.reference, timeout_s=cfg.label_timeout_s)
            rec.update(
                reward=1.0 if v.correct else 0.0, correct=v.correct, extracted_answer=v.extracted, label_reason=v.reason
            )
            summary.correct += int(v.correct)
            summary.labeled += 1
        rec["metadata"] = meta
        records.append(rec)
    for rec in records:
        rec["metadata"]["group_size"] = len(records)
    return records


# ------------------------------------------------------------------------------------------- resume
def scan_output(path: str | Path, problems: list) -> tuple[set[int], int]:
    """Complete problems of an existing output, after cutting an incomplete tail.

    The file is a sequence of groups (one problem's records, written at once). A last line without
    its newline, or a last group with fewer lines than its `group_size`, is a write that a kill
    interrupted: the file is truncated to the end of the last complete group (and fsynced).
    Returns ``(problem indices already complete, bytes cut)``; raises ValueError on anything else
    (a file this code did not write, or records of other problems).
    """
    path = Path(path)
    done: set[int] = set()
    good_end = 0
    cur, count, size = None, 0, 0
    with open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):
            end = offset + len(line)
            if not line.endswith(b"\n"):
                break  # torn last line
            try:
                rec = json.loads(line)
                meta = rec["metadata"]
                idx, gsize = int(meta["problem_index"]), int(meta["group_size"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a rollout record of this tool ({exc})") from None
            if cur is None:
                cur, count, size = idx, 0, gsize
            elif idx != cur or gsize != size:
                raise ValueError(f"{path}:{lineno}: problem {idx} begins before problem {cur} is complete")
            if not 0 <= idx < len(problems) or rec.get("prompt_id") != problems[idx].id:
                raise ValueError(
                    f"{path}:{lineno}: record of problem {idx} ({rec.get('prompt_id')!r}) does not "
                    "match the problem list (problems file changed?)"
                )
            count += 1
            if count == size:
                if idx in done:
                    raise ValueError(f"{path}:{lineno}: problem {idx} written twice")
                done.add(idx)
                good_end, cur = end, None
            offset = end
    total = path.stat().st_size
    if total > good_end:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
        logger.warning(
            "%s: cut %d bytes of an incomplete last problem (a killed run); it is sampled again", path, total - good_end
        )
    return done, total - good_end


def _problems_digest(problems: list) -> str:
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.task, p.prompt, p.reference], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def settings_of(
    cfg: RolloutConfig, problems: list, backend: GenerationBackend | None = None, prompt_format: str | None = None
) -> dict:
    """Everything that shapes the records (stored in the sidecar; a resume must match it). Without a
    backend: the part known before the model is loaded (checked first, so a mismatch fails fast)."""
    keys = (
        "task",
        "offset",
        "limit",
        "n",
        "temperature",
        "top_p",
        "top_k",
        "max_new_tokens",
        "stop",
        "seed",
        "system_prompt",
        "behavior_logprobs",
        "label",
        "chat_template",
        "use_chat_template",
        "eos_token",
        "dtype",
    )
    out = {k: getattr(cfg, k) for k in keys}
    out.update(problems=str(Path(cfg.problems).absolute()), problems_sha256=_problems_digest(problems))
    model = cfg.model or (getattr(backend, "model_path", None) if backend is not None else None)
    identity = model_identity(model, cfg.tokenizer) if model else None
    if identity is not None:  # known before the model is loaded: a changed model fails fast
        out["model_identity"] = identity
    if backend is not None:
        out.update(
            model=str(Path(cfg.model).absolute()) if cfg.model else getattr(backend, "model_path", None),
            backend=backend.name,
            behavior_tokenizer=backend.tokenizer_name,
            prompt_format=prompt_format,
        )
    return json.loads(json.dumps(out))  # the JSON round trip makes it comparable with the stored copy


_WARNED_NO_IDENTITY: set[str] = set()


def check_settings(cfg: RolloutConfig, settings: dict) -> None:
    """ConfigError when `cfg.output` exists (and not overwrite) without a sidecar, or with other `settings`
    (only the keys given are compared).

    The model is compared by identity (`identity.model_identity`: config, tokenizer, sampled weight
    bytes), so a model directory that changed under the same path is refused, and a model that only
    moved is accepted. A sidecar written before identities were recorded is resumed with a warning.
    """
    out, meta = Path(cfg.output), Path(cfg.output + ".meta.json")
    if cfg.overwrite or not (out.exists() or meta.exists()):
        return
    if not meta.exists():
        raise ConfigError(
            f"{out} exists without {meta.name}: not a rollout output this tool can resume; remove it or set overwrite"
        )
    try:
        stored = json.loads(meta.read_text(encoding="utf-8"))["settings"]
        if not isinstance(stored, dict):
            raise TypeError(f"settings is a {type(stored).__name__}")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{meta}: not a rollout settings file this tool wrote ({type(exc).__name__}: {exc}); "
            f"move {out} and {meta.name} away, or set overwrite to start over"
        ) from None
    settings = dict(settings)
    now_id, then_id = settings.pop("model_identity", None), stored.get("model_identity")
    if now_id is not None and then_id is None and str(out) not in _WARNED_NO_IDENTITY:
        _WARNED_NO_IDENTITY.add(str(out))
        logger.warning(
            "%s was begun before rollout recorded the model's identity: cannot check that %s is the "
            "model that wrote it (only its path is compared); resuming",
            out,
            cfg.model or "the model",
        )
    if now_id is not None and then_id is not None:
        if now_id != then_id:
            raise ConfigError(
                f"{out} was made by another model: {cfg.model or settings.get('model')}: "
                f"{identity_difference(then_id, now_id)} since the output was begun, and resuming "
                "would mix two policies in one file; resume with the model that wrote it, write to "
                "a new output (-o), or set overwrite (--overwrite) to start over"
            )
        settings.pop("model", None)  # the same model, perhaps moved: its path may differ
    diff = sorted(k for k in settings if stored.get(k) != settings[k])
    if diff:
        shown = "; ".join(f"{k}: {stored.get(k)!r} there, {settings[k]!r} now" for k in diff)
        raise ConfigError(
            f"{out} was made with other settings ({shown}); resume with the same settings, "
            "write elsewhere, or set overwrite"
        )


def _prepare_output(
    cfg: RolloutConfig, settings: dict, problems: list, summary: RolloutSummary
) -> tuple[set[int], Path]:
    """Problems already done and the file to append to: `cfg.output` (new or resumed) or, when
    overwriting an existing output, a hidden sibling that replaces it once complete."""
    out, meta = Path(cfg.output), Path(cfg.output + ".meta.json")
    if cfg.overwrite and (out.exists() or meta.exists()):
        # the old output stays as it was until the new one is complete (a kill loses nothing)
        out = out.parent / f".{out.name}.overwrite-partial"
        meta = Path(str(out) + ".meta.json")
        out.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
    elif out.exists() or meta.exists():
        check_settings(cfg, settings)
        if not out.exists():
            out.touch()
        done, summary.truncated_bytes = scan_output(out, problems)
        return done, out
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta, json.dumps({"version": META_VERSION, "settings": settings}, indent=1) + "\n")
    out.touch()
    return set(), out


def _drop_if_empty(written: Path, output: str) -> None:
    """After a failed run: remove the records file it was writing (and its sidecar) when it holds no
    record, so a refused model or a crash before the first problem leaves no empty output behind; a
    staged overwrite is removed whatever it holds (the old output stays as it was)."""
    staged = written != Path(output)
    if written.exists() and (staged or written.stat().st_size == 0):
        written.unlink()
        Path(str(written) + ".meta.json").unlink(missing_ok=True)


def _replace_output(staged: Path, output: str) -> None:
    """Move a completed overwrite (records + sidecar) over `output`. The old sidecar goes first: a kill
    in between leaves records without a sidecar, which a resume refuses, never new settings over old
    records."""
    meta = Path(output + ".meta.json")
    meta.unlink(missing_ok=True)
    os.replace(staged, output)
    os.replace(str(staged) + ".meta.json", meta)


# ---------------------------------------------------------------------------------------------- run
def run_rollout(cfg: RolloutConfig, backend: GenerationBackend | None = None) -> RolloutSummary:
    """Sample `cfg.n` responses per problem and append them to `cfg.output` (resuming it).

    Args:
        cfg: the run.
        backend: a ready backend (not closed here); None = `build_backend` from cfg (closed at the end).
    Returns:
        A `RolloutSummary`. Raises ConfigError (settings), FileNotFoundError / ValueError (inputs).
    """
    from tqdm import tqdm

    from dqo_megatron.tasks.datasets import load_problems
    from dqo_megatron.tasks.prompts import build_messages

    problems = load_problems(cfg.problems, None if cfg.task == "auto" else cfg.task, limit=cfg.limit, offset=cfg.offset)
    check_apart(
        [cfg.output, cfg.output + ".meta.json"], [cfg.problems, cfg.model, cfg.tokenizer, cfg.run_config]
    )  # in every mode
    refuse_special(cfg.output)
    check_settings(cfg, settings_of(cfg, problems))  # before a model is loaded
    own = backend is None
    if own:
        if not cfg.model:
            raise ConfigError("model is empty: give an HF model directory or a dqo-megatron checkpoint")
        from dqo_megatron.rollout.factory import build_backend

        backend = build_backend(
            cfg.backend,
            cfg.model,
            cfg.tokenizer,
            device=cfg.device,
            dtype=cfg.dtype,
            tensor_parallel=cfg.tensor_parallel,
            tokenizer_name=cfg.tokenizer_name,
            batch_size=cfg.batch_size,
            chat_template=cfg.chat_template,
            use_chat_template=cfg.use_chat_template,
            eos_token=cfg.eos_token,
            trust_remote_code=cfg.trust_remote_code,
            run_config=cfg.run_config,
        )
    try:
        templated = bool(getattr(backend, "templated", False))
        fmt = cfg.prompt_format if cfg.prompt_format != "auto" else ("chat" if templated else "text")
        if fmt == "chat" and not templated and hasattr(backend, "templated"):
            raise ConfigError(
                "prompt_format=chat, but the tokenizer has no chat template (give chat_template, "
                "or use prompt_format text)"
            )
        if cfg.system_prompt is not None and fmt != "chat":
            raise ConfigError("system_prompt needs chat prompts, and this tokenizer has no chat template")
        summary = RolloutSummary(output=cfg.output, problems=len(problems), backend=backend.name)
        write_to = None
        done, write_to = _prepare_output(cfg, settings_of(cfg, problems, backend, fmt), problems, summary)
        summary.resumed_problems = len(done)
        todo = [k for k in range(len(problems)) if k not in done]
        params = cfg.sampling_params()
        per_call = cfg.problems_per_call or (256 if backend.name == "vllm" else 8)
        start = time.perf_counter()
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
                for k, prompt, completions in zip(chunk, prompts, results):
                    records = build_records(problems[k], k, prompt, completions, cfg, backend, summary)
                    if records:  # one write per problem, then flush + fsync: a kill tears at most this group
                        out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                        out.flush()
                        os.fsync(out.fileno())
                    summary.written += len(records)
                    summary.samples += len(completions)
                    summary.generated_problems += 1
                    bar.update(len(completions))
        if write_to != Path(cfg.output):
            _replace_output(write_to, cfg.output)
        write_to = None  # complete
        summary.seconds = time.perf_counter() - start
    finally:
        if write_to is not None:
            _drop_if_empty(write_to, cfg.output)
        if own:
            backend.close()
    logger.info("rollout done: %s", summary.report().replace("\n", "; "))
    return summary
