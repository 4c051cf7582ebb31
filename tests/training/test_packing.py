"""Packed micro-batches (training/packing.py, models/packed.py) against padded ones and brute force.

The packer against an exhaustive search; the layout of a packed micro-batch against the padded one;
the document mask and the per-token RoPE angles against direct formulas; then, in one process from
the same weights: per-token log-probs, values and reference log-probs of packed rows equal the padded
rows', and one optimizer step (loss, gradient norms, every gradient, every weight after) is the same
packed or padded for every algorithm. fp32 throughout; packed and padded rows run different matmul
shapes, so they agree to rounding (tolerances below), not bit for bit.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from dqo_megatron.algorithms import get as get_algorithm
from dqo_megatron.config import LossConfig, ModelConfig, RunConfig, TrainConfig, ValueConfig
from dqo_megatron.data.dataset import TrajectoryDataset
from dqo_megatron.data.indexed import TrajectoryWriter
from dqo_megatron.data.tokenize import TokenizedSample
from dqo_megatron.models.packed import document_attention_mask, rotary_angles, thd_packed_seq_params
from dqo_megatron.parallel import cp_local_positions
from dqo_megatron.training.microbatches import MicroBatches
from dqo_megatron.training.packing import (
    budget_micro_batches,
    budget_unit_groups,
    first_fit_decreasing,
    unpack_rows,
)
from dqo_megatron.training.policy_value import LOGP, REF_LOGP, VALUE
from tests.helpers.distributed import run_distributed
from tests.helpers.rl_layouts import LR, _setup, _step

SEQ, VOCAB = 32, 256
LENGTHS = (5, 9, 33, 14, 20, 7, 12, 26, 6, 17, 11, 8, 30, 10, 13, 4)
"""Document lengths (tokens): short and long, one of seq_length + 1 (fills a row alone)."""
TRUNCATED = (1, 7, 10)
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
REL_TOL = 2e-5
LAYOUT_METRICS = ("rows_per_document", "padding_frac")
"""Metrics of the model's rows rather than of the documents: packing changes them on purpose."""


def padding_fractions(batch: dict) -> tuple[float, float]:
    """``(packed, padded)``: the share of the model's input positions that hold no document token in
    the packed rows of `batch` (a `pack_microbatch` result), and in padded rows of the same documents."""
    packed = float((batch["attention_document_ids"] < 0).float().mean())
    index = batch["unpack_index"]
    return packed, 1.0 - float((index >= 0).sum()) / index.numel()


# --- the packer -------------------------------------------------------------------------------------


def _optimal_bins(sizes: list[int], capacity: int) -> int:
    """Fewest bins, by trying every assignment of items to bins (small inputs only)."""
    for k in range(1, len(sizes) + 1):
        for assignment in itertools.product(range(k), repeat=len(sizes)):
            fill = [0] * k
            for size, b in zip(sizes, assignment):
                fill[b] += size
            if max(fill) <= capacity:
                return k
    return len(sizes)


def test_first_fit_decreasing_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(60):
        capacity = int(rng.integers(8, 20))
        sizes = [int(x) for x in rng.integers(1, capacity + 1, size=int(rng.integers(1, 8)))]
        bins = first_fit_decreasing(sizes, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(sizes))), "every item exactly once"
        assert all(sum(sizes[i] for i in b) <= capacity for b in bins), "no bin over capacity"
        assert bins == first_fit_decreasing(list(sizes), capacity), "deterministic"
        optimum = _optimal_bins(sizes, capacity)
        assert optimum <= len(bins) <= 11 / 9 * optimum + 6 / 9, (sizes, capacity, bins)
        # first fit, replayed: each item (longest first) is in the first bin with room at its turn
        fill: dict[int, int] = {}
        where = {i: b for b, items in enumerate(bins) for i in items}
        for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            first = next((b for b in sorted(fill) if fill[b] + sizes[i] <= capacity), len(fill))
            assert where[i] == first, (trial, sizes, bins)
            fill[first] = fill.get(first, 0) + sizes[i]


