"""Tokenize validated records: chat template, exact prompt/response boundary, EOS, per-token rewards.

The prompt (rendered with the chat template and `add_generation_prompt=True`) and the response are
tokenized separately and concatenated, so the boundary is exact by construction (no merge across it):

    tokens  = prompt_ids + response_ids + [eos]          (length T; prompt_length = len(prompt_ids))
    rewards = zeros(T); rewards[T-1] += outcome reward; rewards[step token] += process reward
    behavior_logprobs = zeros(prompt_length) ++ record's log-probs (one per response token incl. EOS)

A record with `truncated: true` (the sampler hit its length limit) never ended, so no EOS is made up
for it: tokens = prompt_ids + response_ids, its log-probs cover the response tokens only, and the
outcome reward still sits on the last token (T-1, now a response token). The sample keeps the flag
(`TokenizedSample.truncated`, the "truncated" meta column) so the trainer need not treat T-1 as terminal.

A step ending at character offset e is credited to the last response token that starts before e
(the token holding the step's last character); steps sharing a token add up; a step whose text gave
no token of its own (e.g. whitespace that the tokenizer drops) is credited to the first response token.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from dqo_megatron.config.loader import ConfigError
from dqo_megatron.data.records import RecordError, TrajectoryRecord
from dqo_megatron.errors import first_line
from dqo_megatron.tokenizer_files import (
    HF_TOKENIZER_FILES,
    SENTENCEPIECE_FILE,
    TOKENIZER_FILES,
    TOKENIZER_IDENTITY_FILES,
    sentencepiece_model_file,
    tokenizer_kind,
)


@dataclass
class TokenizerConfig:
    """Which tokenizer to load (always from local files) and how to frame prompts."""

    path: str = ""
    """An HF tokenizer directory (tokenizer.json / tokenizer_config.json) or a sentencepiece .model file (or a
    directory whose only tokenizer file is tokenizer.model)."""
    kind: Literal["auto", "hf", "sentencepiece"] = "auto"
    """auto: as `dqo_megatron.tokenizer_files.tokenizer_kind` reads the path (sentencepiece for a *.model file
    or a directory with only tokenizer.model, else HF)."""
    name: str | None = None
    """Name recorded in the output and compared with records' `behavior_tokenizer`. None: basename of path."""
    chat_template: str | None = None
    """Override the HF tokenizer's chat template: a Jinja string, or the path of a .jinja file."""
    use_chat_template: bool = True
    """HF: wrap prompts in the chat template. False: encode the prompt text as is (plus BOS, see add_bos)."""
    add_bos: bool = True
    """Prepend BOS to prompts that are not chat-templated (templates write their own BOS)."""
    eos_token: str | None = None
    """Token appended to every response. None: the tokenizer's EOS (for Gemma-it give "<end_of_turn>").
    It must be one token of the vocabulary: anything else is refused when the tokenizer loads (it would
    otherwise become <unk>)."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("tokenizer.path is empty: give an HF tokenizer directory or a sentencepiece .model file")
        if not os.path.exists(self.path):
            raise ConfigError(
                f"tokenizer.path={self.path!r} does not exist (tokenizers are loaded from local files only)"
            )
        if self.kind not in ("auto", "hf", "sentencepiece"):
            raise ConfigError(f"tokenizer.kind={self.kind!r}: choose auto, hf or sentencepiece")
        if self.kind == "auto":  # what the path does not tell is checked as HF, whose messages say what is missing
            self.kind = tokenizer_kind(self.path) or "hf"
        _check_tokenizer_path(self.path, self.kind)
        if self.kind == "sentencepiece" and self.chat_template is not None and os.path.isdir(self.path):
            # transformers would have applied it to its own guess at this model's ids: say so, not drop it
            raise ConfigError(
                f"tokenizer.chat_template is set, but tokenizer.path={self.path!r} holds only a sentencepiece "
                f"{SENTENCEPIECE_FILE}, read with sentencepiece, which takes no chat template: give an HF "
                f"tokenizer directory ({', '.join(HF_TOKENIZER_FILES)})"
            )
        if self.name is None:
            self.name = os.path.basename(os.path.normpath(self.path))


def _check_tokenizer_path(path: str, kind: str) -> None:
    """ConfigError naming what is wrong with a tokenizer path before a library reports it its own way."""
    if not os.access(path, os.R_OK):
        raise ConfigError(f"tokenizer.path={path!r} is not readable (permission denied)")
    found = tokenizer_kind(path)
    if kind == "sentencepiece" and found != "sentencepiece" and not os.path.isfile(path):
        raise ConfigError(
            f"tokenizer.path={path!r}: a sentencepiece tokenizer is a .model file (or a directory whose only "
            f"tokenizer file is {SENTENCEPIECE_FILE})"
        )
    if kind == "hf" and os.path.isfile(path):
        raise ConfigError(
            f"tokenizer.path={path!r} is a file but not a sentencepiece .model: give an HF tokenizer "
            "directory (tokenizer.json / tokenizer_config.json) or a .model file"
        )
    if kind == "hf" and found is None:
        raise ConfigError(
            f"tokenizer.path={path!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
            "give the directory of an HF tokenizer or a sentencepiece .model file"
        )
    if kind == "hf" and found == "sentencepiece":  # the export converts it with sentencepiece's ids
        raise ConfigError(
            f"tokenizer.path={path!r} holds no HF tokenizer file ({', '.join(HF_TOKENIZER_FILES)}), only a "
            f"sentencepiece {SENTENCEPIECE_FILE}, which is read with sentencepiece: use tokenizer.kind auto or "
            "sentencepiece (transformers would guess other ids)"
        )


@dataclass
class TokenizeConfig:
    """How records become token sequences."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer."""
    max_length: int = 4096
    """Longest sequence (prompt + response + EOS) written, in tokens."""
    overlong: Literal["drop", "truncate_prompt_left"] = "drop"
    """Longer sequences: drop them (counted as `too_long`), or cut prompt tokens from the left (counted
    as truncated). A response is never cut: if it alone does not fit beside one prompt token, the record
    is skipped as `response_too_long`."""
    behavior_logprobs_include_eos: bool = True
    """Records' behavior_logprobs include the EOS token's (length = response tokens + 1). False: they
    stop before EOS (length = response tokens) and EOS gets log-prob 0. Truncated records have no EOS:
    their length is the response tokens either way."""
    check_behavior_tokenizer: bool = True
    """Reject records whose `behavior_tokenizer` differs from tokenizer.name (their log-probs would not
    line up with our tokens)."""

    def __post_init__(self) -> None:
        if isinstance(self.tokenizer, dict):
            self.tokenizer = TokenizerConfig(**self.tokenizer)
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length!r}: must be an integer >= 2 (one prompt token + EOS)")
        if self.overlong not in ("drop", "truncate_prompt_left"):
            raise ConfigError(f"overlong={self.overlong!r}: choose 'drop' or 'truncate_prompt_left'")


