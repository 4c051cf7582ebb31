"""`dqo-megatron process-scores` (synthetic process rewards) and `dqo-megatron eval` (accuracy tables).

See docs/evaluation.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

import typer

from dqo_megatron.cli._app import app, configure_logging, dtype_option

_BACKEND_HELP = (
    "auto (vllm if installed and on GPU, else transformers; megatron for Megatron checkpoints) "
    "| transformers | vllm | megatron."
)


def _fail(kind: str, exc: Exception) -> None:
    typer.echo(f"{kind}: {exc}", err=True)
    raise typer.Exit(2)


def _backend_factory(
    kind: str, tokenizer: Optional[str], device: str, dtype: str, tensor_parallel: int, **options
) -> Callable:
    """model path -> GenerationBackend, through the rollout factory (imported when a model is built).

    `options`: the factory's framing and batching arguments (chat_template, use_chat_template, eos_token,
    batch_size, trust_remote_code, run_config); None values keep the factory's defaults.
    """
    options = {k: v for k, v in options.items() if v is not None}

    def build(model: str):
        from dqo_megatron.rollout.factory import build_backend

        return build_backend(
            kind, model, tokenizer=tokenizer, device=device, dtype=dtype, tensor_parallel=tensor_parallel, **options
        )

    return build


def _framing(chat_template, no_chat_template, eos_token, gen_batch_size, trust_remote_code, run_config) -> dict:
    return dict(
        chat_template=chat_template,
        use_chat_template=not no_chat_template,
        eos_token=eos_token,
        batch_size=gen_batch_size,
        trust_remote_code=trust_remote_code,
        run_config=run_config,
    )


# Options shared by both commands: how the backend frames prompts must match how the data was (or will be)
# tokenized, so they are the same names as `preprocess` uses.
_CHAT_TEMPLATE = typer.Option(
    None, help="Jinja chat template (string or .jinja file) replacing the tokenizer's (as for preprocess)."
)
_NO_CHAT_TEMPLATE = typer.Option(False, "--no-chat-template", help="Prompt text as is (plus BOS), as for preprocess.")
_EOS_TOKEN = typer.Option(None, help="End-of-response token (default: the tokenizer's), as for preprocess.")
_GEN_BATCH = typer.Option(
    None, "--batch-size", help="Rows (prompt x sample) per forward pass (transformers/megatron; default 64)."
)
_TRUST = typer.Option(False, "--trust-remote-code", help="Let transformers/vLLM run code shipped with the model.")
_RUN_CONFIG = typer.Option(
    None, help="megatron backend, training checkpoint: the run's config.yaml (default beside it)."
)
_BACKEND = typer.Option("auto", help=_BACKEND_HELP)
_DEVICE = typer.Option("auto", help="auto | cpu | cuda | cuda:N.")
_DTYPE = dtype_option("bf16 on GPU, fp32 on CPU", torch_names=True)
_TENSOR_PARALLEL = typer.Option(1, "--tensor-parallel", "--tp", help="vLLM: GPUs per model.")


def _sampling(temperature, top_p, top_k, max_new_tokens, seed, timeout_s) -> dict:
    """The sampling options process-scores and eval share, as their configs name them."""
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens)
    return sampling | dict(seed=seed, timeout_s=timeout_s)


@app.command("process-scores")
def process_scores(
    inputs: List[str] = typer.Argument(
        ..., help="Labeled rollout records (after `label`); failed ones need reference_answer and task."
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Output JSON Lines: all records, failed ones with process_rewards."
    ),
    model: str = typer.Option(
        ..., "--model", "-m", help="The model that continues the prefixes (normally the rollout model)."
    ),
    backend: str = _BACKEND,
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="Tokenizer (default: the model's)."),
    device: str = _DEVICE,
    dtype: str = _DTYPE,
    tensor_parallel: int = _TENSOR_PARALLEL,
    chat_template: Optional[str] = _CHAT_TEMPLATE,
    no_chat_template: bool = _NO_CHAT_TEMPLATE,
    eos_token: Optional[str] = _EOS_TOKEN,
    gen_batch_size: Optional[int] = _GEN_BATCH,
    trust_remote_code: bool = _TRUST,
    run_config: Optional[str] = _RUN_CONFIG,
    num_completions: int = typer.Option(
        20, "--num-completions", "-M", help="Completions per step prefix (the paper: 20)."
    ),
    splitter: str = typer.Option("auto", help="auto | lines | paragraphs | step_markers | regex."),
    split_pattern: Optional[str] = typer.Option(None, help="splitter=regex: a step ends where a match ends."),
    max_steps: Optional[int] = typer.Option(
        None, help="Merge steps so a response has at most this many (caps the cost)."
    ),
    assign: str = typer.Option("every_correct", help="every_correct | last_correct | value (docs/evaluation.md)."),
    step_reward: float = typer.Option(
        0.1, help="Process reward r of one step (outcome rewards are 1/0; keep K x r < 1)."
    ),
    temperature: float = typer.Option(1.0, help="Completion sampling temperature."),
    top_p: float = typer.Option(0.9, help="Completion nucleus top_p."),
    top_k: int = typer.Option(16, help="Completion top_k."),
    max_new_tokens: int = typer.Option(512, help="Longest completion in tokens."),
    seed: int = typer.Option(1234, help="Base seed (each prefix's seed derives from it, the prompt and the prefix)."),
    prefixes_per_call: int = typer.Option(
        16, help="Prefixes per backend call (x M completions each); the cache is appended after each."
    ),
    task: str = typer.Option("auto", help="gsm8k | math | auto (each record's `task`)."),
    timeout_s: float = typer.Option(5.0, help="MATH: seconds per answer comparison."),
    cache: Optional[str] = typer.Option(None, help="Completion cache file (default: OUTPUT.cache.jsonl)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write a completion cache."),
    replace_rewards: bool = typer.Option(
        False, "--replace-rewards", help="Replace process rewards that failed records already have."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing output file (once the new one is complete)."
    ),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Skip and count invalid records instead of stopping."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="State the cost (prefixes x M) and stop; loads no model."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Synthetic process rewards (the paper's section 4.4): M completions from each step prefix of every
    failed response; a prefix is correct when any completion is; rewards per step into process_rewards."""
    from dqo_megatron.config.loader import ConfigError
    from dqo_megatron.data.records import RecordError
    from dqo_megatron.process_scores import ProcessScoresConfig, check_outputs
    from dqo_megatron.process_scores import process_scores as run

    configure_logging()
    try:
        cfg = ProcessScoresConfig(
            inputs=list(inputs),
            output=str(output),
            model_id=model,
            num_completions=num_completions,
            splitter=splitter,
            split_pattern=split_pattern,
            max_steps=max_steps,
            assign=assign,
            step_reward=step_reward,
            **_sampling(temperature, top_p, top_k, max_new_tokens, seed, timeout_s),
            prefixes_per_call=prefixes_per_call,
            task=task,
            cache="" if no_cache else cache,
            replace_rewards=replace_rewards,
            overwrite=overwrite,
            skip_invalid=skip_invalid,
            dry_run=dry_run,
            progress=not no_progress,
        )
        if dry_run:
            # the backend's name is part of the cache key: resolve "auto" as building it would
            from dqo_megatron.rollout.factory import resolve_kind

            summary = run(cfg, _DryRunBackend(resolve_kind(backend, model)))
            typer.echo(summary.plan(num_completions))
            return
        check_outputs(cfg)  # before the model is loaded
        framing = _framing(chat_template, no_chat_template, eos_token, gen_batch_size, trust_remote_code, run_config)
        gen = _backend_factory(backend, tokenizer, device, dtype, tensor_parallel, **framing)(model)
        try:
            summary = run(cfg, gen)
        finally:
            gen.close()
    except ConfigError as exc:
        _fail("config error", exc)
    except RecordError as exc:
        _fail("invalid record (use --skip-invalid to skip and count)", exc)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        _fail("error", exc)
    typer.echo(summary.report())
    typer.echo(f"wrote {output}")


