"""The `megatron` generation backend: sample from a dqo-megatron checkpoint that was never exported to HF.

Two kinds of checkpoint are read, in one process at TP=PP=1 (whatever layout wrote them):

* a `dqo-megatron convert hf-to-megatron` directory (``checkpoint.json``, ``model_config.yaml``,
  ``weights/``, ``hf/`` with the tokenizer files);
* a training checkpoint ``run_dir/checkpoints/step_N`` (its policy), with the run's config
  (default ``run_dir/config.yaml``); the tokenizer then comes from ``init.policy``'s ``hf/``.

Decoding is `dqo_megatron.rollout.megatron_generate.generate`: no KV cache (each step re-runs the prefix),
fine for the small models this backend is for (checking a trained policy on CPU, tests). Token
choice and log-probs use the same `sampling` code and per-row seeds as the transformers backend, so
on the same weights both give the same samples up to float rounding (greedy: the same tokens).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from dqo_megatron.rollout.backend import Completion, SamplingParams
from dqo_megatron.rollout.framing import has_tokenizer, load_tokenizer, prepare_call, resolve_dtype, stop_token_ids
from dqo_megatron.rollout.sampling import sample_seed

logger = logging.getLogger(__name__)


def is_conversion_checkpoint(path: str | Path) -> bool:
    """True for a `convert hf-to-megatron` directory (checkpoint.json + model_config.yaml + weights/)."""
    p = Path(path)
    return (p / "checkpoint.json").is_file() and (p / "model_config.yaml").is_file() and (p / "weights").is_dir()


def is_training_checkpoint(path: str | Path) -> bool:
    """True for a complete training checkpoint directory (run_dir/checkpoints/step_N with COMPLETE)."""
    from dqo_megatron.training.checkpointing import COMPLETE_MARKER

    return (Path(path) / COMPLETE_MARKER).is_file()


def is_megatron_checkpoint(path: str | Path) -> bool:
    """A checkpoint this backend reads (either kind)."""
    return is_conversion_checkpoint(path) or is_training_checkpoint(path)


def _source_name(conv_dir: Path) -> str:
    """Basename of the HF directory a conversion checkpoint was made from (checkpoint.json `source`),
    else of the checkpoint directory: what `preprocess -t <that HF dir>` names its tokenizer."""
    try:
        source = json.loads((conv_dir / "checkpoint.json").read_text()).get("source")
    except (OSError, json.JSONDecodeError):
        source = None
    return Path(source).name if source else conv_dir.absolute().name


class MegatronBackend:
    """`GenerationBackend` over a Megatron GPTModel in this process (TP=PP=1).

    Args:
        model: a conversion checkpoint directory or a training checkpoint (step_N) directory.
        tokenizer: HF tokenizer directory or sentencepiece .model; None = the checkpoint's ``hf/``.
        tokenizer_name: recorded as `behavior_tokenizer`; None = basename of `tokenizer` when given,
          else of the HF directory the checkpoint was converted from (see `_source_name`).
        run_config: a training checkpoint's run config; None = ``<step_N>/../../config.yaml``.
        dtype: "auto" (float32 on CPU, the checkpoint's dtype on CUDA), "float32", "bfloat16", ...
        batch_size: most rows per forward pass.
        chat_template, use_chat_template, eos_token: prompt framing, as in `TokenizerConfig`.

    Creates (and on `close` destroys) a world-size-1 process group when none exists.
    """

    name = "megatron"

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        tokenizer_name: str | None = None,
        run_config: str | None = None,
        dtype: str = "auto",
        batch_size: int = 64,
        chat_template: str | None = None,
        use_chat_template: bool = True,
        eos_token: str | None = None,
    ):
        from dqo_megatron.conversion.megatron_io import HF_DIR, single_process_layout

        path = Path(model)
        if not is_megatron_checkpoint(path):
            raise FileNotFoundError(
                f"{model}: neither a `convert hf-to-megatron` directory (checkpoint.json, "
                "model_config.yaml, weights/) nor a complete training checkpoint (COMPLETE)"
            )
        self._layout = contextlib.ExitStack()
        self._layout.enter_context(single_process_layout())
        try:
            if is_conversion_checkpoint(path):
                self.gpt, self.model_config, base = self._load_conversion(path, dtype)
            else:
                self.gpt, self.model_config, base = self._load_training(path, run_config, dtype)
        except BaseException:
            self._layout.close()
            raise
        hf_dir = base / HF_DIR if base is not None else None
        tok_path = tokenizer or (str(hf_dir) if hf_dir is not None else None)
        if tok_path is None or not has_tokenizer(tok_path):
            self.close()
            raise FileNotFoundError(f"{model}: no tokenizer files in {tok_path}; pass the tokenizer")
        if tokenizer_name is None and tokenizer is None and base is not None:
            tokenizer_name = _source_name(base)
        self._attach_tokenizer(
            load_tokenizer(
                tok_path,
                name=tokenizer_name,
                chat_template=chat_template,
                use_chat_template=use_chat_template,
                eos_token=eos_token,
            ),
            hf_dir,
            batch_size,
            str(model),
        )
        logger.info(
            "megatron backend: %s (%s), tokenizer %s", model, next(self.gpt.parameters()).dtype, self.tokenizer_name
        )

    @classmethod
    def over_module(
        cls,
        gpt,
        model_config,
        tokenizer: str,
        *,
        batch_size: int = 64,
        tokenizer_name: str | None = None,
        hf_dir: str | None = None,
    ) -> "MegatronBackend":
        """A backend over a GPTModel already in memory (e.g. the policy being trained, for held-out
        accuracy during training): nothing is loaded and `close` leaves the model and process groups alone.

        gpt: a TP=PP=1 GPTModel returning logits; model_config: its `ModelConfig` (vocab size);
        tokenizer: HF directory or sentencepiece .model; hf_dir: where `generation_config.json` may add
        stop tokens (None: the tokenizer's EOS only).
        """
        self = cls.__new__(cls)
        self._layout = contextlib.ExitStack()
        self.gpt, self.model_config = gpt, model_config
        self._attach_tokenizer(load_tokenizer(tokenizer, name=tokenizer_name), hf_dir, batch_size, "<in memory>")
        return self

    def _attach_tokenizer(self, tokenizer, hf_dir, batch_size: int, model_path: str) -> None:
        self.tokenizer = tokenizer
        self.tokenizer_name = tokenizer.name
        self.templated = tokenizer.templated
        self.stop_ids = stop_token_ids(tokenizer, hf_dir)
        self.batch_size = batch_size
        self.model_path = model_path

    @staticmethod
    def _dtype(dtype: str, stored: torch.dtype) -> torch.dtype:
        if dtype == "auto":
            return stored if torch.cuda.is_available() else torch.float32
        return resolve_dtype(dtype, "cuda" if torch.cuda.is_available() else "cpu")

    def _load_conversion(self, path: Path, dtype: str):
        from dqo_megatron.config import ParallelConfig
        from dqo_megatron.conversion.megatron_io import WEIGHTS_DIR, build_empty_chunks, load_chunks, read_metadata

        cfg, info = read_metadata(path)
        if info.kind != "policy":
            raise ValueError(f"{path}: a {info.kind} checkpoint; generation needs a policy")
        (gpt,) = build_empty_chunks(cfg, ParallelConfig(), self._dtype(dtype, info.torch_dtype))
        load_chunks([gpt], path / WEIGHTS_DIR)
        return gpt.eval(), cfg, path

    def _load_training(self, path: Path, run_config: str | None, dtype: str):
        from dqo_megatron.config import InitConfig, ParallelConfig, RunConfig, load_config
        from dqo_megatron.config.dtypes import dtype_from_torch
        from dqo_megatron.training.checkpointing import load_checkpoint
        from dqo_megatron.training.policy_value import build_policy_value_chunks

        config = Path(run_config) if run_config else path.absolute().parent.parent / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"{path}: training checkpoint without its run config ({config}); pass run_config")
        run = load_config(RunConfig, config)
        single = copy.deepcopy(run)
        single.parallel, single.init = ParallelConfig(), InitConfig()
        if dtype != "auto":
            name = dtype_from_torch(resolve_dtype(dtype, "cpu"))
            if name is None:
                raise ValueError(f"dtype={dtype!r}: a training checkpoint runs in fp32, bf16 or fp16")
            single.precision = dataclasses.replace(single.precision, dtype=name)
        (chunk,) = build_policy_value_chunks(single, with_value=False, with_reference=False)
        load_checkpoint(path, [chunk], restore_rng=False)
        base = Path(run.init.policy) if run.init.policy else None
        return chunk.policy.eval(), run.model, base

    def generate(
        self, prompts: Sequence, params: SamplingParams, *, seeds: Sequence[int], prefixes: Sequence[str] | None = None
    ) -> list[list[Completion]]:
        """`params.n` completions per prompt (see `GenerationBackend.generate`)."""
        from dqo_megatron.rollout.megatron_generate import generate

        prompt_ids, prefix_ids, decoder, rows = prepare_call(
            self.tokenizer, self.stop_ids, prompts, prefixes, seeds, params
        )
        stop = (lambda r, toks: decoder.finished(prefix_ids[rows[r][0]], toks)) if params.stop else None
        gens = generate(
            self.gpt,
            [prompt_ids[i] + prefix_ids[i] for i, _ in rows],
            max_new_tokens=params.max_new_tokens,
            eos_id=sorted(self.stop_ids),
            vocab_size=self.model_config.vocab_size,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seeds=[sample_seed(seeds[i], j) for i, j in rows],
            stop=stop,
            max_batch=self.batch_size,
        )
        out: list[list[Completion]] = [[] for _ in prompts]
        for (i, _), g in zip(rows, gens):
            out[i].append(decoder.completion(prefix_ids[i], g.tokens, g.logprobs, g.sampled_logprobs))
        return out

    def close(self) -> None:
        """Drop the model and tear down the process group this backend created."""
        self.gpt = None
        self._layout.close()