@dataclass
class TokenizedSample:
    """One tokenized record (all arrays length T = prompt_length + response_length)."""

    tokens: np.ndarray
    """int64 [T] token ids; the last is EOS, unless `truncated`."""
    prompt_length: int
    """Number of prompt tokens; response tokens are tokens[prompt_length:] (their mask is 1)."""
    rewards: np.ndarray
    """float32 [T]: outcome reward on the last token plus process rewards; 0 on prompt tokens."""
    behavior_logprobs: np.ndarray | None
    """float32 [T] (0 on prompt tokens), or None when the record has none."""
    prompt_id: str
    outcome_reward: float
    correct: int
    """1 / 0 from the record's `correct`, else -1 (unknown)."""
    truncated_prompt_tokens: int = 0
    """Prompt tokens cut from the left to fit max_length."""
    truncated: bool = False
    """The record's `truncated`: the response was cut by the sampler's length limit (no EOS appended)."""
    file: str = ""
    line: int = 0


PROMPT_CACHE_SIZE = 4096
"""Distinct prompts whose token ids a worker keeps (cleared when full)."""


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(path: str) -> dict | None:
    """The identity of a tokenizer from its files, without loading it (model weights are never read).

    Returns ``{"sha256": ..., "files": {name: sha256}}``: a sentencepiece .model file is the one file
    "tokenizer.model" (what HF directories call theirs); an HF directory contributes the files of
    TOKENIZER_IDENTITY_FILES it has. `sha256` hashes the sorted (name, file hash) pairs. None when the
    path holds no tokenizer file (e.g. a checkpoint's hf/ with only config.json).
    """
    if os.path.isfile(path):
        files = {"tokenizer.model": _sha256_file(path)}
    elif os.path.isdir(path):
        files = {
            n: _sha256_file(os.path.join(path, n))
            for n in TOKENIZER_IDENTITY_FILES
            if os.path.isfile(os.path.join(path, n))
        }
    else:
        return None
    if not files:
        return None
    combined = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in sorted(files.items())).encode()).hexdigest()
    return {"sha256": combined, "files": files}


