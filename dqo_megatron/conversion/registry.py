"""The family registry: what differs between Llama, Qwen2, Gemma (and the next family) when converting.

A family is a `Family` subclass in its own file under `dqo_megatron/conversion/families/`, decorated
with `@register`; every module there is imported on first lookup, so adding a family is one file.
A family knows

* its HF identity (``architectures``, ``model_type``),
* how HF ``config.json`` maps to a `ModelConfig` and back (`config_from_hf`, `config_to_hf`), refusing
  what our model cannot represent (rope scaling, sliding windows, biases we do not build, ...),
* the tensor rules (`rules`): each Megatron tensor of the full (TP=1 PP=1 names) state, the HF tensors
  it is made of, and the two re-layouts. The base class holds the Llama-style rules that all three
  families share (QKV interleave, fc1 = [gate; up], tied or untied head, optional QKV bias).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import torch

from dqo_megatron.config import ConfigError, ModelConfig
from dqo_megatron.conversion.layout import (
    drop_padded_vocab_rows,
    fuse_gate_up,
    interleave_qkv,
    split_gate_up,
    split_qkv,
)


class ConversionError(ValueError):
    """A checkpoint cannot be converted: unsupported architecture, missing/unexpected tensors, bad layout,
    an output that exists, or failed parity. The message names the file, tensor or option at fault."""


@dataclass(frozen=True)
class TensorRule:
    """One Megatron tensor (full, TP=1 name) and the HF tensors it is made of."""

    megatron: str
    """Megatron name in a TP=1 PP=1 model, e.g. ``decoder.layers.3.self_attention.linear_qkv.weight``."""
    hf: tuple[str, ...]
    """HF tensor names, in the order `to_megatron` takes them and `to_hf` returns them."""
    to_megatron: Callable[..., torch.Tensor]
    """``f(*hf_tensors) -> megatron tensor``."""
    to_hf: Callable[[torch.Tensor], Sequence[torch.Tensor]]
    """``f(megatron tensor) -> hf tensors`` (same order as `hf`)."""


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _one(t: torch.Tensor) -> tuple[torch.Tensor]:
    return (t,)


def _get(hf: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in hf:
        raise ConversionError(f"{where}: config.json has no '{key}'")
    return hf[key]


def rope_theta_of(hf: Mapping[str, Any], where: str, default: Optional[float] = None) -> float:
    """RoPE theta from a transformers-4 (``rope_theta``) or -5 (``rope_parameters``) config; refuses any
    RoPE scaling (our model builds plain RoPE)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for spec in (params, scaling or {}):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in ("default", None):
            raise ConversionError(f"{where}: RoPE scaling {kind!r} is not supported (only plain RoPE)")
    theta = params.get("rope_theta", hf.get("rope_theta", default))
    if theta is None:
        raise ConversionError(f"{where}: config.json has no rope_theta")
    return float(theta)


def checked_seq_length(hf: Mapping[str, Any], seq_length: Optional[int], where: str) -> int:
    """`seq_length`, or ``max_position_embeddings`` (4096 when config.json has none) when None;
    ConversionError when it is not positive or longer than ``max_position_embeddings``."""
    limit = hf.get("max_position_embeddings")
    if seq_length is None:
        return int(limit or 4096)
    if seq_length <= 0:
        raise ConversionError(f"--seq-length {seq_length}: must be positive")
    if limit and seq_length > int(limit):
        raise ConversionError(
            f"--seq-length {seq_length} is longer than {where}'s max_position_embeddings={limit}: the model "
            "was not trained on such positions (and RoPE scaling is not supported); give at most that"
        )
    return int(seq_length)