def test_first_fit_decreasing_refuses_an_item_over_capacity():
    with pytest.raises(ValueError, match="capacity"):
        first_fit_decreasing([3, 11], 10)


def test_given_rows_must_place_every_document_once_within_the_row(dataset):
    from dqo_megatron.training.packing import pack_microbatch

    (padded,) = _micro_batches(dataset, "samples", packing=False, mbs=2)
    samples = [{"tokens": [5] * 10}, {"tokens": [6] * 30}]
    padded = {**padded, "tokens": torch.zeros(2, SEQ, dtype=torch.long)}
    with pytest.raises(ValueError, match="exactly once"):
        pack_microbatch(samples, padded, seq_length=SEQ, pad_id=0, rows=[[0]])
    with pytest.raises(ValueError, match="more than"):
        pack_microbatch(samples, padded, seq_length=SEQ, pad_id=0, rows=[[0, 1]])
    assert pack_microbatch(samples, padded, seq_length=SEQ, pad_id=0, rows=[[1], [0]])["tokens"].shape == (2, SEQ)


# --- the micro-batches --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> TrajectoryDataset:
    """LENGTHS documents, 4 per prompt, correct on every other one (so DPO has pairs), some truncated,
    some without behavior log-probs, process rewards on some."""
    prefix = str(tmp_path_factory.mktemp("packing") / "d")
    rng = np.random.default_rng(1)
    writer = TrajectoryWriter(prefix, VOCAB)
    for d, length in enumerate(LENGTHS):
        prompt = max(2, length // 3)
        rewards = np.zeros(length, np.float32)
        rewards[-1] = float(d % 2 == 0)
        if d % 3 == 0 and length - prompt > 2:
            rewards[prompt + 1] = 0.5
        behavior = None
        if d % 4 != 3:
            behavior = np.zeros(length, np.float32)
            behavior[prompt:] = -rng.uniform(4.5, 6.5, size=length - prompt)
        sample = TokenizedSample(
            tokens=rng.integers(3, VOCAB, length),
            prompt_length=prompt,
            rewards=rewards,
            behavior_logprobs=behavior,
            prompt_id=f"p{d // 4}",
            outcome_reward=float(rewards[-1]),
            correct=int(d % 2 == 0),
            truncated=d in TRUNCATED,
        )
        writer.add(sample, 0)
    writer.finalize({})
    return TrajectoryDataset(prefix)


def _micro_batches(
    dataset,
    mode: str,
    packing: bool,
    mbs: int = 4,
    steps: int = 1,
    fixed_rows: bool = False,
    budget_rows=None,
    micro_batch_multiple: int = 1,
):
    batches = MicroBatches(
        dataset,
        seq_length=SEQ,
        micro_batch_size=mbs,
        dp_rank=0,
        dp_size=1,
        seed=0,
        shuffle=True,
        pad_id=0,
        with_ref_logprobs=False,
        mode=mode,
        packing=packing,
        fixed_rows=fixed_rows,
        budget_rows=budget_rows,
        micro_batch_multiple=micro_batch_multiple,
    )
    return batches.next_step(steps)


@pytest.mark.parametrize("mode", ["samples", "pairs", "kto"])
def test_packed_micro_batch_holds_the_padded_documents(dataset, mode):
    padded = _micro_batches(dataset, mode, packing=False, steps=2)
    packed = _micro_batches(dataset, mode, packing=True, steps=2)
    for pad, pack in zip(padded, packed):
        for key in pad:  # the loss's keys are the padded micro-batch's, unchanged
            if key not in ("tokens", "labels", "position_ids"):
                torch.testing.assert_close(pack[key], pad[key], rtol=0, atol=0, equal_nan=True, msg=key)
        n, s = pad["tokens"].shape
        rows = pack["tokens"].shape[0]
        assert rows < n and pack["tokens"].shape == (rows, s)
        index = pack["unpack_index"]
        inside = index >= 0
        for key in ("tokens", "labels"):  # labels: the document's next token wherever it is a loss target
            moved = unpack_rows(pack[key][..., None], index)[..., 0]
            want = pad[key] if key == "tokens" else torch.where(pad["response_mask"] > 0, pad[key], 0)
            got = moved if key == "tokens" else torch.where(pad["response_mask"] > 0, moved, 0)
            assert torch.equal(torch.where(inside, got, 0), torch.where(inside, want, 0)), key
        assert not (pad["response_mask"].bool() & ~inside).any(), "every loss target is inside its document"
        positions = unpack_rows(pack["position_ids"][..., None], index)[..., 0]
        assert torch.equal(positions[inside], torch.arange(s).expand(n, s)[inside]), "positions restart"
        owner = unpack_rows(pack["attention_document_ids"][..., None], index)[..., 0]
        assert torch.equal(owner[inside], torch.arange(n)[:, None].expand(n, s)[inside])
        assert sorted(index[inside].tolist()) == sorted(set(index[inside].tolist())), "no slot used twice"
        packed_pad, padded_pad = padding_fractions(pack)
        assert packed_pad < padded_pad


def test_fixed_rows_keep_one_row_per_document(dataset):
    (batch,) = _micro_batches(dataset, "samples", packing=True, fixed_rows=True)
    assert batch["tokens"].shape == (4, SEQ)
    assert (batch["attention_document_ids"][-1] == -1).all(), "an empty row pads the packed layout"


# --- the model side -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cp", [1, 2])
def test_document_attention_mask_against_a_loop(cp):
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [5, 5, 5, 5, 5, 7, 7, 7]])
    s = ids.shape[1]
    for rank in range(cp):
        mask = document_attention_mask(ids, cp, rank)
        queries = cp_local_positions(s // cp, cp, rank).tolist()
        keys = [p for r in range(cp) for p in cp_local_positions(s // cp, cp, r).tolist()]
        assert mask.shape == (2, 1, s // cp, s)
        for b in range(2):
            for i, q in enumerate(queries):
                for j, k in enumerate(keys):
                    sees = ids[b, q] == ids[b, k] and k <= q
                    assert bool(mask[b, 0, i, j]) == (not sees), (cp, rank, b, q, k)


def test_rotary_angles_restart_like_megatrons():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    rope.inv_freq = rope.inv_freq.cpu()
    whole = rope.get_freqs_non_repeated(12)  # Megatron's angles of positions 0..11, [12, 8]
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 0], list(range(12))])
    angles = rotary_angles(rope, positions)
    assert angles.shape == (12, 2, 1, 16)
    for b in range(2):
        for h in range(12):
            want = whole[positions[b, h]]
            assert torch.equal(angles[h, b, 0], torch.cat([want, want]))


def test_thd_segments_follow_documents_and_rows():
    ids = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 3, 3]])
    params = thd_packed_seq_params(ids)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 2, 5, 6, 10, 12]
    assert params.max_seqlen_q == 4


