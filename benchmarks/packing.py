"""Packed vs padded micro-batches: padding fraction and useful tokens/s of a DQO step (train.packing).

One process, CPU. Document lengths (prompt + response + EOS) are those of the shared GSM8K and MATH
training sets under the shared sentencepiece tokenizer (`models/stories260K/tok512.model`, 512 pieces:
about twice the tokens of a 32K-150K BPE, so `--seq` defaults are about twice a real run's; what
matters is the spread of lengths against the row). Documents longer than seq + 1 are left out (their
share is reported). `--docs` documents (the paper's global batch of 64) are drawn from the
distribution and written as a trajectory dataset of random tokens; `MicroBatches` cuts them into
micro-batches of `--micro-batch` documents, padded (each row seq + 1 tokens, as the trainer does
without packing) or packed (`training/packing.py`), and the whole step's documents packed at once
and cut into micro-batches of `--token-rows` rows (`train.micro_batch_tokens`). A DQO step (policy +
a value network of the policy's size, reference log-probs in the batch, Megatron DDP, Adam,
Megatron's schedule: what `train` runs per step) over the whole global batch is timed in the three
layouts, round-robin with each layout first in turn, with lr = 0 so every round runs on the same
weights and the losses must agree (checked each round). Useful tokens/s = document tokens of the
batch / median step time (CPU time of the process; see benchmarks/step_cost.py, "Clocks").

    .venv/bin/python benchmarks/packing.py [--data gsm8k math] [--steps 5] [--threads 1]

Prints a Markdown section for docs/packing.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

SHARED_FILES = {
    "gsm8k": ("gsm8k/train.jsonl", "question", "answer"),
    "math": ("math/original/train.jsonl", "problem", "solution"),
}
DEFAULT_SEQ = {"gsm8k": 768, "math": 1024}
TARGET = 1.5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["gsm8k", "math"], choices=sorted(SHARED_FILES))
    p.add_argument("--seq", type=int, default=None, help="train.seq_length (default: 768 for gsm8k, 1024 for math)")
    p.add_argument("--docs", type=int, default=64, help="documents per optimizer step (global batch)")
    p.add_argument("--micro-batch", type=int, default=8, help="documents per micro-batch")
    p.add_argument(
        "--token-rows", type=int, default=4, help="by tokens: rows of seq per micro-batch (micro_batch_tokens / seq)"
    )
    p.add_argument("--records", type=int, default=3000, help="records read to estimate the length distribution")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed rounds (median over them)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def document_lengths(name: str, records: int) -> np.ndarray:
    """``[n, 2]`` (prompt tokens with BOS, response tokens with EOS) of the first `records` records."""
    import sentencepiece as spm

    from dqo_megatron.paths import shared_data_dir

    root = shared_data_dir()
    sp = spm.SentencePieceProcessor(model_file=str(root / "models/stories260K/tok512.model"))
    path, prompt_key, response_key = SHARED_FILES[name]
    out = []
    with open(root / path) as f:
        for i, line in enumerate(f):
            if i >= records:
                break
            record = json.loads(line)
            out.append((len(sp.encode(record[prompt_key])) + 1, len(sp.encode(record[response_key])) + 1))
    return np.array(out)


def write_dataset(prefix: str, lengths: np.ndarray, vocab: int, seed: int) -> None:
    """Random tokens with the given (prompt, response) lengths; outcome 0/1 on the last token."""
    from dqo_megatron.data.indexed import TrajectoryWriter
    from dqo_megatron.data.tokenize import TokenizedSample

    rng = np.random.default_rng(seed)
    writer = TrajectoryWriter(prefix, vocab)
    for d, (prompt, response) in enumerate(lengths):
        total = int(prompt + response)
        rewards = np.zeros(total, np.float32)
        rewards[-1] = float(d % 2)
        behavior = np.zeros(total, np.float32)
        behavior[prompt:] = -rng.uniform(0.5, 3.0, size=total - prompt)
        sample = TokenizedSample(
            tokens=rng.integers(3, vocab, total),
            prompt_length=int(prompt),
            rewards=rewards,
            behavior_logprobs=behavior,
            prompt_id=f"p{d}",
            outcome_reward=float(d % 2),
            correct=d % 2,
        )
        writer.add(sample, 0)
    writer.finalize({})


def micro_batches(prefix: str, args, seq: int, packing: bool, budget_rows: int | None = None) -> list[dict]:
    from dqo_megatron.data.dataset import TrajectoryDataset
    from dqo_megatron.training.microbatches import MicroBatches

    batches = MicroBatches(
        TrajectoryDataset(prefix),
        seq_length=seq,
        micro_batch_size=args.micro_batch,
        dp_rank=0,
        dp_size=1,
        seed=args.seed,
        shuffle=False,
        pad_id=0,
        with_ref_logprobs=False,
        packing=packing,
        budget_rows=budget_rows,
    ).next_step(args.docs // args.micro_batch)
    gen = torch.Generator().manual_seed(args.seed)
    for batch in batches:  # reference log-probs "from annotate": the same per document both ways
        batch["ref_logprobs"] = -torch.rand(batch["response_mask"].shape, generator=gen) * 3 * batch["response_mask"]
    return batches


class DQOStep:
    """Our trainer's pieces for a DQO run without a reference model; `step(micro_batches)`."""

    def __init__(self, run):
        from dqo_megatron import parallel
        from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, wrap_with_ddp
        from dqo_megatron.training.policy_value import build_policy_value_chunks, finalize_policy_value_grads

        parallel.initialize(run.parallel, seed=run.train.seed)
        self.run = run
        self.chunks = build_policy_value_chunks(run, with_value=True, with_reference=False)
        with torch.no_grad():  # a non-zero value head, so the value path costs what it does in training
            self.chunks[0].value_head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        self.ddp = wrap_with_ddp(self.chunks)
        attach_finalize(self.ddp, finalize_policy_value_grads)
        self.optimizer = build_optimizer(self.ddp, lr=0.0, clip_grad=1.0)

    def step(self, batches: list[dict]) -> tuple[float, float, float]:
        """(loss, CPU seconds, wall seconds) of one optimizer step over `batches`."""
        from dqo_megatron.training.algorithms import rl_forward_step
        from dqo_megatron.training.step import train_step

        cpu, wall = time.process_time(), time.perf_counter()
        result = train_step(
            self.ddp,
            self.optimizer,
            iter(batches),
            num_microbatches=len(batches),
            seq_length=self.run.train.seq_length,
            micro_batch_size=self.run.train.micro_batch_size,
            forward_step=partial(rl_forward_step, self.run),
            metric_key="loss",
        )
        return result.loss, time.process_time() - cpu, time.perf_counter() - wall


