"""Rank bodies for the checkpointing tests: train a tiny model (Adam + LR schedule) under a layout,
save / load / resume at given steps, and report losses, parameters and RNG draws.

Step ``i`` (0-based) always trains on the global batch ``make_batch(..., seed=i)``, so a resumed run
sees exactly the batches of an uninterrupted one. Nothing in the step is random (no dropout), so on
CPU a correct resume reproduces the losses bit for bit; the RNG draws after a save / after a load
check the RNG restore separately.
"""

from __future__ import annotations

import os
import random
import signal
from functools import partial

import numpy as np
import torch

from dqo_megatron import parallel
from dqo_megatron.config import LossConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig, ValueConfig
from dqo_megatron.models import build_model_chunks
from dqo_megatron.training import checkpoint_commit, checkpointing
from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, build_scheduler, wrap_with_ddp
from dqo_megatron.training.step import lm_forward_step, microbatch_iterators, reduce_metrics, train_step
from tests.helpers.layouts import make_batch, micro_batches

SEQ, GLOBAL_BATCH, VOCAB, MBS = 32, 4, 256, 1
LR = 3e-3
SEED = 1234
MODEL = ModelConfig(
    family="llama",
    num_layers=4,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=VOCAB,
    seq_length=SEQ,
)
PROBE_SEED = 99  # a batch never trained on: the cross-layout forward check


def shutdown_writer_manager() -> None:
    """Stop the multiprocessing manager dist_checkpointing starts on the first save of a process.

    Forked test ranks end with os._exit, which skips the manager's own shutdown hook: without this each
    saving rank would leave an orphaned manager process behind.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = filesystem_async._results_queue
    if queue is not None:
        filesystem_async._results_queue = None
        manager = getattr(queue, "_manager", None)
        if manager is not None:
            manager.shutdown()


def draw_rng() -> dict:
    """One draw from the python / numpy / torch generators (advances them) and the tracker states."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    # The tracker's states themselves (drawing inside `fork()` on CPU swaps the CPU generator and
    # makes Megatron log a warning).
    tracker = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    return {"python": random.random(), "numpy": float(np.random.rand()), "torch": torch.rand(4), "tracker": tracker}


def lm_setup(par: dict):
    """Tiny llama under layout `par`: DDP, Adam, cosine schedule with warmup."""
    cfg = ParallelConfig(**par)
    info = parallel.initialize(cfg, seed=SEED)
    chunks = build_model_chunks(MODEL, cfg)
    ddp = wrap_with_ddp(chunks)
    attach_finalize(ddp)
    optimizer = build_optimizer(ddp, lr=LR, clip_grad=1.0, optimizer="adam")
    scheduler = build_scheduler(optimizer, lr=LR, min_lr=LR / 10, warmup_steps=2, decay_steps=8, decay_style="cosine")
    return info, chunks, ddp, optimizer, scheduler


def _data(ddp, mbs):
    return microbatch_iterators(ddp, mbs)


def lm_train_step(info, ddp, optimizer, scheduler, step: int) -> float:
    mbs = micro_batches(make_batch(VOCAB, GLOBAL_BATCH, SEQ, seed=step), info.dp_rank, info.dp_size, MBS)
    result = train_step(
        ddp,
        optimizer,
        _data(ddp, mbs),
        num_microbatches=len(mbs),
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_step=lm_forward_step,
    )
    scheduler.step(increment=1)
    return result.loss


def _per_token_forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(out, non_loss_data=False):
        if non_loss_data:
            return out.detach().clone()
        mask = batch["loss_mask"].float()
        total = (out.float() * mask).sum()
        return total, mask.sum().to(torch.int), {"lm loss": torch.stack([total.detach(), mask.sum()])}

    return output, loss_func


