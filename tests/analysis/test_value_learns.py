"""Regression: a value network fitted by the real trainer on a task with KNOWN step correctness must
score high in the value analysis. If tokenization, reward placement, the value targets, checkpointing,
value loading or the step positions the analysis reads break, the correlation or the drop collapses.

Task (word-level tokenizer of conftest.py). A prompt ``so the answer is L`` sets a difficulty level
L in 0..3; the response has K = 2..4 lines, each a good step ``then add D right`` or, with probability
p_L = 0.1 + 0.12 L, a bad step ``then add D wrong``. A response is correct iff it has no bad step:
once a bad step appears the answer is doomed. So the prefix through step j is solvable iff steps
1..j are all good, and the exact process scores are known: M completions all correct while solvable,
all wrong after. Failed answers carry ``process_scores`` (as `dqo-megatron process-scores` writes
them, splitter ``lines``); correct answers carry none (the analysis splits them with the same splitter).

Fit: `dqo_megatron.training.trainer.train` with algorithm dqo, the policy frozen (``train.lr: 0``; the
reference is the initial policy, so the KL term is exactly 0 and every importance weight is 1) and
the value network alone learning (``value.lr: 1e-3``, its own optimizer group): its targets are the
Monte-Carlo returns, 1 for correct answers and 0 for failed ones, so the optimal V after j good steps
is the probability that the remaining steps are good, and 0 after a bad step.

A good and a bad step differ only in their last token, the token the analysis reads a step's value
at: reading one token early sees no difference. Measured on 2 CPU cores (150 steps of 32 answers, about
10 s of training, 15 s in all), train.seed 1 / 2 / 3 at step 150:

    per-step Pearson                       0.952 / 0.928 / 0.957     asserted >= 0.8
    drop at the first unsolvable step      +0.53 / +0.40 / +0.44     asserted > 0.2
    drop at steps that stay solvable       -0.11 / -0.12 / -0.14     (V rises as the answer nears its end)
    mean V, solvable - unsolvable steps    0.76 / 0.62 / 0.67        asserted > 0.4
    V(s0) vs prompt success (4 prompts)    0.97 / 0.99 / 0.98        asserted > 0.8

and with the pipeline broken on purpose (seed 1): values read one token early, Pearson 0.61 and drop
-0.06; training labels shuffled across answers, Pearson 0.73 (V is flat, its tiny token-driven wiggles
still correlate: Pearson is scale-free) but drop 0.0001 and solvable/unsolvable means 0.0 apart;
value.lr 0, V constant and Pearson undefined. Hence the absolute assertions next to the correlation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.helpers.distributed import run_distributed

MODEL = dict(
    family="llama",
    num_layers=2,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=4,
    vocab_size=48,
    seq_length=32,
)
M = 4
PEARSON_MIN = 0.8
"""Per-step Pearson of the fitted value (measured 0.93-0.96 over seeds; see the module docstring)."""


def make_task_records(n: int, seed: int, scored: bool = True) -> list[dict]:
    """`n` answers of the task in the module docstring; failed ones with exact process scores."""
    from dqo_megatron.process_scores.steps import split_steps

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        level = rng.randrange(4)
        p_bad = 0.1 + 0.12 * level
        bad = [rng.random() < p_bad for _ in range(rng.randint(2, 4))]
        lines = [f"then add {rng.randrange(10)} {'wrong' if b else 'right'}" for b in bad]
        response = "\n".join(lines)
        correct = not any(bad)
        row = {
            "prompt": f"so the answer is {level}",
            "prompt_id": f"level{level}",
            "response": response,
            "correct": correct,
            "reward": float(correct),
        }
        if scored and not correct:
            ends = split_steps(response, "lines")
            first_bad = bad.index(True)  # prefixes 1..first_bad are solvable, the later ones are not
            row["process_scores"] = {
                "step_ends": ends,
                "prefix_correct": [M if k < first_bad else 0 for k in range(len(ends) - 1)],
                "num_completions": M,
                "splitter": "lines",
            }
        rows.append(row)
    return rows


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def fit_and_analyse(
    tmp: str,
    tok_dir: str,
    steps: int = 150,
    value_lr: float = 1e-3,
    seed: int = 1,
    train_records: int = 2000,
    held_out: int = 300,
) -> list[dict]:
    """Preprocess, fit the value (policy frozen), analyse two checkpoints on held-out answers; the rows."""
    from dqo_megatron.analysis import ValueAnalysisConfig, run_value_analysis
    from dqo_megatron.config import DataConfig, LossConfig, ModelConfig, RunConfig, TrainConfig, ValueConfig
    from dqo_megatron.data.preprocess import PreprocessConfig, preprocess
    from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig
    from dqo_megatron.training.trainer import train

    tmp_path = Path(tmp)
    tokenize = TokenizeConfig(tokenizer=TokenizerConfig(path=tok_dir, use_chat_template=False))
    # the training answers need no process scores: the outcome reward alone teaches V (lambda = 1)
    train_file = _write(tmp_path / "train.jsonl", make_task_records(train_records, seed=100 + seed, scored=False))
    preprocess(
        PreprocessConfig(inputs=[train_file], output_prefix=f"{tmp}/data/train", tokenize=tokenize, progress=False)
    )
    run = RunConfig(
        model=ModelConfig(**MODEL),
        algorithm="dqo",
        data=DataConfig(train_prefix=f"{tmp}/data/train", reference="model"),
        loss=LossConfig(beta=0.01),
        value=ValueConfig(mode="separate", lr=value_lr),
        train=TrainConfig(
            micro_batch_size=32,
            global_batch_size=32,
            seq_length=32,
            lr=0.0,
            seed=seed,
            train_steps=steps,
            save_interval=steps // 2,
            log_interval=steps,
        ),
        run_dir=f"{tmp}/run",
    )
    train(run)
    held = _write(tmp_path / "held_out.jsonl", make_task_records(held_out, seed=200 + seed))
    cfg = ValueAnalysisConfig(
        checkpoints=[f"{tmp}/run"],
        records=[held],
        tokenize=tokenize,
        score="prefix_solvable",
        out_dir=f"{tmp}/analysis",
        batch_size=64,
    )
    return run_value_analysis(cfg)


def test_fitted_value_tracks_known_solvability(tmp_path, word_tok_dir):
    (rows,) = run_distributed(fit_and_analyse, 1, str(tmp_path), word_tok_dir, timeout=300)
    assert [r["step"] for r in rows] == [75, 150]
    last = rows[-1]
    assert last["algorithm"] == "dqo" and last["splitter"] == "lines" and last["unscored_records"] == 0
    assert last["correct_records"] > 50 and last["failed_records"] > 50
    assert last["pearson"] is not None and last["pearson"] >= PEARSON_MIN, last
    unsolvable, solvable = last["bins"]  # scores 0 and 1: V itself separates them, not just its ranks
    assert (unsolvable["lo"], solvable["lo"]) == (0.0, 1.0) and solvable["mean"] - unsolvable["mean"] > 0.4, last[
        "bins"
    ]
    drop = last["drop"]
    assert drop["first_unsolvable"]["n"] == last["failed_records"]  # every failed answer has its step located
    assert drop["first_unsolvable"]["mean"] > 0.2, drop
    assert drop["excess"] > 0.3, drop  # far more than at steps that stay solvable: not a position trend
    assert last["initial"]["pearson"] > 0.8, last["initial"]  # V(s0) knows the hard prompts
    assert Path(last["trend_plot"]).is_file() and Path(last["plot"]).is_file()
