"""Initial weights of a run's models from `dqo-megatron convert` checkpoints (any TP/PP layout)."""

from __future__ import annotations

from pathlib import Path

from dqo_megatron.config import ConfigError, ModelConfig, RunConfig, to_dict


def check_same_model(run_model: ModelConfig, ckpt_model: ModelConfig, where: str) -> None:
    """ConfigError listing every `model.*` field where the run and the checkpoint disagree."""
    ours, theirs = to_dict(run_model), to_dict(ckpt_model)
    diffs = [f"model.{k}={ours[k]!r} (checkpoint: {theirs[k]!r})" for k in ours if ours[k] != theirs.get(k)]
    if diffs:
        raise ConfigError(
            f"{where} was converted for another model: "
            + "; ".join(diffs)
            + ". Copy the checkpoint's model_config.yaml into the run config's `model` section"
        )


def _load_member(chunks: list, member: str, path: str, run: RunConfig) -> None:
    from dqo_megatron.conversion.megatron_io import WEIGHTS_DIR, load_chunks, read_metadata
    from dqo_megatron.models.value_head import unwrap_gpt

    model, info = read_metadata(path)
    check_same_model(run.model, model, f"init checkpoint {path}")
    gpts = [getattr(chunk, member) for chunk in chunks]
    # A value checkpoint (`convert --value`) stores its head as the GPT's `value_head` submodule; ours
    # lives on the PolicyValueModel: lend it to the GPT for the load.
    lend = member == "value" and info.kind == "value"
    if member == "value" and info.kind != "value" and info.kind != "policy":
        raise ConfigError(f"init.value={path}: checkpoint kind {info.kind!r}, expected policy or value")
    if lend:
        for chunk, gpt in zip(chunks, gpts):
            if chunk.value_head is not None:
                unwrap_gpt(gpt).value_head = chunk.value_head
    try:
        load_chunks(gpts, Path(path) / WEIGHTS_DIR, verify=run.train.verify_checkpoints)
    finally:
        if lend:
            for gpt in gpts:
                inner = unwrap_gpt(gpt)
                if "value_head" in inner._modules:
                    del inner._modules["value_head"]


def load_initial_weights(run: RunConfig, chunks: list) -> str:
    """Fill the members of `PolicyValueModel` chunks from `run.init`; returns what was done, for the log.

    Collective (every rank loads its shards). Without `init.policy` the models keep their random init.
    """
    if not run.init.policy:
        if run.init.reference or run.init.value:
            raise ConfigError("init.reference / init.value need init.policy (or leave them unset)")
        return f"random initialization (train.seed={run.train.seed})"
    done = [f"policy from {run.init.policy}"]
    _load_member(chunks, "policy", run.init.policy, run)
    if chunks[0].reference is not None:
        _load_member(chunks, "reference", run.init.reference or run.init.policy, run)
        done.append(f"reference from {run.init.reference or run.init.policy}")
    if chunks[0].value is not None:
        _load_member(chunks, "value", run.init.value or run.init.policy, run)
        done.append(
            f"value network from {run.init.value or run.init.policy}"
            + ("" if run.init.value else f" (head: init std {run.value.head_init_std})")
        )
    return "; ".join(done)
