"""Precision settings: the config fields, the checks that refuse FP8 where it cannot run (a GPU faked
by value or by monkeypatching torch.cuda), the megatron-core fields they map to, and fp32 loss inputs
from a bf16 model. All on CPU; the GPU side is tests/gpu/."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig, RunConfig, TrainConfig
from dqo_megatron.config.loader import load_config
from dqo_megatron.models.precision import (
    Hardware,
    check_precision_supported,
    detect_hardware,
    fp8_support_problems,
    fp8_transformer_config_kwargs,
)

SMALL = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, vocab_size=300)
LLAMA = ModelConfig(family="llama", **SMALL)
QWEN2 = ModelConfig(family="qwen2", num_query_groups=2, **SMALL)
GEMMA = ModelConfig(family="gemma", **{**SMALL, "num_attention_heads": 2}, kv_channels=48)
TE = "2.8.0"


def gpu(name: str, capability: tuple[int, int], cuda: str = "12.9", te: str | None = TE) -> Hardware:
    return Hardware(
        cuda=True,
        device_name=name,
        capability=capability,
        cuda_version=cuda,
        te_version=te,
        te_reason="" if te else "transformer_engine cannot be imported (ImportError: no module)",
    )


A100, L40S, H100, B200, RTX5090 = (
    gpu("NVIDIA A100-SXM4-80GB", (8, 0)),
    gpu("NVIDIA L40S", (8, 9)),
    gpu("NVIDIA H100 80GB HBM3", (9, 0)),
    gpu("NVIDIA B200", (10, 0)),
    gpu("NVIDIA GeForce RTX 5090", (12, 0)),
)
CPU = Hardware(cuda=False, te_reason="CUDA is not available")


# ------------------------------------------------------------------------------------------ the config
def test_recipe_defaults_follow_transformer_engine():
    assert PrecisionConfig().fp8 is None and PrecisionConfig().resolved_fp8_format is None
    assert {r: PrecisionConfig(fp8=r).resolved_fp8_format for r in ("delayed", "tensorwise", "blockwise", "mxfp8")} == {
        "delayed": "hybrid",
        "tensorwise": "hybrid",
        "blockwise": "e4m3",
        "mxfp8": "e4m3",
    }
    assert PrecisionConfig(fp8="delayed", fp8_format="e4m3").resolved_fp8_format == "e4m3"
    assert PrecisionConfig(fp8="mxfp8").fp8_alignment == 32 and PrecisionConfig(fp8="delayed").fp8_alignment == 16


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(fp8_param=True), "precision.fp8_param"),
        (dict(fp8_format="e4m3"), "precision.fp8_format"),
        (dict(dtype="fp32", fp8="delayed"), "precision.fp8"),
        (dict(dtype="fp16", fp8="tensorwise"), "precision.fp8"),
        (dict(fp8="delayed", fp8_amax_history_len=0), "precision.fp8_amax_history_len"),
    ],
)
def test_inconsistent_precision_fields_are_refused_by_name(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        PrecisionConfig(**kwargs)


def test_unknown_recipe_is_refused_when_loading(tmp_path):
    with pytest.raises(ConfigError, match="precision.fp8"):
        load_config(RunConfig, None, ["precision.fp8=nvfp4"])


@pytest.mark.parametrize(
    ("model", "parallel", "train", "precision", "field"),
    [
        (dict(hidden_size=72, num_attention_heads=4), {}, {}, "delayed", "model.hidden_size=72"),
        (dict(ffn_hidden_size=136), {}, {}, "delayed", "model.ffn_hidden_size=136"),
        # 160 is a multiple of 16, but each of 4 TP ranks holds 40 columns
        (
            dict(ffn_hidden_size=160),
            dict(tensor_model_parallel_size=4),
            {},
            "tensorwise",
            "parallel.tensor_model_parallel_size=4",
        ),
        # Gemma-style head dim 40: 4 heads x 40 = 160, a multiple of 16, but 40 columns on each of 4 TP ranks
        (
            dict(family="gemma", num_attention_heads=4, kv_channels=40, ffn_hidden_size=256),
            dict(tensor_model_parallel_size=4),
            {},
            "delayed",
            "model.kv_channels=40",
        ),
        (dict(family="gemma", num_attention_heads=2, kv_channels=36), {}, {}, "tensorwise", "model.kv_channels=36"),
        (dict(seq_length=128), {}, dict(micro_batch_size=1, seq_length=100), "delayed", "train.seq_length=100"),
        # 1 x 96 tokens over CP=2: 48 per rank, a multiple of 16 but not of mxfp8's 32
        (
            dict(seq_length=128),
            dict(context_parallel_size=2),
            dict(seq_length=96),
            "mxfp8",
            "parallel.context_parallel_size=2",
        ),
    ],
)
def test_fp8_dimensions_not_multiples_are_refused_naming_the_field(model, parallel, train, precision, field):
    kwargs = dict(
        model=ModelConfig(**{**SMALL, **model}),
        parallel=ParallelConfig(**parallel),
        train=TrainConfig(**train),
        precision=PrecisionConfig(fp8=precision),
    )
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        RunConfig(**kwargs)
    RunConfig(**{**kwargs, "precision": PrecisionConfig()})  # the same layout is fine without FP8


def test_fp8_dimensions_that_fit_pass_and_the_paper_models_fit():
    RunConfig(model=ModelConfig(**SMALL), precision=PrecisionConfig(fp8="mxfp8"), train=TrainConfig(seq_length=64))
    for path in ("examples/configs/qwen2-7b.yaml", "examples/configs/gemma-7b.yaml", "examples/configs/llama3-8b.yaml"):
        run = load_config(RunConfig, path, ["precision.fp8=delayed"])
        assert run.precision.fp8 == "delayed"


def test_fp8_param_needs_the_distributed_optimizer():
    with pytest.raises(ConfigError, match=r"train\.distributed_optimizer"):
        RunConfig(model=ModelConfig(**SMALL), precision=PrecisionConfig(fp8="delayed", fp8_param=True))
    RunConfig(
        model=ModelConfig(**SMALL),
        precision=PrecisionConfig(fp8="delayed", fp8_param=True),
        train=TrainConfig(distributed_optimizer=True),
    )


# ------------------------------------------------------------------------------- the hardware checks
@pytest.mark.parametrize("hardware", [CPU, A100, L40S, H100, B200, RTX5090])
def test_no_fp8_needs_nothing(hardware):
    assert fp8_support_problems(PrecisionConfig(), hardware, "local") == []


@pytest.mark.parametrize(
    ("hardware", "recipe", "ok"),
    [
        (L40S, "delayed", True),
        (L40S, "tensorwise", True),
        (L40S, "blockwise", False),
        (L40S, "mxfp8", False),
        (H100, "delayed", True),
        (H100, "tensorwise", True),
        (H100, "blockwise", True),
        (H100, "mxfp8", False),
        (B200, "delayed", True),
        (B200, "tensorwise", True),
        (B200, "blockwise", True),
        (B200, "mxfp8", True),
        (A100, "delayed", False),
        (A100, "tensorwise", False),
        (A100, "blockwise", False),
        (A100, "mxfp8", False),
        (RTX5090, "delayed", True),
        (RTX5090, "mxfp8", False),
    ],
)
def test_recipes_by_compute_capability(hardware, recipe, ok):
    problems = fp8_support_problems(PrecisionConfig(fp8=recipe), hardware, "te")
    assert (problems == []) == ok, problems
    if not ok:
        major, minor = hardware.capability
        assert f"precision.fp8={recipe}" in problems[0] and f"has {major}.{minor}" in problems[0]


def test_mxfp8_on_hopper_points_to_the_hopper_recipes():
    (problem,) = fp8_support_problems(PrecisionConfig(fp8="mxfp8"), H100, "te")
    assert "compute capability >= 10.0 and < 12.0" in problem and "delayed or tensorwise" in problem


def test_blockwise_needs_cuda_12_9():
    (problem,) = fp8_support_problems(PrecisionConfig(fp8="blockwise"), gpu("NVIDIA H100", (9, 0), cuda="12.4"), "te")
    assert "CUDA >= 12.9" in problem and "12.4" in problem


def test_recipes_need_a_recent_enough_transformer_engine():
    old = gpu("NVIDIA H100", (9, 0), te="2.1.0")
    assert fp8_support_problems(PrecisionConfig(fp8="delayed"), old, "te") == []
    (problem,) = fp8_support_problems(PrecisionConfig(fp8="tensorwise"), old, "te")
    assert "Transformer Engine >= 2.2.0.dev0" in problem and "2.1.0" in problem
    assert (
        fp8_support_problems(PrecisionConfig(fp8="tensorwise"), gpu("H100", (9, 0), te="2.2.0.dev0+5fdd7bb"), "te")
        == []
    )


def test_fp8_without_cuda_or_transformer_engine_or_its_spec():
    (problem,) = fp8_support_problems(PrecisionConfig(fp8="delayed"), CPU, "local")
    assert "precision.fp8=delayed" in problem and "CUDA is not available" in problem
    (problem,) = fp8_support_problems(PrecisionConfig(fp8="delayed"), gpu("NVIDIA H100", (9, 0), te=None), "local")
    assert "needs Transformer Engine" in problem and "ImportError" in problem
    (problem,) = fp8_support_problems(PrecisionConfig(fp8="delayed"), H100, "local")
    assert "layer spec" in problem  # the local spec would silently train in bf16


def test_check_also_refuses_dimensions_and_low_precision_on_cpu():
    with pytest.raises(ConfigError, match=r"model\.hidden_size=72"):
        check_precision_supported(
            PrecisionConfig(fp8="delayed"),
            "bf16",
            backend="te",
            hardware=H100,
            model=ModelConfig(**{**SMALL, "hidden_size": 72}),
            parallel=ParallelConfig(),
        )
    with pytest.raises(ConfigError, match=r"precision\.dtype=bf16 needs a GPU"):
        check_precision_supported(PrecisionConfig(dtype="bf16"), "bf16", backend="local", hardware=CPU)
    check_precision_supported(PrecisionConfig(fp8="delayed"), "bf16", backend="te", hardware=H100, model=LLAMA)
    check_precision_supported(PrecisionConfig(dtype="bf16"), "bf16", backend="local", hardware=A100, model=LLAMA)


def _fake_cuda(monkeypatch, name: str, capability: tuple[int, int], te_version: str | None):
    import dqo_megatron.compat as compat
    import dqo_megatron.models.precision as precision_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    status = (
        (True, f"transformer_engine {te_version}") if te_version else (False, "transformer_engine cannot be imported")
    )
    monkeypatch.setattr(compat, "transformer_engine_status", lambda: status)
    monkeypatch.setattr(precision_mod, "_transformer_engine_version", lambda: te_version)


def test_detect_hardware_reads_the_device(monkeypatch):
    assert detect_hardware().cuda == torch.cuda.is_available()
    _fake_cuda(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0), "2.8.0")
    hw = detect_hardware()
    assert (hw.cuda, hw.capability, hw.device_name, hw.cuda_version, hw.te_version) == (
        True,
        (9, 0),
        "NVIDIA H100 80GB HBM3",
        "12.9",
        "2.8.0",
    )
    _fake_cuda(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0), None)
    assert detect_hardware().te_version is None and "cannot be imported" in detect_hardware().te_reason


def test_transformer_config_refuses_fp8_on_a_faked_a100(monkeypatch):
    """The whole path (`transformer_config` -> detected hardware -> checks) with the device faked."""
    from dqo_megatron.models import transformer_config

    _fake_cuda(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0), "2.8.0")
    with pytest.raises(ConfigError, match=r"precision\.fp8=tensorwise needs an Ada.*has 8\.0"):
        transformer_config(LLAMA, ParallelConfig(), PrecisionConfig(fp8="tensorwise"), backend="te")


# ---------------------------------------------------------------------- what megatron-core is told
def test_fp8_fields_for_megatron_core():
    assert fp8_transformer_config_kwargs(PrecisionConfig()) == {}
    got = fp8_transformer_config_kwargs(PrecisionConfig(fp8="blockwise", fp8_param=True))
    assert got == dict(
        fp8="e4m3", fp8_recipe="blockwise", fp8_param=True, fp8_amax_history_len=1024, fp8_amax_compute_algo="max"
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = TransformerConfig.__dataclass_fields__
    assert all(name in fields for name in got)
    for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"):  # names megatron-core knows
        assert recipe in str(fields["fp8_recipe"].type)


@pytest.mark.parametrize("model", [LLAMA, QWEN2, GEMMA], ids=["llama", "qwen2", "gemma"])
def test_family_switches_reach_both_specs(model):
    """What TE's modules read from the TransformerConfig: QKV bias, zero-centred gamma, activation."""
    import torch.nn.functional as F

    from dqo_megatron.models.builder import transformer_config_kwargs

    for backend in ("te", "local"):
        kw = transformer_config_kwargs(
            model, ParallelConfig(), PrecisionConfig(dtype="bf16"), backend=backend, cuda=True
        )
        assert kw["add_qkv_bias"] == (model.family == "qwen2")
        assert kw["layernorm_zero_centered_gamma"] == (model.family == "gemma")
        assert kw["normalization"] == "RMSNorm" and kw["bf16"] and kw["params_dtype"] == torch.bfloat16
        if model.family == "gemma":
            assert kw["activation_func"].keywords == {"approximate": "tanh"} and not kw["bias_activation_fusion"]
        else:
            assert kw["activation_func"] is F.silu and kw["bias_activation_fusion"] == (backend == "te")
        assert kw["apply_rope_fusion"]  # TE's kernel, or ours on the local spec
        # The local spec's SwiGLU module (never on TE's spec: its MLP would apply a plain activation).
        assert kw["use_te_activation_func"] == (backend == "local" and model.family != "gemma")
        assert not kw["gradient_accumulation_fusion"]  # TE would need Megatron DDP's main_grad everywhere


