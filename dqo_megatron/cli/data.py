"""Data commands: `preprocess` (records -> Megatron indexed files) and `label` (add rewards to rollouts)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dqo_megatron.cli._app import app


def _fail(kind: str, exc: Exception) -> None:
    typer.echo(f"{kind}: {exc}", err=True)
    raise typer.Exit(2)


@app.command()
def preprocess(
    inputs: List[str] = typer.Argument(
        ...,
        help="Record files (.jsonl, .parquet), datasets directories or cached hub names (openai/gsm8k[:config]); "
        "our fields or TRL's (prompt/completion/label, messages, chosen/rejected); globs ok.",
    ),
    output_prefix: str = typer.Option(
        ..., "--output-prefix", "-o", help="Writes <prefix>_tokens.bin/.idx ... and <prefix>.json."
    ),
    tokenizer: str = typer.Option(
        ..., "--tokenizer", "-t", help="HF tokenizer directory or sentencepiece .model file."
    ),
    split: Optional[str] = typer.Option(
        None, help="Split of DatasetDict directories and hub names (default: train, when there is one)."
    ),
    tokenizer_name: Optional[str] = typer.Option(
        None, help="Name matched against records' behavior_tokenizer (default: basename)."
    ),
    chat_template: Optional[str] = typer.Option(
        None, help="Jinja chat template (string or .jinja file) replacing the tokenizer's."
    ),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Encode prompt text as is (plus BOS)."),
    eos_token: Optional[str] = typer.Option(None, help="Token appended to responses (default: the tokenizer's EOS)."),
    max_length: int = typer.Option(4096, help="Longest sequence in tokens (prompt + response + EOS)."),
    overlong: str = typer.Option(
        "drop", help="Longer sequences: drop | truncate_prompt_left (responses are never cut)."
    ),
    logprobs_exclude_eos: bool = typer.Option(
        False, "--logprobs-exclude-eos", help="behavior_logprobs stop before EOS."
    ),
    workers: int = typer.Option(1, "--workers", "-j", help="Tokenizing processes."),
    chunk_size: int = typer.Option(256, help="Records per worker task."),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Skip and count invalid records instead of stopping."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing dataset at the prefix (once the new one is complete)."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Validate and tokenize trajectory records into Megatron indexed files (see docs/data.md)."""
    from dqo_megatron.config.loader import ConfigError
    from dqo_megatron.data.preprocess import PreprocessConfig
    from dqo_megatron.data.preprocess import preprocess as run
    from dqo_megatron.data.records import RecordError
    from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig

    try:
        cfg = PreprocessConfig(
            inputs=list(inputs),
            split=split,
            output_prefix=output_prefix,
            workers=workers,
            chunk_size=chunk_size,
            skip_invalid=skip_invalid,
            overwrite=overwrite,
            progress=not no_progress,
            tokenize=TokenizeConfig(
                tokenizer=TokenizerConfig(
                    path=tokenizer,
                    name=tokenizer_name,
                    chat_template=chat_template,
                    use_chat_template=not no_chat_template,
                    eos_token=eos_token,
                ),
                max_length=max_length,
                overlong=overlong,
                behavior_logprobs_include_eos=not logprobs_exclude_eos,
            ),
        )
        summary = run(cfg)
    except ConfigError as exc:
        _fail("config error", exc)
    except RecordError as exc:
        _fail("invalid record (use --skip-invalid to skip and count)", exc)
    except (FileNotFoundError, ValueError) as exc:
        _fail("error", exc)
    typer.echo(summary.report())
    typer.echo(f"wrote {output_prefix}_*.bin/.idx and {output_prefix}.json")


@app.command()
def label(
    inputs: List[str] = typer.Argument(..., help="Rollout record files; each record needs reference_answer."),
    output: Path = typer.Option(..., "--output", "-o", help="Labeled JSON Lines file."),
    task: str = typer.Option("auto", help="gsm8k | math | auto (each record's `task` field)."),
    timeout_s: float = typer.Option(5.0, help="MATH: seconds per answer comparison (timeouts count as wrong)."),
    workers: int = typer.Option(1, "--workers", "-j", help="Checking processes."),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Skip and count invalid records instead of stopping."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing output file (once the new one is complete)."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Set reward (1/0) and correct on each record by checking its final answer (#### N / last \\boxed{})."""
    from dqo_megatron.config.loader import ConfigError
    from dqo_megatron.data.records import RecordError
    from dqo_megatron.tasks.label import LabelConfig, label_records

    try:
        summary = label_records(
            LabelConfig(
                inputs=list(inputs),
                output=str(output),
                task=task,
                timeout_s=timeout_s,
                workers=workers,
                skip_invalid=skip_invalid,
                overwrite=overwrite,
                progress=not no_progress,
            )
        )
    except ConfigError as exc:
        _fail("config error", exc)
    except RecordError as exc:
        _fail("invalid record (use --skip-invalid to skip and count)", exc)
    except (FileNotFoundError, ValueError) as exc:
        _fail("error", exc)
    typer.echo(summary.report())
    typer.echo(f"wrote {output}")
