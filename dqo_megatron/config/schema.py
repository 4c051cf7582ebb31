"""The configuration schema: model, parallelism, precision and the run around them.

Every field has a docstring; `__post_init__` checks what can be checked locally and fills family
defaults (fields left as None). Checks that need the world size live in `RunConfig.validate_layout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from dqo_megatron.config.loader import ConfigError

Family = Literal["llama", "qwen2", "gemma"]

# Architecture traits of each family (what differs between them), used where a field is None.
FAMILY_DEFAULTS: dict[str, dict] = {
    "llama": dict(rotary_base=10000.0, norm_epsilon=1e-5, tie_embeddings=False, add_qkv_bias=False,
                  activation="swiglu"),
    "qwen2": dict(rotary_base=1000000.0, norm_epsilon=1e-6, tie_embeddings=False, add_qkv_bias=True,
                  activation="swiglu"),
    "gemma": dict(rotary_base=10000.0, norm_epsilon=1e-6, tie_embeddings=True, add_qkv_bias=False,
                  activation="geglu"),
}  # fmt: skip


MAX_LR = 1.0
"""The largest learning rate accepted: Adam's update is about lr per weight per step, so above 1 every step
overwrites the weights (a typo such as 1e35 would otherwise train NaN)."""


def _fail(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass
class ModelConfig:
    """A decoder-only transformer of one of the supported families."""

    family: Family = "llama"
    """Architecture family: llama (SwiGLU, RMSNorm, RoPE, optional GQA), qwen2 (llama + QKV bias,
    RoPE theta 1e6, untied head), gemma (GeGLU, zero-centred RMSNorm gamma, embeddings scaled by
    sqrt(hidden), tied head, head_dim may differ from hidden/heads)."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 172
    """Width of the gated MLP's intermediate layer."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads (grouped-query attention). None: equal to num_attention_heads (MHA)."""
    kv_channels: Optional[int] = None
    """Per-head dimension. None: hidden_size // num_attention_heads."""
    vocab_size: int = 512
    """Tokenizer vocabulary size (the embedding is padded for tensor parallelism, see
    make_vocab_size_divisible_by)."""
    make_vocab_size_divisible_by: int = 1
    """Pad the embedding rows to a multiple of this times the TP size (Megatron's convention; 128 is
    usual on GPU). 1 keeps the vocabulary as is when TP divides it."""
    seq_length: int = 128
    """Maximum sequence length (RoPE table size)."""
    rotary_base: Optional[float] = None
    """RoPE theta. None: family default (llama/gemma 1e4, qwen2 1e6)."""
    norm_epsilon: Optional[float] = None
    """RMSNorm epsilon. None: family default (llama 1e-5, qwen2/gemma 1e-6)."""
    tie_embeddings: Optional[bool] = None
    """Share the input embedding and the output layer. None: family default (gemma tied)."""
    add_qkv_bias: Optional[bool] = None
    """Bias on the Q/K/V projections. None: family default (qwen2 true)."""
    init_method_std: float = 0.02
    """Std of the normal initialization of weights."""

    def __post_init__(self) -> None:
        if self.family not in FAMILY_DEFAULTS:
            raise ConfigError(
                f"model.family={self.family!r} is not supported; choose one of {sorted(FAMILY_DEFAULTS)}"
            )
        for name, value in FAMILY_DEFAULTS[self.family].items():
            if name != "activation" and getattr(self, name) is None:
                setattr(self, name, value)
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None and self.num_attention_heads > 0:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        problems = []
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "vocab_size", "seq_length",
                     "make_vocab_size_divisible_by"):  # fmt: skip
            if getattr(self, name) <= 0:
                problems.append(f"model.{name}={getattr(self, name)} must be positive")
        if not problems and self.num_attention_heads % self.num_query_groups:
            problems.append(
                f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"model.num_query_groups={self.num_query_groups} (each KV head serves a whole group)"
            )
        if self.family != "gemma" and not problems:
            if self.kv_channels * self.num_attention_heads != self.hidden_size:
                # Allowed by Megatron, but for llama/qwen2 checkpoints it means a typo.
                problems.append(
                    f"model.kv_channels={self.kv_channels} x num_attention_heads="
                    f"{self.num_attention_heads} != hidden_size={self.hidden_size}; only the gemma "
                    "family uses a head dimension other than hidden_size/num_attention_heads"
                )
        if self.kv_channels is not None and self.kv_channels % 2:
            problems.append(f"model.kv_channels={self.kv_channels} must be even for RoPE")
        _fail(problems)

    @property
    def activation(self) -> str:
        """Gated MLP activation of the family: 'swiglu' (SiLU gate) or 'geglu' (tanh-GELU gate)."""
        return FAMILY_DEFAULTS[self.family]["activation"]

    def padded_vocab_size(self, tensor_parallel_size: int) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of make_vocab_size_divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)


