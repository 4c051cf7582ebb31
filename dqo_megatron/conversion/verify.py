"""Parity check between an HF model directory and a dqo-megatron checkpoint: the same fixed prompts through
both models in fp32, compared on the unpadded vocabulary.

What it checks (and `ParityReport.passed` means):
  * max |logit_hf - logit_megatron| over every prompt, position and vocabulary entry <= tolerance;
  * greedy next-token agreement (argmax at every position) is reported; a disagreement counts as a
    failure only when it is *decisive*: HF's top logit beats the logit of Megatron's pick by more than
    2 x tolerance (a near-tie within tolerance may flip legitimately).
Both models run in fp32 whatever the stored dtype (the conversion is a permutation of the same numbers,
so fp32 separates conversion bugs from rounding), one after the other to keep one model in memory.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

DEFAULT_TOLERANCE = 1e-3
"""Default max |logit difference| (fp32). Correct conversions measure ~1e-5 on small models."""


@dataclass
class ParityReport:
    """Outcome of `verify_parity`."""

    max_abs_diff: float
    """Largest |logit difference| over all prompts, positions and (unpadded) vocabulary entries."""
    max_abs_logit: float
    """Largest |logit| of the HF model (the scale the difference is measured against)."""
    greedy_agreement: float
    """Fraction of positions where both models' argmax agree."""
    decisive_disagreements: int
    """Positions whose argmax differs by more than 2 x tolerance in HF's logits."""
    positions: int
    """Positions compared (sum of prompt lengths)."""
    tolerance: float
    """Tolerance applied to max_abs_diff."""
    prompts: list[list[int]] = field(default_factory=list)
    """The token ids fed to both models."""
    nonfinite_logits: int = 0
    """NaN/inf logits of either model (the differences and maxima above are over finite entries only)."""
    nonfinite_weights: list[str] = field(default_factory=list)
    """Parameters of either model holding NaN/inf, as "hf:<name> (<count>)" / "megatron:<name> (<count>)"."""

    @property
    def passed(self) -> bool:
        """max_abs_diff within tolerance, no decisive greedy disagreement, and nothing non-finite: two
        models full of NaN agree perfectly on every comparison that skips NaN, so that alone cannot pass."""
        return (
            self.max_abs_diff <= self.tolerance
            and self.decisive_disagreements == 0
            and self.nonfinite_logits == 0
            and not self.nonfinite_weights
        )

    def summary(self) -> str:
        """One line for logs and the CLI."""
        verdict = "PASSED" if self.passed else "FAILED"
        bad = ""
        if self.nonfinite_weights:
            shown = ", ".join(self.nonfinite_weights[:5]) + (" ..." if len(self.nonfinite_weights) > 5 else "")
            bad += f"; non-finite weights in {len(self.nonfinite_weights)} tensors: {shown}"
        if self.nonfinite_logits:
            bad += f"; {self.nonfinite_logits} non-finite logits"
        return (
            f"parity {verdict}: max |logit diff| = {self.max_abs_diff:.3e} (tolerance {self.tolerance:.1e}, "
            f"max |logit| {self.max_abs_logit:.2f}); greedy next-token agreement "
            f"{100 * self.greedy_agreement:.1f}% of {self.positions} positions "
            f"({self.decisive_disagreements} decisive disagreements){bad}"
        )


def default_prompts(vocab_size: int, seq_length: int, bos_token_id: Optional[int] = None) -> list[list[int]]:
    """Three fixed pseudo-random prompts (lengths 7, 16, 33, capped by `seq_length`), seeded so every
    run checks the same tokens; each starts with BOS when the model has one."""
    gen = torch.Generator().manual_seed(20240917)
    prompts = []
    for length in (7, 16, 33):
        length = min(length, seq_length)
        ids = torch.randint(0, vocab_size, (length,), generator=gen).tolist()
        if bos_token_id is not None and 0 <= bos_token_id < vocab_size:
            ids[0] = bos_token_id
        prompts.append(ids)
    return prompts


@torch.no_grad()
def megatron_logits(chunk, prompts: Sequence[Sequence[int]], vocab_size: int) -> list[torch.Tensor]:
    """Logits ``[len, vocab_size]`` (fp32, padded rows dropped) of a TP=1 PP=1 GPTModel for each prompt."""
    chunk.eval()
    out = []
    for ids in prompts:
        tokens = torch.tensor([list(ids)], dtype=torch.long)
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        logits = chunk(tokens, positions, None)  # [1, s, padded vocab]
        out.append(logits[0, :, :vocab_size].float().clone())
    return out


@torch.no_grad()
def round_parameters(module: torch.nn.Module, dtype: Optional[torch.dtype]) -> None:
    """Round every parameter through `dtype` and back (in place): the model a cast checkpoint holds."""
    if dtype is None:
        return
    for param in module.parameters():
        param.copy_(param.to(dtype).to(param.dtype))


