"""Packing on a GPU. On the local layer spec (what `train.packing` auto turns on, and what a GPU without
Transformer Engine runs): one DQO step of packed micro-batches, and one by tokens, equals the padded
step in fp32 (CUDA SDPA with the document mask). On Transformer Engine (Megatron's THD path,
`PolicyValueModel._thd_forward`): packed rows against padded rows on the same weights, per-token
log pi, V and log pi_ref.

Written without a GPU; neither has run yet (docs/packing.md). THD: bf16 (TE's fused attention has no fp32
THD kernel): packed and padded rows take different kernels and round differently, so they agree to
bf16 precision (relative RMS below 1e-2), while a lost document boundary or RoPE offset moves the
outputs by O(1) relative.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.support import rel_rms, requires_cuda, requires_te, run_spawned, te_status
from tests.training.test_packing import _micro_batches, _run, dataset  # noqa: F401 - the fixture

pytestmark = [pytest.mark.gpu, requires_cuda]


def _packed_vs_padded(run, padded: dict, packed: dict) -> dict:
    from dqo_megatron import parallel
    from dqo_megatron.training.packing import unpack_rows
    from dqo_megatron.training.policy_value import build_policy_value_chunks

    info = parallel.initialize(run.parallel, seed=11)
    (chunk,) = build_policy_value_chunks(run, with_value=True, with_reference=True)
    padded = {k: v.to(info.device) for k, v in padded.items()}
    packed = {k: v.to(info.device) for k, v in packed.items()}
    with torch.no_grad():
        chunk.value_head.weight.normal_(0, 0.5, generator=torch.Generator(info.device).manual_seed(3))
        args = (packed["tokens"], packed["position_ids"], packed["labels"])
        out = {
            "padded": chunk(padded["tokens"], padded["position_ids"], padded["labels"]),
            "packed": unpack_rows(chunk(*args, packed["attention_document_ids"]), packed["unpack_index"]),
            "unmasked": unpack_rows(chunk(*args), packed["unpack_index"]),
        }
    return {"thd": chunk.thd_packing, **{k: v.float() for k, v in out.items()}}


@requires_te()
def test_thd_packed_rows_give_the_padded_outputs(dataset):  # noqa: F811
    from dqo_megatron.training.policy_value import LOGP, REF_LOGP, VALUE

    (padded,) = _micro_batches(dataset, "samples", packing=False, mbs=8)
    (packed,) = _micro_batches(dataset, "samples", packing=True, mbs=8)
    (out,) = run_spawned(_packed_vs_padded, 1, _run("dqo", mbs=8), padded, packed)
    assert out["thd"], "the TE spec packs as THD"
    inside = packed["unpack_index"] >= 0
    labelled = torch.nn.functional.pad(inside[:, 1:], (0, 1), value=False)
    for channel, where in ((LOGP, labelled), (VALUE, inside), (REF_LOGP, labelled)):
        want = out["padded"][..., channel][where]
        assert rel_rms(out["packed"][..., channel][where], want) < 1e-2, f"channel {channel}"
        assert rel_rms(out["unmasked"][..., channel][where], want) > 5e-2, f"channel {channel}: boundaries matter"


def _dqo_step_on_gpu(run, batches: list[dict], initial: dict | None) -> dict:
    """One DQO step (the layout tests' SGD + per-member clipping) of `batches` on this GPU, from
    `initial` (None: fresh weights, value head perturbed so V != 0)."""
    from tests.helpers.rl_layouts import _setup, _step

    info, (chunk,), ddp, optimizer = _setup(run, True, initial)
    if initial is None:
        with torch.no_grad():
            chunk.value_head.weight.normal_(0, 0.5, generator=torch.Generator(info.device).manual_seed(3))
            chunk.value_head.bias.fill_(0.1)
    start = {n: p.detach().clone() for n, p in chunk.named_parameters()}
    result = _step(run, ddp, optimizer, [{k: v.to(info.device) for k, v in b.items()} for b in batches])
    return {
        "device": str(info.device),
        "thd": chunk.thd_packing,
        "initial": start,
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "grad_norms": result.grad_norms,
    }


@pytest.mark.skipif(te_status()[0], reason="Transformer Engine is usable: the THD test above covers packing there")
@pytest.mark.parametrize("budget_rows", [None, 1], ids=["packed", "by-tokens"])
def test_local_spec_packed_step_equals_padded_on_gpu(dataset, budget_rows):  # noqa: F811
    from dqo_megatron.config import PrecisionConfig

    run = _run("dqo", 4)
    run.precision = PrecisionConfig(dtype="fp32")
    padded = _micro_batches(dataset, "samples", packing=False, mbs=4, steps=2)
    packed = _micro_batches(dataset, "samples", packing=True, mbs=4, steps=2, budget_rows=budget_rows)
    (ref,) = run_spawned(_dqo_step_on_gpu, 1, run, padded, None)
    (got,) = run_spawned(_dqo_step_on_gpu, 1, run, packed, ref["initial"])
    assert got["device"].startswith("cuda") and not got["thd"], "the local spec packs with the document mask"
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    for member, norm in ref["grad_norms"].items():
        assert got["grad_norms"][member] == pytest.approx(norm, rel=1e-4), member
