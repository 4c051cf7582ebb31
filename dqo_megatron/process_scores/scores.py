"""Synthetic process scores (the paper's section 4.4): per-step rewards for failed responses by Monte-Carlo
completion from each step prefix.

For every failed response (`correct` false, or `reward` <= 0 without `correct`), split into steps
1..K (`dqo_megatron.process_scores.steps`); for each prefix k = 1..K-1 (the response up to the end of step k)
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
default r = 0.1 suits up to ~9 steps) keeps a failed response's return below a correct one's (1).
Each scored record also gets a `process_scores` field (step ends, correct completions per prefix, M)
for analysis (e.g. value-network correlation).

Cost: (number of prefixes) x M completions, stated before generation and shown by a progress bar.
Identical (prompt, prefix) pairs are generated once. Completions are cached on disk (JSON Lines, one line
per prefix, appended after every batch) keyed by (model, backend, prompt, prefix, sampling params, seed);
seeds are derived from (seed, prompt, prefix), so a rerun or an interrupted run regenerates nothing it
already has and gets the same completions.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from dqo_megatron.data.hf_sources import local_inputs
from dqo_megatron.data.records import RecordError, expand_inputs, iter_raw, parse_record
from dqo_megatron.outputs import OutputError, check_apart, refuse_existing, staged_file
from dqo_megatron.process_scores.cache import CompletionCache, cache_key, prefix_seed
from dqo_megatron.process_scores.config import ProcessScoresConfig, ProcessScoresSummary
from dqo_megatron.process_scores.rewards import assign_process_rewards
from dqo_megatron.process_scores.steps import compile_pattern, split_steps
from dqo_megatron.rollout.backend import GenerationBackend
from dqo_megatron.rollout.identity import identity_tag
from dqo_megatron.tasks.answers import extract_boxed, extract_gsm8k_answer
from dqo_megatron.tasks.grading import check_answer
from dqo_megatron.tasks.prompts import TASKS

log = logging.getLogger(__name__)


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
    scored: dict[tuple, _Scored] = {}
    invalid: set[tuple] = set()
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
                    raise RecordError(
                        "missing_field",
                        f"task {task!r} unknown: set `task` (gsm8k/math) on the record or pass --task",
                        path,
                        line,
                        "task",
                    )
                if rec.reference_answer is None:
                    raise RecordError(
                        "missing_field",
                        "missing; process scores grade completions against it",
                        path,
                        line,
                        "reference_answer",
                    )
                if rec.process_rewards and not cfg.replace_rewards:
                    raise RecordError(
                        "bad_process_rewards",
                        "the record already has process rewards (use --replace-rewards to replace them)",
                        path,
                        line,
                        "process_rewards",
                    )
            except RecordError as err:
                if not cfg.skip_invalid:
                    raise
                summary.skips.add(err)
                invalid.add(_row_key(path, line, raw))
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
            scored[_row_key(path, line, raw)] = item
    return scored, invalid, list(jobs.values())


def _row_key(path: str, line: int, raw) -> tuple:
    """Which record a row is: a preference-pair row gives two (its chosen and rejected sides) on one line."""
    return path, line, getattr(raw, "side", None)


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


def _generate(
    cfg: ProcessScoresConfig,
    backend: GenerationBackend,
    jobs: list[_Job],
    cache: CompletionCache,
    summary: ProcessScoresSummary,
) -> None:
    from tqdm import tqdm

    params = cfg.sampling_params()
    m = cfg.num_completions
    todo = list({j.key: j for j in jobs if cache.get(j.key) is None}.values())  # each key generated once
    with tqdm(
        total=len(todo) * m,
        disable=not cfg.progress,
        unit="compl",
        desc="process-scores",
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        for start in range(0, len(todo), cfg.prefixes_per_call):
            batch = todo[start : start + cfg.prefixes_per_call]
            out = backend.generate(
                [j.prompt for j in batch], params, seeds=[j.seed for j in batch], prefixes=[j.prefix for j in batch]
            )
            if len(out) != len(batch) or any(len(c) != m for c in out):
                raise RuntimeError(
                    f"backend {backend.name!r} returned {[len(c) for c in out]} completions for "
                    f"{len(batch)} prefixes; expected {m} each"
                )
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
    return local_inputs(list(cfg.inputs) + expand_inputs(cfg.inputs))


def _write(cfg: ProcessScoresConfig, scored: dict, invalid: set, summary: ProcessScoresSummary) -> None:
    m = cfg.num_completions
    with staged_file(cfg.output, overwrite=cfg.overwrite, inputs=_input_paths(cfg)) as tmp:
        with open(tmp, "w", encoding="utf-8") as out:
            for path in expand_inputs(cfg.inputs):
                for line, raw in iter_raw(path):
                    if _row_key(path, line, raw) in invalid:  # counted in the plan; not written
                        continue
                    item = scored.get(_row_key(path, line, raw))
                    if item is None:
                        # passed through unchanged (byte for byte for JSON Lines input)
                        out.write(
                            (raw.rstrip("\r\n") if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)) + "\n"
                        )
                        continue
                    obj = json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw)
                    counts = [j.correct for j in item.jobs]
                    rewards = assign_process_rewards(item.ends, counts, m, cfg.assign, cfg.step_reward)
                    obj.pop("process_segments", None)
                    obj.pop("process_rewards", None)
                    if rewards:
                        obj["process_rewards"] = [[e, r] for e, r in rewards]
                        summary.rewarded_records += 1
                    obj["process_scores"] = {
                        "step_ends": item.ends,
                        "prefix_correct": counts,
                        "num_completions": m,
                        "assign": cfg.assign,
                        "step_reward": cfg.step_reward,
                        "splitter": cfg.splitter,
                    }
                    parse_record(obj, path, line)  # what we write must pass the validator
                    out.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
