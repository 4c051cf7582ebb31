"""DQO raises the reward of the policy's greedy answers on a task with a checkable answer (~20 s).

Task: prompt [BOS, a, b] (digits), answer [(a + 1) mod 10, EOS] (b is a distractor). A tiny GPT is warmed up by SFT on
noisy demonstrations (right 60% of the time) for a few steps, so that it is right only sometimes;
it samples 8 answers per prompt (behavior log-probs recorded), the answers are rewarded 1/0, and
DQO trains on these offline trajectories from the warm model. Greedy accuracy must rise.
"""

from __future__ import annotations

import random

import numpy as np

from dqo_megatron.config import (
    DataConfig,
    InitConfig,
    LossConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    ValueConfig,
)
from tests.helpers.distributed import run_distributed

BOS, EOS, DIGIT0 = 1, 2, 3
MODEL = ModelConfig(
    family="llama",
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    vocab_size=16,
    seq_length=8,
)
PROMPTS = [[BOS, DIGIT0 + a, DIGIT0 + b] for a in range(10) for b in range(10)]


def _answer(prompt):
    return DIGIT0 + (prompt[1] - DIGIT0 + 1) % 10


def _accuracy(model) -> float:
    from dqo_megatron.rollout.megatron_generate import generate

    outs = generate(model, PROMPTS, max_new_tokens=2, eos_id=EOS, vocab_size=MODEL.vocab_size)
    return float(np.mean([o.tokens == [_answer(p), EOS] for p, o in zip(PROMPTS, outs)]))


def _warm_up(steps: int):
    import torch

    from dqo_megatron.models import build_model_chunks
    from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, wrap_with_ddp
    from dqo_megatron.training.step import train_step

    (gpt,) = build_model_chunks(MODEL, ParallelConfig())
    ddp = wrap_with_ddp([gpt])
    attach_finalize(ddp)
    optimizer = build_optimizer(ddp, lr=3e-3, clip_grad=1.0)
    rng = random.Random(0)
    for _ in range(steps):
        rows = []
        for _ in range(32):
            p = rng.choice(PROMPTS)
            digit = _answer(p) if rng.random() < 0.6 else DIGIT0 + rng.randrange(10)
            rows.append(p + [digit, EOS])
        tokens = torch.tensor(rows)
        mask = torch.zeros(32, 4)
        mask[:, 2:] = 1  # loss on the answer and EOS
        batch = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": mask,
            "position_ids": torch.arange(4).expand(32, 4),
        }
        train_step(ddp, optimizer, iter([batch]), num_microbatches=1, seq_length=4, micro_batch_size=32)
    return gpt


def _experiment(tmp: str, warm_steps: int, dqo_steps: int):
    import torch

    from dqo_megatron import parallel
    from dqo_megatron.conversion.megatron_io import CheckpointInfo, save_chunks, write_metadata
    from dqo_megatron.data.indexed import TrajectoryWriter
    from dqo_megatron.data.tokenize import TokenizedSample
    from dqo_megatron.rollout.megatron_generate import generate
    from dqo_megatron.training.trainer import train

    parallel.initialize(ParallelConfig(), seed=0)
    gpt = _warm_up(warm_steps)
    base = _accuracy(gpt)
    init = f"{tmp}/warm"
    save_chunks([gpt], f"{init}/weights")
    from pathlib import Path

    write_metadata(Path(init), MODEL, CheckpointInfo(family="llama", dtype="float32"))
    writer = TrajectoryWriter(f"{tmp}/data/train", MODEL.vocab_size)
    samples = generate(
        gpt,
        [p for p in PROMPTS for _ in range(8)],
        max_new_tokens=2,
        eos_id=EOS,
        vocab_size=MODEL.vocab_size,
        temperature=1.0,
        seed=1,
    )
    rewards = []
    for i, out in enumerate(samples):
        prompt = PROMPTS[i // 8]
        reward = float(out.tokens == [_answer(prompt), EOS])
        rewards.append(reward)
        tokens = np.array(prompt + out.tokens, dtype=np.int64)
        r = np.zeros(len(tokens), np.float32)
        r[-1] = reward
        blp = np.zeros(len(tokens), np.float32)
        blp[len(prompt) :] = out.sampled_logprobs
        writer.add(
            TokenizedSample(
                tokens=tokens,
                prompt_length=len(prompt),
                rewards=r,
                behavior_logprobs=blp,
                prompt_id=str(i // 8),
                outcome_reward=reward,
                correct=int(reward),
            ),
            0,
        )
    writer.finalize({})
    run = RunConfig(
        model=MODEL,
        algorithm="dqo",
        init=InitConfig(policy=init),
        data=DataConfig(train_prefix=f"{tmp}/data/train"),
        loss=LossConfig(beta=0.1, lam=1.0),
        value=ValueConfig(mode="separate", lr=1e-3),
        train=TrainConfig(
            micro_batch_size=16, global_batch_size=32, seq_length=5, lr=1e-3, train_steps=dqo_steps, log_interval=50
        ),
    )
    summary = train(run)
    torch.set_grad_enabled(True)
    return {"base": base, "sampled_reward": float(np.mean(rewards)), "dqo": _accuracy(summary.model_chunks[0].policy)}


def test_dqo_raises_greedy_accuracy(tmp_path):
    (result,) = run_distributed(_experiment, 1, str(tmp_path), 20, 200, timeout=900)
    assert result["base"] < 0.8, f"warm-up too strong to measure a gain: {result}"
    assert result["dqo"] >= result["base"] + 0.15, result