def tokenizer_difference(ours: dict, theirs: dict, names: tuple[str, str] = ("the first", "the second")) -> str | None:
    """None when two `tokenizer_fingerprint`s are the same tokenizer, else what differs (for a message;
    `names` say whose each side is, e.g. ("the data's", "the model's")).

    Same: equal hashes, or the same sentencepiece model when one side is a lone .model file (an HF
    directory around that model adds files that do not change its ids).
    """
    if ours.get("sha256") == theirs.get("sha256"):
        return None
    a, b = ours.get("files") or {}, theirs.get("files") or {}
    if {"tokenizer.model"} in (set(a), set(b)):  # a lone sentencepiece model: the rest is not compared
        if a.get("tokenizer.model") == b.get("tokenizer.model"):
            return None
        missing = [n for n, fp in zip(names, (a, b)) if "tokenizer.model" not in fp]
        return f"no tokenizer.model in {missing[0]}" if missing else "tokenizer.model differ"
    differ = sorted(n for n in set(a) & set(b) if a[n] != b[n])
    parts = [f"{', '.join(differ)} differ"] if differ else []
    for name, only in ((names[0], sorted(set(a) - set(b))), (names[1], sorted(set(b) - set(a)))):
        if only:
            parts.append(f"{', '.join(only)} only in {name}")
    return "; ".join(parts) or f"hash {str(ours.get('sha256'))[:12]} != {str(theirs.get('sha256'))[:12]}"


