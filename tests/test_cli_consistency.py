"""The commands agree with each other: one meaning per short flag, one set of dtype spellings, overrides
blamed on the command line, dependency warnings filtered by message in one place."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from dqo_megatron.cli import app
from dqo_megatron.config import ConfigError, PrecisionConfig, RunConfig, load_config
from dqo_megatron.config.dtypes import canonical_dtype, torch_dtype_name

# Short flags whose long names differ by command but mean the same thing.
SAME_MEANING = {"-o": {"--output", "--output-prefix", "--output-dir", "--run-dir"}, "-n": {"--n", "--num-samples"}}


def _commands(group, prefix: str = ""):  # typer vendors click: duck typing, not isinstance
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield prefix + name, command


def _options():
    root = typer.main.get_command(app)
    for name, command in _commands(root):
        for param in command.params:
            if param.param_type_name == "option":
                yield name, param


def test_every_short_flag_means_one_thing_across_commands():
    meanings: dict[str, dict[str, str]] = {}
    for command, option in _options():
        longs = [o for o in option.opts if o.startswith("--")]
        for short in (o for o in option.opts if not o.startswith("--")):
            meanings.setdefault(short, {})[command] = longs[0]
    for short, used in meanings.items():
        longs = set(used.values())
        assert len(longs) == 1 or longs <= SAME_MEANING.get(short, set()), (short, used)
    assert meanings["-n"] == {"rollout": "--n", "eval": "--num-samples"}


@pytest.mark.parametrize("spelling", ["bf16", "bfloat16", "BF16"])
def test_every_dtype_option_takes_every_spelling(spelling):
    seen = []
    for command, option in _options():
        if option.name == "dtype" and command != "export":  # export's reaches conversion's own alias table
            value = option.callback(None, option, spelling)
            assert value == ("bfloat16" if command in ("rollout", "eval", "process-scores") else "bf16"), command
            seen.append(command)
    assert {"rollout", "eval", "process-scores", "value-analysis", "convert hf-to-megatron"} <= set(seen)
    assert PrecisionConfig(dtype=spelling).dtype == "bf16"


def test_dtype_names():
    assert [canonical_dtype(n) for n in ("float32", "fp16", "auto")] == ["fp32", "fp16", "auto"]
    assert torch_dtype_name("fp16") == "float16"
    with pytest.raises(ConfigError, match=r"precision.dtype='half': choose auto \| fp32"):
        canonical_dtype("half", "precision.dtype")


def test_a_bad_override_is_blamed_on_the_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train: {lr: 1.0e-4}\nprecision: {dtype: fp32}\n")
    for overrides, said in [
        (["train.lr=abc"], "command-line override 'train.lr=abc': train.lr: expected a number"),
        (["train.lrr=1"], "command-line override 'train.lrr=1': unknown config key 'train.lrr'"),
        (["train={lr: abc}"], "command-line override 'train={lr: abc}': train.lr: expected a number"),
        (["precision.dtype=half"], "command-line override 'precision.dtype=half': precision.dtype='half'"),
        (["precision.fp8=delayed"], f"{config} with command-line override(s) 'precision.fp8=delayed': "),
    ]:
        with pytest.raises(ConfigError) as exc:
            load_config(RunConfig, config, overrides)
        assert str(exc.value).startswith(said), str(exc.value)
    config.write_text("train: {lr: abc}\n")
    with pytest.raises(ConfigError, match=f"^{config}: train.lr: expected a number"):
        load_config(RunConfig, config, ["train.seed=3"])
    assert load_config(RunConfig, None, ["precision.dtype=bfloat16"]).precision.dtype == "bf16"


def test_known_dependency_warnings_are_filtered_by_message_only():
    code = (
        "import warnings, dqo_megatron\n"
        "warnings.warn('Please use DTensor instead and we are deprecating ShardedTensor.', FutureWarning)\n"
        "warnings.warn('Transformer Engine and Apex are not installed. Falling back to Torch optimizers.')\n"
        "warnings.warn('something else is deprecated', FutureWarning)\n"
    )
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "something else is deprecated" in proc.stderr
    assert "ShardedTensor" not in proc.stderr and "Falling back" not in proc.stderr