def test_cpu_kwargs_build_a_transformer_config_with_fp8_fields():
    """megatron-core accepts our FP8 fields (constructing the config needs no TE; running it does)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from dqo_megatron.models.builder import transformer_config_kwargs

    kw = transformer_config_kwargs(LLAMA, ParallelConfig(), PrecisionConfig(fp8="delayed"), backend="local", cuda=False)
    config = TransformerConfig(**{**kw, "params_dtype": torch.bfloat16, "bf16": True})
    assert (config.fp8, config.fp8_recipe, config.fp8_amax_history_len) == ("hybrid", "delayed", 1024)


# ------------------------------------------------------------------ fp32 loss math from a bf16 model
def _bf16_policy_value_loss_inputs():
    """One process: a bf16 policy + value network (Float16Module, as on GPU), one DQO loss; the dtypes
    that reach the loss."""

    import dqo_megatron.algorithms.dqo as dqo_algorithm
    import dqo_megatron.training.algorithms as algorithms
    from dqo_megatron import parallel
    from dqo_megatron.config import LossConfig
    from dqo_megatron.models import build_model_chunks
    from dqo_megatron.training.policy_value import PolicyValueModel
    from tests.helpers.rl_layouts import make_rl_batch

    parallel.initialize(ParallelConfig(), seed=3)
    # bf16 parameters through overrides: the precision check refuses bf16 on CPU because Megatron's
    # *optimizer* cannot step bf16 there; a forward/backward is fine.
    bf16 = {"params_dtype": torch.bfloat16, "pipeline_dtype": torch.bfloat16, "bf16": True}
    (policy,), (value,) = (build_model_chunks(LLAMA, ParallelConfig(), config_overrides=bf16) for _ in range(2))
    model = PolicyValueModel(policy, value, value_head=True)
    with torch.no_grad():
        model.value_head.weight.normal_(0, 0.5)
    seen = {}
    real = dqo_algorithm.dqo_losses

    def spy(logprobs, ref, behavior, values, rewards, mask, **kwargs):
        seen.update(logprobs=logprobs.dtype, ref=ref.dtype, behavior=behavior.dtype, values=values.dtype)
        out = real(logprobs, ref, behavior, values, rewards, mask, **kwargs)
        seen["loss"] = out.loss_func_output()[0].dtype
        return out

    dqo_algorithm.dqo_losses = spy
    try:
        batch = make_rl_batch(LLAMA.vocab_size, 2, 16, with_ref=True)
        run = RunConfig(model=LLAMA, loss=LossConfig(beta=0.1, lam=0.9), train=TrainConfig(seq_length=16))
        output, loss_func = algorithms.rl_forward_step(run, iter([batch]), model)
        loss_sum, _count, _metrics = loss_func(output)
        loss_sum.backward()
    finally:
        dqo_algorithm.dqo_losses = real
    trunk = {p.dtype for n, p in model.policy.named_parameters() if "layers" in n}
    return {
        "trunk": trunk,
        "output": output.dtype,
        "head": model.value_head.weight.dtype,
        **seen,
        "grads_finite": all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None),
    }


def test_bf16_model_gives_fp32_loss_inputs():
    from tests.helpers.distributed import run_distributed

    (got,) = run_distributed(_bf16_policy_value_loss_inputs, 1)
    assert got["trunk"] == {torch.bfloat16}  # the model really is bf16
    assert got["output"] == torch.float32  # log pi, V, log pi_ref leave the model in fp32
    assert got["head"] == torch.float32
    for name in ("logprobs", "ref", "behavior", "values", "loss"):
        assert got[name] == torch.float32, (name, got[name])
    assert got["grads_finite"]
