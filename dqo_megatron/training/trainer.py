"""The train loop: DQO (or a baseline) on Megatron-Core, top to bottom.

    setup      process groups -> data -> models (policy, value, reference) -> DDP -> optimizer, schedule
    resume     from the newest intact checkpoint in run_dir (or the one named); run_dir locked
    loop       micro-batches -> Megatron's forward/backward schedule -> step (skipped if non-finite)
               -> log -> checkpoint every N steps and on SIGTERM
    finish     final checkpoint, summary

Everything that is per-rank (data shard, RNG, checkpoint shards) is handled by the pieces it calls;
rank 0 prints and writes TensorBoard.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from dqo_megatron.algorithms import get as get_algorithm
from dqo_megatron.config import ConfigError, RunConfig, save_config
from dqo_megatron.training.algorithms import derived_metrics, rl_forward_step
from dqo_megatron.training.flops import peak_tflops_per_device, step_flops
from dqo_megatron.training.init import load_initial_weights
from dqo_megatron.training.policy_value import (
    build_policy_value_chunks,
    finalize_policy_value_grads,
    pipeline_micro_batch_size,
)
from dqo_megatron.training.step import (
    attach_finalize,
    build_optimizer,
    build_scheduler,
    microbatch_iterators,
    train_step,
    wrap_with_ddp,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    """What a `train` call did (the same on every rank)."""

    start_step: int = 0
    """Step the run started from (> 0 after a resume)."""
    steps: int = 0
    """Optimizer steps completed (counting from 0, including the resumed part)."""
    losses: list[float] = field(default_factory=list)
    """Global loss of each step taken in this call."""
    metrics: list[dict] = field(default_factory=list)
    """All reduced metrics of each step taken in this call."""
    skipped_nonfinite: int = 0
    """Steps not applied because the loss was NaN/inf."""
    stopped_by: str = "done"
    """done | sigterm | nonfinite."""
    checkpoints: list[str] = field(default_factory=list)
    """Checkpoint directories written by this call."""
    best_evaluation: object = None
    """With eval.interval: the `Evaluation` (step, accuracy, checkpoint) the selection rule picks."""
    model_chunks: list = field(default_factory=list, repr=False)
    """This rank's trained `PolicyValueModel` chunks (for evaluation in the same process)."""


class TrainingDiverged(RuntimeError):
    """Training stopped: train.max_consecutive_nonfinite steps in a row had a non-finite loss."""

    user_facing = True
    """The message says what to change (the learning rate, the data): not a bug."""