# --- packed == padded in one process ------------------------------------------------------------------


def _run(algorithm: str, mbs: int = 4) -> RunConfig:
    return RunConfig(
        model=MODEL,
        train=TrainConfig(micro_batch_size=mbs, global_batch_size=2 * mbs, seq_length=SEQ),
        algorithm=algorithm,
        loss=LossConfig(beta=0.5, lam=0.7),
        value=ValueConfig(mode="separate"),
    )


def _forward_body(run: RunConfig, padded: dict, packed: dict) -> dict:
    """Per-token outputs of one micro-batch, padded and packed (moved to document rows), and packed
    without the document mask (must differ: the test can fail)."""
    _info, (chunk,), _ddp, _opt = _setup(run, with_reference=True)
    assert not chunk.thd_packing, "the local spec packs with the document mask"
    with torch.no_grad():
        chunk.value_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        ids = packed["attention_document_ids"]
        args = (packed["tokens"], packed["position_ids"], packed["labels"])
        return {
            "padded": chunk(padded["tokens"], padded["position_ids"], padded["labels"]),
            "packed": unpack_rows(chunk(*args, ids), packed["unpack_index"]),
            "unmasked": unpack_rows(chunk(*args), packed["unpack_index"]),
        }


def test_packed_rows_give_the_padded_per_token_outputs(dataset):
    (padded,) = _micro_batches(dataset, "samples", packing=False, mbs=8)
    (packed,) = _micro_batches(dataset, "samples", packing=True, mbs=8)
    (out,) = run_distributed(_forward_body, 1, _run("dqo", mbs=8), padded, packed)
    inside = packed["unpack_index"] >= 0  # V: every input position of a document
    # log pi / log pi_ref: where the label is the document's next token (after its last token the
    # padded row's label is padding, the packed row's the next document's first token)
    labelled = torch.nn.functional.pad(inside[:, 1:], (0, 1), value=False)
    assert out["padded"].shape == out["packed"].shape == (8, SEQ, 3)
    for channel, where in ((LOGP, labelled), (VALUE, inside), (REF_LOGP, labelled)):
        want, got = out["padded"][..., channel][where], out["packed"][..., channel][where]
        scale = want.abs().max().item()
        assert scale > 0.1
        assert (got - want).abs().max().item() <= 1e-5 * scale, f"channel {channel}"
        wrong = out["unmasked"][..., channel][where]
        assert (wrong - want).abs().max().item() > 1e-2 * scale, f"channel {channel}: the mask matters"


