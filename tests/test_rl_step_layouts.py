"""A DQO (and DRO) step with policy + value network (+ reference model) is the same under every layout.

Same method and tolerance as tests/test_parallel_layouts.py (see its docstring), but the step is the
real RL step: `PolicyValueModel` (members stacked along the micro-batch between pipeline stages),
fused log-probs from hidden states, the value head, context-parallel gathers and the pure losses.
"""

from __future__ import annotations

import pytest

from dqo_megatron.config import LossConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig, ValueConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.rl_layouts import LR, make_rl_batch, rl_layout_step, rl_reference_step

REL_TOL = 2e-5
SEQ, ROWS, VOCAB = 32, 4, 256
MODEL = ModelConfig(
    family="llama",
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=VOCAB,
    seq_length=SEQ,
)

GEMMA = ModelConfig(
    family="gemma",
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=24,
    vocab_size=VOCAB,
    seq_length=SEQ,
)  # tied embeddings

# name: (algorithm, value mode, reference from the model?, lambda, model)
SETUPS = {
    "dqo-separate-dataref": ("dqo", "separate", False, 1.0, MODEL),
    "dqo-shared-modelref": ("dqo", "shared", True, 0.7, MODEL),
    "dro-separate": ("dro", "separate", False, 1.0, MODEL),
    "dqo-gemma-tied-modelref": ("dqo", "separate", True, 1.0, GEMMA),
}
LAYOUTS = {
    "tp2": (2, dict(tensor_model_parallel_size=2)),
    "tp2-sp": (2, dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    "pp2": (2, dict(pipeline_model_parallel_size=2)),
    "cp2": (2, dict(context_parallel_size=2)),
    "dp2": (2, {}),
}
CASES = [
    (s, layout)
    for s in SETUPS
    for layout in LAYOUTS
    if s == "dqo-separate-dataref" or layout in ("pp2", "cp2", "tp2-sp")
]
CASES = [c for c in CASES if not (c[0].startswith("dqo-gemma") and c[1] != "pp2")] + [
    ("dqo-gemma-tied-modelref", "tp2")
]


def _run(setup: str, parallel: dict | None = None) -> RunConfig:
    algorithm, mode, _, lam, model = SETUPS[setup]
    return RunConfig(
        model=model,
        parallel=ParallelConfig(**(parallel or {})),
        train=TrainConfig(micro_batch_size=1, global_batch_size=ROWS, seq_length=SEQ),
        algorithm=algorithm,
        loss=LossConfig(beta=0.5, lam=lam),
        value=ValueConfig(mode=mode),
    )


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(setup):
        if setup not in cache:
            with_ref = SETUPS[setup][2]
            batch = make_rl_batch(VOCAB, ROWS, SEQ, with_ref=not with_ref)
            (ref,) = run_distributed(rl_reference_step, 1, _run(setup), batch, with_ref)
            cache[setup] = (batch, ref)
        return cache[setup]

    return get


@pytest.mark.parametrize("setup, layout", CASES, ids=[f"{setup}-{layout}" for setup, layout in CASES])
def test_rl_step_matches_single_process(setup, layout, references):
    batch, ref = references(setup)
    world, parallel = LAYOUTS[layout]
    results = run_distributed(rl_layout_step, world, _run(setup, parallel), batch, SETUPS[setup][2], ref)
    grad_scale = max(g.abs().max().item() for g in ref["grads"].values())
    for rank, dev in enumerate(results):
        assert dev["compared"] > 0
        assert dev["loss"] == pytest.approx(ref["loss"], rel=REL_TOL), f"rank {rank} loss"
        assert dev["grad_norm"] == pytest.approx(ref["grad_norm"], rel=REL_TOL), f"rank {rank} grad norm"
        for member, norm in ref["grad_norms"].items():  # each member's own norm, counted once per layout
            assert dev["grad_norms"][member] == pytest.approx(norm, rel=REL_TOL), f"rank {rank} {member} norm"
        assert dev["grads"] <= REL_TOL * grad_scale, f"rank {rank}: grads differ by {dev['grads']:.3g}"
        assert dev["after"] <= REL_TOL * LR * grad_scale + 1e-7, f"rank {rank}: weights differ by {dev['after']:.3g}"


def test_reference_step_trains_policy_and_value(references):
    batch, ref = references("dqo-separate-dataref")
    assert set(ref["grad_norms"]) == {"policy", "value"}
    # the per-member clip is active in these tests (else a miscounted norm would go unnoticed)
    assert min(ref["grad_norms"].values()) > 0.5
    moved = {name: (ref["after"][name] - ref["initial"][name]).abs().max().item() for name in ref["initial"]}
    assert max(v for k, v in moved.items() if k.startswith("policy.")) > 1e-5
    assert max(v for k, v in moved.items() if k.startswith("value.")) > 1e-5
    assert moved["value_head.weight"] > 1e-5
