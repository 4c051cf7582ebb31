"""docs/pipeline.md works for a user: tiny random HF models of each family with a locally built HF tokenizer
go through every documented command with the example configs' settings (vocabulary padding 128, a
run seq_length shorter than the model's max_position_embeddings), and the exported model loads with
plain transformers and generates the Megatron policy's greedy text.

Default suite (~90 s on 2 cores): Qwen2 through every step at TP=1 (commands in forked ranks), and each
family's convert -> megatron-to-hf round trip. `slow`: the three families as a user runs them
(`python -m dqo_megatron`, torchrun, examples/train_dqo.sh), Qwen2 at TP=2 with sequence parallelism,
Gemma at PP=2, Llama at TP=1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.pipeline.models import FAMILIES, MAX_POSITIONS, VOCAB, build_hf_model, build_tokenizer
from tests.pipeline.steps import MAX_NEW, RUN_SEQ, Runner, greedy_outputs, run_pipeline


@pytest.fixture(scope="module")
def tokenizer_dir(shared_data, tmp_path_factory) -> Path:
    """The HF tokenizer (word level, chat template) learned from GSM8K text."""
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out, shared_data / "gsm8k" / "train.jsonl")
    return out


def _hf_greedy(model_dir: Path, prompt: str, max_new: int = MAX_NEW) -> str:
    """Greedy answer of plain transformers (AutoModelForCausalLM + AutoTokenizer, the chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _response(row: dict) -> str:
    return row["responses"][0].strip()


def check_exported_model(paths: dict) -> None:
    """The export is a complete HF model (weights trained, config with the model's own positions, the
    tokenizer with its chat template) whose greedy text is the Megatron policy's, as eval saw it."""
    from transformers import AutoConfig, AutoTokenizer

    export, base = paths["export"], paths["base"]
    config = AutoConfig.from_pretrained(export)
    assert config.max_position_embeddings == MAX_POSITIONS and config.vocab_size == VOCAB
    tok = AutoTokenizer.from_pretrained(export)
    assert len(tok) == VOCAB and tok.chat_template and tok.eos_token == "</s>"
    metrics = [json.loads(line) for line in (paths["checkpoint"].parent.parent / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["applied"] for m in metrics)
    assert set(_tensors(export)) == set(_tensors(base))
    megatron_rows = greedy_outputs(paths["eval"], "DQO-megatron")
    exported_rows = greedy_outputs(paths["eval"], "DQO")
    assert len(megatron_rows) == 2 and any(len(_response(row)) > 8 for row in megatron_rows)  # not vacuous
    for meg, hf in zip(megatron_rows, exported_rows):
        assert _response(meg) == _response(hf), (meg, hf)
        assert _hf_greedy(export, meg["prompt"]) == _response(meg)


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_qwen2_through_every_documented_step(tokenizer_dir, shared_data, tmp_path):
    """Steps 1, 2, 4-8 of docs/pipeline.md at TP=1, the commands in forked ranks."""
    build_hf_model("qwen2", tmp_path / "hf" / "base", tokenizer_dir)
    paths = run_pipeline(Runner(tmp_path), "qwen2", shared_data)
    written = yaml.safe_load((tmp_path / "ckpt" / "base" / "model_config.yaml").read_text())
    assert written["make_vocab_size_divisible_by"] == 128 and written["seq_length"] == MAX_POSITIONS
    run = yaml.safe_load((paths["checkpoint"].parent.parent / "config.yaml").read_text())
    assert run["model"]["seq_length"] == RUN_SEQ < MAX_POSITIONS
    check_exported_model(paths)
    table = (paths["eval"] / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ("base", "DQO", "DQO-megatron"))


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_and_back_gives_a_complete_hf_model(family, tokenizer_dir, tmp_path):
    """convert hf-to-megatron --verify (the documented defaults) -> megatron-to-hf --verify: plain
    transformers loads the result, with the model's own max_position_embeddings, and generates the
    base model's greedy text."""
    base = build_hf_model(family, tmp_path / "base", tokenizer_dir)
    run = Runner(tmp_path)
    run("convert", "hf-to-megatron", base, tmp_path / "meg", "--verify")
    run("convert", "megatron-to-hf", tmp_path / "meg", tmp_path / "back", "--verify")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["max_position_embeddings"] == MAX_POSITIONS and config["vocab_size"] == VOCAB
    prompt = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
    assert _hf_greedy(tmp_path / "back", prompt) == _hf_greedy(base, prompt)


@pytest.mark.slow
@pytest.mark.parametrize("family,tp,pp", [("qwen2", 2, 1), ("gemma", 1, 2), ("llama", 1, 1)])
def test_every_family_as_a_user_runs_it(family, tp, pp, tokenizer_dir, shared_data, tmp_path):
    """The commands as processes (torchrun for TP/PP, examples/train_dqo.sh for training), ~2-3 min each."""
    build_hf_model(family, tmp_path / "hf" / "base", tokenizer_dir)
    run = Runner(tmp_path, processes=True)
    paths = run_pipeline(run, family, shared_data, tp=tp, pp=pp)
    run_config = yaml.safe_load((paths["checkpoint"].parent.parent / "config.yaml").read_text())
    assert run_config["parallel"]["tensor_model_parallel_size"] == tp
    assert run_config["parallel"]["pipeline_model_parallel_size"] == pp
    check_exported_model(paths)