def _step_body(run: RunConfig, batches: list[dict], with_reference: bool, full: dict | None) -> dict:
    _info, (chunk,), ddp, optimizer = _setup(run, with_reference, full)
    if full is None and chunk.value_head is not None:  # a zero head makes V = 0 and hides value-path bugs
        with torch.no_grad():
            chunk.value_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
            chunk.value_head.bias.fill_(0.1)
    initial = {n: p.detach().clone() for n, p in chunk.named_parameters()}
    result = _step(run, ddp, optimizer, batches)
    return {
        "initial": initial,
        "loss": result.loss,
        "tokens": result.tokens,
        "grad_norm": result.grad_norm,
        "grad_norms": result.grad_norms,
        "metrics": result.metrics,
        "grads": {n: p.main_grad.detach().clone() for n, p in chunk.named_parameters() if hasattr(p, "main_grad")},
        "after": {n: p.detach().clone() for n, p in chunk.named_parameters()},
    }


def _assert_same_gradients(got: dict, ref: dict) -> float:
    """The same token count and loss, and every gradient within REL_TOL of the largest (> 0); returns it."""
    assert got["tokens"] == ref["tokens"] and got["loss"] == pytest.approx(ref["loss"], rel=REL_TOL)
    scale = max(g.abs().max().item() for g in ref["grads"].values())
    assert scale > 0, "the step has gradients"
    for name, grad in ref["grads"].items():
        assert (got["grads"][name] - grad).abs().max().item() <= REL_TOL * scale, name
    return scale


