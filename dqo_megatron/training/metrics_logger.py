"""The train loop's metrics logger: one place for the console, ``run_dir/metrics.jsonl``, TensorBoard
(``run_dir/tensorboard``) and W&B (`train.wandb_project`). Rank 0 writes; on other ranks every call
does nothing. Closed in one place (`close`, or the `with` block).

TensorBoard and W&B get the same scalars under the same tags (`step_scalars`; `FIXED_TAGS` plus
``train/<metric>`` for each of the algorithm's metrics), both every `train.log_interval` steps.
A run resumed from a checkpoint continues its W&B run: the id is kept in ``run_dir/wandb_run_id``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from dqo_megatron.config import ConfigError, RunConfig
from dqo_megatron.training.flops import peak_tflops_per_device, step_flops

logger = logging.getLogger(__name__)

CONSOLE_METRICS = (
    "policy_loss",
    "value_loss",
    "loss",
    "nll",
    "value_explained_var",
    "grad_norm_policy",
    "grad_norm_value",
)
"""The metrics a console line shows (all of them go to metrics.jsonl, TensorBoard and W&B)."""

FIXED_TAGS = (
    "train/grad_norm",
    "perf/tokens_per_second",
    "perf/seconds_per_step",
    "perf/tflops_per_device",
    "perf/mfu",
    "lr/policy",
    "lr/value",
    "eval/accuracy",
)
"""Tags logged besides ``train/<metric>`` (perf/mfu only with a known peak, lr/value only with a value
network, eval/accuracy only with eval.interval); docs/training.md lists them all."""

WANDB_ID_FILE = "wandb_run_id"
"""File in run_dir holding the W&B run id, so that a resumed run logs into the same W&B run."""
WANDB_STEP = "trainer/step"
"""The W&B metric every other one is plotted against (the optimizer step)."""


class MetricsLogger:
    """Logs each step (metrics.jsonl every step; console, TensorBoard, W&B every `train.log_interval`
    steps and at the last one) and each held-out evaluation."""

    def __init__(self, run: RunConfig, parts, start_step: int = 0) -> None:
        t = run.train
        self.total = t.train_steps
        self.log_interval = t.log_interval
        self.world_size = parts.info.world_size
        self.optimizer = parts.optimizer
        self.start_step = start_step
        self.is_logger = parts.is_logger
        self.writer = _tensorboard(run) if self.is_logger else None
        self.wandb_run = _wandb(run, start_step) if self.is_logger else None
        rows = t.global_batch_size * parts.algorithm.rows_per_item  # one per document: scaled per step by packing
        self.flops = step_flops(
            run.model,
            rows * t.seq_length,
            t.seq_length,
            value_network=bool(parts.chunks[0].value),
            reference_model=parts.chunks[0].reference is not None,
        )
        self.peak = peak_tflops_per_device(t.peak_tflops)
        self.metrics_file = open(Path(run.run_dir) / "metrics.jsonl", "a") if (self.is_logger and run.run_dir) else None
        self.started = time.perf_counter()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_step(self, step: int, result, seconds: float) -> None:
        """One optimizer step (`train_step`'s result, its wall time)."""
        if self.metrics_file is not None:
            # Full precision, one line a step (after a resume the steps since the checkpoint
            # appear again: readers keep the last line of a step).
            self.metrics_file.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": result.loss,
                        "grad_norm": result.grad_norm,
                        "applied": result.update_successful,
                        "seconds": seconds,
                        "document_tokens": result.document_tokens,
                        **result.metrics,
                    }
                )
                + "\n"
            )
            self.metrics_file.flush()
        if self.is_logger and (step % self.log_interval == 0 or step == self.total):
            flops = self.flops * _computed_row_share(result.metrics)
            perf = {"tflops_per_device": flops / seconds / 1e12 / self.world_size if seconds > 0 else float("nan")}
            if self.peak:
                perf["mfu"] = perf["tflops_per_device"] / self.peak
            self._log_step(step, result, seconds, perf)

    def log_eval(self, step: int, evaluation) -> None:
        """A held-out evaluation (its console line and evals.jsonl are `EvalSchedule`'s)."""
        self._emit({"eval/accuracy": evaluation.accuracy}, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None

    def _log_step(self, step: int, result, seconds: float, perf: dict) -> None:
        rate = (result.document_tokens or result.tokens) / seconds if seconds > 0 else float("nan")
        eta = (time.perf_counter() - self.started) / max(step - self.start_step, 1) * (self.total - step)
        lrs = learning_rates(self.optimizer)
        shown = {k: v for k, v in result.metrics.items() if k in CONSOLE_METRICS}
        mfu = f"  MFU {100 * perf['mfu']:.1f}%" if "mfu" in perf else ""
        logger.info(
            "step %d/%d  %s  grad-norm %.3f  lr %s  %.0f tok/s  %.2f TFLOP/s/dev%s  %.2f s/step  ETA %s%s",
            step,
            self.total,
            "  ".join(f"{k} {v:.4f}" for k, v in shown.items()),
            result.grad_norm,
            "/".join(f"{lr:.2e}" for lr in lrs.values()),
            rate,
            perf["tflops_per_device"],
            mfu,
            seconds,
            _hms(eta),
            "" if result.update_successful else "  (skipped: non-finite loss)",
        )
        self._emit(step_scalars(result, seconds, rate, perf, lrs), step)

    def _emit(self, scalars: dict[str, float], step: int) -> None:
        """The same scalars to TensorBoard and W&B."""
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb_run is not None:  # the x-axis is our step (`_wandb`): steps redone after a resume are kept
            self.wandb_run.log({**scalars, WANDB_STEP: step})


def _computed_row_share(metrics: dict) -> float:
    """Rows the model computed per document row (`rows_per_document`: below 1 with packing, whose rows
    hold several documents); 1 when the step did not report it."""
    share = metrics.get("rows_per_document", 1.0)
    return share if math.isfinite(share) and share > 0 else 1.0


def step_scalars(result, seconds: float, rate: float, perf: dict, lrs: dict) -> dict[str, float]:
    """Tag -> value of one logged step, for TensorBoard and W&B alike: ``train/<metric>`` for each of
    the step's metrics, then `FIXED_TAGS`. Non-finite values are left out (a skipped step's NaN loss
    would break the plots' scales; metrics.jsonl keeps it)."""
    scalars = {f"train/{name}": value for name, value in result.metrics.items()}
    scalars |= {"train/grad_norm": result.grad_norm, "perf/tokens_per_second": rate, "perf/seconds_per_step": seconds}
    scalars |= {f"perf/{name}": value for name, value in perf.items()}
    scalars |= {f"lr/{name}": lr for name, lr in lrs.items()}
    return {tag: float(value) for tag, value in scalars.items() if math.isfinite(value)}


def _tensorboard(run: RunConfig):
    if not run.run_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(Path(run.run_dir) / "tensorboard"))


