"""What a DQO step costs: against an SFT step, and against a plain transformers + PyTorch DQO step.

One process, CPU, fixed torch threads. On the same tiny Llama (a `transformers.LlamaForCausalLM`
converted with `dqo-megatron convert`) and the same micro-batch it times one optimizer step of:

    sft           our trainer's pieces, `algorithm: sft` (policy only, fused token log-probs)
    dqo separate  `algorithm: dqo`, a value network of the policy's size (`value.mode: separate`),
                  reference log-probs precomputed in the batch (as after `dqo-megatron annotate`)
    dqo shared    `algorithm: dqo`, `value.mode: shared` (the value head on the policy's trunk)
    plain dqo     `benchmarks/plain_dqo.py`: HF policy + HF value trunk + Linear head, log_softmax +
                  gather, the same `dqo_losses`, torch.optim.AdamW

Our steps run exactly what `dqo_megatron.training.trainer.train` runs per step: `PolicyValueModel`
chunks, Megatron DDP, Megatron's optimizer (Adam, grad clipping) and Megatron's forward/backward
schedule via `train_step(..., forward_step=partial(rl_forward_step, run))`; only data loading,
logging and checkpointing are left out.

Before timing, the losses of "dqo separate" and "plain dqo" are checked equal over a few steps from
the same weights (HF -> `hf_to_megatron` -> `init.policy`; the same non-zero value head in both) and
the run stops if they are not. Then the four setups take steps round-robin, in alternating order
(so that drift of the machine hits all of them alike): `--warmup` rounds, then `--steps` timed
rounds; the table reports the median (and min / max) of the timed steps; the ratios are given as the
median of per-round ratios of CPU times (paired: the steadiest on a drifting machine), and as ratios
of medians.

Clocks: each step is timed by the wall clock and by the process's CPU time (`time.process_time`, all
threads). On a quiet machine they agree (1 thread). On a shared machine other processes preempt ours;
the CPU time does not count that, the wall clock does, so the CPU-time ratios are the ones to read
there. With several threads on a busy machine OpenMP's barriers wait for preempted threads and
single steps take up to 10x longer (measured), so the default is 1 thread.

    .venv/bin/python benchmarks/step_cost.py [--threads 2] [--steps 7] [--profile]

Prints a Markdown section for docs/performance.md (hardware, versions, commit, date, command).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # plain_dqo, when run as a script

TARGETS = {"dqo separate / sft": 2.1, "dqo shared / sft": 1.15, "dqo separate (ours) / plain dqo": 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: see the module docstring, 'Clocks')"
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="rows in the (one) micro-batch")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    p.add_argument("--steps", type=int, default=7, help="timed rounds (median over them)")
    p.add_argument("--check-steps", type=int, default=3, help="steps with losses compared, ours vs plain")
    p.add_argument("--tolerance", type=float, default=1e-4, help="relative loss tolerance, ours vs plain")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--profile", action="store_true", help="also print torch.profiler top ops of one step each")
    return p.parse_args(argv)


def write_hf_model(args, root: Path) -> Path:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "hf", safe_serialization=True)
    return root / "hf"


class Ours:
    """Our trainer's pieces for one `RunConfig`: chunks -> init -> DDP -> optimizer; `step(batch)`."""

    def __init__(self, run):
        from dqo_megatron.algorithms import get as get_algorithm
        from dqo_megatron.training.initial_weights import load_initial_weights
        from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, wrap_with_ddp
        from dqo_megatron.training.policy_value import (
            build_policy_value_chunks,
            finalize_policy_value_grads,
            pipeline_micro_batch_size,
        )

        self.run = run
        # Reference log-probs come with the batch: no reference model in the run.
        learns_value = get_algorithm(run.algorithm).needs_value
        self.chunks = build_policy_value_chunks(run, with_value=learns_value, with_reference=False)
        load_initial_weights(run, self.chunks)
        self.ddp = wrap_with_ddp(self.chunks)
        attach_finalize(self.ddp, finalize_policy_value_grads)
        t = run.train
        self.optimizer = build_optimizer(
            self.ddp,
            lr=t.lr,
            min_lr=t.min_lr,
            clip_grad=t.clip_grad,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            value_lr=run.value.lr,
        )
        self.micro_batch_size = pipeline_micro_batch_size(self.ddp[0], t.micro_batch_size)

    def step(self, batch: dict) -> dict:
        from dqo_megatron.training.algorithms import rl_forward_step
        from dqo_megatron.training.step import train_step

        result = train_step(
            self.ddp,
            self.optimizer,
            iter([batch]),
            num_microbatches=1,
            seq_length=self.run.train.seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_step=partial(rl_forward_step, self.run),
            metric_key="loss",
        )
        return {
            "loss": result.loss,
            **{k: result.metrics[k] for k in ("policy_loss", "value_loss") if k in result.metrics},
        }


