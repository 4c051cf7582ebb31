"""`annotate`: run the frozen reference once over a preprocessed dataset and store its log-probs.

With the reference's per-token log-probs in the dataset, training needs no reference model in memory
and no reference forward pass per step. The reference runs under the same TP/PP/CP layout as
training (Megatron's forward-only schedule); each data-parallel rank takes its share of the
documents in order, and the last pipeline stage's first TP/CP rank writes them into the dataset's
reference slot (`<prefix>_ref_logprobs.bin`, aligned with the tokens: the entry of token t is
``log pi_ref(token_t | tokens_<t)``, 0 for the first token). The manifest is marked filled at the end;
an interrupted run leaves it unmarked, and training refuses `data.reference=data` then.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial

import numpy as np
import torch

from dqo_megatron.config import ConfigError, RunConfig
from dqo_megatron.training.policy_value import (
    LOGP,
    build_policy_value_chunks,
    pipeline_micro_batch_size,
    with_resolved_packing,
)
from dqo_megatron.training.step import microbatch_iterators, model_inputs

logger = logging.getLogger(__name__)


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    inputs = model_inputs(batch)
    output = model(inputs["tokens"], inputs["position_ids"], inputs["labels"], batch.get("attention_document_ids"))
    return output, partial(_collect, batch)


def _collect(batch, output, non_loss_data=False):
    from dqo_megatron.logprobs import gather_from_context_parallel
    from dqo_megatron.training.packing import unpack_rows

    logp = gather_from_context_parallel(output[..., LOGP : LOGP + 1].detach(), dim=1)
    if "unpack_index" in batch:  # packed rows (train.packing): back to one row per document
        logp = unpack_rows(logp, batch["unpack_index"])
    return {"indices": batch["indices"], "lengths": batch["lengths"], "logp": logp[..., 0].float().cpu()}


@torch.no_grad()
def annotate(run: RunConfig, micro_batches_per_call: int = 4, progress: bool = True) -> dict:
    """Fill `run.data.train_prefix`'s reference log-probs with the reference model (collective).

    The reference is `run.init.reference` (else `run.init.policy`). Returns counts for the summary.
    """
    from dqo_megatron import parallel
    from dqo_megatron.data.batching import DistributedTrajectorySampler
    from dqo_megatron.data.dataset import TrajectoryDataset
    from dqo_megatron.training.data_check import check_data_matches_model

    _check_config(run)
    info = parallel.initialize(run.parallel, seed=run.train.seed)
    run = with_resolved_packing(run, log=info.rank == 0)
    dataset = TrajectoryDataset(run.data.train_prefix)
    check_data_matches_model(dataset, run, log=info.rank == 0)  # before the reference is built and loaded
    chunks = _load_reference(run)
    _check_documents_fit(dataset, run.train.seq_length + 1)
    sampler = DistributedTrajectorySampler(
        len(dataset), run.train.micro_batch_size, info.dp_rank, info.dp_size, shuffle=False, drop_last=False
    )
    writer = _is_writer()
    values, starts = _open_reference_slot(run.data.train_prefix, info.rank, writer)
    batches = list(sampler)
    calls = math.ceil(len(batches) / micro_batches_per_call)
    bar = _progress(calls, info.rank == 0 and progress)
    start, written = time.perf_counter(), 0
    for call in range(calls):
        group = batches[call * micro_batches_per_call : (call + 1) * micro_batches_per_call]
        out = _forward_only(run, chunks, _micro_batches(run, dataset, group, info.device))
        if writer:
            written += _store(values, starts, out)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    _finish(run, dataset, values, info.rank, start)
    return {"documents": len(dataset), "written_here": written, "seconds": time.perf_counter() - start}


def _check_config(run: RunConfig) -> None:
    """The settings annotate needs: a dataset and the reference's weights."""
    if not run.data.train_prefix:
        raise ConfigError("data.train_prefix is not set: give the prefix written by `dqo-megatron preprocess`")
    if not (run.init.reference or run.init.policy):
        raise ConfigError("annotate needs the reference's weights: set init.reference (or init.policy)")


def _load_reference(run: RunConfig) -> list:
    """The reference's model chunks, its weights loaded, in eval mode."""
    from dqo_megatron.training.initial_weights import load_initial_weights

    reference_run = _as_reference_run(run)
    chunks = build_policy_value_chunks(reference_run, with_value=False, with_reference=False)
    load_initial_weights(reference_run, chunks)
    for chunk in chunks:
        chunk.eval()
    return chunks