@dataclass
class ParallelConfig:
    """How the model is split across processes. Data parallelism takes the remaining ranks."""

    tensor_model_parallel_size: int = 1
    """TP: split attention heads and MLP columns across this many ranks."""
    pipeline_model_parallel_size: int = 1
    """PP: split the layers into this many stages."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved PP: model chunks per pipeline stage (None: no interleaving)."""
    context_parallel_size: int = 1
    """CP: split each sequence into 2*CP chunks (load-balanced) across this many ranks."""
    sequence_parallel: bool = False
    """SP: shard activations outside attention/MLP along the sequence across the TP group (needs TP>1)."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                problems.append(f"parallel.{name}={getattr(self, name)} must be >= 1")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            if vpp < 1:
                problems.append(f"parallel.virtual_pipeline_model_parallel_size={vpp} must be >= 1")
            elif vpp > 1 and self.pipeline_model_parallel_size < 2:
                problems.append(
                    "parallel.virtual_pipeline_model_parallel_size needs "
                    "parallel.pipeline_model_parallel_size >= 2"
                )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            problems.append(
                "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1 "
                "(SP shards activations across the TP group); set sequence_parallel=false or raise TP"
            )
        _fail(problems)

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one replica of the model: TP * PP * CP."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
"""Transformer Engine FP8 recipes, as megatron-core's `TransformerConfig.fp8_recipe` names them."""

FP8_DEFAULT_FORMAT = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3", "mxfp8": "e4m3"}
"""Each recipe's default `fp8_format`: Transformer Engine's own default for the recipe's class
(DelayedScaling / Float8CurrentScaling: HYBRID; Float8BlockScaling / MXFP8BlockScaling: E4M3)."""


