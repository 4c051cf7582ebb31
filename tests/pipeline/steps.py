"""docs/pipeline.md as code: every documented command, in order, with the example configs' settings.

Commands run either as the user runs them (``python -m dqo_megatron ...``, ``torchrun -m dqo_megatron``,
``bash examples/train_dqo.sh``: the slow test) or as the same CLI invoked in ranks forked from the test
process (`tests.helpers.distributed.run_distributed`: no interpreter start and imports per command,
for the default suite). Run configs are the example YAML files of examples/configs/ with only sizes,
paths, steps, layout and the CPU's dtype changed, so a change that breaks an example breaks this.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dqo_megatron.parallel import find_free_port
from tests.helpers.distributed import run_distributed

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = {"qwen2": "qwen2-7b-gsm8k-dqo.yaml", "gemma": "gemma-7b-math-dqo.yaml", "llama": "qwen2-7b-gsm8k-dqo.yaml"}
"""The DQO example each family's run starts from (there is no Llama DQO example: Qwen2's, family swapped)."""
RUN_SEQ = 320
"""model.seq_length of the runs: shorter than the checkpoint's (MAX_POSITIONS), as 4096 vs 32768 for Qwen2-7B."""
TRAIN_SEQ = 256
"""train.seq_length (rows) of the runs."""
MAX_NEW = 12
"""Tokens a sampled or greedy answer may have."""


def _cli_rank(args: list[str]) -> tuple[int, str]:
    multiprocessing.current_process().daemon = False  # label and the writers start processes
    from typer.testing import CliRunner

    from dqo_megatron.cli import app

    result = CliRunner().invoke(app, args)
    text = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        text += "".join(traceback.format_exception(result.exception))
    return result.exit_code, text


def _child_env(extra: dict | None = None) -> dict:
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env.update(OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return {**env, **(extra or {})}


@dataclass
class Runner:
    """Runs `dqo-megatron` commands in `root` (forked CLI ranks, or real processes when `processes`)."""

    root: Path
    processes: bool = False
    log: list[str] = field(default_factory=list)

    def __call__(self, *args: str, world: int = 1, timeout: float = 300) -> str:
        """Run ``dqo-megatron *args`` on `world` ranks; the output, or AssertionError with its tail."""
        args = [str(a) for a in args]
        self.log.append(" ".join(args))
        if not self.processes:
            results = run_distributed(_cli_rank, world, args, timeout=timeout)
            code, output = next(((c, o) for c, o in results if c != 0), results[0])
        else:
            launch = [sys.executable, "-m", "dqo_megatron"]
            if world > 1:
                launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
                launch += ["-m", "dqo_megatron"]
            done = subprocess.run(
                launch + args, cwd=self.root, env=_child_env(), capture_output=True, text=True, timeout=timeout
            )
            code, output = done.returncode, done.stdout + done.stderr
        assert code == 0, f"`dqo-megatron {' '.join(args)}` exited {code}:\n{output[-4000:]}"
        return output

    def script(self, script: str, *args: str, world: int, timeout: float = 300) -> str:
        """Run one of examples/*.sh as documented (one node of `world` processes, a free port)."""
        env = _child_env({"NNODES": "1", "GPUS_PER_NODE": str(world), "MASTER_PORT": str(find_free_port())})
        self.log.append(f"bash {script} " + " ".join(args))
        done = subprocess.run(
            ["bash", str(REPO / script), *args], cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"`{script}` exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
        return done.stdout + done.stderr


def run_config(family: str, root: Path, tp: int = 1, pp: int = 1) -> Path:
    """The family's DQO example config with only sizes, paths, steps, layout and dtype changed; the
    model section is the converted checkpoint's model_config.yaml with the example's vocabulary
    padding and a seq_length shorter than the checkpoint's (what the example configs do). Written to
    ``root/run.yaml``."""
    config = yaml.safe_load((REPO / "examples" / "configs" / EXAMPLES[family]).read_text())
    example_model = config["model"]
    assert example_model["make_vocab_size_divisible_by"] == 128  # what the test is about
    config["model"] = {
        **yaml.safe_load((root / "ckpt" / "base" / "model_config.yaml").read_text()),
        "make_vocab_size_divisible_by": example_model["make_vocab_size_divisible_by"],
        "seq_length": RUN_SEQ,
    }
    sequence_parallel = bool(config["parallel"].get("sequence_parallel")) and tp > 1
    config["parallel"] = dict(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel
    )
    config["precision"]["dtype"] = "auto"  # bf16 in the examples (GPUs); fp32 on CPU
    config["init"]["policy"] = str(root / "ckpt" / "base")
    config["data"]["train_prefix"] = str(root / "data" / "train")
    config["value"]["warmup_steps"] = 1  # steps: one critic-only step, then policy steps
    train = config["train"]
    train.update(global_batch_size=4, micro_batch_size=1, seq_length=TRAIN_SEQ, train_steps=3, save_interval=3)
    train.update(lr=1e-3, lr_warmup_steps=1)
    config["run_dir"] = str(root / "runs" / "dqo")
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_pipeline(run: Runner, family: str, shared: Path, tp: int = 1, pp: int = 1) -> dict:
    """docs/pipeline.md steps 1, 2, 4-8 for the HF model in ``run.root/hf/base``; returns the paths made."""
    root = run.root
    base, ckpt = root / "hf" / "base", root / "ckpt" / "base"
    out = run("convert", "hf-to-megatron", base, ckpt, "--verify", timeout=240)
    assert "parity PASSED" in out
    rollouts = root / "data" / "rollouts.jsonl"
    run("rollout", shared / "gsm8k" / "train.jsonl", "-m", base, "--backend", "transformers",
        "-n", "2", "--top-p", "0.9", "--top-k", "16", "--max-new-tokens", MAX_NEW, "--limit", "4",
        "--label", "-o", rollouts)  # fmt: skip
    run("preprocess", rollouts, "-t", base, "-o", root / "data" / "train", "-j", "1")
    config = run_config(family, root, tp, pp)
    world = tp * pp
    run("annotate", "-c", config, world=world)
    if run.processes:
        run.script("examples/train_dqo.sh", str(config), world=world, timeout=400)
    else:
        run("train", "-c", config, world=world, timeout=400)
    (checkpoint,) = sorted((root / "runs" / "dqo" / "checkpoints").glob("step_*"))
    export = root / "hf" / "dqo"
    run("export", checkpoint, export, "--verify")
    run("eval", "-m", base, "--name", "base", "-m", export, "--name", "DQO", "-m", checkpoint, "--name", "DQO-megatron",
        "-d", "gsm8k", "--limit", "2", "--decoding", "greedy", "--max-new-tokens", MAX_NEW,
        "--data-dir", shared, "-o", root / "eval")  # fmt: skip
    return {"base": base, "checkpoint": checkpoint, "export": export, "eval": root / "eval", "config": config}


def greedy_outputs(eval_dir: Path, name: str) -> list[dict]:
    """The per-problem rows of eval's greedy GSM8K outputs of model `name`."""
    path = eval_dir / "outputs" / name / "gsm8k.greedy.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
