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
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from dqo_megatron.config import ConfigError
from dqo_megatron.demo.config import ROWS, DemoConfig
from dqo_megatron.demo.stages import Context
from dqo_megatron.demo.task import AdditionTask

logger = logging.getLogger(__name__)

MARKER = "demo.json"
"""File that marks a directory as a demo run (such a directory may be replaced by the next demo)."""


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
        logger.warning(
            "restored the earlier demo in %s (a demo replacing it was killed; its partial run is in %s)", path, failed
        )
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


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> dict:
    """Run every stage; returns the results (also written to run_dir/demo.json). An earlier demo in
    run_dir is replaced only when this one completes (`fresh_run_dir`)."""
    root = Path(cfg.run_dir).absolute()
    with fresh_run_dir(root):
        return _run_stages(cfg, root, echo)


def _run_stages(cfg: DemoConfig, root: Path, echo: Callable[[str], None]) -> dict:
    (root / "logs").mkdir()
    (root / MARKER).write_text(json.dumps({"config": asdict(cfg), "status": "running"}, indent=1))
    task = AdditionTask(cfg.digits, cfg.carry_drop)
    runner = Stages(total=9 + len(cfg.algorithms), echo=echo)
    started = time.perf_counter()
    ctx = Context(cfg=cfg, root=root, task=task)
    runner.run(
        "task",
        f"synthetic {cfg.digits}-digit column addition, held-out splits, imperfect demonstrations",
        ctx.make_task,
    )
    runner.run("tokenizer", "train a sentencepiece BPE model on the task's text; sequence lengths", ctx.make_tokenizer)
    runner.run("warm-up", f"SFT of a tiny llama GPT on the demonstrations ({cfg.sft_steps} steps)", ctx.warm_up)
    runner.run(
        "rollout",
        f"{cfg.samples_per_problem} samples x {cfg.rollout_problems} problems from the base policy, labeled",
        ctx.rollout,
    )
    runner.run(
        "process scores",
        f"synthetic process scores of the training and held-out answers (M={cfg.process_completions})",
        ctx.process_scores,
    )
    runner.run(
        "data",
        "preprocess the rollouts (with and without process scores); annotate reference log-probs",
        ctx.prepare_data,
    )
    for algo in cfg.algorithms:
        runner.run(
            ROWS[algo],
            f"train {ROWS[algo]} from the base policy ({cfg.value_warmup_steps} value-only + "
            f"{cfg.rl_steps} steps, checkpoint picked on {cfg.validation_problems} validation problems)",
            lambda algo=algo: ctx.train_rl(algo),
        )
    runner.run(
        "eval",
        f"base vs {', '.join(ROWS[a] for a in cfg.algorithms)} on {cfg.eval_problems} held-out "
        "problems, greedy and sampled",
        ctx.evaluate,
    )
    runner.run("value analysis", "values vs process scores on held-out answers", ctx.value_analysis)
    runner.run("report", "table, curves, summary", lambda: ctx.report(time.perf_counter() - started, runner.done))
    results = ctx.results(runner.done, time.perf_counter() - started)
    (root / MARKER).write_text(json.dumps(results, indent=1, default=str))
    return results
