"""The megatron-core releases we run on: a clear error outside the tested range (issue #20), and no
deprecation noise from settings we never use (the CUDA-graph scope), on whichever release is installed."""

from __future__ import annotations

import warnings

import pytest

from dqo_megatron.compat import megatron_api
from dqo_megatron.compat.megatron_api import UnsupportedMegatronVersion, check_megatron_version
from dqo_megatron.config import ConfigError


@pytest.mark.parametrize("version", ["0.16.1", "0.17.0", "0.18.2", "0.19.2", "0.19.10", "0.19.0rc0"])
def test_tested_releases_pass(version):
    check_megatron_version(version)


def test_the_installed_release_is_inside_the_range():
    check_megatron_version()  # CI's two legs: 0.16.1 (3.11) and 0.19.2 (3.12)


@pytest.mark.parametrize("version", ["0.15.3", "0.16.0", "0.20.0", "0.20.0rc1", "1.0.0", "not-a-version"])
def test_releases_outside_the_range_are_refused_in_one_line(version, monkeypatch):
    monkeypatch.delenv(megatron_api.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(UnsupportedMegatronVersion) as exc:
        check_megatron_version(version)
    message = str(exc.value)
    assert isinstance(exc.value, ConfigError)  # every command prints it as its one-line error
    assert "\n" not in message and f"megatron-core {version} is outside" in message
    assert "pip install 'megatron-core>=0.16.1,<0.20'" in message and megatron_api.ALLOW_UNTESTED_ENV in message


def test_the_override_turns_the_refusal_into_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(megatron_api.ALLOW_UNTESTED_ENV, "1")
    with caplog.at_level("WARNING", logger=megatron_api.__name__):
        check_megatron_version("0.21.0")
    assert "megatron-core 0.21.0 is outside" in caplog.text and "running anyway" in caplog.text


def test_parallel_setup_refuses_an_untested_release_before_touching_megatron(monkeypatch):
    from dqo_megatron import parallel
    from dqo_megatron.config import ParallelConfig

    monkeypatch.delenv(megatron_api.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setattr(megatron_api, "megatron_version", lambda: "0.25.0")
    with pytest.raises(UnsupportedMegatronVersion, match="megatron-core 0.25.0 is outside"):
        parallel.initialize(ParallelConfig())


def test_our_transformer_config_warns_about_no_cuda_graph_scope():
    from dqo_megatron.config import ModelConfig, ParallelConfig
    from dqo_megatron.models.builder import transformer_config

    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = transformer_config(model, ParallelConfig(), backend="local")
    assert not [w for w in caught if "cuda_graph" in str(w.message) or "full scope" in str(w.message)]
    assert config.cuda_graph_impl == "none"  # graphs stay off: only the deprecated spelling is gone


def _build_and_capture_warnings() -> str:
    import logging

    from dqo_megatron import parallel
    from dqo_megatron.config import ModelConfig, ParallelConfig
    from dqo_megatron.models.builder import build_gpt_model

    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    parallel.initialize(ParallelConfig())
    build_gpt_model(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4), ParallelConfig())
    return "\n".join(records)


def test_building_a_model_logs_no_gpt_model_deprecation():
    """0.19 logs "GPTModel IS DEPRECATED" per construction; we build GPTModel on purpose (HybridModel has
    no CPU path) and say so once in our own words instead. (In a rank: no process group in pytest's.)"""
    from megatron.core.models.gpt import GPTModel

    from tests.helpers.distributed import run_distributed

    assert megatron_api.gpt_model_class() is GPTModel
    (logged,) = run_distributed(_build_and_capture_warnings, 1)
    assert "IS DEPRECATED" not in logged
