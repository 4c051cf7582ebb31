"""The `transformers` generation backend: an HF model directory on CPU or one GPU, KV-cached and batched.

For CPU machines and small GPUs (vLLM is the GPU path at scale). The model is loaded from local
files only (safetensors + config.json; `trust_remote_code` stays off unless asked for), prompts are
framed by the preprocessing `Tokenizer` (see framing.py), and decoding is our own loop around the
model's forward with a `DynamicCache`:

1. The distinct prompts of a batch are prefilled once, left-padded (position ids count real tokens
   only), and their cache rows are repeated for the n samples of each prompt.
2. Each step samples one token per row with `sampling.sample_step` (one generator per row, seeded
   from the prompt's seed and the sample index, so a row does not depend on the batch it is in),
   records the raw and processed log-probs, and drops finished rows from the cache.

Batching changes only the float rounding of the forward pass (padding, matrix shapes), not which
random numbers a row uses: the same seeds give the same samples at any batch size except where
two tokens' cumulative probabilities meet within rounding (not observed in the tests).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from dqo_megatron.rollout.backend import Completion, SamplingParams
from dqo_megatron.rollout.framing import (
    RowDecoder,
    has_tokenizer,
    load_tokenizer,
    prepare_call,
    resolve_device,
    resolve_dtype,
    stop_token_ids,
)
from dqo_megatron.rollout.sampling import draw_uniforms, row_generators, sample_seed, sample_step

logger = logging.getLogger(__name__)


class TransformersBackend:
    """`GenerationBackend` over `transformers.AutoModelForCausalLM`.

    Args:
        model: HF model directory (config.json + safetensors weights).
        tokenizer: HF tokenizer directory or sentencepiece .model; None = `model`.
        tokenizer_name: recorded as `behavior_tokenizer`; None = basename of the tokenizer path (the
          default of `dqo-megatron preprocess -t`).
        device: "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16", "float16".
        batch_size: most rows (prompt x sample) decoded together.
        chat_template, use_chat_template, eos_token: prompt framing, as in `TokenizerConfig`.
        trust_remote_code: let transformers run Python code shipped with the model (off by default).
        attn_implementation: passed to transformers (None = its default, sdpa).
    """

    name = "transformers"

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        tokenizer_name: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 64,
        chat_template: str | None = None,
        use_chat_template: bool = True,
        eos_token: str | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ):
        from transformers import AutoModelForCausalLM

        if not Path(model, "config.json").is_file():
            raise FileNotFoundError(f"{model}: not an HF model directory (no config.json)")
        tok_path = tokenizer or model
        if not has_tokenizer(tok_path):
            raise FileNotFoundError(f"{tok_path}: no tokenizer files; pass the tokenizer (HF directory or .model)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.tokenizer = load_tokenizer(
            tok_path,
            name=tokenizer_name,
            chat_template=chat_template,
            use_chat_template=use_chat_template,
            eos_token=eos_token,
        )
        self.tokenizer_name = self.tokenizer.name
        self.templated = self.tokenizer.templated
        self.device = torch.device(resolve_device(device))
        self.dtype = resolve_dtype(dtype, str(self.device))
        self.batch_size = batch_size
        self.model_path = str(model)
        kwargs = {"dtype": self.dtype, "local_files_only": True, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.model = AutoModelForCausalLM.from_pretrained(model, **kwargs).to(self.device).eval()
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.stop_ids = stop_token_ids(self.tokenizer, model)
        self.pad_id = int(self.tokenizer.eos_id)  # any id: padded positions are masked out
        logger.info(
            "transformers backend: %s on %s (%s), tokenizer %s", model, self.device, self.dtype, self.tokenizer_name
        )

    def generate(
        self, prompts: Sequence, params: SamplingParams, *, seeds: Sequence[int], prefixes: Sequence[str] | None = None
    ) -> list[list[Completion]]:
        """`params.n` completions per prompt (see `GenerationBackend.generate`)."""
        prompt_ids, prefix_ids, decoder, rows = prepare_call(
            self.tokenizer, self.stop_ids, prompts, prefixes, seeds, params
        )
        out: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            contexts = {i: prompt_ids[i] + prefix_ids[i] for i, _ in batch}
            row_seeds = [sample_seed(seeds[i], j) for i, j in batch]
            results = self._decode(
                contexts, [i for i, _ in batch], row_seeds, params, decoder, {i: prefix_ids[i] for i, _ in batch}
            )
            for (i, j), completion in zip(batch, results):
                out[i][j] = completion
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _decode(
        self,
        contexts: dict[int, list[int]],
        row_prompt: list[int],
        row_seeds: list[int],
        params: SamplingParams,
        decoder: RowDecoder,
        prefixes: dict[int, list[int]],
    ) -> list[Completion]:
        """Decode one batch: `row_prompt[r]` is the prompt of row r, `contexts[i]` its ids (prompt + prefix)."""
        from transformers import DynamicCache

        model, dev = self.model, self.device
        uniq = list(dict.fromkeys(row_prompt))
        width = max(len(contexts[i]) for i in uniq)
        ids = torch.full((len(uniq), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(uniq), width), dtype=torch.long)
        for k, i in enumerate(uniq):  # left padding: every row's last position is its last real token
            ctx = contexts[i]
            ids[k, width - len(ctx) :] = torch.tensor(ctx)
            mask[k, width - len(ctx) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = DynamicCache(config=model.config)
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, : self.vocab_size]
        # one cache row per sample: repeat each prompt's prefill for its samples
        src = torch.tensor([uniq.index(i) for i in row_prompt], device=dev)
        cache.batch_select_indices(src)
        logits, mask, last_pos = logits[src], mask[src], positions[src, -1]
        gens = row_generators(row_seeds)
        n = len(row_prompt)
        tokens: list[list[int]] = [[] for _ in range(n)]
        raw: list[list[float]] = [[] for _ in range(n)]
        sampled: list[list[float]] = [[] for _ in range(n)]
        active = list(range(n))  # row index of each cache row
        while True:
            step = sample_step(
                logits, draw_uniforms([gens[r] for r in active]), params.temperature, params.top_k, params.top_p
            )
            toks, lps, sps = step.tokens.tolist(), step.logprobs.tolist(), step.sampled_logprobs.tolist()
            keep = []
            for k, r in enumerate(active):
                tokens[r].append(toks[k])
                raw[r].append(lps[k])
                sampled[r].append(sps[k])
                if not decoder.finished(prefixes[row_prompt[r]], tokens[r]):
                    keep.append(k)
            if not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch (and the cache)
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, last_pos, step.tokens = mask[sel], last_pos[sel], step.tokens[sel]
                active = [active[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            last_pos = last_pos + 1
            logits = model(
                input_ids=step.tokens[:, None].to(dev),
                attention_mask=mask,
                position_ids=last_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1, : self.vocab_size]
        return [decoder.completion(prefixes[row_prompt[r]], tokens[r], raw[r], sampled[r]) for r in range(n)]

    def close(self) -> None:
        """Drop the model (and free its GPU memory)."""
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