class Family:
    """Base: Llama-style decoder (pre-norm, RoPE, GQA, gated MLP). Subclasses set the class attributes
    and override `config_from_hf` / `config_to_hf` where they differ."""

    name: ClassVar[str]
    """`ModelConfig.family` of this family."""
    architectures: ClassVar[tuple[str, ...]]
    """HF ``architectures`` entries handled (the first is written on export)."""
    model_type: ClassVar[str]
    """HF ``model_type`` written on export (also accepted on import when architectures is missing)."""
    hidden_acts: ClassVar[tuple[str, ...]] = ("silu",)
    """HF ``hidden_act`` values that mean this family's MLP activation."""

    # ------------------------------------------------------------------------------- config.json
    def check_hf_config(self, hf: Mapping[str, Any], where: str) -> None:
        """Raise ConversionError for HF options our Megatron model does not build (checked on import)."""
        act = hf.get("hidden_act", self.hidden_acts[0])
        if act not in self.hidden_acts:
            raise ConversionError(
                f"{where}: hidden_act={act!r} is not supported for {self.name} "
                f"(expected one of {list(self.hidden_acts)})"
            )
        if hf.get("mlp_bias"):
            raise ConversionError(f"{where}: mlp_bias=true is not supported (the Megatron model has no MLP bias)")

    def config_from_hf(
        self,
        hf: Mapping[str, Any],
        where: str = "config.json",
        *,
        seq_length: Optional[int] = None,
        make_vocab_size_divisible_by: int = 1,
    ) -> ModelConfig:
        """`ModelConfig` from an HF ``config.json`` dict; ConversionError naming the field when unsupported.

        `seq_length` (None: ``max_position_embeddings``, else 4096) and `make_vocab_size_divisible_by` are
        the run's choices, not the model's: they go into the ModelConfig as given (`seq_length` at most
        ``max_position_embeddings``, since our RoPE has no scaling to go beyond the trained positions)."""
        self.check_hf_config(hf, where)
        heads = int(_get(hf, "num_attention_heads", where))
        hidden = int(_get(hf, "hidden_size", where))
        seq_length = checked_seq_length(hf, seq_length, where)
        try:
            return ModelConfig(
                family=self.name,
                num_layers=int(_get(hf, "num_hidden_layers", where)),
                hidden_size=hidden,
                ffn_hidden_size=int(_get(hf, "intermediate_size", where)),
                num_attention_heads=heads,
                num_query_groups=int(hf.get("num_key_value_heads") or heads),
                kv_channels=int(hf.get("head_dim") or hidden // heads),
                vocab_size=int(_get(hf, "vocab_size", where)),
                make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                seq_length=seq_length,
                rotary_base=rope_theta_of(hf, where, default=10000.0),
                norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", self.default_tie())),
                add_qkv_bias=self.qkv_bias(hf),
            )
        except ConfigError as exc:
            raise ConversionError(f"{where}: cannot be expressed as a {self.name} ModelConfig: {exc}") from None

    def default_tie(self) -> bool:
        """HF's default of ``tie_word_embeddings`` for this family (used when config.json omits it)."""
        return False

    def qkv_bias(self, hf: Mapping[str, Any]) -> bool:
        """Whether the HF model has Q/K/V biases (Llama: ``attention_bias``, which also biases o_proj)."""
        if hf.get("attention_bias"):
            raise ConversionError(
                f"attention_bias=true is not supported for {self.name}: it also puts a bias on o_proj, which "
                "the Megatron model does not build"
            )
        return False

    def config_to_hf(self, cfg: ModelConfig, base: Optional[Mapping[str, Any]], dtype: torch.dtype) -> dict:
        """HF ``config.json`` for `cfg`: `base` (the original config, for token ids and the like) with every
        architecture field set from `cfg`. RoPE theta is written in both the transformers-4 and -5 forms.

        ``max_position_embeddings`` stays the base's (the model's limit; `cfg.seq_length` is only what the
        run used, often shorter) unless the run used more or there is no base."""
        out = dict(base or {})
        for stale in ("rope_scaling", "_name_or_path", "transformers_version"):
            out.pop(stale, None)
        dtype_name = str(dtype).removeprefix("torch.")
        out.update(
            architectures=[self.architectures[0]],
            model_type=self.model_type,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_query_groups,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=max(cfg.seq_length, int(out.get("max_position_embeddings") or 0)),
            rms_norm_eps=cfg.norm_epsilon,
            rope_theta=cfg.rotary_base,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
            tie_word_embeddings=cfg.tie_embeddings,
            hidden_act=self.hidden_acts[0],
            dtype=dtype_name,
            torch_dtype=dtype_name,
        )
        if "head_dim" in out or cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size:
            out["head_dim"] = cfg.kv_channels
        return out

    # ------------------------------------------------------------------------------- tensors
    def rules(self, cfg: ModelConfig) -> list[TensorRule]:
        """Every tensor of the full Megatron state, in HF file order (embedding, layers, norm, head)."""
        heads, groups, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
        vocab = cfg.vocab_size

        def to_qkv(q, k, v):
            return interleave_qkv(q, k, v, heads, groups, d)

        def from_qkv(t):
            return split_qkv(t, heads, groups, d)

        def unpad(t):
            return (drop_padded_vocab_rows(t, vocab),)

        out = [TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), _identity, unpad)]
        for i in range(cfg.num_layers):
            meg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
            attn = hf + "self_attn."
            out += [
                TensorRule(meg + "input_layernorm.weight", (hf + "input_layernorm.weight",), _identity, _one),
                TensorRule(
                    meg + "self_attention.linear_qkv.weight",
                    tuple(f"{attn}{p}_proj.weight" for p in "qkv"),
                    to_qkv,
                    from_qkv,
                ),
            ]
            if cfg.add_qkv_bias:
                out.append(
                    TensorRule(
                        meg + "self_attention.linear_qkv.bias",
                        tuple(f"{attn}{p}_proj.bias" for p in "qkv"),
                        to_qkv,
                        from_qkv,
                    )
                )
            out += [
                TensorRule(meg + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), _identity, _one),
                TensorRule(
                    meg + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), _identity, _one
                ),
                TensorRule(
                    meg + "mlp.linear_fc1.weight",
                    (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                    fuse_gate_up,
                    split_gate_up,
                ),
                TensorRule(meg + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), _identity, _one),
            ]
        out.append(TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), _identity, _one))
        if not cfg.tie_embeddings:
            out.append(TensorRule("output_layer.weight", ("lm_head.weight",), _identity, unpad))
        return out

    def ignored_hf_tensor(self, name: str, cfg: ModelConfig) -> bool:
        """HF tensors that carry no information (skipped on import): rotary caches of old checkpoints, and
        the duplicated ``lm_head.weight`` some tied checkpoints store anyway."""
        return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


