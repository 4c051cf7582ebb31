"""Throughput of one training step on one GPU: tokens/s, model TFLOP/s and MFU, DQO vs SFT, bf16 vs FP8.

Runs exactly the trainer's per-step path (as `benchmarks/step_cost.py` does on CPU): `PolicyValueModel`
chunks from `build_policy_value_chunks`, Megatron DDP, Megatron's optimizer (Adam, grad clipping), and
Megatron's schedule through `train_step(..., forward_step=partial(rl_forward_step, run))`, on random
weights and a synthetic batch (prompts, responses, rewards, reference and behavior log-probs precomputed,
as after `dqo-megatron annotate`). Data loading, logging and checkpointing are left out.

    setups      sft (policy only), dqo (policy + value network of the same size, `value.mode: separate`),
                dqo-shared (`value.mode: shared`: the value head on the policy's trunk)
    precisions  bf16 (the GPU default), fp8 (`precision.fp8`, only where Transformer Engine is usable
                and the recipe fits the GPU; otherwise the row says why it was skipped)

Numbers: median step time over `--steps` timed steps after `--warmup` (CUDA-synchronized); tokens/s =
micro_batch x seq / step time (padding counted, as it is computed); model FLOPs from
`dqo_megatron.training.flops.step_flops` (Megatron's convention: 6N per token plus attention, a value
network without output layer, no reference model); TFLOP/s per GPU = FLOPs / time; MFU against the GPU's
dense bf16 peak and, separately, its dense FP8 peak (`PEAKS`, vendor datasheets, by device name; pass
`--peak-bf16/--peak-fp8` for other GPUs). Peak memory is `torch.cuda.max_memory_allocated`.

    python benchmarks/gpu_step.py                         # ~1.1B Llama, seq 2048 and 4096, all setups
    python benchmarks/gpu_step.py --seq 4096 --setups dqo --precisions bf16 fp8 --json out.json
    python benchmarks/gpu_step.py --dry-run               # tiny model on CPU: the plumbing, no figures

Targets (issue #9): DQO step MFU >= 35% of the bf16 peak on one H100 (bf16, local spec with SDPA/flash
attention); with TE, FP8 tokens/s >= 1.2x bf16. Prints a Markdown section for docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch

# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets: (name fragment, bf16, fp8 or None).
# First match wins, so variants come before the plain name ("H100 PCIe" before "H100").
PEAKS: list[tuple[str, float, Optional[float]]] = [
    ("H100 PCIe", 756.0, 1513.0),
    ("H100 NVL", 835.0, 1671.0),
    ("H100", 989.0, 1979.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.0, 1671.0),
    ("H200", 989.0, 1979.0),  # SXM
    ("H800", 989.0, 1979.0),
    ("GB200", 2500.0, 5000.0),
    ("B200", 2250.0, 4500.0),
    ("A100", 312.0, None),  # Ampere: no FP8 tensor cores
    ("A800", 312.0, None),
    ("L40S", 362.0, 733.0),
]

MODELS = {
    # TinyLlama-1.1B's shape: 22 layers, hidden 2048, FFN 5632, 32 heads / 4 KV groups, vocab 32000.
    "llama-1b": dict(
        family="llama",
        num_layers=22,
        hidden_size=2048,
        ffn_hidden_size=5632,
        num_attention_heads=32,
        num_query_groups=4,
        vocab_size=32000,
        tie_embeddings=False,
    ),
    # Qwen2-1.5B's shape (tied, 151936 vocabulary: the output layer weighs ~1/4 of the FLOPs at seq 2048).
    "qwen2-1.5b": dict(
        family="qwen2",
        num_layers=28,
        hidden_size=1536,
        ffn_hidden_size=8960,
        num_attention_heads=12,
        num_query_groups=2,
        vocab_size=151936,
        tie_embeddings=True,
    ),
    # For --dry-run and CPU plumbing tests.
    "tiny": dict(
        family="llama",
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=512,
        tie_embeddings=False,
    ),
}

SETUPS = {"sft": ("sft", "separate"), "dqo": ("dqo", "separate"), "dqo-shared": ("dqo", "shared")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--model", choices=sorted(MODELS), default="llama-1b")
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 4096], help="sequence lengths")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per (single) micro-batch")
    p.add_argument("--setups", nargs="+", choices=sorted(SETUPS), default=["sft", "dqo", "dqo-shared"])
    p.add_argument("--precisions", nargs="+", choices=["bf16", "fp8"], default=["bf16", "fp8"])
    p.add_argument(
        "--fp8-recipe",
        default="auto",
        choices=["auto", "delayed", "tensorwise", "blockwise", "mxfp8"],
        help="auto: mxfp8 on Blackwell, else tensorwise (current scaling), else delayed",
    )
    p.add_argument("--backend", default="auto", choices=["auto", "te", "local"], help="layer spec (auto: TE if usable)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-bf16", type=float, default=None, help="override the bf16 peak TFLOP/s per GPU")
    p.add_argument("--peak-fp8", type=float, default=None, help="override the FP8 peak TFLOP/s per GPU")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and environment as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the Markdown section here")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny model, seq 64, 2 steps, on whatever device is here (CPU: fp32): checks the plumbing",
    )
    args = p.parse_args(argv)
    if args.dry_run:
        args.model, args.seq, args.steps, args.warmup = "tiny", [64], 2, 1
        args.micro_batch = max(args.micro_batch, 2)
    return args


def peaks_for(device_name: Optional[str]) -> tuple[Optional[float], Optional[float]]:
    """(bf16, fp8) dense peak TFLOP/s for a `torch.cuda.get_device_name()`; (None, None) if unknown."""
    if device_name:
        for fragment, bf16, fp8 in PEAKS:
            if fragment in device_name:
                return bf16, fp8
    return None, None


def pick_fp8_recipe(requested: str, capability: Optional[tuple[int, int]]) -> str:
    """`--fp8-recipe auto`: MXFP8 on Blackwell (10.x/11.x), per-tensor current scaling elsewhere."""
    if requested != "auto":
        return requested
    if capability and (10, 0) <= capability < (12, 0):
        return "mxfp8"
    return "tensorwise"


def synthetic_batch(vocab: int, rows: int, seq: int, device, seed: int = 0) -> dict:
    """One micro-batch in the trainer's format: a prompt of random length, a response to the end (minus
    some padding), an outcome reward on its last token, log-probs near what a fresh model gives."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=gen)
    mask, rewards = torch.zeros(rows, seq), torch.zeros(rows, seq)
    for r in range(rows):
        prompt = int(torch.randint(3, max(4, seq // 4), (1,), generator=gen))
        end = seq - int(torch.randint(0, max(1, seq // 16), (1,), generator=gen))
        mask[r, prompt - 1 : end] = 1
        rewards[r, end - 1] = float(torch.randint(0, 2, (1,), generator=gen))
    uniform = -math.log(vocab)
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "position_ids": torch.arange(seq).expand(rows, seq),
        "response_mask": mask,
        "rewards": rewards,
        "behavior_logprobs": (uniform + 0.02 * torch.randn(rows, seq, generator=gen)) * mask,
        "ref_logprobs": (uniform + 0.05 * torch.randn(rows, seq, generator=gen)) * mask,
    }
    return {k: v.contiguous().to(device) for k, v in batch.items()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(args, setup: str, precision: str, seq: int, fp8_recipe: str, backend: str) -> dict:
    """Build one setup, take warmup + timed steps, free it; one row of the table."""
    from dqo_megatron.algorithms import get as get_algorithm
    from dqo_megatron.config import LossConfig, ModelConfig, PrecisionConfig, RunConfig, TrainConfig, ValueConfig
    from dqo_megatron.parallel import device_for_this_process
    from dqo_megatron.training.algorithms import rl_forward_step
    from dqo_megatron.training.flops import step_flops
    from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, wrap_with_ddp
    from dqo_megatron.training.policy_value import (
        build_policy_value_chunks,
        finalize_policy_value_grads,
        pipeline_micro_batch_size,
    )
    from dqo_megatron.training.step import train_step

    algorithm, value_mode = SETUPS[setup]
    model = ModelConfig(**MODELS[args.model], seq_length=seq)
    prec = PrecisionConfig(dtype="auto", fp8=fp8_recipe if precision == "fp8" else None)
    run = RunConfig(
        model=model,
        algorithm=algorithm,
        precision=prec,
        loss=LossConfig(beta=0.1, lam=0.95),
        value=ValueConfig(mode=value_mode),
        train=TrainConfig(
            micro_batch_size=args.micro_batch,
            global_batch_size=args.micro_batch,
            seq_length=seq,
            lr=1e-6,
            clip_grad=1.0,
        ),
    )
    row = {
        "setup": setup,
        "precision": precision if precision == "bf16" else f"fp8 ({fp8_recipe})",
        "seq": seq,
        "micro_batch": args.micro_batch,
        "backend": backend,
    }
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    learns_value = get_algorithm(algorithm).needs_value
    chunks = build_policy_value_chunks(run, with_value=learns_value, with_reference=False, backend=backend)
    ddp = wrap_with_ddp(chunks)
    attach_finalize(ddp, finalize_policy_value_grads)
    optimizer = build_optimizer(ddp, lr=run.train.lr, clip_grad=run.train.clip_grad)
    batch = synthetic_batch(model.vocab_size, args.micro_batch, seq, device_for_this_process())
    mbs = pipeline_micro_batch_size(ddp[0], args.micro_batch)
    step = partial(
        train_step,
        ddp,
        optimizer,
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=mbs,
        forward_step=partial(rl_forward_step, run),
        metric_key="loss",
    )
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        _sync()
        t0 = time.perf_counter()
        result = step(iter([batch]))
        _sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(result.loss)
    seconds = statistics.median(times)
    tokens = args.micro_batch * seq
    flops = step_flops(
        model, tokens, seq, value_network=algorithm == "dqo" and value_mode == "separate", reference_model=False
    )
    row.update(
        step_ms=seconds * 1e3,
        step_ms_min=min(times) * 1e3,
        step_ms_max=max(times) * 1e3,
        tokens_per_s=tokens / seconds,
        tflops_per_gpu=flops / seconds / 1e12,
        model_flops_per_step=flops,
        loss_first=losses[0],
        loss_last=losses[-1],
        finite=all(math.isfinite(x) for x in losses),
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        params=sum(p.numel() for p in chunks[0].parameters()),
    )
    del step, optimizer, ddp, chunks, batch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def environment(args) -> dict:
    root = Path(__file__).resolve().parent.parent

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=root, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    from dqo_megatron.models.precision import detect_hardware

    hw = detect_hardware()
    try:
        import megatron.core

        mcore = megatron.core.__version__
    except Exception:  # noqa: BLE001
        mcore = "not importable"
    return {
        "date": str(datetime.date.today()),
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "device": hw.device_name or f"CPU ({platform.processor() or platform.machine()})",
        "capability": list(hw.capability) if hw.capability else None,
        "cuda": hw.cuda_version,
        "gpus_visible": torch.cuda.device_count() if hw.cuda else 0,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": mcore,
        "transformer_engine": hw.te_version or f"no ({hw.te_reason})",
        "command": "python benchmarks/gpu_step.py " + " ".join(sys.argv[1:]),
    }


def markdown(env: dict, rows: list[dict], args, peak_bf16, peak_fp8) -> str:
    def pct(x, peak):
        return "n/a" if peak is None or x is None else f"{100 * x / peak:.1f}%"

    lines = [
        f"### One training step on one GPU ({env['device']})",
        "",
        f"{env['date']}, commit {env['commit']}{' (uncommitted changes)' if env['dirty'] else ''}; {env['device']} "
        f"(compute capability {env['capability']}), CUDA {env['cuda']}; Python {env['python']}, torch {env['torch']}, "
        f"megatron-core {env['megatron_core']}, Transformer Engine: {env['transformer_engine']}.",
        f"Command: `{env['command']}`. Model: `{args.model}` ({MODELS[args.model]}); micro-batch {args.micro_batch}; "
        f"median of {args.steps} steps after {args.warmup} warm-up steps. Peaks used (dense TFLOP/s): "
        f"bf16 {peak_bf16 or 'unknown'}, FP8 {peak_fp8 or 'unknown'}.",
        "",
        "| setup | precision | spec | seq | step ms (min-max) | tokens/s | TFLOP/s per GPU | MFU vs bf16 peak | "
        "MFU vs FP8 peak | peak mem GiB | loss first -> last |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['setup']} | {r['precision']} | {r.get('backend', '')} | {r['seq']} | skipped: {r['skipped']} "
                "| | | | | | |"
            )
            continue
        mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(
            f"| {r['setup']} | {r['precision']} | {r['backend']} | {r['seq']} | {r['step_ms']:.1f} "
            f"({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}) | {r['tokens_per_s']:,.0f} | {r['tflops_per_gpu']:.1f} | "
            f"{pct(r['tflops_per_gpu'], peak_bf16)} | {pct(r['tflops_per_gpu'], peak_fp8)} | {mem} | "
            f"{r['loss_first']:.4f} -> {r['loss_last']:.4f} |"
        )
    ratios = []
    for r in rows:
        if r["precision"].startswith("fp8") and "skipped" not in r:
            base = next(
                (
                    b
                    for b in rows
                    if b["precision"] == "bf16"
                    and b["setup"] == r["setup"]
                    and b["seq"] == r["seq"]
                    and "skipped" not in b
                ),
                None,
            )
            if base:
                ratios.append(
                    f"{r['setup']} seq {r['seq']}: FP8 / bf16 tokens/s = "
                    f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} (target >= 1.2)"
                )
    for r in rows:
        if r["setup"] == "dqo" and r["precision"] == "bf16" and "skipped" not in r and peak_bf16:
            ratios.append(
                f"dqo seq {r['seq']} bf16 ({r['backend']} spec): MFU {100 * r['tflops_per_gpu'] / peak_bf16:.1f}% "
                "of the bf16 peak (target >= 35%)"
            )
    if ratios:
        lines += ["", *[f"- {x}" for x in ratios]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from dqo_megatron import parallel
    from dqo_megatron.config import ParallelConfig, PrecisionConfig
    from dqo_megatron.models import select_backend
    from dqo_megatron.models.precision import detect_hardware, fp8_support_problems

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process, one GPU
        os.environ.setdefault(name, "1" if name == "WORLD_SIZE" else "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(parallel.find_free_port()))
    parallel.initialize(ParallelConfig(), seed=1234)
    hw = detect_hardware()
    env = environment(args)
    peak_bf16, peak_fp8 = peaks_for(hw.device_name)
    peak_bf16, peak_fp8 = args.peak_bf16 or peak_bf16, args.peak_fp8 or peak_fp8
    backend = select_backend(args.backend)
    recipe = pick_fp8_recipe(args.fp8_recipe, hw.capability)
    rows = []
    for seq in args.seq:
        for setup in args.setups:
            for precision in args.precisions:
                label = "bf16" if precision == "bf16" else f"fp8 ({recipe})"
                base = {"setup": setup, "precision": label, "seq": seq, "backend": backend}
                if precision == "bf16" and not hw.cuda:
                    base["precision"] = "fp32 (CPU)"
                if precision == "fp8":
                    problems = fp8_support_problems(PrecisionConfig(fp8=recipe), hw, backend)
                    if problems:
                        rows.append({**base, "skipped": "; ".join(problems)})
                        print(f"skip {setup} seq {seq} {label}: {rows[-1]['skipped']}", file=sys.stderr, flush=True)
                        continue
                try:
                    row = measure(args, setup, precision, seq, recipe, backend)
                    row["precision"] = base["precision"]
                except torch.cuda.OutOfMemoryError as exc:  # report and go on with the other rows
                    gc.collect()
                    torch.cuda.empty_cache()
                    row = {**base, "skipped": f"CUDA out of memory ({str(exc).splitlines()[0][:120]})"}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    text = markdown(env, rows, args, peak_bf16, peak_fp8)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env,
                    "peaks": {"bf16": peak_bf16, "fp8": peak_fp8},
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "rows": rows,
                },
                indent=1,
            )
        )
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
