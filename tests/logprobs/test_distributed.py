"""Log-probs and per-token gathers across gloo ranks: TP=2 (vocab-parallel, SP) and CP=2, against the
full-vocabulary / full-sequence computation on one process; the value head under TP=2+SP in a real
GPTModel with Megatron DDP and finalize_model_grads.

Each test forks its ranks once (`run_distributed`) and checks many things inside; a rank returns the
largest deviations it saw so the parent only compares numbers.
"""

from __future__ import annotations

import torch

from dqo_megatron import parallel
from dqo_megatron.config import ModelConfig, ParallelConfig
from dqo_megatron.logprobs import (
    gather_from_context_parallel,
    gather_from_sequence_parallel,
    output_weight,
    split_for_context_parallel,
    token_logprobs_from_hidden,
    token_logprobs_from_logits,
)
from dqo_megatron.parallel import cp_local_positions
from tests.helpers.distributed import run_distributed
from tests.logprobs.reference import random_case, reference_logprobs


def _max_dev(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _full_grads(fn, inputs, upstream):
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad((out * upstream).sum(), leaves)


def _tp2_body() -> dict:
    from megatron.core import parallel_state as ps

    parallel.initialize(ParallelConfig(tensor_model_parallel_size=2))
    group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    dev: dict[str, float] = {}
    b, s, vocab, h = 2, 8, 46, 12
    shard = slice(rank * vocab // 2, (rank + 1) * vocab // 2)
    case = random_case(b, s, vocab, hidden=h, seed=11)
    labels, upstream = case["labels"], case["grad"]

    # Vocab-parallel from logits: fp64 (exact), fp32 and bf16 logits; whole and chunked.
    for dtype, chunk in (
        (torch.float64, None),
        (torch.float64, 3),
        (torch.float32, 3),
        (torch.bfloat16, None),
        (torch.bfloat16, 3),
    ):
        full = case["logits"].to(dtype)
        local = full[..., shard].clone().requires_grad_()
        before = local.detach().clone()
        out = token_logprobs_from_logits(local, labels, tp_group=group, chunk_size=chunk)
        (grad,) = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), local)
        want, (want_grad,) = _full_grads(lambda z: reference_logprobs(z, labels), [full], upstream)
        name = f"logits_{str(dtype).split('.')[-1]}_chunk{chunk}"
        dev[name] = _max_dev(out, want)
        dev[name + "_grad"] = _max_dev(grad, want_grad[..., shard])
        dev[name + "_mutated"] = _max_dev(local.detach(), before)
        dev[name + "_dtype_ok"] = float(
            out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and grad.dtype == dtype
        )

    # Fused from hidden: without SP (hidden replicated) and with SP (hidden [s/2, b, h] per rank).
    def fused_ref(hid, w):
        return reference_logprobs(torch.einsum("sbh,vh->bsv", hid, w), labels)

    want, (want_h, want_w) = _full_grads(fused_ref, [case["hidden"], case["weight"]], upstream)
    rows = slice(rank * s // 2, (rank + 1) * s // 2)
    for sp in (False, True):
        hidden = (case["hidden"][rows] if sp else case["hidden"]).clone().requires_grad_()
        weight = case["weight"][shard].clone().requires_grad_()
        out = token_logprobs_from_hidden(hidden, weight, labels, tp_group=group, sequence_parallel=sp, chunk_size=3)
        grad_h, grad_w = torch.autograd.grad((out * upstream).sum(), (hidden, weight))
        name = f"fused_sp{int(sp)}"
        dev[name] = _max_dev(out, want)
        dev[name + "_grad_hidden"] = _max_dev(grad_h, want_h[rows] if sp else want_h)
        dev[name + "_grad_weight"] = _max_dev(grad_w, want_w[shard])

    # SP gather of per-token values [b, s/2]: whole sequence; the (replicated) loss's gradient is sliced.
    full_values = torch.randn(b, s, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    local = full_values[:, rows].clone().requires_grad_()
    gathered = gather_from_sequence_parallel(local, group, dim=1)
    (grad,) = torch.autograd.grad((gathered.pow(2) * upstream).sum(), local)
    dev["sp_gather"] = _max_dev(gathered, full_values)
    dev["sp_gather_grad"] = _max_dev(grad, (2 * full_values * upstream)[:, rows])
    summed = gather_from_sequence_parallel(local, group, dim=1, sum_grads=True)
    (grad,) = torch.autograd.grad((summed * upstream).sum(), local)
    dev["sp_gather_sum_grad"] = _max_dev(grad, 2 * upstream[:, rows])  # both ranks' identical grads added
    return dev


def test_tp2_vocab_parallel_logprobs_and_sp_gather_match_full_vocabulary():
    results = run_distributed(_tp2_body, 2, timeout=120)
    for rank, dev in enumerate(results):
        for name, value in dev.items():
            if name.endswith("_dtype_ok"):
                assert value == 1.0, (rank, name)
                continue
            if name.endswith("_mutated"):
                assert value == 0.0, (rank, name)
                continue
            if "bfloat16" in name:
                tol = 2e-2 if name.endswith("_grad") else 1e-4  # bf16 gradient vs exact fp64
            elif "float32" in name:
                tol = 2e-5
            else:
                tol = 1e-12
            assert value <= tol, f"rank {rank}: {name} deviates by {value:.3g} (tol {tol})"


def _returns_like(x: torch.Tensor) -> torch.Tensor:
    """A whole-sequence function mixing positions (a discounted reverse cumulative sum, like returns)."""
    out, running = torch.empty_like(x), torch.zeros_like(x[:, 0])
    for t in reversed(range(x.shape[1])):
        running = x[:, t] + 0.9 * running
        out[:, t] = running
    return out.pow(2)


def _cp2_body() -> dict:
    from megatron.core import parallel_state as ps

    from dqo_megatron.training.step import slice_batch_for_context_parallel

    parallel.initialize(ParallelConfig(context_parallel_size=2))
    group, rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    b, s = 2, 12
    full = torch.randn(b, s, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    upstream = torch.randn(b, s, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    dev = {}
    # Megatron's own CP slicing (get_batch_on_this_cp_rank) is what the gather must undo.
    local_megatron = slice_batch_for_context_parallel({"x": full})["x"]
    positions = cp_local_positions(s // 2, 2, rank)
    dev["layout_is_megatrons"] = _max_dev(local_megatron, full[:, positions])
    local = local_megatron.clone().requires_grad_()
    gathered = gather_from_context_parallel(local, group)
    dev["natural_order"] = _max_dev(gathered, full)
    dev["split_inverts_gather"] = _max_dev(split_for_context_parallel(gathered, group), local)

    leaf = full.clone().requires_grad_()
    (want,) = torch.autograd.grad((_returns_like(leaf) * upstream).sum(), leaf)
    # (a) Each rank keeps only its own positions' loss terms: the sum over ranks is the whole loss.
    per_token = _returns_like(gathered) * upstream
    (grad_a,) = torch.autograd.grad(split_for_context_parallel(per_token, group).sum(), local, retain_graph=True)
    dev["grad_own_positions"] = _max_dev(grad_a, want[:, positions])
    # (b) Every rank computes the whole loss: gradient (and token count) cp times larger.
    (grad_b,) = torch.autograd.grad(per_token.sum(), local)
    dev["grad_whole_loss_times_cp"] = _max_dev(grad_b, 2 * want[:, positions])
    return dev


def test_cp2_gather_restores_natural_order_with_correct_gradients():
    for rank, dev in enumerate(run_distributed(_cp2_body, 2, timeout=120)):
        for name, value in dev.items():
            assert value <= 1e-12, f"rank {rank}: {name} deviates by {value:.3g}"


def _model_tp2_sp_body() -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from dqo_megatron.models import build_model_chunks
    from dqo_megatron.models.value_head import FinalHiddenStates, ValueHead, final_hidden_states_only
    from dqo_megatron.training.megatron_setup import wrap_with_ddp

    cfg_parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    parallel.initialize(cfg_parallel)
    group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    model_cfg = ModelConfig(
        num_layers=1, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, vocab_size=40, seq_length=8
    )
    (gpt,) = build_model_chunks(model_cfg, cfg_parallel, backend="local")
    gpt.value_head = ValueHead.from_config(gpt.config, init_std=0.1)  # before DDP: gets a main_grad buffer
    (ddp,) = wrap_with_ddp([gpt])
    b, s = 2, 8
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 40, (b, s), generator=gen)
    labels = torch.randint(0, 40, (b, s), generator=gen)
    positions = torch.arange(s).expand(b, s)
    c_value = torch.randn(b, s, generator=gen)
    c_logp = torch.randn(b, s, generator=gen)
    dev = {}

    with FinalHiddenStates(ddp) as captured:
        logits = ddp(tokens, positions, None)  # [b, s, V/tp]
    hidden = captured.hidden  # [s/tp, b, h]
    dev["hidden_is_sp_slice"] = float(hidden.shape != (s // 2, b, 16))
    with final_hidden_states_only(ddp):
        hidden_only = ddp(tokens, positions, None)
    dev["hidden_only_same"] = _max_dev(hidden_only, hidden)
    dev["post_process_restored"] = float(not gpt.post_process)

    weight = output_weight(ddp)
    from_logits = token_logprobs_from_logits(logits, labels, tp_group=group)
    fused = token_logprobs_from_hidden(hidden, weight, labels, tp_group=group, sequence_parallel=True, chunk_size=3)
    dev["fused_equals_logits_path"] = _max_dev(fused, from_logits)

    values = gather_from_sequence_parallel(gpt.value_head(hidden.detach()), group, dim=1)  # [b, s]
    loss = (values * c_value).sum() + (fused * c_logp).sum()
    loss.backward()
    head_w, head_b = gpt.value_head.weight.main_grad.clone(), gpt.value_head.bias.main_grad.clone()
    finalize_model_grads([ddp])
    # Expected: dL/dw = sum_{b,s} c[b,s] x[s,b], over the whole sequence (hidden gathered here, detached).
    parts = [torch.empty_like(hidden) for _ in range(2)]
    torch.distributed.all_gather(parts, hidden.detach().contiguous(), group=group)
    whole = torch.cat(parts)  # [s, b, h]
    dev["head_grad_after_finalize"] = _max_dev(
        gpt.value_head.weight.main_grad[0], torch.einsum("bs,sbh->h", c_value, whole)
    )
    dev["head_bias_after_finalize"] = _max_dev(gpt.value_head.bias.main_grad[0], c_value.sum())
    rows = slice(rank * s // 2, (rank + 1) * s // 2)
    dev["head_grad_before_is_partial"] = _max_dev(
        head_w[0], torch.einsum("bs,sbh->h", c_value[:, rows], hidden.detach())
    )
    dev["head_bias_before_is_partial"] = _max_dev(head_b[0], c_value[:, rows].sum())
    return {"dev": dev, "head_grad": gpt.value_head.weight.main_grad.clone()}


def test_value_head_and_fused_logprobs_in_a_tp2_sp_gpt_model():
    results = run_distributed(_model_tp2_sp_body, 2, timeout=120)
    for rank, result in enumerate(results):
        for name, value in result["dev"].items():
            tol = 0.0 if name in ("hidden_is_sp_slice", "post_process_restored", "hidden_only_same") else 1e-5
            assert value <= tol, f"rank {rank}: {name} deviates by {value:.3g}"
    assert torch.equal(results[0]["head_grad"], results[1]["head_grad"])
    assert results[0]["head_grad"].abs().sum() > 0
