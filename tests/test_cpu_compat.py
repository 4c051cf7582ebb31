"""The CPU patch (dqo_megatron.compat.cpu): still needed, still applicable, never global, a GPU no-op.

If a megatron-core upgrade removes the CUDA-bound code an entry is for, `test_patch_still_needed`
fails and names the entry: drop it from the list. If an upgrade moves things so the patch no longer
applies, `test_patches_apply` fails. The layout tests prove the patched modules work together.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from dqo_megatron.compat import cpu
from tests.helpers.distributed import run_distributed


@pytest.mark.parametrize("entry", cpu.PATCHED_MODULES, ids=lambda e: e.name.removeprefix("megatron.core."))
def test_module_patch_still_needed(entry):
    source = inspect.getsource(importlib.import_module(entry.name))
    assert entry.marker in source, (
        f"{entry.name} no longer contains {entry.marker!r}: megatron-core changed; check whether the CPU "
        f"patch for it ({entry.needed_for}) is still needed and update dqo_megatron/compat/cpu.py"
    )


@pytest.mark.parametrize("patch", cpu.PATCHED_FUNCTIONS, ids=lambda p: f"{p.owner.split('.')[-1]}.{p.attribute}")
def test_function_patch_still_needed(patch):
    assert patch.marker in cpu.original_source_of(patch), (
        f"{patch.owner}.{patch.attribute}: the CUDA-bound code {patch.marker!r} is gone; revisit the patch"
    )


def _apply_and_inspect():
    import megatron.core.optimizer.optimizer as opt_module
    import megatron.core.pipeline_parallel.schedules as schedules

    assert not cpu.cpu_patches_applied()
    assert cpu.apply_cpu_patches() is True
    assert cpu.apply_cpu_patches() is True  # idempotent
    report = {
        "schedules_torch_is_proxy": schedules.torch is not torch,
        "global_torch_untouched": torch.zeros(1).device.type == "cpu" and torch.cuda.current_device is not None,
        "proxy_zeros_on_cpu": schedules.torch.zeros([], device="cuda").device.type,
        "proxy_current_device": str(schedules.torch.cuda.current_device()),
        "clip_replaced": opt_module.clip_grad_by_total_norm_fp32 is cpu._clip_grad_by_total_norm_fp32,
    }
    try:  # the real torch still refuses CUDA on this machine: we did not patch it globally
        torch.zeros(1, device="cuda")
        report["global_cuda_factory_raises"] = False
    except (RuntimeError, AssertionError):
        report["global_cuda_factory_raises"] = True
    return report


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_patches_apply_and_stay_local():
    (report,) = run_distributed(_apply_and_inspect, 1)  # a fresh forked process: the patch is per process
    assert report == {
        "schedules_torch_is_proxy": True,
        "global_torch_untouched": True,
        "proxy_zeros_on_cpu": "cpu",
        "proxy_current_device": "cpu",
        "clip_replaced": True,
        "global_cuda_factory_raises": True,
    }


def _noop_when_cuda(monkeypatch_cuda: bool):
    import megatron.core.pipeline_parallel.schedules as schedules

    torch.cuda.is_available = lambda: monkeypatch_cuda  # only inside this forked child
    applied = cpu.apply_cpu_patches()
    return applied, schedules.torch is torch


def test_noop_when_cuda_is_available():
    (result,) = run_distributed(_noop_when_cuda, 1, True)
    assert result == (False, True)


def test_clip_grad_replacement_matches_definition():
    grads = [torch.randn(5), torch.randn(3, 2)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    total = torch.sqrt(sum((g**2).sum() for g in grads)).item()
    cpu._clip_grad_by_total_norm_fp32(params, max_norm=0.5, total_norm=total)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * 0.5 / (total + 1e-6))
    cpu._clip_grad_by_total_norm_fp32(params, max_norm=100.0, total_norm=total)  # below max: untouched
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * 0.5 / (total + 1e-6))


def test_cp_rope_slice_matches_load_balanced_layout():
    class Group:
        def __init__(self, rank, size):
            self._rank, self._size = rank, size

        def rank(self):
            return self._rank

        def size(self):
            return self._size

    table = torch.arange(16.0).view(16, 1, 1, 1)  # [seq, 1, 1, dim]
    # cp=2: 4 chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    got0 = cpu._get_pos_emb_on_this_cp_rank(table, 0, Group(0, 2)).flatten().tolist()
    got1 = cpu._get_pos_emb_on_this_cp_rank(table, 0, Group(1, 2)).flatten().tolist()
    assert got0 == [0, 1, 2, 3, 12, 13, 14, 15]
    assert got1 == [4, 5, 6, 7, 8, 9, 10, 11]
