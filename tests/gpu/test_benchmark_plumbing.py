"""benchmarks/gpu_step.py on CPU: `--help`, the peak table, and a `--dry-run` of a tiny DQO step through the
trainer's pieces (a row measured, the FP8 row skipped with the reason). No figures: those need a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_step.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peaks_by_device_name_and_fp8_recipe_choice():
    gs = _module()
    assert gs.peaks_for("NVIDIA H100 80GB HBM3") == (989.0, 1979.0)
    assert gs.peaks_for("NVIDIA H100 PCIe") == (756.0, 1513.0)
    assert gs.peaks_for("NVIDIA H200") == (989.0, 1979.0)
    assert gs.peaks_for("NVIDIA A100-SXM4-80GB") == (312.0, None)
    assert gs.peaks_for("NVIDIA B200") == (2250.0, 4500.0)
    assert gs.peaks_for("NVIDIA GB200") == (2500.0, 5000.0)
    assert gs.peaks_for("Some Future GPU") == (None, None) and gs.peaks_for(None) == (None, None)
    assert gs.pick_fp8_recipe("auto", (9, 0)) == "tensorwise" and gs.pick_fp8_recipe("auto", (10, 0)) == "mxfp8"
    assert gs.pick_fp8_recipe("delayed", (10, 0)) == "delayed"
    from dqo_megatron.config import ModelConfig, PrecisionConfig, RunConfig, TrainConfig
    from dqo_megatron.models import expected_parameter_count

    sizes = {"llama-1b": (1.0e9, 1.2e9), "qwen2-1.5b": (1.4e9, 1.6e9)}
    for name, (low, high) in sizes.items():
        model = ModelConfig(**gs.MODELS[name], seq_length=4096)
        assert low < expected_parameter_count(model) < high, name
        for seq in (2048, 4096):  # both presets fit every FP8 recipe's alignment
            RunConfig(model=model, precision=PrecisionConfig(fp8="mxfp8"), train=TrainConfig(seq_length=seq))


def test_help_and_dry_run(tmp_path):
    help_text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "--dry-run" in help_text.stdout and "MFU" in help_text.stdout
    out = tmp_path / "rows.json"
    run = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dry-run",
            "--setups",
            "dqo",
            "--precisions",
            "bf16",
            "fp8",
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "table.md"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    measured, skipped = [r for r in rows if "skipped" not in r], [r for r in rows if "skipped" in r]
    assert len(measured) == 1 and measured[0]["finite"] and measured[0]["tokens_per_s"] > 0
    assert measured[0]["model_flops_per_step"] > 0
    if not _module().torch.cuda.is_available():
        assert len(skipped) == 1 and "precision.fp8" in skipped[0]["skipped"]
    assert "| dqo |" in (tmp_path / "table.md").read_text()