def _check_documents_fit(dataset, length: int) -> None:
    if int(dataset.lengths.max(initial=0)) > length:
        raise ConfigError(
            f"documents up to {int(dataset.lengths.max())} tokens do not fit train.seq_length + 1 = {length}"
        )


def _is_writer() -> bool:
    """Whether this rank writes the log-probs: the last pipeline stage's first TP/CP rank."""
    from megatron.core import parallel_state

    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    )


def _open_reference_slot(prefix: str, rank: int, writer: bool) -> tuple:
    """Stage a copy of the reference slot (rank 0; collective barrier), and open it for writing on the
    writers: ``(values, starts)``, ``(None, None)`` elsewhere."""
    from dqo_megatron.data.indexed import open_reference_logprobs_for_update, stage_reference_logprobs

    if rank == 0:
        stage_reference_logprobs(prefix)  # written aside: a killed rerun mixes nothing
    torch.distributed.barrier()
    values, starts, _lengths = open_reference_logprobs_for_update(prefix) if writer else (None, None, None)
    return values, starts


def _micro_batches(run: RunConfig, dataset, group: list, device) -> list[dict]:
    """One call's micro-batches on `device`: each padded to train.seq_length + 1 (or packed, with
    `train.packing`: as many rows as documents under PP), with its documents' indices and lengths."""
    from dqo_megatron.data.batching import pad_collate
    from dqo_megatron.training.microbatches import to_model_batch
    from dqo_megatron.training.packing import pack_microbatch

    length = run.train.seq_length + 1
    mbs_data = []
    for indices in group:
        samples = [dataset[i] for i in indices]
        collated = pad_collate(samples, run.data.pad_id, pad_to_multiple_of=length, max_length=length)
        batch = to_model_batch(collated, with_ref_logprobs=False)
        if run.train.packing:
            rows = len(samples) if run.parallel.pipeline_model_parallel_size > 1 else None
            batch = pack_microbatch(samples, batch, seq_length=length - 1, pad_id=run.data.pad_id, num_rows=rows)
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["indices"], batch["lengths"] = torch.tensor(indices), collated["lengths"]
        mbs_data.append(batch)
    return mbs_data


def _forward_only(run: RunConfig, chunks: list, mbs_data: list[dict]) -> list:
    """Megatron's forward-only schedule over `mbs_data`; the last stage's `_collect` results."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=microbatch_iterators(chunks, mbs_data),
        model=chunks,
        num_microbatches=len(mbs_data),
        seq_length=run.train.seq_length,
        micro_batch_size=pipeline_micro_batch_size(chunks[0], run.train.micro_batch_size),
        forward_only=True,
        collect_non_loss_data=True,
    )


def _store(values, starts, out: list) -> int:
    """Write the collected log-probs into the reference slot; return how many documents were written."""
    written = 0
    for item in out:
        for row, (doc, n) in enumerate(zip(item["indices"].tolist(), item["lengths"].tolist())):
            # position h predicts token h+1: token t's log-prob sits at h = t-1
            values[starts[doc] + 1 : starts[doc] + n] = item["logp"][row, : n - 1].numpy().astype(np.float32)
            written += 1
    return written


def _finish(run: RunConfig, dataset, values, rank: int, start: float) -> None:
    """Flush the writer's slot (`values`, None elsewhere); after every rank is done, mark it filled (rank 0)."""
    from dqo_megatron.data.indexed import mark_reference_logprobs_filled

    if values is not None:
        values.flush()
    torch.distributed.barrier()
    if rank == 0:
        mark_reference_logprobs_filled(run.data.train_prefix)
        logger.info(
            "annotated %d documents of %s in %.1f s", len(dataset), run.data.train_prefix, time.perf_counter() - start
        )


def _as_reference_run(run: RunConfig) -> RunConfig:
    """The same run with the reference's checkpoint as the policy (the model that is evaluated)."""
    import copy

    from dqo_megatron.config import InitConfig

    ref = copy.deepcopy(run)
    ref.init = InitConfig(policy=run.init.reference or run.init.policy)
    ref.algorithm = "sft"
    return ref


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="annotate", unit="call")
