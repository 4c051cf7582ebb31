"""Config: YAML + overrides, type checks, impossible layouts rejected with messages naming the fields."""

from __future__ import annotations

import pytest
import yaml

from dqo_megatron.config import ConfigError, ModelConfig, ParallelConfig, RunConfig, load_config, save_config, to_dict


def _load(*overrides, path=None):
    return load_config(RunConfig, path, list(overrides))


@pytest.mark.parametrize(
    "overrides, must_name",
    [
        (
            ["parallel.tensor_model_parallel_size=3"],
            ["parallel.tensor_model_parallel_size=3", "model.num_attention_heads"],
        ),
        (
            [
                "model.num_attention_heads=8",
                "model.num_query_groups=2",
                "model.hidden_size=64",
                "parallel.tensor_model_parallel_size=4",
            ],
            ["model.num_query_groups=2"],
        ),
        (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel", "tensor_model_parallel_size"]),
        (["parallel.pipeline_model_parallel_size=3"], ["model.num_layers=2", "pipeline_model_parallel_size=3"]),
        (
            ["parallel.context_parallel_size=2", "train.seq_length=30"],
            ["train.seq_length=30", "context_parallel_size=2"],
        ),
        (["model.num_attention_heads=3", "model.num_query_groups=2"], ["num_attention_heads=3", "num_query_groups=2"]),
        (["train.seq_length=512"], ["train.seq_length=512", "model.seq_length=128"]),
        (["model.family=mistral"], ["model.family", "gemma", "llama", "qwen2"]),
        (["model.hidden_size=abc"], ["model.hidden_size", "integer"]),
        (["model.hidden_sise=64"], ["model.hidden_sise", "did you mean 'hidden_size'"]),
        (["precision.fp8_param=true"], ["precision.fp8_param", "precision.fp8"]),
        (
            ["parallel.virtual_pipeline_model_parallel_size=2"],
            ["virtual_pipeline_model_parallel_size", "pipeline_model_parallel_size >= 2"],
        ),
        (["model.kv_channels=8"], ["model.kv_channels=8", "gemma"]),
    ],
)
def test_impossible_configs_name_the_fields(overrides, must_name):
    with pytest.raises(ConfigError) as info:
        _load(*overrides)
    for fragment in must_name:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"


def test_world_size_must_divide():
    run = _load("parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2")
    with pytest.raises(ConfigError, match="world size 6 is not divisible .*= 4"):
        run.validate_layout(6)
    assert run.validate_layout(8) == 2
    with pytest.raises(
        ConfigError, match="global_batch_size=4 must be a multiple of train.micro_batch_size=1 x data-parallel size 8"
    ):
        run.validate_layout(32)
    assert run.num_microbatches(8) == 2


def test_yaml_overrides_and_written_back(tmp_path):
    source = tmp_path / "run.yaml"
    source.write_text(yaml.safe_dump({"model": {"family": "qwen2", "num_layers": 4}, "train": {"lr": "3e-5"}}))
    run = _load("model.num_layers=6", "parallel.tensor_model_parallel_size=2", path=source)
    assert run.model.num_layers == 6 and run.train.lr == 3e-5
    assert run.model.rotary_base == 1e6 and run.model.add_qkv_bias  # family defaults resolved
    written = save_config(run, tmp_path / "run_dir")
    again = load_config(RunConfig, written)
    assert to_dict(again) == to_dict(run)
    assert yaml.safe_load(written.read_text())["model"]["tie_embeddings"] is False  # resolved, not None
    assert not list((tmp_path / "run_dir").glob(".*tmp"))  # atomic write left no temporary file


def test_yaml_boolean_spellings_of_string_choices(tmp_path):
    # YAML 1.1 reads `off` as False: a string choice spelled that way must still mean "off"
    assert _load("loss.is_level=off").loss.is_level == "off"
    source = tmp_path / "run.yaml"
    source.write_text("loss:\n  is_level: off\n")
    assert _load(path=source).loss.is_level == "off"
    with pytest.raises(ConfigError, match="loss.is_level"):
        _load("loss.is_level=yes")  # no "on"/"yes"/"true" choice: still an error naming the field


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        _load(path=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        _load(path=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        _load("model.num_layers")


def test_every_field_has_a_docstring():
    import ast
    import importlib
    import inspect
    import pkgutil

    import dqo_megatron.config as config

    # Every module of the package: the sections live in several (config/schema.py only re-exports them).
    modules = [importlib.import_module(f"{config.__name__}.{m.name}") for m in pkgutil.iter_modules(config.__path__)]
    nodes = [node for module in modules for node in ast.parse(inspect.getsource(module)).body]
    assert sum(isinstance(node, ast.ClassDef) and node.name == "RunConfig" for node in nodes) == 1
    for node in nodes:
        if isinstance(node, ast.ClassDef):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    following = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant), (
                        f"{node.name}.{stmt.target.id} has no docstring"
                    )


def test_valid_layouts_pass():
    ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    RunConfig(
        model=ModelConfig(num_layers=4),
        parallel=ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
    )


KNOWN_SIZES = {"qwen2-7b.yaml": 7_615_616_512, "gemma-7b.yaml": 8_537_680_896, "llama3-8b.yaml": 8_030_261_248}


def test_example_configs_load_validate_and_have_the_published_sizes():
    from pathlib import Path

    from dqo_megatron.models import expected_parameter_count

    configs = sorted(Path(__file__).resolve().parent.parent.joinpath("examples", "configs").glob("*.yaml"))
    assert configs, "no example configs found"
    for path in configs:
        run = load_config(RunConfig, path)
        run.validate_layout(run.parallel.model_parallel_size * 2)
        if path.name in KNOWN_SIZES:
            assert expected_parameter_count(run.model) == KNOWN_SIZES[path.name], path.name


def test_configuration_reference_is_current():
    from pathlib import Path

    from dqo_megatron.config.reference import markdown_reference

    committed = Path(__file__).resolve().parent.parent.joinpath("docs", "configuration.md").read_text()
    assert committed == markdown_reference(), (
        "docs/configuration.md is stale: run python -m dqo_megatron.config.reference > docs/configuration.md"
    )