@dataclass
class PrecisionConfig:
    """Numerical formats. The DQO loss math, log-probs and IS weights are always fp32."""

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Parameter/activation dtype. auto: bf16 on GPU, fp32 on CPU (the only format Megatron's
    optimizer supports there)."""
    fp8: Optional[Literal["delayed", "tensorwise", "blockwise", "mxfp8"]] = None
    """FP8 GEMMs in the transformer layers through Transformer Engine (None: off). Recipes: delayed
    (per-tensor scale from an amax history; compute capability >= 8.9), tensorwise (per-tensor current
    scaling; >= 8.9, TE >= 2.2), blockwise (1x128 / 128x128 blocks; >= 9.0 with CUDA >= 12.9, TE >= 2.3),
    mxfp8 (32-element blocks, E8M0 scales; Blackwell, 10.0 <= capability < 12.0). Needs the TE layer
    spec and bf16; every GEMM dimension (model.hidden_size, model.ffn_hidden_size / TP, the QKV and
    attention-output widths heads x model.kv_channels / TP, tokens per micro-batch) a multiple of 16
    (32 for mxfp8). The output layer, log-probs, value head and losses stay in bf16/fp32. See
    docs/gpu.md."""
    fp8_format: Optional[Literal["hybrid", "e4m3"]] = None
    """FP8 formats: hybrid (e4m3 forward, e5m2 gradients) or e4m3 everywhere. None: the recipe's
    default (hybrid for delayed/tensorwise, e4m3 for blockwise/mxfp8)."""
    fp8_param: bool = False
    """Keep the transformer layers' GEMM weights in FP8 (saves memory and the weight cast; needs `fp8`
    and train.distributed_optimizer, as in Megatron-LM)."""
    fp8_amax_history_len: int = 1024
    """delayed recipe: steps of amax history a scale is computed from (Transformer Engine's default)."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """delayed recipe: the amax used for a scale, the history's max or its most recent value."""

    def __post_init__(self) -> None:
        problems = []
        if self.fp8_param and self.fp8 is None:
            problems.append("precision.fp8_param=true needs precision.fp8 set to a recipe")
        if self.fp8_format is not None and self.fp8 is None:
            problems.append(f"precision.fp8_format={self.fp8_format} needs precision.fp8 set to a recipe")
        if self.fp8 is not None and self.dtype in ("fp32", "fp16"):
            problems.append(f"precision.fp8 needs precision.dtype bf16 (or auto), not {self.dtype}")
        if self.fp8 is not None and self.fp8 not in FP8_RECIPES:
            problems.append(f"precision.fp8={self.fp8!r}: choose one of {', '.join(FP8_RECIPES)}")
        if self.fp8_amax_history_len < 1:
            problems.append(f"precision.fp8_amax_history_len={self.fp8_amax_history_len} must be >= 1")
        _fail(problems)

    def resolved_dtype(self, cuda_available: bool) -> str:
        """The dtype actually used: 'auto' resolved for this machine."""
        if self.dtype == "auto":
            return "bf16" if cuda_available else "fp32"
        return self.dtype

    @property
    def resolved_fp8_format(self) -> Optional[str]:
        """`fp8_format`, or the recipe's default; None without FP8."""
        if self.fp8 is None:
            return None
        return self.fp8_format or FP8_DEFAULT_FORMAT[self.fp8]

    @property
    def fp8_alignment(self) -> int:
        """What every FP8 GEMM dimension must be a multiple of: 32 for mxfp8 (its scaling blocks),
        else 16 (Transformer Engine's FP8 GEMM alignment)."""
        return 32 if self.fp8 == "mxfp8" else 16


def fp8_dimension_problems(precision: PrecisionConfig, model: "ModelConfig", parallel: "ParallelConfig",
                           micro_batch_size: Optional[int] = None,
                           seq_length: Optional[int] = None) -> list[str]:  # fmt: skip
    """Why FP8 GEMMs cannot run on this model/layout (empty when they can, or without FP8).

    Transformer Engine quantizes both operands of every GEMM of a layer: the tokens of a micro-batch
    (``micro_batch_size * seq_length / CP``: the linears see the whole local sequence, SP gathers it
    first), the hidden size, and the per-rank widths of QKV (``(heads + 2 groups) * kv_channels / TP``),
    the attention output (``heads * kv_channels / TP``) and the MLP (``ffn / TP``). Each must be a
    multiple of `precision.fp8_alignment`. (Attention itself stays in bf16, so the head dimension
    matters only through those widths.)
    """
    if precision.fp8 is None:
        return []
    align, tp, cp = precision.fp8_alignment, parallel.tensor_model_parallel_size, parallel.context_parallel_size
    why = f"must be a multiple of {align} for precision.fp8={precision.fp8}"
    problems = []
    if model.hidden_size % align:
        problems.append(f"model.hidden_size={model.hidden_size} {why}")
    if model.ffn_hidden_size % (align * tp):
        problems.append(f"model.ffn_hidden_size={model.ffn_hidden_size} / parallel.tensor_model_parallel_size={tp} "
                        f"{why}")  # fmt: skip
    heads, groups, d = model.num_attention_heads, model.num_query_groups, model.kv_channels
    if d is not None and groups is not None:
        widths = {"attention output": heads * d, "QKV": (heads + 2 * groups) * d}
        for what, width in widths.items():
            if width % (align * tp):
                problems.append(f"the {what} width ({'' if what == 'attention output' else '('}model.num_attention_heads="
                                f"{heads}{'' if what == 'attention output' else f' + 2 x model.num_query_groups={groups})'}"
                                f" x model.kv_channels={d} = {width}) / parallel.tensor_model_parallel_size={tp} {why}")  # fmt: skip
    if micro_batch_size is not None and seq_length is not None:
        tokens = micro_batch_size * seq_length // max(cp, 1)
        if tokens % align:
            problems.append(f"train.micro_batch_size={micro_batch_size} x train.seq_length={seq_length}"
                            f"{f' / parallel.context_parallel_size={cp}' if cp > 1 else ''} = {tokens} tokens "
                            f"per micro-batch {why}")  # fmt: skip
    return problems


@dataclass
class TrainConfig:
    """Batching and optimization of a run (the trainer adds its own sections)."""

    micro_batch_size: int = 1
    """Sequences per micro-batch on one data-parallel rank."""
    global_batch_size: int = 4
    """Sequences per optimizer step, summed over micro-batches and data-parallel ranks."""
    seq_length: int = 64
    """Tokens per sequence fed to the model (<= model.seq_length)."""
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
        for name in ("lr_warmup_steps", "save_interval"):
            if getattr(self, name) < 0:
                problems.append(f"train.{name}={getattr(self, name)} must be >= 0")
        for name in ("log_interval", "keep_last_checkpoints", "max_consecutive_nonfinite"):
            if getattr(self, name) < 1:
                problems.append(f"train.{name}={getattr(self, name)} must be >= 1")
        _fail(problems)


@dataclass
class DataConfig:
    """Training data: a preprocessed trajectory dataset (`dqo-megatron preprocess`)."""

    train_prefix: Optional[str] = None
    """Output prefix given to preprocess (<prefix>.json and <prefix>_*.bin/.idx)."""
    shuffle: bool = True
    """Shuffle documents each epoch (seeded by train.seed)."""
    reference: Literal["auto", "data", "model"] = "auto"
    """Where reference log-probs come from: data (filled by `dqo-megatron annotate`), model (a frozen
    reference held in the run, forward only), auto (data when the dataset has them, else model)."""
    pad_id: int = 0
    """Token id written into padding (masked out of every loss)."""
    reference_offload: bool = False
    """Keep a reference model held in the run on the CPU between its forward passes (saves accelerator
    memory at the cost of a copy per micro-batch; no effect on CPU)."""
    allow_tokenizer_mismatch: bool = False
    """Train or annotate although the dataset was tokenized by another tokenizer than the model's (its
    manifest's tokenizer hash differs from that of an init checkpoint's hf/ or of eval.tokenizer) or
    with a larger vocabulary than model.vocab_size: only for data whose ids you know mean the same to
    the model. Token ids outside the model's vocabulary are refused regardless (docs/data.md)."""


@dataclass
class InitConfig:
    """Where the models' initial weights come from (directories written by `dqo-megatron convert`)."""

    policy: Optional[str] = None
    """Megatron checkpoint of the policy (None: random init from train.seed, for tests and demos)."""
    reference: Optional[str] = None
    """Checkpoint of the frozen reference (None: the policy's initial weights, the paper's setting)."""
    value: Optional[str] = None
    """Checkpoint of the value network's trunk (None: a copy of the policy's initial weights); its scalar
    head starts at zero (value.head_init_std)."""


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
        _fail(problems)


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
        _fail(problems)

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


@dataclass
class TrainEvalConfig:
    """Held-out accuracy measured during training, and the checkpoint it picks (docs/training.md)."""

    problems: Optional[str] = None
    """Problems file (GSM8K/MATH-style JSONL or a saved HF dataset; see `tasks.datasets.load_problems`).
    Use a validation split disjoint from the test set you report: the best checkpoint is picked on it."""
    interval: int = 0
    """Evaluate (greedy) every this many steps from the step the policy starts moving (0, or after
    value.warmup_steps) to the last step, and save a checkpoint at each evaluated step (0: off). Needs TP = PP = CP = 1 (the problems are split over data-parallel
    ranks); larger layouts evaluate saved checkpoints with `dqo-megatron eval`."""
    limit: int = 0
    """Evaluate this many problems, evenly spread over the file (0: all)."""
    task: Optional[Literal["gsm8k", "math"]] = None
    """Answer format of the problems (None: guessed from the path)."""
    max_new_tokens: int = 256
    """Longest greedy answer, EOS included."""
    tokenizer: Optional[str] = None
    """Tokenizer (HF directory or sentencepiece .model) to frame prompts and decode answers with.
    None: the `hf/` directory of init.policy (a `convert hf-to-megatron` checkpoint)."""
    batch_size: int = 64
    """Rows per forward pass of the (cache-less) greedy decoder."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("interval", "limit"):
            if getattr(self, name) < 0:
                problems.append(f"eval.{name}={getattr(self, name)} must be >= 0")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"eval.{name}={getattr(self, name)} must be >= 1")
        if self.interval and not self.problems:
            problems.append("eval.interval is set but eval.problems is not: name a held-out problems file")
        _fail(problems)


@dataclass
class RunConfig:
    """Everything a run needs; written, resolved, into the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Model parallel layout."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numerical formats."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batching and optimization."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    init: InitConfig = field(default_factory=InitConfig)
    """Initial weights."""
    algorithm: str = "dqo"
    """What to train: dqo (default), or a baseline: dro, dpo, kto, sft, rs (rejection sampling); any name
    registered in `dqo_megatron.algorithms` (docs/algorithms.md, "Adding an algorithm")."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss coefficients."""
    value: ValueConfig = field(default_factory=ValueConfig)
    """The value network (dqo, dro)."""
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    """Held-out accuracy during training and checkpoint selection."""
    run_dir: Optional[str] = None
    """Where logs, checkpoints and the resolved config go (None: nothing is written)."""

    def __post_init__(self) -> None:
        from dqo_megatron.algorithms import get, names

        problems = []
        if self.algorithm not in names():
            problems.append(f"algorithm={self.algorithm!r}: choose one of {', '.join(names())}")
        elif get(self.algorithm).needs_value and self.value.resolved_lr(self.train.lr) > MAX_LR:
            problems.append(f"the value network's learning rate {self.value.resolved_lr(self.train.lr):g} (value.lr, "
                            f"else value.lr_ratio={self.value.lr_ratio:g} x train.lr={self.train.lr:g}) is above "
                            f"{MAX_LR}")  # fmt: skip
        if self.train.seq_length > self.model.seq_length:
            problems.append(
                f"train.seq_length={self.train.seq_length} exceeds model.seq_length={self.model.seq_length}"
            )
        problems += fp8_dimension_problems(self.precision, self.model, self.parallel, self.train.micro_batch_size,
                                           self.train.seq_length)  # fmt: skip
        if self.precision.fp8_param and not self.train.distributed_optimizer:
            # Megatron's plain mixed-precision optimizer has no FP8-parameter path; the distributed
            # optimizer keeps fp32 main weights and re-quantizes its shard (Megatron-LM requires it too).
            problems.append("precision.fp8_param=true needs train.distributed_optimizer=true")
        _fail(problems)
        validate_model_layout(self.model, self.parallel, self.train.seq_length)

    def validate_layout(self, world_size: int) -> int:
        """Check the layout against `world_size`; return the data-parallel size."""
        dp = data_parallel_size(self.parallel, world_size)
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size} x data-parallel size {dp} "
                f"(= world size {world_size} / (TP*PP*CP))"
            )
        return dp

    def num_microbatches(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        dp = self.validate_layout(world_size)
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)


