"""The train loop's metrics logger: one place for the console, ``run_dir/metrics.jsonl``, TensorBoard
(``run_dir/tensorboard``) and W&B (`train.wandb_project`). Rank 0 writes; on other ranks every call
does nothing. Closed in one place (`close`, or the `with` block).
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
        self.wandb_run = _wandb(run) if self.is_logger else None
        rows = t.global_batch_size * parts.algorithm.rows_per_item
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
                        **result.metrics,
                    }
                )
                + "\n"
            )
            self.metrics_file.flush()
        if self.is_logger and (step % self.log_interval == 0 or step == self.total):
            perf = {"tflops_per_device": self.flops / seconds / 1e12 / self.world_size if seconds > 0 else float("nan")}
            if self.peak:
                perf["mfu"] = perf["tflops_per_device"] / self.peak
            self._log_step(step, result, seconds, perf)

    def log_eval(self, step: int, evaluation) -> None:
        """A held-out evaluation (its console line and evals.jsonl are `EvalSchedule`'s)."""
        if self.writer is not None:
            self.writer.add_scalar("eval/accuracy", evaluation.accuracy, step)

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
        rate = result.tokens / seconds if seconds > 0 else float("nan")
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
        if self.wandb_run is not None:
            self.wandb_run.log(
                {
                    **{f"train/{k}": v for k, v in result.metrics.items()},
                    "train/grad_norm": result.grad_norm,
                    "perf/tokens_per_second": rate,
                    **{f"perf/{k}": v for k, v in perf.items()},
                    **{f"lr/{k}": lr for k, lr in lrs.items()},
                },
                step=step,
            )
        writer = self.writer
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
        raise ConfigError(
            "train.wandb_project is set but wandb is not installed: pip install wandb, or unset it"
        ) from None
    from dqo_megatron.config import to_dict

    return wandb.init(project=run.train.wandb_project, config=to_dict(run), dir=run.run_dir)


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