@torch.no_grad()
def nonfinite_parameters(module: torch.nn.Module, label: str) -> list[str]:
    """ "<label>:<name> (<count>)" for every parameter or buffer of `module` holding NaN or inf."""
    tensors = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    out = []
    for name, tensor in tensors:
        count = int((~torch.isfinite(tensor)).sum())
        if count:
            out.append(f"{label}:{name} ({count})")
    return out


@torch.no_grad()
def hf_logits(
    hf_dir: str | Path,
    prompts: Sequence[Sequence[int]],
    round_to: Optional[torch.dtype] = None,
    nonfinite: Optional[list] = None,
) -> list[torch.Tensor]:
    """Logits ``[len, vocab]`` (fp32) of the transformers model in `hf_dir` (no custom code, eager attention),
    its weights first rounded through `round_to` when given; non-finite parameters are appended to
    `nonfinite` when given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    if nonfinite is not None:
        nonfinite.extend(nonfinite_parameters(model, "hf"))
    round_parameters(model, round_to)
    model.eval()
    out = [model(torch.tensor([list(ids)], dtype=torch.long)).logits[0].float().clone() for ids in prompts]
    del model
    gc.collect()
    return out


def compare_logits(
    reference: Sequence[torch.Tensor],
    candidate: Sequence[torch.Tensor],
    tolerance: float,
    prompts: Sequence[Sequence[int]] = (),
) -> ParityReport:
    """`ParityReport` of `candidate` (Megatron) against `reference` (HF) logits, prompt by prompt.

    Non-finite logits are counted (and fail the report); the differences and maxima are taken over the
    entries finite in both (Python's max() would silently drop a NaN: max(0.0, nan) is 0.0)."""
    max_diff, max_logit, agree, decisive, positions, nonfinite = 0.0, 0.0, 0, 0, 0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        if ref.shape != cand.shape:
            raise ValueError(f"logit shapes differ: HF {tuple(ref.shape)} vs Megatron {tuple(cand.shape)}")
        finite = torch.isfinite(ref) & torch.isfinite(cand)
        nonfinite += int((~torch.isfinite(ref)).sum()) + int((~torch.isfinite(cand)).sum())
        zero = torch.zeros_like(ref)
        max_diff = max(max_diff, torch.where(finite, (ref - cand).abs(), zero).max().item())
        max_logit = max(max_logit, torch.where(finite, ref.abs(), zero).max().item())
        ref_top, cand_top = ref.argmax(-1), cand.argmax(-1)
        agree += (ref_top == cand_top).sum().item()
        gap = ref.gather(-1, ref_top[:, None]) - ref.gather(-1, cand_top[:, None])
        decisive += (gap.squeeze(-1) > 2 * tolerance).sum().item()
        positions += ref.shape[0]
    return ParityReport(
        max_abs_diff=max_diff,
        max_abs_logit=max_logit,
        greedy_agreement=agree / max(positions, 1),
        decisive_disagreements=decisive,
        positions=positions,
        tolerance=tolerance,
        prompts=[list(p) for p in prompts],
        nonfinite_logits=nonfinite,
    )


def verify_parity(
    hf_dir: str | Path,
    megatron_dir: str | Path,
    tolerance: float = DEFAULT_TOLERANCE,
    prompts: Optional[Sequence[Sequence[int]]] = None,
    round_hf_to: Optional[torch.dtype] = None,
    round_megatron_to: Optional[torch.dtype] = None,
) -> ParityReport:
    """Run both checkpoints on `prompts` (default: `default_prompts`) and compare; see the module doc.

    `round_hf_to` / `round_megatron_to`: when the conversion changed the dtype, round the source side's
    weights through the target dtype first, so that the check measures the conversion, not the cast.

    Loads the Megatron checkpoint from disk at TP=1 PP=1 in fp32 (in this process; creates a
    single-process group if none exists). Does not raise on failure: check `report.passed`.
    """
    from dqo_megatron.config import ParallelConfig
    from dqo_megatron.conversion.hf_io import HFCheckpoint
    from dqo_megatron.conversion.megatron_io import (
        build_empty_chunks,
        load_chunks,
        read_metadata,
        single_process_layout,
    )

    cfg, _info = read_metadata(megatron_dir)
    if prompts is None:
        bos = HFCheckpoint.open(hf_dir).config.get("bos_token_id")
        prompts = default_prompts(cfg.vocab_size, cfg.seq_length, bos if isinstance(bos, int) else None)
    nonfinite: list[str] = []
    reference = hf_logits(hf_dir, prompts, round_hf_to, nonfinite=nonfinite)
    with single_process_layout():
        chunks = build_empty_chunks(cfg, ParallelConfig(), torch.float32)
        load_chunks(chunks, Path(megatron_dir) / "weights")
        nonfinite += nonfinite_parameters(chunks[0], "megatron")
        round_parameters(chunks[0], round_megatron_to)
        candidate = megatron_logits(chunks[0], prompts, cfg.vocab_size)
        del chunks
    gc.collect()
    report = compare_logits(reference, candidate, tolerance, prompts)
    report.nonfinite_weights = nonfinite
    return report
