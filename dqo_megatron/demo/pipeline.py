"""`dqo-megatron demo`: the whole DQO loop on a laptop CPU, through the commands a 7B run uses.

    task          synthetic column addition (GSM8K record format), imperfect demonstrations; training,
                  validation (checkpoint picking), test and analysis problems, disjoint
    tokenizer     a sentencepiece BPE model trained on the task's text; row and answer lengths
    warm-up       preprocess the demonstrations; `train` algorithm=sft from random init (a tiny Llama
                  built from its layer spec); `export` to HF, `convert hf-to-megatron` -> base/
    rollout       `rollout` N samples per training problem from the base policy, labeled
    scores        `process-scores` of the training rollouts (DQO+PS) and of held-out answers (analysis)
    data          `preprocess` the rollouts with and without process rewards; `annotate` reference log-probs
    DRO, DQO,     `train` each row from base/ with the same data and budget; held-out accuracy on the
    DQO+PS        validation problems every eval_interval steps picks the checkpoint that is exported
    eval          `eval` base and the trained rows on the test problems, greedy and sampled
    analysis      value analysis of the trained value networks against the process scores
    report        table, training curves, value-vs-process-score plots, summary

Why this task: each of the `digits` columns may need a carry, and the warm policy forgets a due carry
more often than not, so a failed answer holds correct steps followed by a fatal one; with scarce data
(512 problems x 4 samples, about 1.6 epochs of policy steps) the question is whether per-step credit
(DQO's value, process scores) helps.

Megatron stages (train, annotate, export) run as `python -m dqo_megatron ...` subprocesses, under
`torchrun` when the layout has several ranks (`--tp 2` ...): the very commands of
docs/pipeline.md. Generation stages call the library functions behind `rollout`, `process-scores`
and `eval` in this process. Every stage writes into the run directory and says how long it took.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import yaml

from dqo_megatron.config import ConfigError
from dqo_megatron.demo.task import (
    AdditionTask,
)

logger = logging.getLogger(__name__)

MARKER = "demo.json"
"""File that marks a directory as a demo run (such a directory may be replaced by the next demo)."""


ROWS = {"dro": "DRO", "dqo": "DQO", "dqo_ps": "DQO+PS"}
"""The trained rows (algorithm key -> row name); `dqo_ps` is DQO on the rollouts with process scores."""


@dataclass
class DemoConfig:
    """Sizes and knobs of the demo (defaults: the full demo, under 10 minutes on 2 CPU cores)."""

    run_dir: str = "runs/demo"
    """Where everything goes; an existing demo run there is replaced once the new one completes (kept if it
    fails), any other non-empty directory is an error."""
    seed: int = 0
    """Seeds the problems, demonstrations, model init, sampling and data order."""
    quick: bool = False
    """Smaller sizes everywhere (CI: the same stages in under 3 minutes)."""
    tp: int = 1
    """Tensor-parallel size of the Megatron stages (torchrun with gloo when > 1)."""
    pp: int = 1
    """Pipeline-parallel size of the Megatron stages."""
    digits: int = 3
    """Digits per operand: an answer has `digits` column steps; every column but the first may need a
    carry-in (a decisive step). 3 is the most the demo's tiny model learns in its warm-up budget (at 4 its
    base answers misread digits: 1.5% greedy accuracy, docs/demo.md)."""
    carry_drop: float = 0.6
    """Probability that a demonstration forgets a due carry (> 0.5: the warm policy's greedy step is wrong)."""
    demonstrations: int = 4000
    """Demonstrations for the supervised warm-up."""
    sft_steps: int = 600
    """Warm-up optimizer steps (batch 32)."""
    rollout_problems: int = 512
    """Training problems the base policy samples answers to (many problems, few samples each: a value
    fitted on 64 problems x 8 samples memorized the problems and learned no step, docs/demo.md)."""
    samples_per_problem: int = 4
    """N: samples per training problem (about 40% of them correct)."""
    value_warmup_steps: int = 400
    """Critic warm-up of every row with a value (DRO, DQO, DQO+PS): the value network alone first
    (value.warmup_steps), on data that is then exactly on-policy (importance weights 1)."""
    rl_steps: int = 100
    """Policy optimizer steps of each trained row after the warm-up (batch 32, the same data)."""
    rl_lr: float = 1e-5
    """Peak learning rate of the policy (DQO, DRO). At 3e-5 every row's validation accuracy peaked at the
    first evaluation (25 policy steps) and fell by 14-19 points by step 100 (seed 0, docs/demo.md)."""
    value_lr_ratio: float = 100.0
    """Value learning rate = this x rl_lr: 1e-3, the best of 1e-5..3e-3 for this tiny value network in a
    400-step value-only fit (benchmarks/value_lr.py, docs/algorithms.md); the trainer's default ratio is 10."""
    beta: float = 0.1
    """KL coefficient of DQO and DRO."""
    eval_interval: int = 10
    """Greedy accuracy on the validation problems every this many RL steps; the best step is the
    checkpoint evaluated on the test problems (the paper picks checkpoints by evaluation)."""
    validation_problems: int = 100
    """Held-out problems (disjoint from the test problems) that pick each row's checkpoint."""
    eval_problems: int = 500
    """Held-out test problems of the accuracy table."""
    analysis_problems: int = 100
    """Held-out problems whose sampled answers get synthetic process scores (value analysis)."""
    process_completions: int = 8
    """M: completions per step prefix in process scores (the paper: 20)."""
    step_reward: float = 0.1
    """Process reward of each step of a solvable prefix (every_correct)."""
    algorithms: tuple[str, ...] = ("dro", "dqo", "dqo_ps")
    """Trained from the base policy, each with the same data and budget (dqo_ps: with process scores)."""

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ConfigError(f"tp={self.tp}, pp={self.pp}: must be >= 1")
        _check_layout(self.tp, self.pp)
        if not 1 <= self.digits <= 6:
            raise ConfigError(f"digits={self.digits}: choose 1..6")
        if self.quick:  # the same stages at a size CI affords (2-digit problems; accuracies not meaningful)
            self.digits = min(self.digits, 2)
            self.demonstrations = min(self.demonstrations, 2000)
            self.sft_steps = min(self.sft_steps, 300)
            self.rollout_problems = min(self.rollout_problems, 48)
            self.samples_per_problem = min(self.samples_per_problem, 4)
            self.value_warmup_steps = min(self.value_warmup_steps, 6)
            self.rl_steps = min(self.rl_steps, 12)
            self.eval_interval = min(self.eval_interval, 6)
            self.validation_problems = min(self.validation_problems, 16)
            self.eval_problems = min(self.eval_problems, 40)
            self.analysis_problems = min(self.analysis_problems, 12)
            self.process_completions = min(self.process_completions, 2)
        if self.value_warmup_steps < 0:
            raise ConfigError(f"value_warmup_steps={self.value_warmup_steps}: must be >= 0")
        for name in ("demonstrations", "sft_steps", "rollout_problems", "samples_per_problem", "rl_steps",
                     "eval_interval", "validation_problems", "eval_problems", "analysis_problems",
                     "process_completions"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        unknown = set(self.algorithms) - set(ROWS)
        if unknown or not self.algorithms:
            raise ConfigError(f"algorithms={list(self.algorithms)}: choose from {', '.join(ROWS)}")


def model_config(seq_length: int) -> dict:
    """The tiny Llama-family policy (about 0.1M parameters) built from Megatron's layer spec."""
    return dict(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=172, num_attention_heads=4,
                num_query_groups=4, vocab_size=VOCAB, seq_length=seq_length)  # fmt: skip


VOCAB = 128
"""Sentencepiece pieces of the demo tokenizer."""


def _check_layout(tp: int, pp: int) -> None:
    """ConfigError (before any stage runs) when the demo's model cannot be split into TP x PP."""
    from dqo_megatron.config import ModelConfig, ParallelConfig, validate_model_layout
    from dqo_megatron.config.loader import from_dict

    model = from_dict(ModelConfig, model_config(64), "model")
    try:
        validate_model_layout(model, ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                              seq_length=64)  # fmt: skip
    except ConfigError as exc:
        raise ConfigError(f"--tp {tp} --pp {pp}: the demo's model cannot be split so: {exc}") from None


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


def _restore_after_a_killed_replacement(path: Path) -> None:
    """A demo killed while replacing an earlier one left that one in `.NAME.old-*` and its own partial run
    at `path`: put the earlier one back (the partial run goes to NAME.failed) before anything else."""
    for aside in sorted(path.parent.glob(f".{path.name}.old-*")):
        if not (aside / path.name / MARKER).is_file():
            continue
        failed = path.with_name(path.name + ".failed")
        if path.exists():
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(path, failed)
        os.replace(aside / path.name, path)
        shutil.rmtree(aside, ignore_errors=True)
        logger.warning("restored the earlier demo in %s (a demo replacing it was killed; its partial run is in %s)",
                       path, failed)  # fmt: skip
        return


@contextlib.contextmanager
def fresh_run_dir(path: Path) -> Iterator[None]:
    """Create `path` for a new demo, refusing anything that is not an earlier demo (MARKER) or empty.

    An earlier demo is moved aside (`.NAME.old-*` beside it) and deleted only when the block succeeds;
    when it fails, the failed run is kept as `NAME.failed` (its logs) and the earlier demo comes back.
    """
    _restore_after_a_killed_replacement(path)
    old = None
    if path.exists():
        if not (path / MARKER).is_file():
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            else:
                raise ConfigError(f"{path} exists and is not a demo run directory: choose another --run-dir")
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
    path.mkdir(parents=True)
    try:
        yield
    except BaseException:
        if old is not None:
            failed = path.with_name(path.name + ".failed")
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(path, failed)
            os.replace(old / path.name, path)
            old.rmdir()
            logger.warning("the demo failed: its run is in %s; the earlier demo is back in %s", failed, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_config(cfg: DemoConfig, run_dir: Path, *, seq: int, algorithm: str, train_prefix: str, steps: int,
               lr: float, init_policy: str | None = None, extra: dict | None = None) -> dict:  # fmt: skip
    """A training config (the same YAML a user writes) for one of the demo's runs (`seq` tokens a row)."""
    config = {
        "model": model_config(seq),
        "parallel": {"tensor_model_parallel_size": cfg.tp, "pipeline_model_parallel_size": cfg.pp},
        "algorithm": algorithm,
        "train": {"micro_batch_size": 32 // cfg.pp, "global_batch_size": 32,
                  "seq_length": seq, "lr": lr, "train_steps": steps, "seed": cfg.seed + 1,
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


def _dies_with_us():
    """A `preexec_fn` that makes a stage's process die with the demo (even a `kill -9` of it), so that no
    stage keeps writing into a run directory nobody runs any more."""
    from dqo_megatron.processes import dies_with_this_process

    return dies_with_this_process()


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
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=_dies_with_us())
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        raise RuntimeError(f"`{' '.join(args[:1])}` failed (exit {done.returncode}); log {log}:\n" + "\n".join(tail))


def single_command(args: list[str], log: Path) -> None:
    """Run a single-process `dqo-megatron <args>` (export: always TP=PP=1) with its output in `log`."""
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "dqo_megatron", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=_child_env(), preexec_fn=_dies_with_us())  # fmt: skip
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
    """Run every stage; returns the results (also written to run_dir/demo.json). An earlier demo in
    run_dir is replaced only when this one completes (`fresh_run_dir`)."""
    root = Path(cfg.run_dir).absolute()
    with fresh_run_dir(root):
        return _run_stages(cfg, root, echo)


def _run_stages(cfg: DemoConfig, root: Path, echo: Callable[[str], None]) -> dict:
    from dqo_megatron.demo import stages

    (root / "logs").mkdir()
    (root / MARKER).write_text(json.dumps({"config": asdict(cfg), "status": "running"}, indent=1))
    task = AdditionTask(cfg.digits, cfg.carry_drop)
    runner = Stages(total=9 + len(cfg.algorithms), echo=echo)
    started = time.perf_counter()
    ctx = stages.Context(cfg=cfg, root=root, task=task)
    runner.run("task", f"synthetic {cfg.digits}-digit column addition, held-out splits, imperfect demonstrations",
               ctx.make_task)  # fmt: skip
    runner.run("tokenizer", "train a sentencepiece BPE model on the task's text; sequence lengths", ctx.make_tokenizer)
    runner.run("warm-up", f"SFT of a tiny llama GPT on the demonstrations ({cfg.sft_steps} steps)", ctx.warm_up)
    runner.run("rollout", f"{cfg.samples_per_problem} samples x {cfg.rollout_problems} problems from the base "
               "policy, labeled", ctx.rollout)  # fmt: skip
    runner.run("process scores", f"synthetic process scores of the training and held-out answers "
               f"(M={cfg.process_completions})", ctx.process_scores)  # fmt: skip
    runner.run("data", "preprocess the rollouts (with and without process scores); annotate reference log-probs",
               ctx.prepare_data)  # fmt: skip
    for algo in cfg.algorithms:
        runner.run(ROWS[algo], f"train {ROWS[algo]} from the base policy ({cfg.value_warmup_steps} value-only + "
                   f"{cfg.rl_steps} steps, checkpoint picked on {cfg.validation_problems} validation problems)",
                   lambda algo=algo: ctx.train_rl(algo))  # fmt: skip
    runner.run("eval", f"base vs {', '.join(ROWS[a] for a in cfg.algorithms)} on {cfg.eval_problems} held-out "
               "problems, greedy and sampled", ctx.evaluate)  # fmt: skip
    runner.run("value analysis", "values vs process scores on held-out answers", ctx.value_analysis)
    runner.run("report", "table, curves, summary", lambda: ctx.report(time.perf_counter() - started, runner.done))
    results = ctx.results(runner.done, time.perf_counter() - started)
    (root / MARKER).write_text(json.dumps(results, indent=1, default=str))
    return results
