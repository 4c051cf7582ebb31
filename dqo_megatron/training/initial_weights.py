"""Initial weights of a run's models from `dqo-megatron convert` checkpoints (any TP/PP layout)."""

from __future__ import annotations

from pathlib import Path

from dqo_megatron.config import ConfigError, ModelConfig, RunConfig, to_dict


def check_same_model(run_model: ModelConfig, ckpt_model: ModelConfig, where: str) -> None:
    """ConfigError listing every `model.*` field where the run cannot start from the checkpoint.

    Two fields are the run's to choose: `make_vocab_size_divisible_by` may differ (the loaded embedding
    rows are the checkpoint's, and rows the run pads beyond `vocab_size` are zero: Megatron loads
    embeddings with `allow_shape_mismatch`), and `seq_length` may be shorter than the checkpoint's (RoPE
    has no position weights; longer would be positions the model was not converted for). Every other
    field must be equal."""
    ours, theirs = to_dict(run_model), to_dict(ckpt_model)
    diffs = []
    for key in ours:
        if key == "make_vocab_size_divisible_by" or ours[key] == theirs.get(key):
            continue
        if key == "seq_length" and isinstance(theirs.get(key), int):
            if ours[key] <= theirs[key]:
                continue
            diffs.append(
                f"model.seq_length={ours[key]} is longer than the checkpoint's {theirs[key]} (use at most that, "
                f"or convert again with `convert hf-to-megatron --seq-length {ours[key]}`, which the HF config's "
                "max_position_embeddings must allow)"
            )
            continue
        diffs.append(f"model.{key}={ours[key]!r} (checkpoint: {theirs.get(key)!r})")
    if diffs:
        raise ConfigError(
            f"{where} was converted for another model: "
            + "; ".join(diffs)
            + ". Copy the checkpoint's model_config.yaml into the run config's `model` section (seq_length may be "
            "shorter, make_vocab_size_divisible_by any)"
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
