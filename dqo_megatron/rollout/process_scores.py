"""Synthetic process scores (the paper's section 4.4): per-step rewards for failed responses by Monte-Carlo
completion from each step prefix.

For every failed response (`correct` false, or `reward` <= 0 without `correct`), split into steps
1..K (`dqo_megatron.rollout.steps`); for each prefix k = 1..K-1 (the response up to the end of step k)
sample M completions that continue it, grade `prefix + completion` against the reference, and call the
prefix *solvable* when at least one completion is correct (the paper's rule). Prefix K is the whole
response, known to be wrong. Successful responses are copied through unchanged.

How solvability becomes rewards (`assign`), with `r = step_reward`. Preprocessing puts the outcome reward
on the last token and a process reward on the last token of its step, so with DQO's Monte-Carlo return
(lambda = 1) a token inside step j sees `outcome + sum of the process rewards of steps j..K`:

  every_correct (default) +r on each step of the longest solvable prefix: the paper's rule as our notes
                          give it ("if any completion is correct the prefix is taken as correct and its
                          steps get a process reward", shared/docs/dqo-math.md). Solvability is monotone in
                          truth (a solvable prefix k makes every shorter prefix solvable), so a later
                          solvable prefix overrides an earlier miss of the sampler. A token in step j of a
                          failed response returns r x (solvable steps from j on); the return drops to 0 at
                          the first step after the last solvable prefix: where the problem became unsolvable.
  last_correct            +r on the last solvable step only: every token up to it returns r, every token
                          after it 0 (one drop of r, independent of how many correct steps remain).
  value                   v_k = fraction of the M completions of prefix k that are correct (v_K = 0);
                          step k gets r * (v_k - v_{k+1}), so a token inside step j returns r * v_j, an
                          estimate of the success probability after step j. Steps after which the
                          estimate drops get negative rewards.

The outcome reward (`reward`, `correct`) is left as it is: the per-token rewards are its sum with the
process rewards (the combination is "add"); with every_correct, K x r < 1 (K = steps of a response; the
default r = 0.1 suits up to ~9 steps) keeps a failed response's return below a correct one's (1). Each scored record also gets a `process_scores` field (step ends,
correct completions per prefix, M) for analysis (e.g. value-network correlation).

Cost: (number of prefixes) x M completions, stated before generation and shown by a progress bar.
Identical (prompt, prefix) pairs are generated once. Completions are cached on disk (JSON Lines, one line
per prefix, appended after every batch) keyed by (model, backend, prompt, prefix, sampling params, seed);
seeds are derived from (seed, prompt, prefix), so a rerun or an interrupted run regenerates nothing it
already has and gets the same completions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

from dqo_megatron.config.loader import ConfigError
from dqo_megatron.data.records import RecordError, SkipCounter, expand_inputs, iter_raw, parse_record
from dqo_megatron.outputs import OutputError, check_apart, refuse_existing, staged_file
from dqo_megatron.rollout.backend import GenerationBackend, SamplingParams
from dqo_megatron.rollout.identity import identity_tag
from dqo_megatron.rollout.steps import SPLITTERS, compile_pattern, split_steps
from dqo_megatron.tasks.answers import extract_boxed, extract_gsm8k_answer
from dqo_megatron.tasks.grading import check_answer
from dqo_megatron.tasks.prompts import TASKS

log = logging.getLogger(__name__)

ASSIGN_MODES = ("last_correct", "every_correct", "value")
"""How prefix solvability becomes step rewards (see the module docstring)."""


@dataclass
class ProcessScoresConfig:
    """Inputs, output, splitting, sampling and reward assignment of a process-scores run."""

    inputs: list[str] = field(default_factory=list)
    """Labeled rollout record files (.jsonl/.parquet/datasets directory, globs allowed); failed records need
    `reference_answer` and `task` (or `task` below)."""
    output: str = ""
    """Output JSON Lines file (written atomically, records in input order)."""
    model_id: str = ""
    """Names the generating model in the cache key (its path or name), so completions of another model are
    never reused."""
    num_completions: int = 20
    """M: completions sampled from each step prefix (the paper: 20)."""
    splitter: Literal["auto", "lines", "paragraphs", "step_markers", "regex"] = "auto"
    """How responses are cut into steps (see dqo_megatron.rollout.steps)."""
    split_pattern: str | None = None
    """Boundary regex for splitter="regex": a step ends where a match ends."""
    max_steps: int | None = None
    """Merge neighbouring steps so that a response has at most this many (caps the cost); None: no cap."""
    assign: Literal["last_correct", "every_correct", "value"] = "every_correct"
    """From solvable prefixes to step rewards (module docstring)."""
    step_reward: float = 0.1
    """r: the process reward of one step (outcome rewards are 1 / 0). Our notes on the paper give no value;
    0.1 keeps K x r < 1 for responses of up to ~9 steps, so no failed response outscores a correct one."""
    temperature: float = 1.0
    """Completion sampling temperature (our notes on the paper give none; 1.0 = the model's distribution)."""
    top_p: float = 0.9
    """Nucleus sampling of the completions (the paper: 0.9)."""
    top_k: int = 16
    """Top-k of the completions (the paper: 16)."""
    max_new_tokens: int = 512
    """Longest completion in tokens; a completion cut here rarely holds an answer and counts as wrong."""
    seed: int = 1234
    """Base seed; each prefix's seed derives from it, the prompt and the prefix."""
    prefixes_per_call: int = 16
    """Prefixes per backend call (each gives M completions); the backend splits its rows into its own batches."""
    task: Literal["auto", "gsm8k", "math"] = "auto"
    """Answer format; auto: each record's `task` field."""
    timeout_s: float = 5.0
    """MATH: seconds per answer comparison (a timeout counts as wrong)."""
    cache: str | None = None
    """Completion cache (JSON Lines); None: `<output>.cache.jsonl`; "" disables caching."""
    replace_rewards: bool = False
    """Replace the process rewards a failed record already has (otherwise such a record is an error)."""
    overwrite: bool = False
    """Replace an existing output file (only once the new one is complete); without it, an error."""
    skip_invalid: bool = False
    """Skip invalid records (counted by reason; they are not written) instead of stopping at the first."""
    dry_run: bool = False
    """Plan and state the cost, generate nothing, write nothing."""
    progress: bool = True
    """Progress bar on stderr."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if not self.inputs:
            raise ConfigError("inputs: process-scores needs at least one record file")
        if not self.output and not self.dry_run:
            raise ConfigError("output: process-scores needs an output path")
        if not isinstance(self.num_completions, int) or self.num_completions < 1:
            raise ConfigError(f"num_completions={self.num_completions!r}: must be an integer >= 1")
        if self.splitter not in SPLITTERS:
            raise ConfigError(f"splitter={self.splitter!r}: choose one of {list(SPLITTERS)}")
        if self.splitter == "regex":
            if not self.split_pattern:
                raise ConfigError("split_pattern: splitter='regex' needs a pattern")
            try:
                compile_pattern(self.split_pattern)
            except ValueError as exc:
                raise ConfigError(f"split_pattern: {exc}") from None
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 2):
            raise ConfigError(f"max_steps={self.max_steps!r}: must be an integer >= 2 (or None)")
        if self.assign not in ASSIGN_MODES:
            raise ConfigError(f"assign={self.assign!r}: choose one of {list(ASSIGN_MODES)}")
        if not (isinstance(self.step_reward, (int, float)) and self.step_reward > 0):
            raise ConfigError(f"step_reward={self.step_reward!r}: must be a number > 0")
        if self.task not in ("auto",) + TASKS:
            raise ConfigError(f"task={self.task!r}: choose auto, gsm8k or math")
        if not isinstance(self.prefixes_per_call, int) or self.prefixes_per_call < 1:
            raise ConfigError(f"prefixes_per_call={self.prefixes_per_call!r}: must be an integer >= 1")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s={self.timeout_s}: must be > 0")
        try:
            self.sampling_params()
        except ValueError as exc:
            raise ConfigError(f"sampling (temperature/top_p/top_k/max_new_tokens): {exc}") from None
        if self.temperature == 0 and self.num_completions > 1:
            raise ConfigError("temperature=0 (greedy) gives one completion per prefix: set num_completions=1")

    def sampling_params(self) -> SamplingParams:
        """The backend's SamplingParams for the completions (n = num_completions)."""
        return SamplingParams(n=self.num_completions, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, max_new_tokens=self.max_new_tokens)

    @property
    def cache_path(self) -> str | None:
        """The cache file in use, or None when caching is off."""
        if self.cache == "":
            return None
        return self.cache if self.cache is not None else self.output + ".cache.jsonl"


@dataclass
class ProcessScoresSummary:
    """What a process-scores run did."""

    records: int = 0
    """Records read (valid ones)."""
    failed: int = 0
    """Failed responses (the ones scored)."""
    prefixes: int = 0
    """Step prefixes of the failed responses (each needs M completions)."""
    unique_prefixes: int = 0
    """Distinct (prompt, prefix) pairs among them."""
    cached_prefixes: int = 0
    """Distinct prefixes whose completions were already in the cache."""
    completions_total: int = 0
    """unique_prefixes x M."""
    completions_generated: int = 0
    """Completions generated by this run."""
    solvable_prefixes: int = 0
    """Distinct prefixes with at least one correct completion."""
    answer_checks: int = 0
    """Answer comparisons run (distinct final answers per reference; see AnswerMemo)."""
    rewarded_records: int = 0
    """Failed records that got at least one non-zero process reward."""
    seconds: float = 0.0
    skips: SkipCounter = field(default_factory=SkipCounter)

    def plan(self, m: int) -> str:
        """The cost statement printed before generation."""
        return (f"process-scores: {self.records} records, {self.failed} failed -> {self.prefixes} step prefixes "
                f"({self.unique_prefixes} distinct, {self.cached_prefixes} cached) x M={m}: "
                f"{(self.unique_prefixes - self.cached_prefixes) * m} completions to generate "
                f"(of {self.completions_total})")

    def report(self) -> str:
        """Human-readable summary."""
        rate = self.completions_generated / self.seconds if self.seconds > 0 else 0.0
        return (f"records {self.records}, failed {self.failed}, prefixes {self.prefixes} ({self.unique_prefixes} distinct, "
                f"{self.solvable_prefixes} solvable), completions generated {self.completions_generated} "
                f"({rate:.1f}/s), answer checks {self.answer_checks}, cached prefixes {self.cached_prefixes}, "
                f"records with process rewards "
                f"{self.rewarded_records}, {self.seconds:.1f} s\n{self.skips.report()}")


def assign_process_rewards(ends: Sequence[int], correct_counts: Sequence[int], num_completions: int,
                           assign: str = "every_correct", step_reward: float = 0.1) -> list[tuple[int, float]]:  # fmt: skip
    """Step rewards of one failed response, as `process_rewards` pairs (zero rewards left out).

    Args:
        ends: the K step end offsets (`split_steps`).
        correct_counts: for prefixes k = 1..K-1, how many of the M completions were correct (K-1 numbers).
        num_completions: M.
        assign: one of ASSIGN_MODES (module docstring).
        step_reward: r.
    Returns:
        [(end offset of step k, reward), ...] in step order.
    """
    if len(correct_counts) != len(ends) - 1:
        raise ValueError(f"{len(ends)} steps need {len(ends) - 1} prefix counts, got {len(correct_counts)}")
    if assign not in ASSIGN_MODES:
        raise ValueError(f"assign={assign!r}: choose one of {list(ASSIGN_MODES)}")
    solvable = [k for k, c in enumerate(correct_counts, 1) if c > 0]
    last = solvable[-1] if solvable else 0
    if assign == "last_correct":
        return [(ends[last - 1], float(step_reward))] if last else []
    if assign == "every_correct":
        return [(ends[k - 1], float(step_reward)) for k in range(1, last + 1)]
    v = [c / num_completions for c in correct_counts] + [0.0]  # v_K = 0: the full response is wrong
    out = []
    for k in range(1, len(ends)):
        r = step_reward * (v[k - 1] - v[k])
        if r != 0.0:
            out.append((ends[k - 1], r))
    return out


def _canonical(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def prefix_seed(seed: int, prompt: Any, prefix: str) -> int:
    """Deterministic seed of one prefix's completions: from the base seed, the prompt and the prefix only
    (not from the batch or the file order, so reruns and resumed runs draw the same completions)."""
    h = hashlib.sha256(f"{seed}\0{_canonical(prompt)}\0{prefix}".encode("utf-8")).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def cache_key(prompt: Any, prefix: str, params: SamplingParams, seed: int, model: str, backend: str) -> str:
    """Cache key of one prefix's completions (sha256 of everything that determines them)."""
    blob = _canonical({"prompt": prompt, "prefix": prefix, "params": asdict(params), "seed": seed,
                       "model": model, "backend": backend})
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CompletionCache:
    """Completions on disk: one JSON line {"key", "texts", "finish"?} per prompt (+ prefix), appended per batch.

    Used by process-scores (per prefix) and eval (per problem). A line cut by a kill (the last one) or
    otherwise unreadable is ignored (counted in `bad_lines`) and its completions are generated again.
    `path=None` keeps the cache in memory only.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.entries: dict[str, list[str]] = {}
        self.finish: dict[str, list[str]] = {}
        self.bad_lines = 0
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                for raw in f:
                    try:
                        obj = json.loads(raw)
                        texts = obj["texts"]
                        if not isinstance(obj["key"], str) or not all(isinstance(t, str) for t in texts):
                            raise TypeError
                    except (ValueError, KeyError, TypeError):
                        self.bad_lines += 1
                        continue
                    self.entries[obj["key"]] = texts
                    if isinstance(obj.get("finish"), list):
                        self.finish[obj["key"]] = obj["finish"]
            if self.bad_lines and not self.entries:
                # appending to it would damage a file that is not ours (records, a model's config, a tokenizer)
                raise ValueError(f"{path}: not a completion cache (no line of it is a cache entry); give another "
                                 "cache path, or remove the file")  # fmt: skip
            if self.bad_lines:
                log.warning("%s: %d unreadable cache line(s) ignored (an interrupted write?)", path, self.bad_lines)

    def get(self, key: str) -> list[str] | None:
        """The cached completion texts of a prefix, or None."""
        return self.entries.get(key)

    def finish_reasons(self, key: str) -> list[str] | None:
        """The cached finish reasons ("eos", "length", "stop") of an entry, when they were stored."""
        return self.finish.get(key)

    def put_many(self, items: Sequence[tuple[str, list[str]]], finish: Sequence[list[str]] | None = None) -> None:
        """Add entries (and optionally their finish reasons, one list per entry) and append them to the file
        (flushed and fsynced: a kill loses at most this batch)."""
        lines = []
        for i, (key, texts) in enumerate(items):
            self.entries[key] = texts
            entry: dict[str, Any] = {"key": key, "texts": texts}
            if finish is not None:
                self.finish[key] = entry["finish"] = list(finish[i])
            lines.append(_canonical(entry) + "\n")
        if not self.path or not items:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        # a previous run killed mid-line leaves no newline at the end: start on a fresh line
        needs_nl = os.path.exists(self.path) and os.path.getsize(self.path) > 0 and _last_byte(self.path) != b"\n"
        with open(self.path, "a", encoding="utf-8") as f:
            if needs_nl:
                f.write("\n")
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())


def _last_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


@dataclass
class _Job:
    """One distinct (prompt, prefix) to complete M times."""

    key: str
    """Cache key: what determines the completions (two jobs may share it when their references differ)."""
    prompt: Any
    prefix: str
    seed: int
    task: str
    reference: str
    correct: int = -1  # correct completions once graded


@dataclass
class _Scored:
    """A failed record's split and the job of each of its prefixes."""

    ends: list[int]
    jobs: list[_Job]


def is_failed(rec) -> bool:
    """A failed response: `correct` is false, or (without `correct`) `reward` <= 0."""
    if rec.correct is not None:
        return rec.correct is False
    return rec.reward is not None and rec.reward <= 0


def _plan(cfg: ProcessScoresConfig, backend: GenerationBackend, summary: ProcessScoresSummary):
    """Read every input once: validate, split failed responses, build the distinct prefix jobs."""
    params = cfg.sampling_params()
    model_tag = identity_tag(cfg.model_id)  # a model replaced at the same path is not answered from the cache
    pattern = compile_pattern(cfg.split_pattern) if cfg.splitter == "regex" else None
    scored: dict[tuple[str, int], _Scored] = {}
    invalid: set[tuple[str, int]] = set()
    jobs: dict[tuple[str, str, str], _Job] = {}
    for path in expand_inputs(cfg.inputs):
        for line, raw in iter_raw(path):
            try:
                rec = parse_record(raw, path, line)
                if not is_failed(rec):
                    summary.records += 1
                    continue
                task = cfg.task if cfg.task != "auto" else rec.task
                if task not in TASKS:
                    raise RecordError("missing_field", f"task {task!r} unknown: set `task` (gsm8k/math) on the "
                                      "record or pass --task", path, line, "task")
                if rec.reference_answer is None:
                    raise RecordError("missing_field", "missing; process scores grade completions against it",
                                      path, line, "reference_answer")
                if rec.process_rewards and not cfg.replace_rewards:
                    raise RecordError("bad_process_rewards", "the record already has process rewards "
                                      "(use --replace-rewards to replace them)", path, line, "process_rewards")
            except RecordError as err:
                if not cfg.skip_invalid:
                    raise
                summary.skips.add(err)
                invalid.add((path, line))
                continue
            summary.records += 1
            summary.failed += 1
            ends = split_steps(rec.response, cfg.splitter, pattern, cfg.max_steps)
            item = _Scored(ends, [])
            for end in ends[:-1]:  # the full response (prefix K) is known to be wrong
                prefix = rec.response[:end]
                seed = prefix_seed(cfg.seed, rec.prompt, prefix)
                key = cache_key(rec.prompt, prefix, params, seed, model_tag, backend.name)
                # graded per reference: the same prompt could carry another reference in another file
                ident = (key, task, rec.reference_answer)
                job = jobs.get(ident)
                if job is None:
                    job = jobs[ident] = _Job(key, rec.prompt, prefix, seed, task, rec.reference_answer)
                item.jobs.append(job)
            summary.prefixes += len(item.jobs)
            scored[(path, line)] = item
    return scored, invalid, list(jobs.values())


class AnswerMemo:
    """`check_answer` with its verdicts memoized per (task, reference, extracted answer).

    A verdict depends on the response only through its extracted final answer, and the completions of one
    prompt's prefixes repeat a few answers many times, so this grades each distinct answer once (a MATH
    comparison through math_verify costs ~10-30 ms; a paper-scale run grades millions of completions).
    """

    def __init__(self, timeout_s: float = 5.0, max_entries: int = 200_000) -> None:
        self.timeout_s = timeout_s
        self.max_entries = max_entries
        self.memo: dict[tuple[str, str, str], bool] = {}
        self.checks = 0
        """Comparisons actually run."""

    def correct(self, task: str, response: str, reference: str) -> bool:
        """Whether `response`'s final answer matches `reference` (no answer: False)."""
        pred = extract_gsm8k_answer(response) if task == "gsm8k" else extract_boxed(response)
        if pred is None:
            return False
        key = (task, reference, pred)
        hit = self.memo.get(key)
        if hit is None:
            if len(self.memo) >= self.max_entries:
                self.memo.clear()  # bounded memory; records of one prompt are usually adjacent anyway
            self.checks += 1
            hit = self.memo[key] = check_answer(task, response, reference, timeout_s=self.timeout_s).correct
        return hit


def _generate(cfg: ProcessScoresConfig, backend: GenerationBackend, jobs: list[_Job], cache: CompletionCache,
              summary: ProcessScoresSummary) -> None:  # fmt: skip
    from tqdm import tqdm

    params = cfg.sampling_params()
    m = cfg.num_completions
    todo = list({j.key: j for j in jobs if cache.get(j.key) is None}.values())  # each key generated once
    with tqdm(total=len(todo) * m, disable=not cfg.progress, unit="compl", desc="process-scores",
              file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), cfg.prefixes_per_call):
            batch = todo[start:start + cfg.prefixes_per_call]
            out = backend.generate([j.prompt for j in batch], params, seeds=[j.seed for j in batch],
                                   prefixes=[j.prefix for j in batch])
            if len(out) != len(batch) or any(len(c) != m for c in out):
                raise RuntimeError(f"backend {backend.name!r} returned {[len(c) for c in out]} completions for "
                                   f"{len(batch)} prefixes; expected {m} each")
            new = [(j.key, [c.text for c in comps]) for j, comps in zip(batch, out)]
            cache.put_many(new, [[c.finish_reason for c in comps] for comps in out])
            summary.completions_generated += len(batch) * m
            bar.update(len(batch) * m)
    grader = AnswerMemo(cfg.timeout_s)
    for job in tqdm(jobs, disable=not cfg.progress, unit="prefix", desc="grade", file=sys.stderr, dynamic_ncols=True):
        job.correct = sum(grader.correct(job.task, job.prefix + t, job.reference) for t in cache.get(job.key))
    summary.answer_checks = grader.checks


def process_scores(cfg: ProcessScoresConfig, backend: GenerationBackend) -> ProcessScoresSummary:
    """Score the failed responses of `cfg.inputs` with `backend` and write all records to `cfg.output`.

    Records keep their order and fields; failed ones get `process_rewards` (see `assign_process_rewards`) and
    `process_scores` (step_ends, prefix_correct, num_completions, assign, step_reward, splitter).
    Returns:
        A ProcessScoresSummary; with cfg.dry_run only the plan is filled in.
    Raises:
        RecordError: the first invalid record (file:line, field), unless cfg.skip_invalid.
    """
    t0 = time.perf_counter()
    summary = ProcessScoresSummary()
    scored, invalid, jobs = _plan(cfg, backend, summary)
    cache = CompletionCache(cfg.cache_path)
    m = cfg.num_completions
    keys = {j.key for j in jobs}
    summary.unique_prefixes = len(keys)
    summary.cached_prefixes = sum(cache.get(k) is not None for k in keys)
    summary.completions_total = len(keys) * m
    log.info(summary.plan(m))
    if cfg.dry_run:
        summary.seconds = time.perf_counter() - t0
        return summary
    check_outputs(cfg)  # before hours of generation, not after
    _generate(cfg, backend, jobs, cache, summary)
    summary.solvable_prefixes = len({j.key for j in jobs if j.correct > 0})
    _write(cfg, scored, invalid, summary)
    summary.seconds = time.perf_counter() - t0
    return summary


def check_outputs(cfg: ProcessScoresConfig) -> None:
    """OutputError when cfg.output exists (and not cfg.overwrite), or when the output or the cache is, lies
    inside or contains an input. Cheap: callers run it before loading a model."""
    inputs = _input_paths(cfg)
    check_apart([cfg.output], inputs)
    if cfg.cache_path:  # appended to: never a file or directory of anything else
        try:
            check_apart([cfg.cache_path], inputs + [cfg.model_id, cfg.output])
        except OutputError as exc:
            raise OutputError(f"--cache {cfg.cache_path}: {exc}") from None
    refuse_existing([cfg.output], cfg.overwrite)


def _input_paths(cfg: ProcessScoresConfig) -> list[str]:
    return list(cfg.inputs) + expand_inputs(cfg.inputs)


def _write(cfg: ProcessScoresConfig, scored: dict, invalid: set, summary: ProcessScoresSummary) -> None:
    m = cfg.num_completions
    with staged_file(cfg.output, overwrite=cfg.overwrite, inputs=_input_paths(cfg)) as tmp:
        with open(tmp, "w", encoding="utf-8") as out:
            for path in expand_inputs(cfg.inputs):
                for line, raw in iter_raw(path):
                    if (path, line) in invalid:  # counted in the plan; not written
                        continue
                    item = scored.get((path, line))
                    if item is None:
                        # passed through unchanged (byte for byte for JSON Lines input)
                        out.write((raw.rstrip("\r\n") if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)) + "\n")
                        continue
                    obj = json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw)
                    counts = [j.correct for j in item.jobs]
                    rewards = assign_process_rewards(item.ends, counts, m, cfg.assign, cfg.step_reward)
                    obj.pop("process_segments", None)
                    obj.pop("process_rewards", None)
                    if rewards:
                        obj["process_rewards"] = [[e, r] for e, r in rewards]
                        summary.rewarded_records += 1
                    obj["process_scores"] = {"step_ends": item.ends, "prefix_correct": counts, "num_completions": m,
                                             "assign": cfg.assign, "step_reward": cfg.step_reward,
                                             "splitter": cfg.splitter}
                    parse_record(obj, path, line)  # what we write must pass the validator
                    out.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