class Tokenizer:
    """A loaded HF or sentencepiece tokenizer behind one small interface."""

    def __init__(self, cfg: TokenizerConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.prompt_cache: dict = {}
        if cfg.kind == "sentencepiece":
            import sentencepiece as spm

            try:
                self.sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_model_file(cfg.path) or cfg.path))
            except (RuntimeError, OSError) as exc:
                raise ConfigError(f"tokenizer {cfg.path!r}: not a sentencepiece model ({first_line(exc)})") from None
            self.hf = None
            self.vocab_size = int(self.sp.vocab_size())
            self.bos_id = int(self.sp.bos_id())
            self.eos_id = self.special_token_id(cfg.eos_token, "eos_token") if cfg.eos_token else int(self.sp.eos_id())
            self.has_offsets = True
        else:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we parallelize with processes
            from transformers import AutoTokenizer

            self.sp = None
            try:
                self.hf = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
            except (ValueError, OSError, TypeError, KeyError) as exc:
                raise ConfigError(f"tokenizer {cfg.path!r}: transformers cannot load it ({first_line(exc)})") from None
            if cfg.chat_template is not None:
                tpl = cfg.chat_template
                if os.path.isfile(tpl):
                    with open(tpl, encoding="utf-8") as f:
                        tpl = f.read()
                self.hf.chat_template = tpl
            self.vocab_size = len(self.hf)
            self.bos_id = self.hf.bos_token_id if self.hf.bos_token_id is not None else -1
            eos = cfg.eos_token or self.hf.eos_token
            self.eos_id = (
                self.special_token_id(eos, "eos_token" if cfg.eos_token else "the tokenizer's own eos_token")
                if eos is not None
                else None
            )
            self.has_offsets = bool(getattr(self.hf, "is_fast", False))
            # the Rust tokenizer itself: same ids and offsets as calling self.hf, without building a
            # BatchEncoding per call (that wrapper cost ~25% of preprocessing time)
            self.fast = getattr(self.hf, "backend_tokenizer", None) if self.has_offsets else None
        if self.eos_id is None or self.eos_id < 0:
            raise ConfigError(f"tokenizer {cfg.path!r} has no EOS token: set tokenizer.eos_token")

    def special_token_id(self, token: str, option: str) -> int:
        """The id of a named token (EOS, or any special token a setting names), refusing a token that is not
        in the vocabulary: sentencepiece would map it to <unk> and HF to the unknown id (or None), so the
        data would end every response with <unk> without a word."""
        if self.sp is not None:
            i = int(self.sp.piece_to_id(token))
            back = self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None
        else:
            i = self.hf.convert_tokens_to_ids(token)
            back = self.hf.convert_ids_to_tokens(i) if isinstance(i, int) and i >= 0 else None
        if back != token:
            raise ConfigError(
                f"{option}={token!r} is not a token of tokenizer {self.name!r} ({self.cfg.path}): it "
                f"would become {back!r} (id {i}); give a token of its vocabulary, e.g. its EOS "
                f"{self._default_eos()!r}"
            )
        return int(i)

    def _default_eos(self) -> str | None:
        if self.sp is not None:
            return self.sp.id_to_piece(self.sp.eos_id()) if self.sp.eos_id() >= 0 else None
        return self.hf.eos_token

    @property
    def fingerprint(self) -> dict | None:
        """`tokenizer_fingerprint` of the tokenizer's files (computed once, on first use)."""
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = tokenizer_fingerprint(self.cfg.path)
        return self._fingerprint

    def identity(self) -> dict:
        """What a dataset manifest records of the tokenizer besides its name: the files' hash and each file's."""
        fp = self.fingerprint or {}
        return {"sha256": fp.get("sha256"), "files": fp.get("files", {})}

    # ---- prompts
    def render_prompt(self, prompt, where: dict) -> str | list[int]:
        """HF: the prompt text after the chat template; sentencepiece: the prompt ids."""
        chat = isinstance(prompt, list)
        if self.sp is not None:
            if chat:
                raise RecordError(
                    "chat_without_template",
                    "chat-message prompts need an HF tokenizer with a chat "
                    "template; a sentencepiece model has none (give the prompt as text)",
                    field="prompt",
                    **where,
                )
            return ([self.bos_id] if self.cfg.add_bos and self.bos_id >= 0 else []) + self.sp.encode(prompt)
        if self.cfg.use_chat_template and self.hf.chat_template:
            messages = prompt if chat else [{"role": "user", "content": prompt}]
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if chat:
            raise RecordError(
                "chat_without_template",
                "chat-message prompt, but the tokenizer has no chat template "
                "(or use_chat_template is off); set tokenizer.chat_template",
                field="prompt",
                **where,
            )
        bos = self.hf.bos_token if (self.cfg.add_bos and self.hf.bos_token) else ""
        return bos + prompt

    @property
    def templated(self) -> bool:
        """Prompts go through the HF chat template (then render_prompt never raises)."""
        return self.sp is None and bool(self.cfg.use_chat_template and self.hf.chat_template)

    def render_chat_batch(self, prompts: list) -> list[str]:
        """render_prompt of many prompts at once (only when `templated`): one batched apply_chat_template
        call, which renders each conversation exactly as a single call would, with the per-call set-up
        (template lookup, special-token variables) done once."""
        if not prompts:
            return []
        convs = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        return self.hf.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)

    def encode_prompts(self, rendered: list) -> list[list[int]]:
        """Ids of rendered prompts (see render_prompt); no special tokens are added here."""
        if self.sp is not None:
            return rendered
        if not rendered:
            return []
        if self.fast is not None:
            return [e.ids for e in self.fast.encode_batch(rendered, add_special_tokens=False)]
        return self.hf(rendered, add_special_tokens=False)["input_ids"]

    # ---- responses
    def encode_responses(self, texts: list[str], offsets: list[bool]) -> tuple[list[list[int]], list[list[int] | None]]:
        """Ids of response texts (no special tokens) and, where offsets[i], each token's start character offset."""
        if not texts:
            return [], []
        if self.sp is not None:
            if not any(offsets):
                return self.sp.encode(texts), [None] * len(texts)
            ids, starts = [], []
            for t in texts:
                proto = self.sp.encode(t, return_type="proto")
                b2c = _byte_to_char(t)
                ids.append([p.id for p in proto.pieces])
                starts.append([b2c[p.begin] for p in proto.pieces])
            return ids, starts
        if any(offsets) and not self.has_offsets:
            raise ValueError("process rewards need a fast (Rust) HF tokenizer for character offsets")
        if self.fast is not None:
            encs = self.fast.encode_batch(texts, add_special_tokens=False)
            return [e.ids for e in encs], [
                [s for s, _ in e.offsets] if want else None for e, want in zip(encs, offsets)
            ]
        enc = self.hf(texts, add_special_tokens=False, return_offsets_mapping=any(offsets))
        if not any(offsets):
            return enc["input_ids"], [None] * len(texts)
        return enc["input_ids"], [
            [s for s, _ in om] if want else None for om, want in zip(enc["offset_mapping"], offsets)
        ]

    def decode(self, ids) -> str:
        """Text of token ids; ValueError when an id is beyond this tokenizer (a model that does not match it)."""
        ids = [int(i) for i in ids]
        try:
            return self.sp.decode(ids) if self.sp is not None else self.hf.decode(ids)
        except (IndexError, OverflowError) as exc:
            top = max(ids, default=-1)
            raise ValueError(
                f"token id {top} is beyond tokenizer {self.cfg.path!r} (vocabulary {self.vocab_size}): the "
                f"tokenizer does not match the model that produced it ({type(exc).__name__})"
            ) from None