def probe(info, ddp) -> dict:
    """Forward only on the probe batch: global loss (every rank) and per-token -log p ``[rows, SEQ]``
    of this DP rank's rows (last pipeline stage only, else None)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mbs = micro_batches(make_batch(VOCAB, GLOBAL_BATCH, SEQ, seed=PROBE_SEED), info.dp_rank, info.dp_size, MBS)
    run = partial(
        get_forward_backward_func(),
        forward_step_func=_per_token_forward_step,
        model=list(ddp),
        num_microbatches=len(mbs),
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=True,
    )
    with torch.no_grad():
        losses = run(data_iterator=_data(ddp, mbs))
        per_token = run(data_iterator=_data(ddp, mbs), collect_non_loss_data=True)
    loss_sum, count = reduce_metrics(losses)["lm loss"]
    last = ps.is_pipeline_last_stage()
    return {"loss": loss_sum / count, "per_token": torch.cat(per_token) if last else None, "dp_rank": info.dp_rank}


def local_params(chunks) -> dict:
    return {f"{i}.{n}": p.detach().clone() for i, c in enumerate(chunks) for n, p in c.named_parameters()}


def lm_body(par: dict, plan: dict) -> dict:
    """Train under layout `par` following `plan`:

    load (path) / load_optimizer / load_scheduler / restore_rng: resume from a checkpoint first;
    until: train up to this step; save_root + save_at (steps): save after those steps;
    probe_at (steps, 0 = right after setup/load): forward-only probe results.
    """
    info, chunks, ddp, optimizer, scheduler = lm_setup(par)
    out: dict = {"losses": {}, "probes": {}, "rng": {}, "rank": info.rank, "saved": []}
    step = 0
    try:
        if plan.get("load"):
            extra = checkpointing.load_checkpoint(
                plan["load"],
                ddp,
                optimizer if plan.get("load_optimizer", True) else None,
                scheduler if plan.get("load_scheduler", True) else None,
                restore_rng=plan.get("restore_rng", True),
            )
            step = int(extra["step"])
            out["extra"] = extra
            out["rng"]["load"] = draw_rng()
            out["rng_warned"] = checkpointing._warned_rng
        if 0 in plan.get("probe_at", ()):
            out["probes"][step] = probe(info, ddp)
        while step < plan["until"]:
            out["losses"][step + 1] = lm_train_step(info, ddp, optimizer, scheduler, step)
            step += 1
            if step in plan.get("save_at", ()):
                extra = {
                    "step": step,
                    "consumed_samples": step * GLOBAL_BATCH,
                    "metrics": {"loss": out["losses"][step]},
                    "sampler": {"epoch": 0, "position": step},
                }
                path = checkpointing.save_checkpoint(
                    plan["save_root"], step, ddp, optimizer, scheduler, extra=extra, keep_last=plan.get("keep_last", 3)
                )
                out["saved"].append(str(path))
                out["rng"][step] = draw_rng()
                out.setdefault("params_at", {})[step] = local_params(chunks)
            if step in plan.get("probe_at", ()):
                out["probes"][step] = probe(info, ddp)
        out["params"] = local_params(chunks)
        out["lr"] = optimizer.param_groups[0]["lr"]
    finally:
        shutdown_writer_manager()
    return out


# ------------------------------------------------------------------------------ crash-in-save body
def crash_body(root: str, stage: str, record: str) -> None:
    """Single rank: train 1 step, save step 1 (good), train 1 more, then start saving step 2 and die
    by SIGKILL at `stage` of the save. Writes what the good checkpoint must hold to `record` first."""
    info, chunks, ddp, optimizer, scheduler = lm_setup({})
    lm_train_step(info, ddp, optimizer, scheduler, 0)
    checkpointing.save_checkpoint(root, 1, ddp, optimizer, scheduler, extra={"step": 1})
    torch.save({"params": local_params(chunks)}, record)
    lm_train_step(info, ddp, optimizer, scheduler, 1)

    def die(original):
        def wrapper(*args, **kwargs):
            if stage.startswith("after_"):
                original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        return wrapper

    if stage == "during_write":
        # The shard files are written (by torch_dist's forked writers, which have finished), the
        # global .metadata / metadata.json not yet. (Killing the rank while writers are still busy
        # would leave them orphaned and stuck on queue locks: in a real crash they die with it.)
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async.FileSystemWriterAsync.retrieve_write_results = die(None)
    else:
        target = {"before_rename": "_publish", "after_rename": "_publish"}[stage]
        setattr(checkpoint_commit, target, die(getattr(checkpoint_commit, target)))
    checkpointing.save_checkpoint(root, 2, ddp, optimizer, scheduler, extra={"step": 2})
    raise AssertionError(f"the save at stage {stage} should have been killed")


# ----------------------------------------------------------------------------- policy + value body
PV_MODEL = ModelConfig(
    family="llama",
    num_layers=2,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=VOCAB,
    seq_length=SEQ,
)


def pv_run(par: dict) -> RunConfig:
    return RunConfig(
        model=PV_MODEL,
        parallel=ParallelConfig(**par),
        train=TrainConfig(micro_batch_size=1, global_batch_size=GLOBAL_BATCH, seq_length=SEQ),
        algorithm="dqo",
        loss=LossConfig(beta=0.5, lam=1.0),
        value=ValueConfig(mode="separate"),
    )


def pv_body(par: dict, plan: dict) -> dict:
    """DQO with policy + separate value network + value head (+ a reference model when
    ``plan["reference"]``): same plan keys as `lm_body` (no probes)."""
    from dqo_megatron.training.algorithms import rl_forward_step
    from dqo_megatron.training.policy_value import (
        build_policy_value_chunks,
        finalize_policy_value_grads,
        pipeline_micro_batch_size,
    )
    from tests.helpers.rl_layouts import make_rl_batch

    run = pv_run(par)
    info = parallel.initialize(run.parallel, seed=SEED)
    chunks = build_policy_value_chunks(run, with_value=True, with_reference=plan.get("reference", False))
    with torch.no_grad():  # a zero head hides value-path bugs (V = 0 whatever the head's state)
        for c in chunks:
            if c.value_head is not None:
                c.value_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
                c.value_head.bias.fill_(0.1)
    ddp = wrap_with_ddp(chunks)
    attach_finalize(ddp, finalize_policy_value_grads)
    optimizer = build_optimizer(ddp, lr=LR, clip_grad=1.0, optimizer="adam", value_lr=2 * LR)
    scheduler = build_scheduler(optimizer, lr=LR, min_lr=LR / 10, warmup_steps=1, decay_steps=8, decay_style="cosine")
    pmbs = pipeline_micro_batch_size(ddp[0], MBS)
    out: dict = {"losses": {}, "saved": []}
    step = 0
    try:
        if plan.get("bad_load"):  # a checkpoint of another model: every rank must get the errors
            for name, opt in (("model", None), ("optimizer", optimizer)):
                try:
                    checkpointing.load_checkpoint(plan["bad_load"], ddp, opt, None)
                except checkpointing.CheckpointError as err:
                    out[f"bad_load_{name}"] = str(err)
        if plan.get("load"):
            step = int(checkpointing.load_checkpoint(plan["load"], ddp, optimizer, scheduler)["step"])
        while step < plan["until"]:
            batch = make_rl_batch(VOCAB, GLOBAL_BATCH, SEQ, with_ref=not plan.get("reference", False), seed=step)
            mbs = micro_batches(batch, info.dp_rank, info.dp_size, MBS)
            result = train_step(
                ddp,
                optimizer,
                _data(ddp, mbs),
                num_microbatches=len(mbs),
                seq_length=SEQ,
                micro_batch_size=pmbs,
                forward_step=partial(rl_forward_step, run),
                metric_key="loss",
            )
            scheduler.step(increment=1)
            step += 1
            out["losses"][step] = result.loss
            if step in plan.get("save_at", ()):
                out["saved"].append(
                    str(
                        checkpointing.save_checkpoint(
                            plan["save_root"], step, ddp, optimizer, scheduler, extra={"step": step}
                        )
                    )
                )
        out["params"] = local_params(chunks)
        out["keys"] = sorted(chunks[0].sharded_state_dict().keys())
    finally:
        shutdown_writer_manager()
    return out
