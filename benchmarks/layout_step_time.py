"""Time one training step of a tiny model under each parallel layout, and the import cost.

Every layout runs the real entry point under the real launcher
(`torchrun -m dqo_megatron smoke ...`, Megatron DDP + optimizer + schedules) in a fresh process
group; the steady step time is the mean over steps 2..N as printed by `smoke`.

    .venv/bin/python benchmarks/layout_step_time.py [--steps 8]

Prints a Markdown table for docs/performance.md, with hardware, versions, commit and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time

MODEL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=172",
    "model.num_attention_heads=4",
    "train.seq_length=32",
    "train.micro_batch_size=1",
]
LAYOUTS = {
    "single process": (1, []),
    "DP=2": (2, []),
    "TP=2": (2, ["parallel.tensor_model_parallel_size=2"]),
    "TP=2 + SP": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    "PP=2": (2, ["parallel.pipeline_model_parallel_size=2"]),
    "CP=2": (2, ["parallel.context_parallel_size=2"]),
    "TP=2 x PP=2 (4 ranks)": (4, ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]),
}


def import_seconds(module: str) -> float:
    """Wall time of `import module` in a fresh interpreter (minus the interpreter's own start)."""
    code = f"import time; t=time.perf_counter(); import {module}; print(time.perf_counter()-t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_layout(world: int, overrides: list[str], steps: int) -> tuple[float, float]:
    """(steady step ms, wall seconds of the whole launch) for one layout."""
    dp = world
    for item in overrides:
        if "=" in item and item.split("=")[0].endswith("_size"):
            dp //= int(item.split("=")[1])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(world),
        "-m",
        "dqo_megatron",
        "smoke",
        "--steps",
        str(steps),
        *MODEL,
        *overrides,
        f"train.global_batch_size={2 * dp}",
    ]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    text = out.stdout + out.stderr
    match = re.search(r"steady step=([0-9.]+) ms", text)
    if out.returncode or not match:
        raise RuntimeError(f"layout {overrides} failed:\n{text[-3000:]}")
    return float(match.group(1)), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"date {datetime.date.today()}, commit {commit}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"
    )
    print(
        f"import torch: {import_seconds('torch'):.2f} s; import megatron.core: "
        f"{import_seconds('megatron.core'):.2f} s; import dqo_megatron.models: "
        f"{import_seconds('dqo_megatron.models'):.2f} s"
    )
    print("\n| layout | ranks | steady step (ms) | launch to exit (s) |\n| --- | --- | --- | --- |")
    for name, (world, overrides) in LAYOUTS.items():
        step_ms, wall = run_layout(world, overrides, args.steps)
        print(f"| {name} | {world} | {step_ms:.1f} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
