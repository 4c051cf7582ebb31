"""Kill a training run (SIGKILL) mid-training and mid-checkpoint-save, resume with --resume auto: the
next losses equal those of an uninterrupted run exactly, and the last good checkpoint is intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.synthetic_data import write_synthetic_dataset

STEPS = 8
SEQ = 32


def _config(tmp: Path, dataset: str, run_dir: Path, steps: int = STEPS) -> Path:
    """A tiny DQO run's config file (tmp/<run_dir name>.yaml): llama, 2 layers, save every 2 steps."""
    config = {
        "model": {
            "family": "llama",
            "num_layers": 2,
            "hidden_size": 64,
            "ffn_hidden_size": 128,
            "num_attention_heads": 4,
            "num_query_groups": 2,
            "vocab_size": 256,
            "seq_length": SEQ,
        },
        "algorithm": "dqo",
        "loss": {"beta": 0.5},
        "data": {"train_prefix": dataset},
        "train": {
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "seq_length": SEQ,
            "lr": 3e-3,
            "train_steps": steps,
            "save_interval": 2,
            "lr_warmup_steps": 2,
            "lr_decay_style": "cosine",
        },
        "run_dir": str(run_dir),
    }
    path = tmp / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        item = json.loads(line)
        out[item["step"]] = item["loss"]  # the last line of a step wins (a resumed run repeats steps)
    return out


def _command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dqo_megatron", "train", "--config", str(config), *extra]


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            # the whole process group, as a scheduler kills a job (dist_checkpointing's helper too)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before it could be killed")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the kill condition never came true")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    dataset = write_synthetic_dataset(str(tmp / "data" / "train"), docs=12, max_len=SEQ + 1)
    reference_dir = tmp / "uninterrupted"
    done = subprocess.run(_command(_config(tmp, dataset, reference_dir)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, dataset, _losses(reference_dir)


def test_sigkill_mid_training_then_resume_auto(setup):
    tmp, dataset, reference = setup
    run_dir = tmp / "killed_training"
    config = _config(tmp, dataset, run_dir)
    proc = subprocess.Popen(
        _command(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    # after the step-4 checkpoint, while step 5 or 6 runs
    _kill_when(proc, lambda: (run_dir / "metrics.jsonl").exists() and max(_losses(run_dir), default=0) >= 5)
    killed_at = max(_losses(run_dir))
    assert killed_at < STEPS
    resumed = subprocess.run(_command(config, "--resume", "auto"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_00000004" in resumed.stderr
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert losses[step] == reference[step], f"step {step}: {losses[step]!r} != {reference[step]!r}"


def test_sigkill_mid_checkpoint_save_keeps_the_last_good_one(setup):
    tmp, dataset, reference = setup
    run_dir = tmp / "killed_saving"
    config = _config(tmp, dataset, run_dir)
    proc = subprocess.Popen(
        _command(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpts = run_dir / "checkpoints"
    # the save of step 4 has started (its temporary directory exists) but is not published yet
    _kill_when(proc, lambda: (ckpts / ".tmp_step_00000004").exists() and not (ckpts / "step_00000004").exists())
    from dqo_megatron.training.checkpointing import find_latest_checkpoint, is_complete

    latest = find_latest_checkpoint(ckpts)
    assert latest is not None and latest.name == "step_00000002" and is_complete(latest)
    resumed = subprocess.run(_command(config), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000002" in resumed.stderr
    assert "packing: on (auto" in resumed.stderr  # the default, logged at start
    losses = _losses(run_dir)
    for step in range(1, STEPS + 1):
        assert losses[step] == reference[step], f"step {step}"
    assert not any(p.name.startswith(".tmp_") for p in ckpts.iterdir())
    assert {p.name for p in ckpts.glob("step_*")} == {"step_00000004", "step_00000006", "step_00000008"}
    assert os.path.exists(ckpts / "latest")


def test_export_trained_policy_to_hf(setup):
    tmp, _dataset, _reference = setup
    checkpoint = tmp / "uninterrupted" / "checkpoints" / "step_00000008"
    out = tmp / "exported_hf"
    done = subprocess.run(
        [sys.executable, "-m", "dqo_megatron", "export", str(checkpoint), str(out), "--verify"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # no custom code
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 256
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
    again = subprocess.run(
        [sys.executable, "-m", "dqo_megatron", "export", str(checkpoint), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode != 0 and "exists" in again.stderr  # no silent overwrite
    # the base model a run started from (whose hf/ files export copies) is never an export's output
    config = yaml.safe_load((tmp / "uninterrupted" / "config.yaml").read_text())
    assert config["train"]["packing"] is True  # unset: auto, resolved (local layer spec) and recorded
    base = tmp / "base_model"
    (base / "hf").mkdir(parents=True)
    (base / "hf" / "tokenizer.json").write_text("{}")
    config["init"]["policy"] = str(base)
    (tmp / "with_base.yaml").write_text(yaml.safe_dump(config))
    for target in (base, base / "hf"):
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "dqo_megatron",
                "export",
                str(checkpoint),
                str(target),
                "--overwrite",
                "--config",
                str(tmp / "with_base.yaml"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert refused.returncode == 2 and "the input" in refused.stderr, refused.stderr[-2000:]
    assert sorted(p.name for p in base.rglob("*")) == ["hf", "tokenizer.json"]
    # --format megatron writes a checkpoint that init.policy takes; converted to HF it equals the HF export
    meg = tmp / "exported_megatron"
    done = subprocess.run(
        [sys.executable, "-m", "dqo_megatron", "export", str(checkpoint), str(meg), "--format", "megatron"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # in a subprocess: a process group in pytest's own process would be inherited by later forked ranks
    done = subprocess.run(
        [sys.executable, "-m", "dqo_megatron", "convert", "megatron-to-hf", str(meg), str(tmp / "via_megatron")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    twin = transformers.AutoModelForCausalLM.from_pretrained(tmp / "via_megatron")
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name


def test_sigterm_saves_and_resume_continues_exactly(setup):
    tmp, dataset, reference = setup
    run_dir = tmp / "sigterm"
    config = _config(tmp, dataset, run_dir)
    proc = subprocess.Popen(_command(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").exists() and max(_losses(run_dir), default=0) >= 3):
        assert time.monotonic() < deadline and proc.poll() is None, "the run ended or hung before SIGTERM"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert "train sigterm" in output
    stopped_at = max(_losses(run_dir))
    assert stopped_at < STEPS and (run_dir / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    resumed = subprocess.run(_command(config), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = _losses(run_dir)
    assert [losses[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]