def make_run(args, seq: int):
    from dqo_megatron.config import LossConfig, ModelConfig, RunConfig, TrainConfig

    model = ModelConfig(
        family="llama",
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=4 * args.hidden,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        seq_length=seq,
    )
    return RunConfig(
        model=model,
        algorithm="dqo",
        loss=LossConfig(beta=0.1, lam=1.0),
        train=TrainConfig(micro_batch_size=args.micro_batch, global_batch_size=args.docs, seq_length=seq, lr=0.0),
    )


LAYOUTS = ("padded", "packed", "by tokens")
"""Padded rows; packed micro-batch by micro-batch (`train.packing`); the step packed at once and cut by
tokens (`train.micro_batch_tokens`)."""


def measure(name: str, args, step: DQOStep, seq: int, tmp: Path) -> list[dict]:
    """Rows, padding and step times of one dataset's length distribution, one dict per layout."""
    lengths = document_lengths(name, args.records)
    fits = lengths.sum(1) <= seq + 1
    rng = np.random.default_rng(args.seed)
    chosen = lengths[fits][rng.choice(int(fits.sum()), size=args.docs, replace=False)]
    prefix = str(tmp / name)
    write_dataset(prefix, chosen, args.vocab, args.seed)
    layouts = {
        "padded": micro_batches(prefix, args, seq, False),
        "packed": micro_batches(prefix, args, seq, True),
        "by tokens": micro_batches(prefix, args, seq, True, budget_rows=args.token_rows),
    }
    useful = int(np.minimum(chosen.sum(1), seq).sum())  # input positions holding a document token
    times = {k: [] for k in layouts}
    for round_ in range(args.warmup + args.steps):
        order = list(layouts.items())
        losses = {}
        for label, batches in order[round_ % 3 :] + order[: round_ % 3]:  # each layout first in turn
            losses[label], cpu, _wall = step.step(batches)
            if round_ >= args.warmup:
                times[label].append(cpu)
        for label, loss in losses.items():
            if abs(loss - losses["padded"]) > 1e-4 * abs(losses["padded"]):
                sys.exit(f"{name}: {label} loss {loss} != padded {losses['padded']}")
    out = []
    for label, batches in layouts.items():
        rows = sum(b["tokens"].shape[0] for b in batches)
        median = statistics.median(times[label])
        out.append(
            {
                "name": name,
                "seq": seq,
                "layout": label,
                "left_out": 1.0 - float(fits.mean()),
                "median_tokens": int(np.median(chosen.sum(1))),
                "micro_batches": len(batches),
                "rows": rows,
                "padding": 1.0 - useful / (rows * seq),
                "seconds": median,
                "tokens_per_s": useful / median,
                "speedup": statistics.median(p / q for p, q in zip(times["padded"], times[label])),
            }
        )
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from dqo_megatron.env_report import environment_report

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.data:
            seq = args.seq or DEFAULT_SEQ[name]
            rows.extend(measure(name, args, DQOStep(make_run(args, seq)), seq, Path(tmp)))
            from dqo_megatron import parallel

            parallel.destroy()
    print(
        "| data | seq | left out | median doc | layout | micro-batches | rows | padding | step s (CPU) | "
        "useful tok/s | speed-up |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [
            r["name"],
            r["seq"],
            f"{r['left_out']:.1%}",
            r["median_tokens"],
            r["layout"],
            r["micro_batches"],
            r["rows"],
            f"{r['padding']:.1%}",
            f"{r['seconds']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['speedup']:.2f}x",
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(
        f"\n{args.docs} documents per step, micro-batches of {args.micro_batch}; model hidden {args.hidden}, "
        f"{args.layers} layers, vocab {args.vocab}; by tokens: at most {args.token_rows} rows of seq per "
        f"micro-batch; {args.threads} thread(s); median of {args.steps} rounds; target {TARGET}x."
    )
    print(json.dumps(environment_report()))


if __name__ == "__main__":
    main()