def _byte_to_char(text: str) -> np.ndarray:
    """Map each UTF-8 byte offset (0..len(bytes)) to the index of the character it belongs to."""
    lens = np.fromiter((len(c.encode("utf-8")) for c in text), dtype=np.int64, count=len(text))
    return np.concatenate([np.repeat(np.arange(len(text)), lens), [len(text)]])


def step_token_indices(starts: list[int], step_ends: list[int]) -> list[int]:
    """For each step end offset e, the index of the last token with start < e (0 when there is none).

    Args:
        starts: start character offset of each response token (non-decreasing), length n >= 0.
        step_ends: exclusive end character offsets of the steps.
    Returns:
        A response-relative token index per step (0 when no text token started before e, which is the
        first response token or EOS when the response has no text tokens).
    """
    arr = np.asarray(starts, dtype=np.int64)
    idx = np.searchsorted(arr, np.asarray(step_ends, dtype=np.int64), side="left") - 1
    return [int(max(i, 0)) for i in idx]


def tokenize_records(
    tok: Tokenizer, records: list[TrajectoryRecord], cfg: TokenizeConfig
) -> list[TokenizedSample | RecordError]:
    """Tokenize a chunk of records; each slot holds a sample or the RecordError that rejects it.

    Reasons: chat_without_template, behavior_tokenizer_mismatch, behavior_logprobs_length, too_long,
    response_too_long, empty_response (a truncated record whose response gives no token), empty_prompt
    (see docs/data.md).
    """
    out: list[TokenizedSample | RecordError | None] = [None] * len(records)
    # The samples of one prompt (20 in the paper) usually sit together: render and encode each distinct
    # prompt once per worker (bounded cache keyed by the prompt itself, so results cannot differ).
    cache = tok.prompt_cache
    if len(cache) > PROMPT_CACHE_SIZE:
        cache.clear()
    # chat-templated prompts are rendered in one batched call after the loop (rendering cannot fail
    # there); other prompts are rendered here, where a chat prompt without a template is rejected
    templated = tok.templated
    check_blp = cfg.check_behavior_tokenizer
    keys, keep, todo, todo_keys, pending = [], [], [], [], set()
    for i, r in enumerate(records):
        if check_blp and r.behavior_logprobs is not None and r.behavior_tokenizer and r.behavior_tokenizer != tok.name:
            out[i] = RecordError(
                "behavior_tokenizer_mismatch",
                f"log-probs are for tokenizer {r.behavior_tokenizer!r}, we tokenize with {tok.name!r}",
                field="behavior_tokenizer",
                file=r.file,
                line=r.line,
            )
            continue
        prompt = r.prompt
        key = prompt if isinstance(prompt, str) else tuple((m["role"], m["content"]) for m in prompt)
        if key not in cache and key not in pending:
            if templated:
                todo.append(prompt)
            else:
                try:
                    todo.append(tok.render_prompt(prompt, {"file": r.file, "line": r.line}))
                except RecordError as err:
                    out[i] = err
                    continue
            todo_keys.append(key)
            pending.add(key)
        keys.append(key)
        keep.append(i)
    if templated:
        todo = tok.render_chat_batch(todo)
    for key, ids in zip(todo_keys, tok.encode_prompts(todo)):
        cache[key] = ids
    need_offsets = [bool(records[i].process_rewards) for i in keep]
    resp_ids, resp_starts = tok.encode_responses([records[i].response for i in keep], need_offsets)
    # _assemble builds new lists from these (never mutates them), so cached prompt ids can be shared
    for i, key, r_ids, starts in zip(keep, keys, resp_ids, resp_starts):
        out[i] = _assemble(records[i], cache[key], r_ids, starts, tok, cfg)
    return out  # type: ignore[return-value]


