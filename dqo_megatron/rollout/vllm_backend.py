"""The `vllm` generation backend: the GPU path at scale (tensor parallel, paged KV cache, continuous batching).

vLLM is optional (GPU machines: ``pip install vllm``); importing this module does not import it,
constructing `VLLMBackend` does, with a clear error when it is missing.

Log-probs. vLLM reports one log-prob per generated token, of the kind set engine-wide by
``logprobs_mode`` (vLLM >= 0.10.2): ``raw_logprobs`` (the model, before any processing; vLLM's
default) or ``processed_logprobs`` (after temperature and top-k/top-p, i.e. the distribution sampled
from). We run the engine with ``processed_logprobs``, so the sampler itself gives our
`sampled_logprobs` (the behavior policy); the raw log-probs come from a second, cheap pass that scores
prompt + response as a prompt (``prompt_logprobs=0`` at temperature 1 without top-k/top-p, where both
modes agree). ``raw_logprobs=False`` skips that pass (then `Completion.logprobs` is empty).

Prompts go in as token ids framed by the preprocessing `Tokenizer` (vLLM's own chat templating is not
used), every sample is its own request with its own seed (`sampling.sample_seed(prompt seed, j)`), and
the text is decoded from the token ids with the same `Tokenizer`, as in the other backends.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Sequence

from dqo_megatron.rollout.backend import Completion, SamplingParams
from dqo_megatron.rollout.framing import has_tokenizer, load_tokenizer, prepare_call, stop_token_ids
from dqo_megatron.rollout.sampling import check_finite_logprobs, sample_seed

logger = logging.getLogger(__name__)

MISSING = (
    "the vllm backend needs vLLM, which is not installed here: on a GPU machine `pip install vllm` "
    "(it brings its own CUDA torch; use a separate environment), or use backend='transformers'"
)
"""Error message when vllm cannot be imported."""


def vllm_available() -> tuple[bool, str]:
    """(True, version) when vllm imports, else (False, the reason)."""
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 - an ImportError, or a broken install raising anything
        return False, f"vllm not importable ({type(exc).__name__}: {exc})"
    return True, getattr(vllm, "__version__", "unknown")


class VLLMBackend:
    """`GenerationBackend` over `vllm.LLM`.

    Args:
        model: HF model directory (what vLLM loads).
        tokenizer: HF tokenizer directory (or sentencepiece .model for our framing; vLLM then uses the
          model directory's tokenizer for stop strings); None = `model`.
        tokenizer_name: recorded as `behavior_tokenizer`; None = basename of the tokenizer path.
        tensor_parallel: vLLM's tensor_parallel_size (GPUs per engine).
        dtype: "auto" (the model's), "float32", "bfloat16", "float16".
        raw_logprobs: also compute the raw log-probs (a scoring pass); False leaves them empty.
        chat_template, use_chat_template, eos_token: prompt framing, as in `TokenizerConfig`.
        trust_remote_code: passed to vLLM (off by default).
        **engine_kwargs: more `vllm.LLM` arguments (gpu_memory_utilization, max_model_len, enforce_eager, ...).
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        tokenizer_name: str | None = None,
        tensor_parallel: int = 1,
        dtype: str = "auto",
        raw_logprobs: bool = True,
        chat_template: str | None = None,
        use_chat_template: bool = True,
        eos_token: str | None = None,
        trust_remote_code: bool = False,
        **engine_kwargs,
    ):
        ok, why = vllm_available()
        if not ok:
            raise ImportError(f"{MISSING} [{why}]")
        import torch
        import vllm

        if not torch.cuda.is_available():
            raise ValueError("the vllm backend needs a CUDA GPU; on CPU use backend='transformers'")
        if not Path(model, "config.json").is_file():
            raise FileNotFoundError(f"{model}: not an HF model directory (no config.json)")
        tok_path = tokenizer or model
        if not has_tokenizer(tok_path):
            raise FileNotFoundError(f"{tok_path}: no tokenizer files; pass the tokenizer")
        self.tokenizer = load_tokenizer(
            tok_path,
            name=tokenizer_name,
            chat_template=chat_template,
            use_chat_template=use_chat_template,
            eos_token=eos_token,
        )
        self.tokenizer_name = self.tokenizer.name
        self.templated = self.tokenizer.templated
        self.stop_ids = stop_token_ids(self.tokenizer, model)
        self.raw_logprobs = raw_logprobs
        self.model_path = str(model)
        vllm_tok = str(tok_path) if Path(tok_path).is_dir() else str(model)
        try:
            self.llm = vllm.LLM(
                model=str(model),
                tokenizer=vllm_tok,
                tensor_parallel_size=tensor_parallel,
                dtype="auto" if dtype == "auto" else dtype,
                trust_remote_code=trust_remote_code,
                logprobs_mode="processed_logprobs",
                **engine_kwargs,
            )
        except TypeError as exc:
            if "logprobs_mode" in str(exc):
                raise ImportError(
                    f"vLLM {vllm.__version__} has no logprobs_mode (needed for the log-probs of the "
                    "distribution sampled from): install vLLM >= 0.10.2"
                ) from exc
            raise
        logger.info(
            "vllm backend: %s (TP=%d), vLLM %s, tokenizer %s",
            model,
            tensor_parallel,
            vllm.__version__,
            self.tokenizer_name,
        )

    def _params(self, params: SamplingParams, seed: int | None, **extra):
        import vllm

        # every knob explicit: vLLM must not take defaults from the model's generation_config
        return vllm.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p if not params.greedy else 1.0,
            top_k=params.top_k if params.top_k > 0 and not params.greedy else -1,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            seed=seed,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            stop_token_ids=sorted(self.stop_ids),
            skip_special_tokens=False,
            logprobs=0,
            **extra,
        )

    def generate(
        self, prompts: Sequence, params: SamplingParams, *, seeds: Sequence[int], prefixes: Sequence[str] | None = None
    ) -> list[list[Completion]]:
        """`params.n` completions per prompt (see `GenerationBackend.generate`)."""
        import vllm
        from vllm.inputs import TokensPrompt

        prompt_ids, prefix_ids, decoder, rows = prepare_call(
            self.tokenizer, self.stop_ids, prompts, prefixes, seeds, params
        )
        contexts = [prompt_ids[i] + prefix_ids[i] for i, _ in rows]
        requests = [TokensPrompt(prompt_token_ids=ctx) for ctx in contexts]
        sps = [self._params(params, sample_seed(seeds[i], j)) for i, j in rows]
        results = self.llm.generate(requests, sps, use_tqdm=False)
        gen_ids, sampled = [], []
        for res in results:
            out = res.outputs[0]
            ids = [int(t) for t in out.token_ids]
            gen_ids.append(ids)
            if params.greedy:
                sampled.append([0.0] * len(ids))
            else:
                sampled.append([float(out.logprobs[k][t].logprob) for k, t in enumerate(ids)])
        raw: list[list[float]] = [[] for _ in rows]
        if self.raw_logprobs:
            score = vllm.SamplingParams(
                n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=1, prompt_logprobs=0, detokenize=False
            )
            scored = self.llm.generate(
                [TokensPrompt(prompt_token_ids=ctx + ids) for ctx, ids in zip(contexts, gen_ids)], score, use_tqdm=False
            )
            for r, (ctx, ids, res) in enumerate(zip(contexts, gen_ids, scored)):
                plp = res.prompt_logprobs  # position p: {token id: Logprob} of token p given tokens < p
                raw[r] = [float(plp[len(ctx) + k][t].logprob) for k, t in enumerate(ids)]
        check_finite_logprobs(sampled + raw, "vLLM")
        out_rows: list[list[Completion]] = [[] for _ in prompts]
        for r, (i, _) in enumerate(rows):
            out_rows[i].append(decoder.completion(prefix_ids[i], gen_ids[r], raw[r], sampled[r]))
        return out_rows

    def close(self) -> None:
        """Shut the engine down and free GPU memory."""
        llm, self.llm = getattr(self, "llm", None), None
        del llm
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:  # noqa: BLE001 - best effort across vLLM versions
            pass
        gc.collect()