def data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    """world_size / (TP*PP*CP), or ConfigError naming the fields when it does not divide."""
    mp = parallel.model_parallel_size
    if world_size % mp:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size="
            f"{parallel.tensor_model_parallel_size} x parallel.pipeline_model_parallel_size="
            f"{parallel.pipeline_model_parallel_size} x parallel.context_parallel_size="
            f"{parallel.context_parallel_size} = {mp}"
        )
    return world_size // mp


def validate_model_layout(model: ModelConfig, parallel: ParallelConfig, seq_length: int) -> None:
    """Checks that involve both the model and the layout (independent of the world size)."""
    tp, pp, cp = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.context_parallel_size)  # fmt: skip
    problems = []
    if model.num_attention_heads % tp:
        problems.append(
            f"parallel.tensor_model_parallel_size={tp} must divide model.num_attention_heads="
            f"{model.num_attention_heads}"
        )
    if model.num_query_groups % tp:
        problems.append(
            f"parallel.tensor_model_parallel_size={tp} must divide model.num_query_groups="
            f"{model.num_query_groups} (KV heads are not replicated across TP ranks)"
        )
    if model.ffn_hidden_size % tp:
        problems.append(
            f"parallel.tensor_model_parallel_size={tp} must divide model.ffn_hidden_size={model.ffn_hidden_size}"
        )
    chunks = pp * (parallel.virtual_pipeline_model_parallel_size or 1)
    if model.num_layers % chunks:
        problems.append(
            f"model.num_layers={model.num_layers} must be divisible by parallel.pipeline_model_parallel_size"
            f"={pp} x virtual_pipeline_model_parallel_size={parallel.virtual_pipeline_model_parallel_size or 1}"
        )
    why = []
    if cp > 1:
        why.append(f"2 x parallel.context_parallel_size={cp} load-balanced chunks")
    if parallel.sequence_parallel:
        why.append(f"parallel.tensor_model_parallel_size={tp} sequence-parallel shards")
    divisor = (2 * cp if cp > 1 else 1) * (tp if parallel.sequence_parallel else 1)
    if seq_length % divisor:
        problems.append(f"train.seq_length={seq_length} must be divisible by {divisor} ({' x '.join(why)})")
    _fail(problems)
