"""`dqo-megatron rollout`: sample N responses per problem into trajectory records (see docs/rollout.md)."""

from __future__ import annotations

from typing import List, Optional

import typer

from dqo_megatron.cli._app import app, configure_logging, dtype_option


@app.command()
def rollout(
    problems: str = typer.Argument(
        ..., help="Problem file: GSM8K/MATH JSONL, any JSONL with question+answer, or a datasets directory."
    ),
    output: str = typer.Option(..., "--output", "-o", help="Output JSON Lines file (resumed when it exists)."),
    model: str = typer.Option(..., "--model", "-m", help="HF model directory or dqo-megatron checkpoint directory."),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", "-t", help="HF tokenizer directory or .model (default: the model's)."
    ),
    tokenizer_name: Optional[str] = typer.Option(
        None, help="behavior_tokenizer written (must match preprocess's; default: basename)."
    ),
    backend: str = typer.Option("auto", help="auto | vllm | transformers | megatron."),
    task: str = typer.Option("auto", help="gsm8k | math | auto (from the path)."),
    offset: int = typer.Option(0, help="Skip this many problems."),
    limit: Optional[int] = typer.Option(None, help="At most this many problems."),
    n: int = typer.Option(20, "--n", "-n", help="Samples per problem (paper: 20)."),
    temperature: float = typer.Option(1.0, help="Temperature (0 = greedy, then n must be 1)."),
    top_p: float = typer.Option(0.9, help="Nucleus threshold (paper: 0.9; 1 = off)."),
    top_k: int = typer.Option(16, help="Top-k (paper: 16; 0 = off)."),
    max_new_tokens: int = typer.Option(512, help="Longest response in tokens (EOS included)."),
    stop: Optional[List[str]] = typer.Option(None, help="Stop string (repeatable)."),
    seed: int = typer.Option(0, help="Base seed (per problem: derived from it and the problem id)."),
    prompt_format: str = typer.Option("auto", help="chat | text | auto (chat when the tokenizer has a template)."),
    system_prompt: Optional[str] = typer.Option(None, help="System turn before each problem (chat only)."),
    behavior_logprobs: str = typer.Option(
        "raw",
        help="raw | sampled | none: what behavior_logprobs holds. raw (default): the model's own log-probs, "
        "so importance weights are 1 at step 0 when training starts from the sampler; sampled: after "
        "temperature/top-k/top-p (weights then shrink with response length).",
    ),
    label: bool = typer.Option(False, "--label", help="Check answers inline (reward/correct like `label`)."),
    label_timeout_s: float = typer.Option(5.0, help="MATH: seconds per answer comparison."),
    chat_template: Optional[str] = typer.Option(
        None, help="Jinja chat template (string or file) replacing the tokenizer's."
    ),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Frame prompts as BOS + text."),
    eos_token: Optional[str] = typer.Option(None, help="EOS that preprocessing appends (default: the tokenizer's)."),
    device: str = typer.Option("auto", help="transformers backend: auto | cpu | cuda[:i]."),
    dtype: str = dtype_option("bf16 on GPU, fp32 on CPU; megatron: the checkpoint's on GPU", torch_names=True),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", "--tp", help="vLLM tensor_parallel_size."),
    batch_size: int = typer.Option(64, help="Rows (problem x sample) per forward pass (transformers/megatron)."),
    problems_per_call: Optional[int] = typer.Option(
        None, help="Problems per backend call, each written when its call returns (default: 256 vLLM, 8 otherwise)."
    ),
    run_config: Optional[str] = typer.Option(None, help="megatron + training checkpoint: the run's config.yaml."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow code shipped with the model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over instead of resuming an existing output."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Sample N responses per problem into trajectory records with behavior log-probs (resumable)."""
    from dqo_megatron.config.loader import ConfigError
    from dqo_megatron.rollout.config import RolloutConfig
    from dqo_megatron.rollout.rollout import run_rollout

    configure_logging()
    try:
        cfg = RolloutConfig(
            problems=problems,
            output=output,
            model=model,
            tokenizer=tokenizer,
            tokenizer_name=tokenizer_name,
            backend=backend,
            task=task,
            offset=offset,
            limit=limit,
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            stop=list(stop or []),
            seed=seed,
            prompt_format=prompt_format,
            system_prompt=system_prompt,
            behavior_logprobs=behavior_logprobs,
            label=label,
            label_timeout_s=label_timeout_s,
            chat_template=chat_template,
            use_chat_template=not no_chat_template,
            eos_token=eos_token,
            device=device,
            dtype=dtype,
            tensor_parallel=tensor_parallel,
            batch_size=batch_size,
            problems_per_call=problems_per_call,
            run_config=run_config,
            trust_remote_code=trust_remote_code,
            overwrite=overwrite,
            progress=not no_progress,
        )
        summary = run_rollout(cfg)
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (FileNotFoundError, ValueError, ImportError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary.report())