_FAMILIES: dict[str, Family] = {}
_LOADED = False


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: add a family (one instance) to the registry, keyed by its `name`."""
    if cls.name in _FAMILIES and type(_FAMILIES[cls.name]) is not cls:
        raise RuntimeError(f"conversion family {cls.name!r} registered twice")
    _FAMILIES[cls.name] = cls()
    return cls


def _load_families() -> None:
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module("dqo_megatron.conversion.families")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _LOADED = True


def families() -> dict[str, Family]:
    """All registered families, by `ModelConfig.family` name."""
    _load_families()
    return dict(_FAMILIES)


def family(name: str) -> Family:
    """The family registered as `name` (a `ModelConfig.family`); ConversionError listing the known ones."""
    known = families()
    if name not in known:
        raise ConversionError(f"no conversion family {name!r}; known: {sorted(known)}")
    return known[name]


def family_for_hf_config(hf: Mapping[str, Any], where: str = "config.json") -> Family:
    """The family handling an HF config (by ``architectures``, else ``model_type``); ConversionError
    naming the architecture and the supported ones when none does."""
    known = families().values()
    archs = hf.get("architectures") or []
    for arch in archs:
        for fam in known:
            if arch in fam.architectures:
                return fam
    if not archs:
        for fam in known:
            if hf.get("model_type") == fam.model_type:
                return fam
    supported = sorted(a for fam in known for a in fam.architectures)
    raise ConversionError(f"{where}: unknown architecture {archs or hf.get('model_type')!r}; supported: {supported}")
