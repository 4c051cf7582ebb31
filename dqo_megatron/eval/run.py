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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

from dqo_megatron.config.loader import ConfigError
from dqo_megatron.eval.scoring import ScoreSummary, grade_outputs, graded_to_dict, summarize
from dqo_megatron.outputs import check_apart, staged_file
from dqo_megatron.paths import shared_data_dir
from dqo_megatron.rollout.backend import GenerationBackend, SamplingParams
from dqo_megatron.rollout.identity import identity_tag
from dqo_megatron.rollout.process_scores import CompletionCache, cache_key, prefix_seed
from dqo_megatron.tasks.datasets import Problem, load_problems

log = logging.getLogger(__name__)

BUILTIN_DATASETS = {
    "gsm8k": ("GSM8K", "gsm8k/test.jsonl", "gsm8k"),
    "math": ("MATH", "math/original/test.jsonl", "math"),
    "math500": ("MATH500", "math/prm800k_split/test.jsonl", "math"),
}
"""name -> (table label, path under the data directory, task): GSM8K test (1319), MATH test (5000, the
paper's), MATH500 (the PRM800K test split, 500 problems of the 5000)."""

DECODINGS = ("greedy", "sample")
"""greedy: temperature 0; sample: temperature/top_p/top_k of the config."""


@dataclass
class DatasetSpec:
    """One evaluation set."""

    name: str
    """Key in results ("gsm8k", "math", "math500", or a user name)."""
    label: str
    """Column label in the table."""
    path: str
    """Problem file (JSONL or a saved datasets directory)."""
    task: str | None
    """"gsm8k" / "math"; None: guessed from the path."""