def _assemble(
    r: TrajectoryRecord, p_ids: list[int], r_ids: list[int], starts, tok: Tokenizer, cfg: TokenizeConfig
) -> TokenizedSample | RecordError:
    """One record's sample: prompt (left-cut to fit `max_length`) + response + EOS (unless truncated),
    per-token rewards and behaviour log-probs on the response; or the first problem as a RecordError."""
    where = {"file": r.file, "line": r.line}
    eos = [] if r.truncated else [tok.eos_id]
    problem = _response_problem(r, r_ids, eos, tok, cfg, where)
    if problem is not None:
        return problem
    p_ids, cut = _fit_prompt(p_ids, len(r_ids) + len(eos), bool(eos), cfg, where)
    if isinstance(p_ids, RecordError):
        return p_ids
    P = len(p_ids)
    tokens = np.asarray(p_ids + r_ids + eos, dtype=np.int64)
    rewards = _token_rewards(r, P, len(tokens), starts, where)
    if isinstance(rewards, RecordError):
        return rewards
    blp = None
    if r.behavior_logprobs is not None:
        blp = np.zeros(len(tokens), dtype=np.float32)
        blp[P : P + len(r.behavior_logprobs)] = np.asarray(r.behavior_logprobs, dtype=np.float32)
    return TokenizedSample(
        tokens=tokens,
        prompt_length=P,
        rewards=rewards,
        behavior_logprobs=blp,
        prompt_id=r.prompt_id,
        outcome_reward=float(r.reward) if r.reward is not None else 0.0,
        correct=-1 if r.correct is None else int(r.correct),
        truncated_prompt_tokens=cut,
        truncated=r.truncated,
        file=r.file,
        line=r.line,
    )