@pytest.mark.parametrize("algorithm", ["dqo", "dro", "dpo", "kto", "sft", "rs"])
def test_packed_step_equals_padded_step(dataset, algorithm):
    """Two micro-batches of 4 (DPO: 4 pairs = 8 rows; KTO: 4 + 4 mismatched rows), one SGD step."""
    algo = get_algorithm(algorithm)
    mbs = 2 if algo.batch_mode == "pairs" else 4
    run = _run(algorithm, mbs)
    padded = _micro_batches(dataset, algo.batch_mode, packing=False, mbs=mbs, steps=2)
    packed = _micro_batches(dataset, algo.batch_mode, packing=True, mbs=mbs, steps=2)
    assert sum(b["tokens"].shape[0] for b in packed) < sum(b["tokens"].shape[0] for b in padded)
    with_reference = algo.needs_reference
    (ref,) = run_distributed(_step_body, 1, run, padded, with_reference, None)
    (got,) = run_distributed(_step_body, 1, run, packed, with_reference, ref["initial"])
    assert ref["tokens"] > 0 and got["tokens"] == ref["tokens"]
    if algo.needs_value:  # a truncated response is in the step: its bootstrap / exclusion is compared too
        assert ref["metrics"]["truncated_bootstrapped" if algorithm == "dqo" else "truncated_excluded"] > 0
    assert got["loss"] == pytest.approx(ref["loss"], rel=REL_TOL)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=REL_TOL)
    for member, norm in ref["grad_norms"].items():
        assert got["grad_norms"][member] == pytest.approx(norm, rel=REL_TOL), member
    for name, value in ref["metrics"].items():
        if name in LAYOUT_METRICS:  # what the model computed: fewer, fuller rows (test_packing_by_tokens)
            assert got["metrics"][name] < value, name
            continue
        assert got["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), name
    scale = _assert_same_gradients(got, ref)
    moved = max((ref["after"][n] - ref["initial"][n]).abs().max().item() for n in ref["after"])
    assert moved > 1e-6, "the step moved the weights"
    for name, weight in ref["after"].items():
        assert (got["after"][name] - weight).abs().max().item() <= REL_TOL * LR * scale + 1e-7, name


def test_four_packed_micro_batches_equal_one_of_four(dataset):
    """The step is the global token mean however the documents are cut into micro-batches and rows."""
    one = _micro_batches(dataset, "samples", packing=True, mbs=8, steps=1)
    four = _micro_batches(dataset, "samples", packing=True, mbs=2, steps=4)
    assert one[0]["tokens"].shape[0] < sum(b["tokens"].shape[0] for b in four), "the documents share rows differently"
    (ref,) = run_distributed(_step_body, 1, _run("dqo", 8), one, True, None)
    (got,) = run_distributed(_step_body, 1, _run("dqo", 2), four, True, ref["initial"])
    _assert_same_gradients(got, ref)


# --- micro-batches by tokens (train.micro_batch_tokens) -----------------------------------------------


def test_budget_micro_batches_hold_every_document_once():
    for rows_per_micro_batch in (1, 2, 3):
        cut = budget_micro_batches(LENGTHS, SEQ, rows_per_micro_batch)
        assert cut == budget_micro_batches(list(LENGTHS), SEQ, rows_per_micro_batch), "deterministic"
        assert sorted(d for documents, _ in cut for d in documents) == list(range(len(LENGTHS)))
        total_rows = len(first_fit_decreasing([min(n, SEQ) for n in LENGTHS], SEQ))
        assert len(cut) == -(-total_rows // rows_per_micro_batch)
        for documents, rows in cut:
            assert 1 <= len(rows) <= rows_per_micro_batch
            assert sorted(i for row in rows for i in row) == list(range(len(documents)))
            assert all(sum(min(LENGTHS[documents[i]], SEQ) for i in row) <= SEQ for row in rows)


@pytest.mark.parametrize("algorithm", ["dqo", "sft"])
def test_token_budget_step_equals_padded_step(dataset, algorithm):
    """The step's 8 documents in micro-batches of one packed row (4 here) == 2 padded of 4 documents."""
    padded = _micro_batches(dataset, "samples", packing=False, mbs=4, steps=2)
    budget = _micro_batches(dataset, "samples", packing=True, mbs=4, steps=2, budget_rows=1)
    assert len(budget) == 4 and all(b["tokens"].shape[0] == 1 for b in budget)
    assert sum(b["unpack_index"].shape[0] for b in budget) == 8
    with_reference = get_algorithm(algorithm).needs_reference
    (ref,) = run_distributed(_step_body, 1, _run(algorithm), padded, with_reference, None)
    (got,) = run_distributed(_step_body, 1, _run(algorithm), budget, with_reference, ref["initial"])
    _assert_same_gradients(got, ref)


def test_token_budget_needs_packing_and_one_row_per_document():
    from dqo_megatron.config import ConfigError, ParallelConfig

    with pytest.raises(ConfigError, match="needs train.packing=true"):
        TrainConfig(seq_length=SEQ, micro_batch_tokens=2 * SEQ, packing=False)  # unset: auto (test_packing_default)
    with pytest.raises(ConfigError, match="at least"):
        TrainConfig(seq_length=SEQ, packing=True, micro_batch_tokens=SEQ - 1)
    train = TrainConfig(seq_length=SEQ, packing=True, micro_batch_tokens=2 * SEQ, micro_batch_size=2)
    with pytest.raises(ConfigError, match=f"algorithm=kto keeps each KL group .* at least .* = {4 * SEQ}"):
        RunConfig(model=MODEL, train=train, algorithm="kto")  # 2 documents + 2 mismatched rows: up to 4 rows
    RunConfig(model=MODEL, train=dataclasses.replace(train, micro_batch_tokens=4 * SEQ), algorithm="kto")
    RunConfig(model=MODEL, train=train, algorithm="dpo")  # pairs stay together
    one_row = TrainConfig(seq_length=SEQ, packing=True, micro_batch_tokens=SEQ, micro_batch_size=2)
    RunConfig(model=MODEL, train=one_row, algorithm="dqo")
    with pytest.raises(ConfigError, match=f"at least 2 x train.seq_length = {2 * SEQ}"):
        RunConfig(model=MODEL, train=one_row, algorithm="dpo")  # a pair of long documents needs two rows
    RunConfig(model=MODEL, train=train, parallel=ParallelConfig(pipeline_model_parallel_size=2))  # fixed rows
    vpp = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    RunConfig(model=dataclasses.replace(MODEL, num_layers=4), train=train, parallel=vpp)  # split to groups of PP


def test_thd_packing_refused_under_cp_or_pp(monkeypatch):
    """The Transformer Engine (THD) path under CP or PP: a ConfigError naming the setting, not a
    wrong loss; the local spec's mask path is not refused."""
    from types import SimpleNamespace

    from megatron.core import parallel_state

    from dqo_megatron.config import ConfigError
    from dqo_megatron.training.policy_value import PolicyValueModel

    check = PolicyValueModel.check_packing_supported
    whole = SimpleNamespace(thd_packing=True, pre_process=True, post_process=True)
    for cp, stage in ((1, SimpleNamespace(thd_packing=True, pre_process=True, post_process=False)), (2, whole)):
        monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda cp=cp: cp)
        with pytest.raises(ConfigError, match="set train.packing=false"):
            check(stage)
        check(SimpleNamespace(thd_packing=False, pre_process=True, post_process=False))
    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: 1)
    check(whole)


