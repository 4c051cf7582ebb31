"""The real entry point under the real launcher: `torchrun -m dqo_megatron smoke` with TP=2 gives the
same losses as one process (the many other layouts are tested through forked ranks, ~10x cheaper)."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from dqo_megatron.parallel import find_free_port

STEPS = ["--steps", "2", "train.global_batch_size=2", "model.num_layers=2"]


def _final_loss(output: str) -> float:
    match = re.search(r"smoke OK: world=(\d+) .*final loss=([0-9.]+)", output)
    assert match, output[-3000:]
    return float(match.group(2))


def test_torchrun_tp2_equals_single_process(tmp_path):
    single = subprocess.run(
        [sys.executable, "-m", "dqo_megatron", "smoke", *STEPS, f"run_dir={tmp_path / 'one'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(find_free_port()),
            "-m",
            "dqo_megatron",
            "smoke",
            *STEPS,
            "parallel.tensor_model_parallel_size=2",
            f"run_dir={tmp_path / 'tp2'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    output = launched.stdout + launched.stderr
    assert "world=2" in output
    assert abs(_final_loss(output) - _final_loss(single.stdout + single.stderr)) < 1e-4
    written = yaml.safe_load((tmp_path / "tp2" / "config.yaml").read_text())
    assert written["parallel"]["tensor_model_parallel_size"] == 2
    assert written["model"]["rotary_base"] == 10000.0  # resolved family default, not None


def test_bad_layout_exits_with_a_message():
    bad = subprocess.run(
        [sys.executable, "-m", "dqo_megatron", "smoke", "parallel.sequence_parallel=true"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1" in bad.stderr