def _response_problem(
    r: TrajectoryRecord, r_ids: list[int], eos: list[int], tok: Tokenizer, cfg: TokenizeConfig, where: dict
) -> RecordError | None:
    """What is wrong with the response as tokenized: empty though truncated, or behaviour log-probs that
    do not match its token count (with or without EOS as configured)."""
    if r.truncated and not r_ids:  # the outcome reward would land on a prompt token
        return RecordError(
            "empty_response",
            "truncated: true, but the response gives no token with tokenizer "
            f"{tok.name!r} (and a truncated response gets no EOS)",
            field="response",
            **where,
        )
    if r.behavior_logprobs is None:
        return None
    n_resp = len(r_ids) + len(eos)
    if r.truncated:
        want, what = n_resp, " (truncated: true, so no EOS)"
    elif cfg.behavior_logprobs_include_eos:
        want, what = n_resp, " incl. EOS"
    else:
        want, what = n_resp - 1, " before EOS"
    if len(r.behavior_logprobs) == want:
        return None
    return RecordError(
        "behavior_logprobs_length",
        f"has {len(r.behavior_logprobs)} values but the response has {want} tokens{what} with tokenizer {tok.name!r}",
        field="behavior_logprobs",
        **where,
    )


def _fit_prompt(
    p_ids: list[int], n_resp: int, has_eos: bool, cfg: TokenizeConfig, where: dict
) -> tuple[list[int] | RecordError, int]:
    """(prompt ids cut from the left so that prompt + `n_resp` response tokens fit `max_length`, tokens
    cut); responses are never cut, so a record that cannot fit (or is to be dropped) is a RecordError."""
    cut = 0
    total = len(p_ids) + n_resp
    if total > cfg.max_length:
        if cfg.overlong == "drop":
            return RecordError("too_long", f"{total} tokens > max_length {cfg.max_length}", **where), 0
        if n_resp + 1 > cfg.max_length:
            message = (
                f"response alone has {n_resp} tokens{' incl. EOS' if has_eos else ''}; "
                f"with one prompt token that exceeds max_length {cfg.max_length} (responses are never cut)"
            )
            return RecordError("response_too_long", message, **where), 0
        cut = total - cfg.max_length
        p_ids = p_ids[cut:]
    if not p_ids:
        message = "the prompt gives no tokens (a response needs a state to start from)"
        return RecordError("empty_prompt", message, field="prompt", **where), 0
    return p_ids, cut


def _token_rewards(
    r: TrajectoryRecord, prompt_len: int, n_tokens: int, starts, where: dict
) -> np.ndarray | RecordError:
    """``[n_tokens]`` float32 rewards: process rewards on the last token of their step, the outcome on
    the last token; a RecordError when rewards sharing a token add up beyond float32."""
    rewards = np.zeros(n_tokens, dtype=np.float32)
    with np.errstate(over="ignore"):  # an overflowing sum is refused just below, with file:line
        if r.process_rewards:
            idx = step_token_indices(starts, [e for e, _ in r.process_rewards])
            for j, (_, v) in zip(idx, r.process_rewards):
                rewards[prompt_len + j] += np.float32(v)
        rewards[-1] += np.float32(float(r.reward) if r.reward is not None else 0.0)
    if np.isfinite(rewards).all():
        return rewards
    # each value fits float32 (parse_record checks), but rewards sharing a token add up beyond it
    t = int(np.flatnonzero(~np.isfinite(rewards))[0])
    return RecordError(
        "not_representable",
        f"the rewards on token {t} (outcome and/or process rewards on the "
        "same token) add up beyond float32, the dtype they are stored in",
        field="process_rewards" if r.process_rewards else "reward",
        **where,
    )
