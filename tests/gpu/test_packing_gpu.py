"""Packed rows on Transformer Engine (Megatron's THD path, `PolicyValueModel._thd_forward`) against
padded rows on the same weights: per-token log pi, V and log pi_ref.

Written without a GPU; it has never run (docs/packing.md). bf16 (TE's fused attention has no fp32
THD kernel): packed and padded rows take different kernels and round differently, so they agree to
bf16 precision (relative RMS below 1e-2), while a lost document boundary or RoPE offset moves the
outputs by O(1) relative.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.support import rel_rms, requires_cuda, requires_te, run_spawned
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
