"""Held-out accuracy during training (`eval.interval`): the evaluator the trainer is given.

`dqo-megatron train` passes `HeldOutEvaluator` to `train(run, make_evaluator=...)`; the trainer's
`training.evals.EvalSchedule` calls it every `eval.interval` steps of the policy (from the step it starts
moving, after any critic warm-up, to the last), on the policy it is training, with greedy decoding (the
same `generate` loop and prompt framing as the `megatron` rollout backend). When to evaluate, the
evals.jsonl log and the rule that picks the checkpoint (`best_evaluation`) are in `training/evals.py`.

Evaluate on a validation split disjoint from the test problems you report, or the test accuracy of the
picked checkpoint is biased upwards (the demo does so).

Layout: TP = PP = CP = 1 (the cache-less decoder runs one whole model per process); the problems are
split over data-parallel ranks and the counts summed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dqo_megatron.config import ConfigError, RunConfig
from dqo_megatron.training.evals import Evaluation


def check_layout(run: RunConfig) -> None:
    """ConfigError when `eval.interval` is set on a layout the in-training evaluator cannot run."""
    p = run.parallel
    if run.eval.interval and (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
    ) != (1, 1, 1):
        raise ConfigError(
            "eval.interval needs TP = PP = CP = 1 (the greedy decoder holds a whole model per "
            "process); set eval.interval=0 and evaluate saved checkpoints with `dqo-megatron eval`"
        )


def _tokenizer_and_stops(run: RunConfig) -> tuple[str, str | None]:
    if run.eval.tokenizer:
        return run.eval.tokenizer, None
    if run.init.policy:
        from dqo_megatron.conversion.megatron_io import HF_DIR

        hf = Path(run.init.policy) / HF_DIR
        if hf.is_dir():
            return str(hf), str(hf)
    raise ConfigError(
        "eval.interval needs a tokenizer: set eval.tokenizer (HF directory or sentencepiece .model), "
        "or start from a `convert hf-to-megatron` checkpoint (init.policy) that holds hf/"
    )


def greedy_correct(backend, problems: list, max_new_tokens: int) -> int:
    """How many of `problems` (`tasks.datasets.Problem`) `backend` answers correctly with greedy decoding."""
    from dqo_megatron.eval.scoring import grade_outputs
    from dqo_megatron.process_scores.cache import prefix_seed
    from dqo_megatron.rollout.backend import SamplingParams

    if not problems:
        return 0
    prompts = [p.prompt for p in problems]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    out = backend.generate(prompts, params, seeds=[prefix_seed(0, p, "") for p in prompts])
    return sum(bool(g.correct[0]) for g in grade_outputs(problems, [c[0].text for c in out]))


class HeldOutEvaluator:
    """Greedy accuracy of the policy on `run.eval.problems` (this data-parallel rank's share)."""

    def __init__(self, run: RunConfig, dp_rank: int, dp_size: int):
        from dqo_megatron.eval.run import select
        from dqo_megatron.tasks.datasets import load_problems

        check_layout(run)
        cfg = run.eval
        if not Path(cfg.problems).exists():
            raise ConfigError(f"eval.problems={cfg.problems!r} does not exist")
        self.mine = select(load_problems(cfg.problems, task=cfg.task), cfg.limit or None, "spread")[dp_rank::dp_size]
        self.tokenizer, self.hf_dir = _tokenizer_and_stops(run)
        self.run = run

    def __call__(self, policy, step: int) -> Evaluation:
        """Evaluate `policy` (the TP=PP=1 GPTModel being trained); collective over data-parallel ranks."""
        from megatron.core import parallel_state

        from dqo_megatron.rollout.megatron_backend import MegatronBackend

        started = time.perf_counter()
        backend = MegatronBackend.over_module(
            policy, self.run.model, self.tokenizer, hf_dir=self.hf_dir, batch_size=self.run.eval.batch_size
        )
        correct, failure = 0, None
        try:  # a failure on one rank must not leave the others waiting in the all-reduce below
            correct = greedy_correct(backend, self.mine, self.run.eval.max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            failure = exc
        counts = torch.tensor(
            [float(correct), float(len(self.mine)), float(failure is not None)], device=next(policy.parameters()).device
        )
        torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        if counts[2] > 0:
            raise RuntimeError(
                f"held-out evaluation at step {step} failed on {int(counts[2])} rank(s)"
                + (f": {type(failure).__name__}: {failure}" if failure else "")
            ) from failure
        correct, n = int(counts[0]), int(counts[1])
        return Evaluation(
            step=step, accuracy=correct / max(n, 1), correct=correct, problems=n, seconds=time.perf_counter() - started
        )
