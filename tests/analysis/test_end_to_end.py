"""End to end: a tiny DQO run (the real trainer, 2 steps, a checkpoint after each), then the value
analysis of its checkpoints on held-out records with process rewards: JSON rows, PNGs and the trend PNG
exist, the numbers are finite, and the per-step values equal the trainer's own `PolicyValueModel` forward
of the loaded checkpoint (value mode separate and shared), also with the sequences packed into rows
(`pack_rows`; the command line run packs). A DRO run gets no per-step number, only V(x)
against prompt success. The command line is run once, on one checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.analysis.test_value_extraction import MODEL
from tests.helpers.distributed import run_distributed
from tests.helpers.synthetic_data import write_synthetic_dataset


def _body(tmp: str, algorithm: str, mode: str, tok_dir: str, records_file: str, cli_records: str | None) -> dict:
    import torch

    from dqo_megatron.analysis import ValueAnalysisConfig, run_value_analysis
    from dqo_megatron.analysis.value_analysis import prepare_samples
    from dqo_megatron.config import (
        DataConfig,
        InitConfig,
        LossConfig,
        ModelConfig,
        ParallelConfig,
        RunConfig,
        TrainConfig,
        ValueConfig,
    )
    from dqo_megatron.data.records import SkipCounter, read_records
    from dqo_megatron.data.tokenize import TokenizeConfig, Tokenizer, TokenizerConfig
    from dqo_megatron.training.checkpointing import load_checkpoint
    from dqo_megatron.training.policy_value import VALUE, build_policy_value_chunks
    from dqo_megatron.training.trainer import train

    prefix = write_synthetic_dataset(f"{tmp}/data/train", docs=8, vocab=MODEL["vocab_size"], max_len=25)
    run_dir = Path(tmp) / f"run-{mode}"
    run = RunConfig(
        model=ModelConfig(**MODEL),
        algorithm=algorithm,
        data=DataConfig(train_prefix=prefix),
        loss=LossConfig(beta=0.5),
        value=ValueConfig(mode=mode, head_init_std=0.02),
        train=TrainConfig(
            micro_batch_size=2,
            global_batch_size=4,
            seq_length=24,
            lr=3e-3,
            train_steps=2,
            save_interval=1,
            log_interval=10,
        ),
        run_dir=str(run_dir),
    )
    train(run)
    tokenize = TokenizeConfig(tokenizer=TokenizerConfig(path=tok_dir, use_chat_template=False))
    cfg = ValueAnalysisConfig(
        checkpoints=[str(run_dir)],
        records=[records_file],
        tokenize=tokenize,
        out_dir=f"{tmp}/analysis-{mode}",
        write_pairs=True,
    )
    rows = run_value_analysis(cfg)
    if algorithm == "dro":
        return {"rows": rows}

    # independently: the trainer's whole PolicyValueModel, loaded from the last checkpoint, run forward
    single = copy.deepcopy(run)
    single.parallel, single.init = ParallelConfig(), InitConfig()
    (chunk,) = build_policy_value_chunks(single, with_value=True, with_reference=False)
    load_checkpoint(run_dir / "checkpoints" / "step_00000002", [chunk], restore_rng=False)
    chunk.eval()
    from collections import Counter

    samples = prepare_samples(
        list(read_records(records_file)),
        Tokenizer(tokenize.tokenizer),
        tokenize,
        "process_reward",
        SkipCounter(),
        False,
        Counter(),
    )
    direct = []
    with torch.no_grad():
        for s in samples:
            t = torch.as_tensor(s.tokens)[None]
            out = chunk(t, torch.arange(t.shape[1])[None], torch.roll(t, -1, 1))  # [1, s, 3]
            direct.extend(out[0, :, VALUE].double().numpy()[s.positions].tolist())
    pairs = [json.loads(line) for line in Path(rows[-1]["pairs"]).read_text().splitlines()]
    # the same analysis on packed rows (several held-out answers per row of 48 tokens)
    packed_rows = run_value_analysis(dataclasses.replace(cfg, out_dir=f"{tmp}/packed-{mode}", pack_rows=48))
    packed = [json.loads(line) for line in Path(packed_rows[-1]["pairs"]).read_text().splitlines()]
    from dqo_megatron.training.packing import first_fit_decreasing

    shared = len(first_fit_decreasing([len(s.tokens) for s in samples], 48)) < len(samples)
    result = {"rows": rows, "direct": direct, "pairs": pairs, "packed_pairs": packed, "shared": shared, "cli": None}
    if cli_records:
        from typer.testing import CliRunner

        from dqo_megatron.cli import app

        out = CliRunner().invoke(
            app,
            [
                "value-analysis",
                str(run_dir / "checkpoints" / "step_00000001"),
                "--records",
                cli_records,
                "--tokenizer",
                tok_dir,
                "--no-chat-template",
                "-o",
                f"{tmp}/cli",
                "--no-initial",
                "--pack-rows",
                "48",
            ],
        )
        result["cli"] = {
            "code": out.exit_code,
            "output": out.output,
            "rows": [json.loads(x) for x in (Path(tmp) / "cli" / "value_analysis.jsonl").read_text().splitlines()]
            if out.exit_code == 0
            else None,
        }
        bad = CliRunner().invoke(
            app,
            [
                "value-analysis",
                str(run_dir),
                "--records",
                records_file,
                "--tokenizer",
                tok_dir,
                "-o",
                f"{tmp}/cli2",
                "--score",
                "nope",
            ],
        )
        result["bad"] = {"code": bad.exit_code, "output": bad.output}
    return result


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _assert_dro_rows(rows, tmp_path):
    for row in rows:  # V(x) only: no per-step number, V(x) against each prompt's success rate
        assert row["algorithm"] == "dro" and row["value_target"] == "prompt"
        assert row["per_step"] is None and row["pearson"] is None and row["n"] is None and row["drop"] is None
        assert row["reason"].startswith("DRO trains V(x) only") and row["undefined_reason"] == row["reason"]
        assert row["initial"]["prompts"] == 4 and row["initial"]["responses"] == 12
        assert _finite(row["initial"]["value"]["mean"]) and Path(row["plot"]).is_file()
    assert (
        rows[0]["trend_plot"] == rows[1]["trend_plot"] == str(tmp_path / "analysis-separate" / "trend_run-separate.png")
    )
    assert Path(rows[0]["trend_plot"]).is_file()


@pytest.mark.parametrize("algorithm,mode", [("dqo", "separate"), ("dqo", "shared"), ("dro", "separate")])
def test_value_analysis_of_a_trained_run(algorithm, mode, tmp_path, word_tok_dir, records_file, scored_records_file):
    cli_records = scored_records_file if (algorithm, mode) == ("dqo", "separate") else None
    (res,) = run_distributed(
        _body, 1, str(tmp_path), algorithm, mode, word_tok_dir, records_file, cli_records, timeout=300
    )
    rows = res["rows"]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["label"] for r in rows] == [f"run-{mode}-step_00000001", f"run-{mode}-step_00000002"]
    on_disk = [json.loads(x) for x in (tmp_path / f"analysis-{mode}" / "value_analysis.jsonl").read_text().splitlines()]
    assert on_disk == rows
    if algorithm == "dro":
        return _assert_dro_rows(rows, tmp_path)
    png = rows[0]["trend_plot"]  # two checkpoints of one run: a trend figure
    assert png == str(tmp_path / f"analysis-{mode}" / f"trend_run-{mode}.png") and Path(png).is_file()
    for row in rows:
        assert (
            row["algorithm"] == "dqo" and row["value_target"] == "token" and row["run"] == str(tmp_path / f"run-{mode}")
        )
        assert row["drop"] == {
            "reason": "score process_reward: the drop needs solvability (prefix_success or prefix_solvable)"
        }
        assert row["kind"] == "training" and row["value_mode"] == mode and row["score"] == "process_reward"
        assert row["records"] == 12 and row["records_with_steps"] == 12 and row["n"] >= 24
        assert _finite(row["pearson"]) and _finite(row["spearman"]) and row["undefined_reason"] is None
        assert -1 <= row["pearson"] <= 1 and -1 <= row["spearman"] <= 1
        assert _finite(row["value_stats"]["mean"]) and sum(b["count"] for b in row["bins"]) == row["n"]
        assert {b["lo"] for b in row["bins"]} == {0.0, 1.0}  # 0/1 process scores
        assert row["initial"]["prompts"] == 4 and _finite(row["initial"]["value"]["mean"])
        png = Path(row["plot"])
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # the analysis reads the same numbers as the trainer's model at the steps' last tokens
    assert len(res["pairs"]) == rows[-1]["n"]
    np.testing.assert_allclose([p["value"] for p in res["pairs"]], res["direct"], rtol=1e-5, atol=1e-6)
    assert res["shared"], "answers share packed rows"
    np.testing.assert_allclose([p["value"] for p in res["packed_pairs"]], res["direct"], rtol=1e-5, atol=1e-6)
    if res["cli"] is not None:
        cli = res["cli"]
        assert cli["code"] == 0, cli["output"]
        assert "Pearson" in cli["output"] and "value_analysis.jsonl" in cli["output"]
        (row,) = cli["rows"]
        assert row["score"] == "prefix_success" and row["initial"] is None and row["step"] == 1  # auto
        assert row["correct_records"] + row["failed_records"] == row["records"] == 12 and row["trend_plot"] is None
        assert row["drop"]["first_unsolvable"]["n"] == row["failed_records"]  # every failed answer is scored
        scored = [json.loads(x) for x in Path(scored_records_file).read_text().splitlines()]
        assert row["n"] == sum(len(r["process_scores"]["step_ends"]) for r in scored)
        assert _finite(row["pearson"]) and Path(row["plot"]).is_file()
        assert res["bad"]["code"] == 2 and "score='nope'" in res["bad"]["output"]