class _SigtermFlag:
    """Turn SIGTERM into a flag the loop checks between steps (a preempted job saves, then exits)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self) -> "_SigtermFlag":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, *_args) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _any_rank(flag: bool) -> bool:
    from dqo_megatron.parallel import device_for_this_process

    value = torch.tensor([1.0 if flag else 0.0], device=device_for_this_process())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def train(run: RunConfig) -> TrainSummary:
    """Train `run.algorithm` on `run.data.train_prefix` for `run.train.train_steps` steps (collective).

    Holds `run.run_dir`'s lock for the whole run (`run_dir_lock`): a second run on the same run_dir
    refuses to start (RunDirInUse naming the holder) before it writes anything there."""
    from dqo_megatron import parallel
    from dqo_megatron.training.run_dir_lock import run_dir_lock

    if not run.data.train_prefix:
        raise ConfigError("data.train_prefix is not set: give the prefix written by `dqo-megatron preprocess`")
    _check_run_dir_apart(run)
    info = parallel.initialize(run.parallel, seed=run.train.seed)
    with run_dir_lock(run.run_dir):
        return _train(run, info)


def _check_run_dir_apart(run: RunConfig) -> None:
    """ConfigError when what the run writes (its checkpoints, which it prunes, its config, its logs)
    would overlap what it reads: the dataset, the init checkpoints, the eval problems."""
    from dqo_megatron.data.indexed import dataset_files
    from dqo_megatron.outputs import OutputError, check_apart

    if not run.run_dir:  # a run that writes nothing
        return
    root = Path(run.run_dir)
    written = [root / "checkpoints", root / "config.yaml", root / "tensorboard"]
    read = dataset_files(run.data.train_prefix) + [run.init.policy, run.init.reference, run.init.value,
                                                   run.eval.problems]  # fmt: skip
    try:
        check_apart(written, [p for p in read if p])
    except OutputError as exc:
        raise ConfigError(f"run_dir={run.run_dir}: {exc}") from None


def _train(run: RunConfig, info) -> TrainSummary:
    from dqo_megatron.data.dataset import TrajectoryDataset
    from dqo_megatron.training.data import MicroBatches
    from dqo_megatron.training.data_check import check_data_matches_model

    num_microbatches = run.num_microbatches(info.world_size)
    is_logger = info.rank == 0
    algorithm = get_algorithm(run.algorithm)

    # ---- data
    dataset = TrajectoryDataset(run.data.train_prefix)
    check_data_matches_model(dataset, run, log=is_logger)  # before any model is built
    has_ref = bool(dataset.manifest.get("ref_logprobs_filled", False))
    if run.data.reference == "data" and not has_ref:
        raise ConfigError(f"data.reference=data but {run.data.train_prefix} has no reference log-probs: run "
                          "`dqo-megatron annotate` first or set data.reference=model")  # fmt: skip
    if algorithm.needs_reference and not algorithm.reference_from_data and run.data.reference == "data":
        raise ConfigError(f"algorithm={run.algorithm} needs a reference model in the run (not all its rows are in "
                          "the data: KTO's mismatched prompt/response rows): set data.reference=model or auto")  # fmt: skip
    ref_from_data = has_ref and run.data.reference != "model" and algorithm.reference_from_data
    needs_ref_model = algorithm.needs_reference and not ref_from_data
    batches = MicroBatches(dataset, seq_length=run.train.seq_length, micro_batch_size=run.train.micro_batch_size,
                           dp_rank=info.dp_rank, dp_size=info.dp_size, seed=run.train.seed, shuffle=run.data.shuffle,
                           pad_id=run.data.pad_id, with_ref_logprobs=ref_from_data, device=info.device,
                           mode=algorithm.batch_mode, max_pairs_per_prompt=run.loss.dpo_max_pairs_per_prompt)  # fmt: skip
    if is_logger:
        behavior_share = float(dataset.has_behavior.mean()) if len(dataset) else 0.0
        logger.info("data: %d documents from %s; reference log-probs from %s; behavior log-probs from the data for "
                    "%.0f%% of documents, the reference's for the rest", len(dataset), run.data.train_prefix,
                    "the data" if ref_from_data else ("a reference model in the run" if needs_ref_model else "nowhere (not needed)"),
                    100 * behavior_share)  # fmt: skip

    # ---- models, optimizer, schedule
    chunks = build_policy_value_chunks(run, with_value=algorithm.needs_value, with_reference=needs_ref_model)
    initialized = load_initial_weights(run, chunks)
    if is_logger:
        logger.info("models: %s", initialized)
    t = run.train
    if t.distributed_optimizer and not torch.cuda.is_available():
        raise ConfigError("train.distributed_optimizer=true needs GPUs: Megatron's distributed optimizer "
                          "supports CUDA tensors only; set it to false on CPU")  # fmt: skip
    ddp = wrap_with_ddp(chunks, use_distributed_optimizer=t.distributed_optimizer)
    attach_finalize(ddp, finalize_policy_value_grads)
    learns_value = algorithm.needs_value
    optimizer = build_optimizer(ddp, lr=t.lr, min_lr=t.min_lr, clip_grad=t.clip_grad, weight_decay=t.weight_decay,
                                adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
                                value_lr=run.value.resolved_lr(t.lr), value_min_lr=run.value.resolved_min_lr(t.lr, t.min_lr),
                                use_distributed_optimizer=t.distributed_optimizer)  # fmt: skip
    value_warmup = run.value.warmup_steps if learns_value else 0
    scheduler = build_scheduler(optimizer, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.lr_warmup_steps,
                                decay_steps=t.train_steps, decay_style=t.lr_decay_style, weight_decay=t.weight_decay,
                                value_warmup_steps=run.value.lr_warmup_steps,
                                value_decay_style=run.value.lr_decay_style, policy_delay=value_warmup,
                                adam_betas=(t.adam_beta1, t.adam_beta2))  # fmt: skip
    # Policy and value are clipped by their own gradient norms (a large value gradient must not shrink
    # the policy's step); without a value network Megatron's own global clip is used.
    member_clips = ({"policy": t.clip_grad, "value": run.value.resolved_clip_grad(t.clip_grad)}
                    if learns_value else None)  # fmt: skip

    # ---- resume
    summary = TrainSummary()
    ckpt_root = Path(run.run_dir) / "checkpoints" if run.run_dir else None
    if run.run_dir and is_logger:
        save_config(run, run.run_dir)
    resume_from = None
    if ckpt_root is not None:
        from dqo_megatron.training import checkpointing

        # the newest intact checkpoint: damaged newer ones are reported (file, why) and skipped
        resumed = checkpointing.resume_checkpoint(ckpt_root, t.resume, ddp, optimizer, scheduler,
                                                  verify=t.verify_checkpoints)  # fmt: skip
        resume_from, extra = resumed if resumed is not None else (None, None)
    if resume_from is not None:
        summary.start_step = int(extra["step"])
        batches.load_state_dict(extra["data"])
        if is_logger:
            logger.info("resumed from %s at step %d", resume_from, summary.start_step)
    from dqo_megatron.eval.during_training import EvalSchedule

    evals = EvalSchedule(run, info.dp_rank, info.dp_size, is_logger, start=value_warmup,
                         resumed_at=summary.start_step if resume_from is not None else None)  # fmt: skip
    writer = _tensorboard(run) if is_logger else None
    wandb_run = _wandb(run) if is_logger else None
    rows = t.global_batch_size * algorithm.rows_per_item
    flops = step_flops(run.model, rows * t.seq_length, t.seq_length, value_network=bool(chunks[0].value),
                       reference_model=chunks[0].reference is not None)  # fmt: skip
    peak = peak_tflops_per_device(t.peak_tflops)
    metrics_file = open(Path(run.run_dir) / "metrics.jsonl", "a") if (is_logger and run.run_dir) else None

    # ---- loop
    step = summary.start_step
    pipeline_mbs = pipeline_micro_batch_size(ddp[0], t.micro_batch_size * algorithm.rows_per_item)
    nonfinite_in_a_row = 0
    started = time.perf_counter()
    with _SigtermFlag() as sigterm:
        save = partial(_save, ckpt_root, ddp=ddp, optimizer=optimizer, scheduler=scheduler, batches=batches, t=t)
        if evals.due(step):  # the starting policy (no critic warm-up): the baseline the picked checkpoint must beat
            _evaluate_and_save(evals, chunks, step, save if ckpt_root else None, writer, summary)
        while step < t.train_steps:
            mbs = batches.next_step(num_microbatches)
            data = microbatch_iterators(ddp, mbs)
            t0 = time.perf_counter()
            # the critic warm-up counts applied steps (the scheduler's), like the policy's LR schedule
            warming_up = scheduler.num_steps < value_warmup
            forward_step = partial(rl_forward_step, run, policy_weight=0.0 if warming_up else 1.0)
            result = train_step(ddp, optimizer, data, num_microbatches=num_microbatches, seq_length=t.seq_length,
                                micro_batch_size=pipeline_mbs, forward_step=forward_step, metric_key="loss",
                                member_clips=member_clips)  # fmt: skip
            result.metrics.update(derived_metrics(result.metrics))
            result.metrics.update({f"grad_norm_{m}": n for m, n in result.grad_norms.items()})
            seconds = time.perf_counter() - t0
            if result.update_successful:
                scheduler.step(increment=1)
                nonfinite_in_a_row = 0
            else:
                summary.skipped_nonfinite += 1
                nonfinite_in_a_row += 1
            step += 1
            summary.losses.append(result.loss)
            summary.metrics.append(result.metrics)
            if metrics_file is not None:
                # Full precision, one line a step (after a resume the steps since the checkpoint
                # appear again: readers keep the last line of a step).
                metrics_file.write(json.dumps({"step": step, "loss": result.loss, "grad_norm": result.grad_norm,
                                               "applied": result.update_successful, "seconds": seconds,
                                               **result.metrics}) + "\n")  # fmt: skip
                metrics_file.flush()
            if is_logger and (step % t.log_interval == 0 or step == t.train_steps):
                perf = {"tflops_per_device": flops / seconds / 1e12 / info.world_size if seconds > 0 else float("nan")}
                if peak:
                    perf["mfu"] = perf["tflops_per_device"] / peak
                _log_step(writer, wandb_run, step, t.train_steps, result, seconds, optimizer, started,
                          summary.start_step, perf)  # fmt: skip
            if nonfinite_in_a_row >= t.max_consecutive_nonfinite:
                summary.stopped_by = "nonfinite"
                break
            stop = _any_rank(sigterm.raised)
            if evals.due(step) and not stop:  # saves the evaluated step too
                _evaluate_and_save(evals, chunks, step, save if ckpt_root else None, writer, summary)
            elif ckpt_root is not None and (stop or (t.save_interval and step % t.save_interval == 0)):
                summary.checkpoints.append(str(save(step, keep_steps=evals.keep_steps())))
            if stop:
                summary.stopped_by = "sigterm"
                break
    summary.steps = step
    summary.model_chunks = chunks
    if ckpt_root is not None and summary.stopped_by == "done" and (not summary.checkpoints or not summary.checkpoints[-1].endswith(f"{step:08d}")):
        summary.checkpoints.append(str(save(step, keep_steps=evals.keep_steps())))
    summary.best_evaluation = evals.best
    if writer is not None:
        writer.close()
    if wandb_run is not None:
        wandb_run.finish()
    if metrics_file is not None:
        metrics_file.close()
    if summary.stopped_by == "nonfinite":
        raise TrainingDiverged(f"stopped after {t.max_consecutive_nonfinite} consecutive steps with a NaN/inf loss "
                               f"(step {step}); lower train.lr or check the data")  # fmt: skip
    return summary


def _evaluate_and_save(evals, chunks, step: int, save, writer, summary: TrainSummary) -> None:
    """Held-out accuracy of the policy now, the checkpoint holding it (kept if it is the best), the log."""
    evaluation = evals.evaluate(chunks[0].policy, step)
    if writer is not None:
        writer.add_scalar("eval/accuracy", evaluation.accuracy, step)
    checkpoint = None
    if save is not None:
        checkpoint = str(save(step, keep_steps=evals.keep_steps(evaluation)))
        summary.checkpoints.append(checkpoint)
    evals.record(evaluation, checkpoint)


def _save(root: Path, step: int, ddp, optimizer, scheduler, batches, t, keep_steps=()) -> Path:
    from dqo_megatron.training import checkpointing

    # a step whose loss was finite can still leave inf/NaN weights (a huge LR): never save those
    if _any_rank(not all(bool(torch.isfinite(p).all()) for chunk in ddp for p in chunk.parameters())):
        raise TrainingDiverged(f"the weights became non-finite (NaN/inf) by step {step}: not saved; lower train.lr "
                               "(or value.lr) and resume from the last checkpoint")  # fmt: skip
    # Every data-parallel rank is at the same sampler position (epoch, batch): one state serves all.
    return checkpointing.save_checkpoint(root, step, ddp, optimizer, scheduler,
                                         extra={"step": step, "data": batches.state_dict()},
                                         keep_last=t.keep_last_checkpoints, keep_steps=keep_steps)  # fmt: skip


def _tensorboard(run: RunConfig):
    if not run.run_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(Path(run.run_dir) / "tensorboard"))


def _wandb(run: RunConfig):
    if not run.train.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb_project is set but wandb is not installed: pip install wandb, or unset it") from None
    from dqo_megatron.config import to_dict

    return wandb.init(project=run.train.wandb_project, config=to_dict(run), dir=run.run_dir)


def _log_step(writer, wandb_run, step: int, total: int, result, seconds: float, optimizer, started: float,
              start_step: int, perf: dict) -> None:  # fmt: skip
    rate = result.tokens / seconds if seconds > 0 else float("nan")
    done = step - start_step
    eta = (time.perf_counter() - started) / max(done, 1) * (total - step)
    lrs = learning_rates(optimizer)
    shown = {k: v for k, v in result.metrics.items()
             if k in ("policy_loss", "value_loss", "loss", "nll", "value_explained_var", "grad_norm_policy",
                      "grad_norm_value")}  # fmt: skip
    mfu = f"  MFU {100 * perf['mfu']:.1f}%" if "mfu" in perf else ""
    logger.info(
        "step %d/%d  %s  grad-norm %.3f  lr %s  %.0f tok/s  %.2f TFLOP/s/dev%s  %.2f s/step  ETA %s%s",
        step, total, "  ".join(f"{k} {v:.4f}" for k, v in shown.items()), result.grad_norm,
        "/".join(f"{lr:.2e}" for lr in lrs.values()), rate, perf["tflops_per_device"], mfu, seconds, _hms(eta),
        "" if result.update_successful else "  (skipped: non-finite loss)",
    )  # fmt: skip
    if wandb_run is not None:
        wandb_run.log({**{f"train/{k}": v for k, v in result.metrics.items()}, "train/grad_norm": result.grad_norm,
                       "perf/tokens_per_second": rate, **{f"perf/{k}": v for k, v in perf.items()},
                       **{f"lr/{k}": lr for k, lr in lrs.items()}}, step=step)  # fmt: skip
    if writer is None:
        return
    for name, value in perf.items():
        writer.add_scalar(f"perf/{name}", value, step)
    for name, value in result.metrics.items():
        if math.isfinite(value):
            writer.add_scalar(f"train/{name}", value, step)
    writer.add_scalar("train/grad_norm", result.grad_norm, step)
    writer.add_scalar("perf/tokens_per_second", rate, step)
    writer.add_scalar("perf/seconds_per_step", seconds, step)
    for name, lr in lrs.items():
        writer.add_scalar(f"lr/{name}", lr, step)


def learning_rates(optimizer) -> dict[str, float]:
    """{"policy": lr, "value": lr} now (the value entry only when the run learns a value network)."""
    from dqo_megatron.training.step import MEMBER_KEY

    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        out.setdefault(group.get(MEMBER_KEY, "policy"), group["lr"])
    return dict(sorted(out.items()))


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
