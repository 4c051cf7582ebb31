"""The optimization sections: batching and schedule (train), loss coefficients (loss), the value network (value)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dqo_megatron.config.loader import raise_problems

MAX_LR = 1.0
"""The largest learning rate accepted: Adam's update is about lr per weight per step, so above 1 every step
overwrites the weights (a typo such as 1e35 would otherwise train NaN)."""


@dataclass
class TrainConfig:
    """Batching and optimization of a run (the trainer adds its own sections)."""

    micro_batch_size: int = 1
    """Sequences per micro-batch on one data-parallel rank."""
    global_batch_size: int = 4
    """Sequences per optimizer step, summed over micro-batches and data-parallel ranks."""
    seq_length: int = 64
    """Tokens per sequence fed to the model (<= model.seq_length)."""
    packing: Optional[bool] = None
    """Pack each micro-batch's documents into as few rows of seq_length tokens as fit (first-fit
    decreasing; attention stops at document boundaries, positions restart per document; the loss is the
    padded one). Same documents per micro-batch as unpacked. Default None (auto): on for the local layer
    spec (tested equal to unpacked on CPU in every layout: TP, SP, CP, PP, DP), off on Transformer
    Engine's (its THD path has not run on a GPU yet); resolved once at run start, logged and written to
    run_dir/config.yaml. true / false: as set (true on Transformer Engine runs the untested THD path,
    refused under CP and PP). Under pipeline parallelism a micro-batch keeps as many rows as unpacked
    (stages exchange fixed shapes: correct, no saving; micro_batch_tokens saves rows there)."""
    micro_batch_tokens: Optional[int] = None
    """With packing: micro-batches cut by tokens instead of documents. Each step still trains on
    global_batch_size documents (drawn as without it); a rank packs its share of the step into rows of
    seq_length and gives a micro-batch up to micro_batch_tokens // seq_length rows, so the number of
    micro-batches varies per step (under pipeline parallelism every micro-batch has that many rows, some
    empty; with virtual pipeline stages micro-batches are split until their number is a multiple of
    PP). DPO keeps each pair in one micro-batch (so at least 2 x seq_length); KTO keeps each draw of
    micro_batch_size documents with its mismatched rows (its KL reference point, as unpacked) in one
    (so at least 2 x micro_batch_size x seq_length). Needs packing (true, or auto on the local layer
    spec). None: micro_batch_size documents (pairs) per micro-batch."""
    lr: float = 1e-4
    """Peak learning rate (at most 1; no setting anywhere takes inf or NaN)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    seed: int = 1234
    """Seed of model init, data order and dropout."""
    train_steps: int = 10
    """Optimizer steps."""
    min_lr: float = 0.0
    """Learning rate at the end of a cosine/linear decay."""
    lr_warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many steps."""
    lr_decay_style: Literal["constant", "cosine", "linear"] = "constant"
    """Schedule after warmup (decays over train_steps)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    log_interval: int = 1
    """Print and log metrics every this many steps."""
    save_interval: int = 0
    """Save a checkpoint every this many steps (0: only at the end and on SIGTERM)."""
    keep_last_checkpoints: int = 3
    """Checkpoints kept in run_dir/checkpoints (older ones are deleted after a successful save)."""
    resume: str = "auto"
    """auto: continue from the newest intact checkpoint in run_dir if any (a damaged newer one is reported
    and skipped); none: start fresh; or a checkpoint directory (damage is then an error)."""
    verify_checkpoints: Literal["full", "size", "off"] = "full"
    """Check a checkpoint against the manifest its save wrote before loading it (resume, export): full:
    sizes and CRC32 of every file (reads it once more, ~4 GB/s per core plus the disk); size: sizes only;
    off: no check (torch's reader errors are still reported naming the file)."""
    max_consecutive_nonfinite: int = 5
    """A step with a NaN/inf loss or gradient is skipped and counted; stop after this many in a row."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer; GPU only)."""
    peak_tflops: Optional[float] = None
    """Per-device peak TFLOP/s for the MFU estimate (None: the bf16 peak of a known GPU; no MFU on CPU)."""
    wandb_project: Optional[str] = None
    """Also log to Weights & Biases under this project (needs `pip install wandb`; None: off)."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("micro_batch_size", "global_batch_size", "seq_length", "train_steps"):
            if getattr(self, name) < 1:
                problems.append(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.lr < 0 or self.clip_grad < 0 or self.min_lr < 0 or self.weight_decay < 0:
            problems.append("train.lr, train.min_lr, train.clip_grad and train.weight_decay must be >= 0")
        if self.lr > MAX_LR:
            problems.append(f"train.lr={self.lr}: above {MAX_LR} (Adam moves every weight by about lr per step)")
        if self.min_lr > self.lr:
            problems.append(f"train.min_lr={self.min_lr} exceeds train.lr={self.lr}")
        if self.micro_batch_tokens is not None and self.packing is False:
            problems.append(f"train.micro_batch_tokens={self.micro_batch_tokens} needs train.packing=true (or unset)")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < self.seq_length:
            problems.append(
                f"train.micro_batch_tokens={self.micro_batch_tokens}: give at least "
                f"train.seq_length={self.seq_length} tokens (one row)"
            )
        for name in ("lr_warmup_steps", "save_interval"):
            if getattr(self, name) < 0:
                problems.append(f"train.{name}={getattr(self, name)} must be >= 0")
        for name in ("log_interval", "keep_last_checkpoints", "max_consecutive_nonfinite"):
            if getattr(self, name) < 1:
                problems.append(f"train.{name}={getattr(self, name)} must be >= 1")
        raise_problems(problems)

    def resolved_packing(self, layer_spec: str) -> bool:
        """Whether to pack on a model built with `layer_spec` ('local' or 'te'): `packing` when set, else
        (auto) on for the local spec and off for Transformer Engine's (ConfigError there when
        micro_batch_tokens asks for packing: the THD path runs only when packing=true says so)."""
        if self.packing is not None:
            return self.packing
        if layer_spec == "local":
            return True
        if self.micro_batch_tokens is not None:
            raise_problems(
                [
                    f"train.micro_batch_tokens={self.micro_batch_tokens} needs packing, which is off by default "
                    "on the Transformer Engine layer spec (its THD path has not run on a GPU yet): set "
                    "train.packing=true to run it, or unset train.micro_batch_tokens (docs/packing.md)"
                ]
            )
        return False


@dataclass
class LossConfig:
    """Coefficients of DQO and the baselines (see docs/algorithms.md)."""

    beta: float = 0.1
    """KL coefficient beta (DRO's tau). The spec fixes no value; 0.1 is a common starting point."""
    lam: float = 1.0
    """lambda of the lambda-returns: 1 = Monte-Carlo return (the paper's best), 0 = one-step TD."""
    is_level: Literal["trajectory", "prefix", "off"] = "trajectory"
    """Truncated importance sampling: per response (trajectory), per prefix, or off."""
    is_clip: float = 2.0
    """Truncation constant c of the importance weights."""
    is_self_normalize: bool = False
    """Divide the importance weights by their mean over the micro-batch."""
    is_apply_to: Literal["both", "policy", "value"] = "both"
    """Which DQO loss the importance weights multiply: both (the paper's best), only the policy (Q) loss,
    or only the value loss (the other gets w = 1): the paper's ablation."""
    truncated: Literal["bootstrap", "exclude", "terminal"] = "bootstrap"
    """Responses cut by the length limit (records with `truncated: true`): bootstrap = the state after the
    last token is not terminal, its value sg(V(s_(H+1))) is added to the last token's return (dropped,
    counted as excluded, when the row has no position left for s_(H+1)); exclude = no loss on them;
    terminal = treated as ended (the return after them is 0; wrong for unfinished answers)."""
    reduction: Literal["token", "sequence"] = "token"
    """Mean over all response tokens of the global batch, or per sequence then over sequences."""
    dpo_max_pairs_per_prompt: int = 12
    """DPO: at most this many (correct, incorrect) pairs per prompt (the paper's cap)."""
    kto_desirable_weight: float = 1.0
    """KTO: weight lambda_D of desirable (correct) responses."""
    kto_undesirable_weight: float = 1.0
    """KTO: weight lambda_U of undesirable (incorrect) responses."""

    def __post_init__(self) -> None:
        problems = []
        if not self.beta > 0:
            problems.append(f"loss.beta={self.beta} must be > 0")
        if not 0.0 <= self.lam <= 1.0:
            problems.append(f"loss.lam={self.lam} must be in [0, 1]")
        if not self.is_clip > 0:
            problems.append(f"loss.is_clip={self.is_clip} must be > 0")
        if self.is_apply_to not in ("both", "policy", "value"):
            problems.append(f"loss.is_apply_to={self.is_apply_to!r}: choose both, policy or value")
        if self.truncated not in ("bootstrap", "exclude", "terminal"):
            problems.append(f"loss.truncated={self.truncated!r}: choose bootstrap, exclude or terminal")
        if self.dpo_max_pairs_per_prompt < 1:
            problems.append(f"loss.dpo_max_pairs_per_prompt={self.dpo_max_pairs_per_prompt} must be >= 1")
        raise_problems(problems)


@dataclass
class ValueConfig:
    """The value network V_phi(s) that DQO and DRO learn next to the policy."""

    mode: Literal["separate", "shared"] = "separate"
    """separate: a second GPT of the policy's architecture with a scalar head (the paper's setting);
    shared: a scalar head on the policy's trunk (cheaper; the trunk gets both losses' gradients)."""
    lr: Optional[float] = None
    """Peak learning rate of the value parameters. None: train.lr x value.lr_ratio. Either way at most 1 for
    algorithms with a value network."""
    lr_ratio: float = 10.0
    """value.lr = this x train.lr when value.lr is None. The value network fits a regression target
    from a zero-initialized head and must move faster than the policy it criticizes: at ratio 1 the
    demo's value did not fit at all, 10 fitted best on its first design (docs/algorithms.md, "Value
    learning", which also says why a larger default would be unsafe for large models)."""
    clip_grad: Optional[float] = None
    """Clip the value parameters' own gradient norm to this (0 disables; None: train.clip_grad). The
    policy's gradient is clipped by its own norm, so a large value gradient never shrinks the policy's
    step."""
    warmup_steps: int = 0
    """Critic warm-up: for the first this many steps only the value network learns (the policy's loss
    is not backpropagated and its learning rate is 0); the policy's schedule starts after them."""
    loss_coef: float = 1.0
    """Weight of the value loss in the summed loss. It scales the value gradient, which matters in
    value.mode=shared, where the value loss also trains the policy's trunk."""
    min_lr: Optional[float] = None
    """Value learning rate at the end of its decay (None: train.min_lr)."""
    lr_warmup_steps: Optional[int] = None
    """Linear warmup of the value learning rate, in steps (None: train.lr_warmup_steps)."""
    lr_decay_style: Optional[Literal["constant", "cosine", "linear"]] = None
    """Value schedule after warmup, decaying over train.train_steps (None: train.lr_decay_style)."""
    head_init_std: float = 0.0
    """Std of the value head's weight init (0: zero-initialized, V = 0 at the start)."""

    def __post_init__(self) -> None:
        problems = []
        if self.lr is not None and self.lr < 0:
            problems.append(f"value.lr={self.lr} must be >= 0")
        if self.lr is not None and self.lr > MAX_LR:
            problems.append(f"value.lr={self.lr}: above {MAX_LR} (Adam moves every weight by about lr per step)")
        if self.min_lr is not None and self.min_lr < 0:
            problems.append(f"value.min_lr={self.min_lr} must be >= 0")
        if self.lr is not None and self.min_lr is not None and self.min_lr > self.lr:
            problems.append(f"value.min_lr={self.min_lr} exceeds value.lr={self.lr}")
        if self.lr_warmup_steps is not None and self.lr_warmup_steps < 0:
            problems.append(f"value.lr_warmup_steps={self.lr_warmup_steps} must be >= 0")
        if self.lr_decay_style not in (None, "constant", "cosine", "linear"):
            problems.append(f"value.lr_decay_style={self.lr_decay_style!r}: choose constant, cosine or linear")
        if not self.lr_ratio > 0:
            problems.append(f"value.lr_ratio={self.lr_ratio} must be > 0")
        if self.clip_grad is not None and self.clip_grad < 0:
            problems.append(f"value.clip_grad={self.clip_grad} must be >= 0")
        if self.warmup_steps < 0:
            problems.append(f"value.warmup_steps={self.warmup_steps} must be >= 0")
        if self.loss_coef < 0:
            problems.append(f"value.loss_coef={self.loss_coef} must be >= 0")
        if self.head_init_std < 0:
            problems.append(f"value.head_init_std={self.head_init_std} must be >= 0")
        raise_problems(problems)

    def resolved_lr(self, train_lr: float) -> float:
        """The value parameters' peak learning rate: `lr`, or `lr_ratio` x the policy's."""
        return self.lr if self.lr is not None else self.lr_ratio * train_lr

    def resolved_min_lr(self, train_lr: float, train_min_lr: float) -> float:
        """The value learning rate at the end of its decay: `min_lr`, else the policy's final LR scaled
        like the peak (never above the value's peak)."""
        if self.min_lr is not None:
            return self.min_lr
        if self.lr is None:
            return self.lr_ratio * train_min_lr
        return min(train_min_lr, self.lr)

    def resolved_clip_grad(self, train_clip_grad: float) -> float:
        """The value parameters' own gradient-norm clip (0: none)."""
        return train_clip_grad if self.clip_grad is None else self.clip_grad
