"""`dqo-megatron value-analysis`: a value network against process scores and outcomes (docs/value-analysis.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dqo_megatron.cli._app import app, configure_logging, dtype_option


@app.command("value-analysis")
def value_analysis(
    checkpoints: List[str] = typer.Argument(
        ...,
        help="Training checkpoints (run_dir/checkpoints/step_N), run directories "
        "(all their checkpoints) or value checkpoints (convert --value).",
    ),
    records: List[str] = typer.Option(
        ...,
        "--records",
        "-r",
        help="Held-out record files, all answers, failed ones with process_scores (repeatable; globs ok).",
    ),
    tokenizer: str = typer.Option(
        ..., "--tokenizer", "-t", help="The run's tokenizer: HF directory or sentencepiece .model."
    ),
    out_dir: Path = typer.Option(
        ..., "--output-dir", "-o", help="Writes value_analysis.jsonl, value_<label>.png and trend_<run>.png here."
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="The run's config (default: run_dir/config.yaml beside the checkpoints)."
    ),
    score: str = typer.Option(
        "auto",
        help="prefix_success (correct fraction of process-scores completions), prefix_solvable (1/0), "
        "process_reward, return_to_go; auto: prefix_success if records have process_scores, else process_reward.",
    ),
    splitter: Optional[str] = typer.Option(
        None,
        help="How correct responses without process_scores are cut into steps: "
        "auto | lines | paragraphs | step_markers | regex (default: the splitter "
        "the records' process_scores name, else auto).",
    ),
    split_pattern: Optional[str] = typer.Option(
        None, help="Boundary regex for --splitter regex (as given to process-scores)."
    ),
    max_steps: Optional[int] = typer.Option(
        None, help="Cap on steps per correct response (as given to process-scores)."
    ),
    chat_template: Optional[str] = typer.Option(
        None, help="Jinja chat template (string or .jinja file), as given to preprocess."
    ),
    no_chat_template: bool = typer.Option(
        False, "--no-chat-template", help="Encode prompt text as is (plus BOS), as given to preprocess."
    ),
    eos_token: Optional[str] = typer.Option(None, help="Token appended to responses, as given to preprocess."),
    max_length: int = typer.Option(4096, help="Longest sequence in tokens (prompt + response + EOS)."),
    overlong: str = typer.Option("drop", help="Longer sequences: drop | truncate_prompt_left."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass (with --pack-rows: rows)."),
    pack_rows: Optional[int] = typer.Option(
        None, help="Pack sequences into rows of this many tokens (as train.packing); default: pad by length."
    ),
    max_records: Optional[int] = typer.Option(None, help="Use at most this many records."),
    dtype: str = dtype_option("fp32 on CPU, bf16 on GPU"),
    no_initial: bool = typer.Option(
        False,
        "--no-initial",
        help="DQO: skip the V(s0) vs prompt success-rate correlation "
        "(DRO checkpoints always get it: it is their only measure).",
    ),
    no_plot: bool = typer.Option(False, "--no-plot", help="No PNG (no matplotlib needed)."),
    pairs: bool = typer.Option(
        False, "--pairs", help="Also write pairs_<label>.jsonl (value, score and drop of every step)."
    ),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Skip and count invalid or too long records instead of stopping."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the results of an earlier analysis in the output directory."
    ),
) -> None:
    """How a trained value network tracks solvability on held-out answers (all of them, correct and failed).

    DQO (token-level V): Pearson / Spearman of V after each step with the step's process score, the value
    drop at the first unsolvable step vs at steps that stay solvable, V(s0) vs prompt success. DRO (V(x)
    only): V(x) vs each prompt's success rate, no per-step number. One JSON line and one PNG per checkpoint;
    a trend PNG per run when several of its checkpoints are given."""
    from dqo_megatron.analysis.value_analysis import RESULTS_FILE, ValueAnalysisConfig, format_row, run_value_analysis
    from dqo_megatron.config import ConfigError
    from dqo_megatron.data.records import RecordError
    from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig
    from dqo_megatron.training.checkpointing import CheckpointError

    configure_logging()
    try:
        cfg = ValueAnalysisConfig(
            checkpoints=list(checkpoints),
            records=list(records),
            out_dir=str(out_dir),
            overwrite=overwrite,
            run_config=str(config) if config else None,
            score=score,
            initial_value=not no_initial,
            splitter=splitter,
            split_pattern=split_pattern,
            max_steps=max_steps,
            batch_size=batch_size,
            pack_rows=pack_rows,
            max_records=max_records,
            skip_invalid=skip_invalid,
            dtype=dtype,
            plot=not no_plot,
            write_pairs=pairs,
            tokenize=TokenizeConfig(
                tokenizer=TokenizerConfig(
                    path=tokenizer,
                    chat_template=chat_template,
                    use_chat_template=not no_chat_template,
                    eos_token=eos_token,
                ),
                max_length=max_length,
                overlong=overlong,
            ),
        )
        rows = run_value_analysis(cfg)
    except RecordError as exc:
        typer.echo(f"invalid record (use --skip-invalid to skip and count): {exc}", err=True)
        raise typer.Exit(2) from None
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, ImportError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for row in rows:
        typer.echo(format_row(row))
    typer.echo(f"wrote {out_dir / RESULTS_FILE}")