@pytest.mark.parametrize("size", [2, 4])
def test_budget_unit_groups_keep_units_whole_within_the_budget(size):
    """Units of 2 (DPO's pairs) and 4 (a KTO KL group of 2 documents and 2 mismatched rows) documents."""
    rng = np.random.default_rng(2)
    for rows_per_micro_batch in (size // 2, size // 2 + 1, size):
        units = [[int(x) for x in rng.integers(3, 17, size=size)] for _ in range(12)]
        groups = budget_unit_groups(units, SEQ, rows_per_micro_batch)
        assert groups == budget_unit_groups([list(u) for u in units], SEQ, rows_per_micro_batch), "deterministic"
        assert sorted(i for g in groups for i in g) == list(range(12)), "every unit once, whole"
        for g in groups:
            assert len(first_fit_decreasing([n for i in g for n in units[i]], SEQ)) <= rows_per_micro_batch
        assert len(groups) < 12, "units share micro-batches"
    with pytest.raises(ValueError, match="KL group 0 needs more than 1 rows: raise train.micro_batch_tokens"):
        budget_unit_groups([[20, 20]], SEQ, 1, unit="KL group")


def test_dpo_by_tokens_equals_padded_dpo(dataset):
    """4 pairs in micro-batches of at most 2 packed rows (pairs kept whole) == 2 padded of 2 pairs."""
    padded = _micro_batches(dataset, "pairs", packing=False, mbs=2, steps=2)
    budget = _micro_batches(dataset, "pairs", packing=True, mbs=2, steps=2, budget_rows=2)
    assert all(b["tokens"].shape[0] <= 2 for b in budget)
    assert [b["unpack_index"].shape[0] for b in budget] != [4, 4], "the pairs are cut differently"
    (ref,) = run_distributed(_step_body, 1, _run("dpo", 2), padded, True, None)
    (got,) = run_distributed(_step_body, 1, _run("dpo", 2), budget, True, ref["initial"])
    _assert_same_gradients(got, ref)