def make_run(model, ckpt: str, args, algorithm: str, value_mode: str = "separate"):
    from dqo_megatron.config import InitConfig, LossConfig, RunConfig, TrainConfig, ValueConfig

    return RunConfig(
        model=model,
        algorithm=algorithm,
        loss=LossConfig(beta=0.1, lam=1.0),
        value=ValueConfig(mode=value_mode),
        init=InitConfig(policy=ckpt),
        train=TrainConfig(
            micro_batch_size=args.batch, global_batch_size=args.batch, seq_length=args.seq, lr=args.lr, clip_grad=1.0
        ),
    )


def check_losses_equal(ours: Ours, plain, batch: dict, steps: int, tolerance: float) -> list[str]:
    """Same head in both (non-zero, so the value path counts), then `steps` steps; lines for the report."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(1, plain.head.weight.shape[1], generator=gen) * 0.05
    bias = torch.tensor([0.1])
    with torch.no_grad():
        for head in (ours.chunks[0].value_head, plain.head):
            head.weight.copy_(weight)
            head.bias.copy_(bias)
    lines, worst = [], 0.0
    for i in range(steps):
        a, b = ours.step(batch), plain.step(batch)
        rel = {k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in ("loss", "policy_loss", "value_loss")}
        worst = max(worst, *rel.values())
        lines.append(
            f"step {i + 1}: loss ours {a['loss']:.7f} plain {b['loss']:.7f}; policy {a['policy_loss']:.7f} / "
            f"{b['policy_loss']:.7f}; value {a['value_loss']:.7f} / {b['value_loss']:.7f}; "
            f"max rel diff {max(rel.values()):.1e}"
        )
    if worst > tolerance:
        raise SystemExit("losses differ (ours vs plain) beyond tolerance %.1e:\n%s" % (tolerance, "\n".join(lines)))
    return lines


def profile_one(name: str, step, batch: dict, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    print(f"\n### profile: {name}\n```")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    print("```")


def environment(args) -> str:
    import megatron.core
    import transformers

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parent
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
    ).stdout.strip()
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return (
        f"{datetime.date.today()}, commit {commit}{' (tree with uncommitted changes)' if dirty else ''}; "
        f"CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()} "
        f"(interop {torch.get_num_interop_threads()}); Python {platform.python_version()}, torch {torch.__version__}, "
        f"megatron-core {megatron.core.__version__}, transformers {transformers.__version__}"
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from plain_dqo import PlainDQO, make_batch

    from dqo_megatron import parallel
    from dqo_megatron.config import ParallelConfig
    from dqo_megatron.conversion.convert import hf_to_megatron
    from dqo_megatron.conversion.megatron_io import read_metadata

    omp = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = f"{omp}.venv/bin/python benchmarks/step_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_hf_model(args, Path(tmp))
        ckpt = str(Path(tmp) / "megatron")
        hf_to_megatron(str(hf_dir), ckpt, progress=False)
        model, _ = read_metadata(ckpt)
        parallel.initialize(ParallelConfig(), seed=1234)
        setups = {
            "sft": Ours(make_run(model, ckpt, args, "sft")),
            "dqo separate": Ours(make_run(model, ckpt, args, "dqo", "separate")),
            "dqo shared": Ours(make_run(model, ckpt, args, "dqo", "shared")),
        }
        plain = PlainDQO(str(hf_dir), setups["dqo separate"].run.loss, lr=args.lr, clip_grad=1.0)
    # Reference / behavior log-probs of the initial model, as `dqo-megatron annotate` would store them.
    batch = plain.annotate(make_batch(args.vocab, args.batch, args.seq, seed=0))
    check = check_losses_equal(setups["dqo separate"], plain, batch, args.check_steps, args.tolerance)
    steps = {name: s.step for name, s in setups.items()}
    steps["plain dqo"] = plain.step

    times = {name: [] for name in steps}  # wall ms
    cpu_times = {name: [] for name in steps}  # process CPU ms (all threads)
    for round_ in range(args.warmup + args.steps):
        # Alternate the order (ABCD, DCBA, ...) so that no setup always runs right after another.
        order = list(steps.items()) if round_ % 2 == 0 else list(steps.items())[::-1]
        for name, step in order:
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            step(batch)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            if round_ >= args.warmup:
                times[name].append(seconds * 1e3)
                cpu_times[name].append(cpu_seconds * 1e3)
        print(
            f"round {round_ + 1}/{args.warmup + args.steps}: "
            + ", ".join(f"{n} {t[-1]:.0f} ms" for n, t in times.items() if t),
            file=sys.stderr,
            flush=True,
        )
    median = {name: statistics.median(t) for name, t in times.items()}
    cpu_median = {name: statistics.median(t) for name, t in cpu_times.items()}
    pairs = {
        "dqo separate / sft": ("dqo separate", "sft"),
        "dqo shared / sft": ("dqo shared", "sft"),
        "dqo separate (ours) / plain dqo": ("dqo separate", "plain dqo"),
    }
    ratios = {k: median[a] / median[b] for k, (a, b) in pairs.items()}
    cpu_ratios = {k: cpu_median[a] / cpu_median[b] for k, (a, b) in pairs.items()}
    # Paired: the two setups' CPU times in the same round, divided; machine drift between rounds cancels.
    paired = {k: statistics.median(x / y for x, y in zip(cpu_times[a], cpu_times[b])) for k, (a, b) in pairs.items()}
    tokens = args.batch * args.seq
    print("\n## DQO step cost\n")
    print(f"Command: `{command}`\n")
    print(environment(args) + "\n")
    print(
        f"Model: Llama, {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, {args.heads} heads "
        f"({args.kv_heads} KV), vocab {args.vocab}, untied head, fp32; batch: {args.batch} x {args.seq} tokens "
        f"(one micro-batch). Median of {args.steps} steps after {args.warmup} warmup rounds, setups interleaved "
        "round-robin in one process.\n"
    )
    print(
        "| setup | median wall ms/step | min | max | median CPU ms/step | tokens/s (wall) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    for name, t in times.items():
        print(
            f"| {name} | {median[name]:.0f} | {min(t):.0f} | {max(t):.0f} | {cpu_median[name]:.0f} | "
            f"{tokens / median[name] * 1e3:.0f} |"
        )
    print(
        "\n| ratio | CPU time, median of per-round ratios | CPU time, ratio of medians | wall, ratio of medians "
        "| target | met (paired CPU / CPU / wall) |\n| --- | ---: | ---: | ---: | ---: | --- |"
    )
    for name, value in ratios.items():
        target, cpu = TARGETS[name], cpu_ratios[name]
        met = "/".join("yes" if v <= target else "NO" for v in (paired[name], cpu, value))
        print(f"| {name} | {paired[name]:.3f} | {cpu:.3f} | {value:.3f} | <= {target:g} | {met} |")
    load = os.getloadavg()
    print(f"\nLoad average during the run (1/5/15 min, at the end): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print("\nLosses checked equal first (ours `dqo separate` vs `plain dqo`, same weights, same non-zero head):\n")
    for line in check:
        print(f"- {line}")
    if args.profile:
        for name, step in steps.items():
            profile_one(name, step, batch)
    parallel.destroy()


if __name__ == "__main__":
    main()
