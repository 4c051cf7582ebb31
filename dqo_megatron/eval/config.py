"""What an eval run measures: the models, the datasets (built-in or your own) and the decodings.

`EvalConfig` is the run's configuration (`dqo-megatron eval` builds it from its options); it lives apart
from `run` so that `results` and `report` can name it without importing the generation loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dqo_megatron.config.loader import ConfigError
from dqo_megatron.paths import shared_data_dir
from dqo_megatron.rollout.backend import SamplingParams

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
            raise ConfigError(
                f"names: {len(self.names)} names for {len(self.models)} models (give one --name per --model)"
            )
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
        return SamplingParams(
            n=self.num_samples,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
        )

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
