"""The demo's sizes and knobs (`DemoConfig`), its trained rows and its tiny model."""

from __future__ import annotations

from dataclasses import dataclass

from dqo_megatron.config import ConfigError

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
        for name in (
            "demonstrations",
            "sft_steps",
            "rollout_problems",
            "samples_per_problem",
            "rl_steps",
            "eval_interval",
            "validation_problems",
            "eval_problems",
            "analysis_problems",
            "process_completions",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        unknown = set(self.algorithms) - set(ROWS)
        if unknown or not self.algorithms:
            raise ConfigError(f"algorithms={list(self.algorithms)}: choose from {', '.join(ROWS)}")


def model_config(seq_length: int) -> dict:
    """The tiny Llama-family policy (about 0.1M parameters) built from Megatron's layer spec."""
    return dict(
        family="llama",
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=172,
        num_attention_heads=4,
        num_query_groups=4,
        vocab_size=VOCAB,
        seq_length=seq_length,
    )


VOCAB = 128
"""Sentencepiece pieces of the demo tokenizer."""


def _check_layout(tp: int, pp: int) -> None:
    """ConfigError (before any stage runs) when the demo's model cannot be split into TP x PP."""
    from dqo_megatron.config import ModelConfig, ParallelConfig, validate_model_layout
    from dqo_megatron.config.loader import from_dict

    model = from_dict(ModelConfig, model_config(64), "model")
    try:
        validate_model_layout(
            model, ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seq_length=64
        )
    except ConfigError as exc:
        raise ConfigError(f"--tp {tp} --pp {pp}: the demo's model cannot be split so: {exc}") from None
