"""The demo's Megatron runs: their configs, the `dqo-megatron` commands that run them (subprocesses that
die with the demo), and what they leave in their run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from dqo_megatron.demo.config import DemoConfig, model_config


def run_config(
    cfg: DemoConfig,
    run_dir: Path,
    *,
    seq: int,
    algorithm: str,
    train_prefix: str,
    steps: int,
    lr: float,
    init_policy: str | None = None,
    extra: dict | None = None,
) -> dict:
    """A training config (the same YAML a user writes) for one of the demo's runs (`seq` tokens a row)."""
    config = {
        "model": model_config(seq),
        "parallel": {"tensor_model_parallel_size": cfg.tp, "pipeline_model_parallel_size": cfg.pp},
        "algorithm": algorithm,
        "train": {
            "micro_batch_size": 32 // cfg.pp,
            "global_batch_size": 32,
            "seq_length": seq,
            "lr": lr,
            "train_steps": steps,
            "seed": cfg.seed + 1,
            "log_interval": max(steps // 10, 1),
            "keep_last_checkpoints": 1,
        },
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
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world}",
            "-m",
            "dqo_megatron",
            *args,
        ]
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
        done = subprocess.run(
            [sys.executable, "-m", "dqo_megatron", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            preexec_fn=_dies_with_us(),
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"`{args[0]}` failed (exit {done.returncode}); log {log}:\n" + "\n".join(log.read_text().splitlines()[-25:])
        )


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
