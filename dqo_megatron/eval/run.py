"""`dqo-megatron eval`: accuracy of one or more models on GSM8K / MATH / MATH500, greedy and sampled.

For each model (one backend at a time, closed before the next is built, so a GPU holds one model), each
decoding, the union of the datasets' prompts is generated once (MATH500 is a subset of the MATH 5K test
with the same prompts, so it costs nothing extra), then each dataset is graded. Generations are cached in
`output_dir/cache/<name>.jsonl` keyed by (model, backend, prompt, sampling params, seed), so an
interrupted run resumes, and adding a model to a table, a dataset or a decoding only generates what is
new. Outputs (see `dqo_megatron.eval.report`): results.json, results.md (the paper's Table 3 layout),
accuracy.png, and per-problem outputs with verdicts in outputs/<name>/<dataset>.<decoding>.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from dqo_megatron.eval.config import DatasetSpec, EvalConfig
from dqo_megatron.eval.report import write_reports
from dqo_megatron.eval.results import EvalResults, RunStats
from dqo_megatron.eval.scoring import grade_outputs, graded_to_dict, summarize
from dqo_megatron.outputs import check_apart, staged_file
from dqo_megatron.process_scores.cache import CompletionCache, cache_key, prefix_seed
from dqo_megatron.rollout.backend import GenerationBackend, SamplingParams
from dqo_megatron.rollout.identity import identity_tag
from dqo_megatron.tasks.datasets import Problem, load_problems

log = logging.getLogger(__name__)


def safe_name(name: str) -> str:
    """A file-name-safe form of a model or dataset name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def select(problems: list[Problem], limit: int | None, mode: str) -> list[Problem]:
    """At most `limit` problems: the first ones, or evenly spaced ones ("spread", deterministic)."""
    if limit is None or limit >= len(problems):
        return problems
    if mode == "first":
        return problems[:limit]
    return [problems[i * len(problems) // limit] for i in range(limit)]


def load_datasets(cfg: EvalConfig) -> tuple[list[DatasetSpec], dict[str, list[Problem]]]:
    """The configured datasets' problems (after `limit`); errors name the missing file."""
    specs = cfg.dataset_specs()
    out = {}
    for spec in specs:
        if not os.path.exists(spec.path):
            raise FileNotFoundError(
                f"dataset {spec.name!r}: {spec.path} does not exist (set data_dir / $DQO_SHARED_DATA)"
            )
        out[spec.name] = select(load_problems(spec.path, task=spec.task), cfg.limit, cfg.limit_mode)
    return specs, out


def generate_outputs(
    backend: GenerationBackend,
    prompts: Sequence[str],
    params: SamplingParams,
    *,
    seed: int,
    model_id: str,
    cache: CompletionCache,
    per_call: int,
    progress: bool = False,
    desc: str = "generate",
) -> tuple[dict[str, tuple[list[str], list[str]]], RunStats]:
    """Generate `params.n` samples for each distinct prompt (cached ones are read, not generated).

    Returns:
        {prompt: (texts, finish reasons)} and the generation stats.
    """
    from tqdm import tqdm

    unique = list(dict.fromkeys(prompts))
    keys = {p: cache_key(p, "", params, prefix_seed(seed, p, ""), model_id, backend.name) for p in unique}
    todo = [p for p in unique if cache.get(keys[p]) is None]
    stats = RunStats(prompts=len(unique))
    t0 = time.perf_counter()
    with tqdm(
        total=len(todo) * params.n, disable=not progress, unit="sample", desc=desc, file=sys.stderr, dynamic_ncols=True
    ) as bar:
        for start in range(0, len(todo), per_call):
            batch = todo[start : start + per_call]
            out = backend.generate(batch, params, seeds=[prefix_seed(seed, p, "") for p in batch])
            if len(out) != len(batch) or any(len(c) != params.n for c in out):
                raise RuntimeError(
                    f"backend {backend.name!r} returned {[len(c) for c in out]} samples for "
                    f"{len(batch)} prompts; expected {params.n} each"
                )
            cache.put_many(
                [(keys[p], [c.text for c in comps]) for p, comps in zip(batch, out)],
                [[c.finish_reason for c in comps] for comps in out],
            )
            stats.generated += len(batch) * params.n
            bar.update(len(batch) * params.n)
    stats.seconds = time.perf_counter() - t0
    result = {}
    for p in unique:
        texts = cache.get(keys[p])
        result[p] = (texts, cache.finish_reasons(keys[p]) or ["unknown"] * len(texts))
    return result, stats


def _write_problem_outputs(path: Path, problems: list[Problem], graded, finish: list[list[str]], decoding: str) -> None:
    with staged_file(path, overwrite=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for p, g, fin in zip(problems, graded, finish):
            row = {"id": p.id, "decoding": decoding, "prompt": p.prompt, **graded_to_dict(g), "finish_reasons": fin}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _evaluate_model(
    cfg: EvalConfig,
    name: str,
    path: str,
    backend: GenerationBackend,
    specs: list[DatasetSpec],
    problems: dict[str, list[Problem]],
    results: EvalResults,
) -> None:
    out_dir = Path(cfg.output_dir)
    cache = CompletionCache(str(out_dir / "cache" / f"{safe_name(name)}.jsonl") if cfg.cache else None)
    all_prompts = [p.prompt for spec in specs for p in problems[spec.name]]
    model_tag = identity_tag(path)  # a model replaced at the same path is generated from again
    for decoding in cfg.decodings:
        params = cfg.sampling_params(decoding)
        outputs, stats = generate_outputs(
            backend,
            all_prompts,
            params,
            seed=cfg.seed,
            model_id=model_tag,
            cache=cache,
            per_call=cfg.problems_per_call,
            progress=cfg.progress,
            desc=f"{name} {decoding}",
        )
        results.stats.setdefault(name, {})[decoding] = stats
        for spec in specs:
            probs = problems[spec.name]
            graded = grade_outputs(
                probs, [outputs[p.prompt][0] for p in probs], timeout_s=cfg.timeout_s, progress=cfg.progress
            )
            summary = summarize(graded)
            results.scores.setdefault(name, {}).setdefault(spec.name, {})[decoding] = summary
            _write_problem_outputs(
                out_dir / "outputs" / safe_name(name) / f"{safe_name(spec.name)}.{decoding}.jsonl",
                probs,
                graded,
                [outputs[p.prompt][1] for p in probs],
                decoding,
            )
            log.info(
                "%s %s %s: accuracy %.2f%% (%d problems)",
                name,
                spec.label,
                decoding,
                100 * summary.accuracy,
                summary.overall.n,
            )


def evaluate(
    cfg: EvalConfig, backends: Sequence[GenerationBackend] | Callable[[str], GenerationBackend], write: bool = True
) -> EvalResults:
    """Run the evaluation and (with `write`) write results.json, results.md, accuracy.png and outputs/.

    Args:
        cfg: the run.
        backends: one backend per model (in `cfg.models` order; the caller closes them), or a factory called
          with each model path in turn (each backend is closed before the next model is built).
        write: write the report files (outputs/ and cache/ are always written).
    Returns:
        EvalResults (accuracy per model, dataset, decoding, with MATH breakdowns).
    """
    # what eval writes into output_dir (the directory itself is shared with the user's other files)
    written = [
        Path(cfg.output_dir, name) for name in ("results.json", "results.md", "accuracy.png", "outputs", "cache")
    ]
    check_apart(written, list(cfg.models) + [s.path for s in cfg.dataset_specs()])
    specs, problems = load_datasets(cfg)
    results = EvalResults(cfg, specs, {s.name: len(problems[s.name]) for s in specs})
    if not callable(backends) and len(backends) != len(cfg.models):
        raise ValueError(f"{len(backends)} backends for {len(cfg.models)} models")
    for i, (name, path) in enumerate(zip(cfg.names, cfg.models)):
        backend = backends(path) if callable(backends) else backends[i]
        try:
            _evaluate_model(cfg, name, path, backend, specs, problems, results)
        finally:
            if callable(backends):
                backend.close()
    if write:
        write_reports(results, cfg.output_dir)
    return results