@dataclass
class EvalConfig:
    """Models, datasets, decoding and outputs of an evaluation run."""

    models: list[str] = field(default_factory=list)
    """Model paths (HF directories or checkpoints the backend understands), one table row each."""
    names: list[str] = field(default_factory=list)
    """Row names, one per model (default: each path's basename); unique."""
    output_dir: str = ""
    """Where results.json, results.md, accuracy.png, outputs/ and cache/ go."""
    datasets: list[str] = field(default_factory=lambda: ["gsm8k", "math", "math500"])
    """"gsm8k", "math" (MATH 5K test), "math500", or "NAME=PATH" for any problem file (task from the path)."""
    data_dir: str | None = None
    """Shared data directory for the built-in datasets (default: $DQO_SHARED_DATA or ../shared/data)."""
    decodings: list[str] = field(default_factory=lambda: ["greedy", "sample"])
    """Decodings to run: "greedy" and/or "sample"."""
    temperature: float = 1.0
    """"sample" decoding: temperature (our notes on the paper give none; 1.0 = the model's distribution)."""
    top_p: float = 0.9
    """"sample" decoding: nucleus top_p (the paper's sampling: 0.9)."""
    top_k: int = 16
    """"sample" decoding: top_k (the paper's sampling: 16)."""
    num_samples: int = 1
    """"sample" decoding: samples per problem; accuracy is their mean (the expected one-sample accuracy)."""
    max_new_tokens: int = 1024
    """Longest response in tokens; a cut response usually has no final answer and counts as wrong."""
    limit: int | None = None
    """Evaluate at most this many problems per dataset (quick runs); None: all."""
    limit_mode: Literal["spread", "first"] = "spread"
    """With `limit`: "spread" takes evenly spaced problems (the MATH files are sorted by subject, so this
    covers every subject); "first" takes the first ones."""
    seed: int = 1234
    """Base seed of sampled decoding (each problem's seed derives from it and the prompt)."""
    problems_per_call: int = 32
    """Problems per backend call (the cache is appended after each); the backend batches rows itself."""
    timeout_s: float = 5.0
    """MATH: seconds per answer comparison (a timeout counts as wrong)."""
    cache: bool = True
    """Cache generations under output_dir/cache (resume; only new work is generated)."""
    progress: bool = True
    """Progress bars on stderr."""

    def __post_init__(self) -> None:
        for name in ("models", "names", "datasets", "decodings"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if not self.models:
            raise ConfigError("models: eval needs at least one model")
        if not self.names:
            self.names = [Path(m.rstrip("/")).name or m for m in self.models]
        if len(self.names) != len(self.models):
            raise ConfigError(f"names: {len(self.names)} names for {len(self.models)} models (give one --name per --model)")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"names: must be unique, got {self.names} (pass --name for each model)")
        if not self.output_dir:
            raise ConfigError("output_dir: eval needs an output directory")
        if not self.datasets:
            raise ConfigError("datasets: give at least one")
        for d in self.datasets:
            if "=" not in d and d not in BUILTIN_DATASETS:
                raise ConfigError(f"datasets: unknown {d!r}: choose {list(BUILTIN_DATASETS)} or NAME=PATH")
        if not self.decodings or any(d not in DECODINGS for d in self.decodings):
            raise ConfigError(f"decodings={self.decodings}: choose from {list(DECODINGS)}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"limit={self.limit!r}: must be an integer >= 1 (or None)")
        if self.limit_mode not in ("spread", "first"):
            raise ConfigError(f"limit_mode={self.limit_mode!r}: choose spread or first")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ConfigError(f"num_samples={self.num_samples!r}: must be an integer >= 1")
        if not isinstance(self.problems_per_call, int) or self.problems_per_call < 1:
            raise ConfigError(f"problems_per_call={self.problems_per_call!r}: must be an integer >= 1")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s={self.timeout_s}: must be > 0")
        if "sample" in self.decodings and self.temperature == 0:
            raise ConfigError("temperature=0 is greedy decoding: use decodings=[greedy] instead of sample")
        for dec in self.decodings:
            try:
                self.sampling_params(dec)
            except ValueError as exc:
                raise ConfigError(f"sampling (temperature/top_p/top_k/max_new_tokens): {exc}") from None

    def sampling_params(self, decoding: str) -> SamplingParams:
        """The backend's SamplingParams of a decoding."""
        if decoding == "greedy":
            return SamplingParams(n=1, temperature=0.0, max_new_tokens=self.max_new_tokens)
        return SamplingParams(n=self.num_samples, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens)

    def dataset_specs(self) -> list[DatasetSpec]:
        """The datasets with their labels, files and tasks."""
        root = Path(self.data_dir) if self.data_dir else shared_data_dir()
        out = []
        for d in self.datasets:
            if "=" in d:
                name, path = d.split("=", 1)
                out.append(DatasetSpec(name, name, path, None))
            else:
                label, rel, task = BUILTIN_DATASETS[d]
                out.append(DatasetSpec(d, label, str(root / rel), task))
        return out


@dataclass
class RunStats:
    """Generation cost of one model and decoding."""

    prompts: int = 0
    """Distinct prompts over the datasets."""
    generated: int = 0
    """Samples generated by this run (the rest came from the cache)."""
    seconds: float = 0.0
    """Generation wall time."""

    def to_dict(self) -> dict:
        """JSON form with samples/s."""
        return {**asdict(self), "samples_per_s": self.generated / self.seconds if self.seconds > 0 else None}


@dataclass
class EvalResults:
    """Everything an eval run measured; `report.write_reports` renders it."""

    config: EvalConfig
    datasets: list[DatasetSpec]
    problems: dict[str, int]
    """Problems evaluated per dataset (after `limit`)."""
    scores: dict[str, dict[str, dict[str, ScoreSummary]]] = field(default_factory=dict)
    """scores[model name][dataset name][decoding]."""
    stats: dict[str, dict[str, RunStats]] = field(default_factory=dict)
    """stats[model name][decoding]."""

    def accuracy(self, model: str, dataset: str, decoding: str) -> float | None:
        """An accuracy (fraction) or None when it was not measured."""
        s = self.scores.get(model, {}).get(dataset, {}).get(decoding)
        return None if s is None else s.accuracy

    def to_dict(self) -> dict:
        """The results.json document."""
        return {
            "config": asdict(self.config),
            "models": [{"name": n, "path": p} for n, p in zip(self.config.names, self.config.models)],
            "datasets": [asdict(d) | {"problems": self.problems[d.name]} for d in self.datasets],
            "decodings": {d: asdict(self.config.sampling_params(d)) for d in self.config.decodings},
            "results": {m: {d: {k: s.to_dict() for k, s in by_dec.items()} for d, by_dec in by_ds.items()}
                        for m, by_ds in self.scores.items()},
            "generation": {m: {k: s.to_dict() for k, s in by_dec.items()} for m, by_dec in self.stats.items()},
        }


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
            raise FileNotFoundError(f"dataset {spec.name!r}: {spec.path} does not exist (set data_dir / $DQO_SHARED_DATA)")
        out[spec.name] = select(load_problems(spec.path, task=spec.task), cfg.limit, cfg.limit_mode)
    return specs, out


def generate_outputs(backend: GenerationBackend, prompts: Sequence[str], params: SamplingParams, *, seed: int,
                     model_id: str, cache: CompletionCache, per_call: int, progress: bool = False,
                     desc: str = "generate") -> tuple[dict[str, tuple[list[str], list[str]]], RunStats]:  # fmt: skip
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
    with tqdm(total=len(todo) * params.n, disable=not progress, unit="sample", desc=desc, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for start in range(0, len(todo), per_call):
            batch = todo[start:start + per_call]
            out = backend.generate(batch, params, seeds=[prefix_seed(seed, p, "") for p in batch])
            if len(out) != len(batch) or any(len(c) != params.n for c in out):
                raise RuntimeError(f"backend {backend.name!r} returned {[len(c) for c in out]} samples for "
                                   f"{len(batch)} prompts; expected {params.n} each")
            cache.put_many([(keys[p], [c.text for c in comps]) for p, comps in zip(batch, out)],
                           [[c.finish_reason for c in comps] for comps in out])
            stats.generated += len(batch) * params.n
            bar.update(len(batch) * params.n)
    stats.seconds = time.perf_counter() - t0
    result = {}
    for p in unique:
        texts = cache.get(keys[p])
        result[p] = (texts, cache.finish_reasons(keys[p]) or ["unknown"] * len(texts))
    return result, stats


def _write_problem_outputs(path: Path, problems: list[Problem], graded, finish: list[list[str]],
                           decoding: str) -> None:  # fmt: skip
    with staged_file(path, overwrite=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for p, g, fin in zip(problems, graded, finish):
            row = {"id": p.id, "decoding": decoding, "prompt": p.prompt, **graded_to_dict(g), "finish_reasons": fin}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _evaluate_model(cfg: EvalConfig, name: str, path: str, backend: GenerationBackend, specs: list[DatasetSpec],
                    problems: dict[str, list[Problem]], results: EvalResults) -> None:  # fmt: skip
    out_dir = Path(cfg.output_dir)
    cache = CompletionCache(str(out_dir / "cache" / f"{safe_name(name)}.jsonl") if cfg.cache else None)
    all_prompts = [p.prompt for spec in specs for p in problems[spec.name]]
    model_tag = identity_tag(path)  # a model replaced at the same path is generated from again
    for decoding in cfg.decodings:
        params = cfg.sampling_params(decoding)
        outputs, stats = generate_outputs(backend, all_prompts, params, seed=cfg.seed, model_id=model_tag, cache=cache,
                                          per_call=cfg.problems_per_call, progress=cfg.progress,
                                          desc=f"{name} {decoding}")
        results.stats.setdefault(name, {})[decoding] = stats
        for spec in specs:
            probs = problems[spec.name]
            graded = grade_outputs(probs, [outputs[p.prompt][0] for p in probs], timeout_s=cfg.timeout_s,
                                   progress=cfg.progress)
            summary = summarize(graded)
            results.scores.setdefault(name, {}).setdefault(spec.name, {})[decoding] = summary
            _write_problem_outputs(out_dir / "outputs" / safe_name(name) / f"{safe_name(spec.name)}.{decoding}.jsonl",
                                   probs, graded, [outputs[p.prompt][1] for p in probs], decoding)
            log.info("%s %s %s: accuracy %.2f%% (%d problems)", name, spec.label, decoding, 100 * summary.accuracy,
                     summary.overall.n)


def evaluate(cfg: EvalConfig, backends: Sequence[GenerationBackend] | Callable[[str], GenerationBackend],
             write: bool = True) -> EvalResults:  # fmt: skip
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
    written = [Path(cfg.output_dir, name) for name in ("results.json", "results.md", "accuracy.png", "outputs", "cache")]
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
        from dqo_megatron.eval.report import write_reports

        write_reports(results, cfg.output_dir)
    return results
