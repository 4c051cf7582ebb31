"""train.packing's default (issue #21): unset = auto, on for the local layer spec (tested equal to
unpacked in every layout), off on Transformer Engine's (its THD path has not run on a GPU); an
explicit true / false always wins; resolved once at start, logged and written into the run's config."""

from __future__ import annotations

import logging

import pytest

from dqo_megatron.config import ConfigError, RunConfig, TrainConfig
from dqo_megatron.training.checkpointer import _note_packing_change
from dqo_megatron.training.policy_value import with_resolved_packing


def test_the_default_is_auto_on_for_the_local_spec_and_off_on_transformer_engine():
    t = TrainConfig()
    assert t.packing is None
    assert t.resolved_packing("local") is True
    assert t.resolved_packing("te") is False


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("spec", ["local", "te"])
def test_an_explicit_choice_wins(spec, explicit):
    assert TrainConfig(packing=explicit).resolved_packing(spec) is explicit


def test_micro_batch_tokens_needs_packing_that_auto_gives_only_on_the_local_spec():
    t = TrainConfig(seq_length=64, micro_batch_tokens=256)
    assert t.resolved_packing("local") is True
    with pytest.raises(ConfigError, match="train.packing=true"):
        t.resolved_packing("te")
    assert TrainConfig(seq_length=64, micro_batch_tokens=256, packing=True).resolved_packing("te") is True
    with pytest.raises(ConfigError, match="needs train.packing=true"):
        TrainConfig(seq_length=64, micro_batch_tokens=256, packing=False)


@pytest.mark.parametrize("spec, expected", [("local", True), ("te", False)])
def test_the_run_is_resolved_once_by_the_layer_spec_it_is_built_with(monkeypatch, caplog, spec, expected):
    import dqo_megatron.models as models

    monkeypatch.setattr(models, "select_backend", lambda requested="auto": spec)
    run = RunConfig()
    with caplog.at_level(logging.INFO, logger="dqo_megatron.training.policy_value"):
        resolved = with_resolved_packing(run, log=True)
    assert resolved.train.packing is expected and run.train.packing is None  # a copy: config.yaml records it
    assert f"packing: {'on' if expected else 'off'} (auto" in caplog.text
    for explicit in (True, False):
        kept = with_resolved_packing(RunConfig(train=TrainConfig(packing=explicit)))
        assert kept.train.packing is explicit


def test_a_resume_with_the_other_choice_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="dqo_megatron.training.checkpointer"):
        _note_packing_change(None, True)  # a checkpoint from before the key: nothing to compare
        _note_packing_change(True, True)
        assert caplog.text == ""
        _note_packing_change(False, True)
    assert "the checkpoint was written with false" in caplog.text