def check_wandb(run: RunConfig) -> None:
    """ConfigError when train.wandb_project is set and wandb does not import: called before anything is
    built, so a missing wandb costs no model load."""
    if run.train.wandb_project:
        _import_wandb(run)


def _import_wandb(run: RunConfig):
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            f"train.wandb_project={run.train.wandb_project} is set but wandb is not installed: "
            "pip install wandb, or unset train.wandb_project"
        ) from None
    return wandb


def _wandb(run: RunConfig, start_step: int):
    """The W&B run (None without train.wandb_project): a run resumed from a checkpoint (start_step > 0)
    continues the W&B run whose id run_dir/wandb_run_id holds; a fresh start opens a new one."""
    if not run.train.wandb_project:
        return None
    wandb = _import_wandb(run)
    from dqo_megatron.config import to_dict
    from dqo_megatron.outputs import atomic_write_text

    id_file = Path(run.run_dir) / WANDB_ID_FILE if run.run_dir else None
    resumed = id_file.read_text().strip() if start_step > 0 and id_file and id_file.is_file() else ""
    options = {"id": resumed, "resume": "allow"} if resumed else {}
    wandb_run = wandb.init(project=run.train.wandb_project, config=to_dict(run), dir=run.run_dir, **options)
    # W&B drops a `log(step=...)` below the run's last step: a resumed run redoes the steps after its
    # checkpoint, so they are plotted against our own step metric instead of W&B's internal counter.
    wandb_run.define_metric(WANDB_STEP)
    wandb_run.define_metric("*", step_metric=WANDB_STEP)
    if id_file is not None and wandb_run.id != resumed:
        atomic_write_text(id_file, f"{wandb_run.id}\n")
    logger.info("W&B run %s (%s)", wandb_run.id, f"continued at step {start_step}" if resumed else "new")
    return wandb_run


def learning_rates(optimizer) -> dict[str, float]:
    """{"policy": lr, "value": lr} now (the value entry only when the run learns a value network)."""
    from dqo_megatron.training.member_step import MEMBER_KEY

    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        out.setdefault(group.get(MEMBER_KEY, "policy"), group["lr"])
    return dict(sorted(out.items()))


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
