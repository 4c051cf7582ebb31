"""`dqo-megatron demo`: the whole DQO loop on a laptop CPU, through the commands a 7B run uses.

    task          synthetic column addition (GSM8K record format), imperfect demonstrations
    tokenizer     a sentencepiece BPE model trained on the task's text
    warm-up       preprocess the demonstrations; `train` algorithm=sft from random init (a tiny Llama
                  built from its layer spec); `export --format megatron` -> base/ (policy and reference)
    rollout       `rollout` N samples per training problem from base/ (megatron backend), labeled
    scores        `rollout` + `process-scores` on held-out problems (for the value analysis)
    data          `preprocess` the rollouts; `annotate` them with the reference's log-probs
    dqo, dro      `train` each algorithm from base/ with the same data and budget
    eval          `eval` base, DRO and DQO on held-out problems, greedy and sampled
    report        table, training curves, value-vs-process-score plots, summary

Megatron stages (train, annotate, export) run as `python -m dqo_megatron ...` subprocesses, under
`torchrun` when the layout has several ranks (`--tp 2` ...): the very commands of
docs/pipeline.md. Generation stages call the library functions behind `rollout`, `process-scores`
and `eval` in this process. Every stage writes into the run directory and says how long it took.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from dqo_megatron.config import ConfigError
from dqo_megatron.demo.task import (
    AdditionTask,
)

MARKER = "demo.json"
"""File that marks a directory as a demo run (such a directory may be replaced by the next demo)."""


@dataclass
class DemoConfig:
    """Sizes and knobs of the demo (defaults: the full demo, a few minutes on 2 CPU cores)."""

    run_dir: str = "runs/demo"
    """Where everything goes; an existing demo run there is replaced, any other directory is an error."""
    seed: int = 0
    """Seeds the problems, demonstrations, model init, sampling and data order."""
    quick: bool = False
    """Smaller sizes everywhere (CI: the same stages in well under 3 minutes)."""
    tp: int = 1
    """Tensor-parallel size of the Megatron stages (torchrun with gloo when > 1)."""
    pp: int = 1
    """Pipeline-parallel size of the Megatron stages."""
    digits: int = 2
    """Digits per operand of the addition task."""
    carry_drop: float = 0.6
    """Probability that a demonstration forgets a due carry (> 0.5: the warm policy's greedy step is wrong)."""
    demonstrations: int = 4000
    """Demonstrations for the supervised warm-up."""
    sft_steps: int = 600
    """Warm-up optimizer steps (batch 32)."""
    rollout_problems: int = 256
    """Training problems the base policy samples answers to."""
    samples_per_problem: int = 8
    """N: samples per training problem."""
    rl_steps: int = 100
    """Optimizer steps of DQO and of DRO (batch 32, the same data)."""
    rl_lr: float = 3e-5
    """Peak learning rate of DQO and DRO (policy and value network)."""
    beta: float = 0.1
    """KL coefficient of DQO and DRO."""
    eval_problems: int = 500
    """Held-out problems for evaluation."""
    analysis_problems: int = 100
    """Held-out problems whose sampled answers get synthetic process scores (value analysis)."""
    process_completions: int = 8
    """M: completions per step prefix in process scores (the paper: 20)."""
    algorithms: tuple[str, ...] = ("dqo", "dro")
    """Trained from the base policy, each with the same data and budget."""

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ConfigError(f"tp={self.tp}, pp={self.pp}: must be >= 1")
        if self.quick:
            self.demonstrations = min(self.demonstrations, 2000)
            self.sft_steps = min(self.sft_steps, 300)
            self.rollout_problems = min(self.rollout_problems, 64)
            self.samples_per_problem = min(self.samples_per_problem, 4)
            self.rl_steps = min(self.rl_steps, 12)
            self.eval_problems = min(self.eval_problems, 40)
            self.analysis_problems = min(self.analysis_problems, 12)
            self.process_completions = min(self.process_completions, 4)
        for name in ("demonstrations", "sft_steps", "rollout_problems", "samples_per_problem", "rl_steps",
                     "eval_problems", "analysis_problems", "process_completions"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        unknown = set(self.algorithms) - {"dqo", "dro"}
        if unknown or not self.algorithms:
            raise ConfigError(f"algorithms={list(self.algorithms)}: choose from dqo, dro")


MODEL = dict(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=172, num_attention_heads=4,
             num_query_groups=4, vocab_size=128, seq_length=64)  # fmt: skip
"""The tiny Llama-family policy (about 0.1M parameters) built from Megatron's layer spec."""
SEQ = 64
"""Tokens per training sequence (prompt + response + EOS fit in 56 for 2-digit problems)."""
MAX_NEW_TOKENS = 40
"""Longest generated response (a correct 2-digit solution takes 21 tokens)."""


@dataclass
class StageResult:
    """What one stage did."""

    name: str
    seconds: float
    summary: str
    outputs: dict = field(default_factory=dict)


class Stages:
    """Runs named stages in order, printing one line per stage with its duration."""

    def __init__(self, total: int, echo: Callable[[str], None]):
        self.total, self.echo, self.done = total, echo, []

    def run(self, name: str, what: str, fn: Callable[[], tuple[str, dict]]) -> StageResult:
        """Call `fn` (returns a one-line summary and the outputs it wrote), timing it."""
        k = len(self.done) + 1
        self.echo(f"[{k}/{self.total}] {name}: {what} ...")
        start = time.perf_counter()
        summary, outputs = fn()
        result = StageResult(name, time.perf_counter() - start, summary, outputs)
        self.echo(f"[{k}/{self.total}] {name}: {summary} ({result.seconds:.1f} s)")
        self.done.append(result)
        return result


def prepare_run_dir(path: Path) -> None:
    """Create `path`; replace it when it holds an earlier demo (MARKER), refuse anything else."""
    if path.exists():
        if not (path / MARKER).is_file():
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            else:
                raise ConfigError(f"{path} exists and is not a demo run directory: choose another --run-dir")
        else:
            shutil.rmtree(path)
    path.mkdir(parents=True)


def run_config(cfg: DemoConfig, run_dir: Path, *, algorithm: str, train_prefix: str, steps: int, lr: float,
               init_policy: str | None = None, extra: dict | None = None) -> dict:  # fmt: skip
    """A training config (the same YAML a user writes) for one of the demo's runs."""
    config = {
        "model": dict(MODEL),
        "parallel": {"tensor_model_parallel_size": cfg.tp, "pipeline_model_parallel_size": cfg.pp},
        "algorithm": algorithm,
        "train": {"micro_batch_size": 32 // cfg.pp, "global_batch_size": 32,
                  "seq_length": SEQ, "lr": lr, "train_steps": steps, "seed": cfg.seed + 1,
                  "log_interval": max(steps // 10, 1), "keep_last_checkpoints": 1},  # fmt: skip
        "data": {"train_prefix": train_prefix},
        "run_dir": str(run_dir),
    }
    if init_policy:
        config["init"] = {"policy": init_policy}
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    return config


def _child_env() -> dict:
    # A child picks its own rendezvous: never one inherited from a launcher that started the demo.
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return {**{k: v for k, v in os.environ.items() if k not in rendezvous}, "OMP_NUM_THREADS": "1"}


def megatron_command(cfg: DemoConfig, args: list[str], log: Path, env_extra: dict | None = None) -> None:
    """Run `dqo-megatron <args>` as a subprocess (torchrun with tp*pp ranks when > 1); output into `log`."""
    world = cfg.tp * cfg.pp
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "dqo_megatron", *args]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "dqo_megatron", *args]
    env = {**_child_env(), **(env_extra or {})}
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        raise RuntimeError(f"`{' '.join(args[:1])}` failed (exit {done.returncode}); log {log}:\n" + "\n".join(tail))


def single_command(args: list[str], log: Path) -> None:
    """Run a single-process `dqo-megatron <args>` (export: always TP=PP=1) with its output in `log`."""
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "dqo_megatron", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=_child_env())  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"`{args[0]}` failed (exit {done.returncode}); log {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-25:]))  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a training run's metrics.jsonl."""
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete training checkpoint of a run."""
    from dqo_megatron.training.checkpointing import find_latest_checkpoint

    found = find_latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        raise RuntimeError(f"{run_dir} has no complete checkpoint")
    return found


def write_yaml(path: Path, data: dict) -> Path:
    """Write `data` as YAML."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> dict:
    """Run every stage; returns the results (also written to run_dir/demo.json)."""
    from dqo_megatron.demo import stages

    root = Path(cfg.run_dir).absolute()
    prepare_run_dir(root)
    (root / "logs").mkdir()
    (root / MARKER).write_text(json.dumps({"config": asdict(cfg), "status": "running"}, indent=1))
    task = AdditionTask(cfg.digits, cfg.carry_drop)
    runner = Stages(total=9 + len(cfg.algorithms), echo=echo)
    started = time.perf_counter()
    ctx = stages.Context(cfg=cfg, root=root, task=task)
    runner.run("task", "synthetic column addition, held-out split, imperfect demonstrations", ctx.make_task)
    runner.run("tokenizer", "train a sentencepiece BPE model on the task's text", ctx.make_tokenizer)
    runner.run("warm-up", f"SFT of a tiny {MODEL['family']} GPT on the demonstrations ({cfg.sft_steps} steps)",
               ctx.warm_up)  # fmt: skip
    runner.run("rollout", f"{cfg.samples_per_problem} samples x {cfg.rollout_problems} problems from the base "
               "policy, labeled", ctx.rollout)  # fmt: skip
    runner.run("process scores", f"synthetic process scores of held-out answers (M={cfg.process_completions})",
               ctx.process_scores)  # fmt: skip
    runner.run("data", "preprocess the rollouts; annotate reference log-probs", ctx.prepare_data)
    for algo in cfg.algorithms:
        runner.run(algo.upper(), f"train {algo.upper()} from the base policy ({cfg.rl_steps} steps)",
                   lambda algo=algo: ctx.train_rl(algo))  # fmt: skip
    runner.run("eval", f"base vs {', '.join(a.upper() for a in cfg.algorithms)} on {cfg.eval_problems} held-out "
               "problems, greedy and sampled", ctx.evaluate)  # fmt: skip
    runner.run("value analysis", "per-step values vs process scores", ctx.value_analysis)
    runner.run("report", "table, curves, summary", lambda: ctx.report(time.perf_counter() - started, runner.done))
    results = ctx.results(runner.done, time.perf_counter() - started)
    (root / MARKER).write_text(json.dumps(results, indent=1, default=str))
    return results