class _DryRunBackend:
    """Stands in for the backend when only the cost is asked for (the cache key needs the backend name)."""

    tokenizer_name = ""

    def __init__(self, kind: str) -> None:
        self.name = kind

    def generate(self, *args, **kwargs):
        raise RuntimeError("dry run: nothing is generated")

    def close(self) -> None:
        """Nothing to free."""


@app.command("eval")
def eval_(
    model: List[str] = typer.Option(..., "--model", "-m", help="Model path (repeat for several rows of one table)."),
    name: Optional[List[str]] = typer.Option(
        None, "--name", help="Row name per --model, in order (default: basenames)."
    ),
    output_dir: Path = typer.Option(
        ..., "--output-dir", "-o", help="Writes results.json, results.md, accuracy.png, outputs/, cache/."
    ),
    dataset: Optional[List[str]] = typer.Option(
        None, "--dataset", "-d", help="gsm8k | math | math500 | NAME=PATH (repeat; default: all three)."
    ),
    decoding: Optional[List[str]] = typer.Option(None, "--decoding", help="greedy | sample (repeat; default: both)."),
    limit: Optional[int] = typer.Option(None, help="At most this many problems per dataset (quick runs)."),
    limit_mode: str = typer.Option("spread", help="With --limit: spread (evenly spaced: every MATH subject) | first."),
    data_dir: Optional[str] = typer.Option(
        None, help="Shared data directory (default: $DQO_SHARED_DATA or ../shared/data)."
    ),
    backend: str = _BACKEND,
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", "-t", help="Tokenizer for every model (default: each model's)."
    ),
    device: str = _DEVICE,
    dtype: str = _DTYPE,
    tensor_parallel: int = _TENSOR_PARALLEL,
    chat_template: Optional[str] = _CHAT_TEMPLATE,
    no_chat_template: bool = _NO_CHAT_TEMPLATE,
    eos_token: Optional[str] = _EOS_TOKEN,
    gen_batch_size: Optional[int] = _GEN_BATCH,
    trust_remote_code: bool = _TRUST,
    run_config: Optional[str] = _RUN_CONFIG,
    temperature: float = typer.Option(1.0, help="sample decoding: temperature."),
    top_p: float = typer.Option(0.9, help="sample decoding: top_p."),
    top_k: int = typer.Option(16, help="sample decoding: top_k."),
    num_samples: int = typer.Option(
        1, "--num-samples", "-n", help="sample decoding: samples per problem (accuracy = their mean)."
    ),
    max_new_tokens: int = typer.Option(1024, help="Longest response in tokens."),
    seed: int = typer.Option(1234, help="Base seed of sampled decoding."),
    problems_per_call: int = typer.Option(32, help="Problems per backend call; the cache is appended after each."),
    timeout_s: float = typer.Option(5.0, help="MATH: seconds per answer comparison."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not reuse or keep generations in OUTPUT_DIR/cache."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
) -> None:
    """Accuracy on GSM8K / MATH / MATH500, greedy and sampled, one table row per model (the paper's Table 3
    layout), with MATH per-subject and per-level tables, a JSON file and a PNG chart."""
    from dqo_megatron.config.loader import ConfigError
    from dqo_megatron.eval.config import EvalConfig
    from dqo_megatron.eval.run import evaluate

    configure_logging()
    try:
        kw = {}
        if dataset:
            kw["datasets"] = list(dataset)
        if decoding:
            kw["decodings"] = list(decoding)
        cfg = EvalConfig(
            models=list(model),
            names=list(name or []),
            output_dir=str(output_dir),
            data_dir=data_dir,
            limit=limit,
            limit_mode=limit_mode,
            **_sampling(temperature, top_p, top_k, max_new_tokens, seed, timeout_s),
            num_samples=num_samples,
            problems_per_call=problems_per_call,
            cache=not no_cache,
            progress=not no_progress,
            **kw,
        )
        framing = _framing(chat_template, no_chat_template, eos_token, gen_batch_size, trust_remote_code, run_config)
        results = evaluate(cfg, _backend_factory(backend, tokenizer, device, dtype, tensor_parallel, **framing))
    except ConfigError as exc:
        _fail("config error", exc)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        _fail("error", exc)
    from dqo_megatron.eval.report import markdown_report

    typer.echo(markdown_report(results).split("\n\n## ")[0])
    typer.echo(f"wrote {output_dir}/results.json, results.md, accuracy.png, outputs/")
