"""Exported tokenizers: a sentencepiece model written as an HF tokenizer gives the training tokenizer's ids
(prompts with BOS, responses, decoding) through plain `AutoTokenizer`; HF tokenizer directories are copied
with their chat template; every export gets generation_config.json; bad --tokenizer arguments are named
before anything loads (~10 s)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from dqo_megatron.conversion import ConversionError
from dqo_megatron.conversion.hf_tokenizer import (
    checked_tokenizer_source,
    export_tokenizer,
    sentencepiece_to_hf,
)
from dqo_megatron.data.tokenize import Tokenizer, TokenizerConfig
from dqo_megatron.paths import shared_data_dir

STORIES_TOKENIZER = shared_data_dir() / "models" / "stories260K" / "tok512.model"
SPECIAL_TEXT = ("<s>", "</s>", "<pad>", "<unk>")  # spelled out by sentencepiece, one token for HF (documented)


def _texts() -> list[str]:
    """Prompts and responses as training frames them (the demo's task, GSM8K) and odd strings: runs of
    spaces, leading/trailing whitespace, newlines, tabs, characters outside the vocabulary, emoji."""
    from dqo_megatron.demo.task import AdditionTask
    from dqo_megatron.tasks.prompts import build_prompt

    texts = ["", " ", "  ", "\n", "\n\nx", "a\nb", "a \n b", " What", "What  is\n\n 12", "\tx", "x  ", "héllo 日本 😀"]
    for digits in (2, 3):
        task = AdditionTask(digits)
        for a, b in ((547 % 10**digits, 385 % 10**digits), (10**digits - 1, 10**digits - 1), (3, 40)):
            texts += [build_prompt("gsm8k", task.question(a, b)), task.solution(a, b)]
    for split in ("train", "test"):
        with open(shared_data_dir() / "gsm8k" / f"{split}.jsonl", encoding="utf-8") as f:
            for _, line in zip(range(150), f):
                row = json.loads(line)
                texts += [build_prompt("gsm8k", row["question"]), row["answer"], " " + row["answer"]]
    rng = random.Random(0)
    alphabet = "ab 1\n\t+=#?.,'éW日😀<>/s"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(600)]
    return [t for t in texts if not any(s in t for s in SPECIAL_TEXT)]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    """A sentencepiece model trained as the demo trains its own (BPE, digits split, "\\n" a user symbol, no
    normalization, spaces kept), on the demo's task text."""
    from dqo_megatron.demo.task import AdditionTask, make_problems, tokenizer_corpus, train_tokenizer

    task = AdditionTask(3)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    return train_tokenizer(tokenizer_corpus(task, make_problems(task, 500, seed=3)), path, vocab_size=128)


def _export(model: Path, out: Path, **config) -> Path:
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"vocab_size": 1024, **config}))
    export_tokenizer(model, out, 1024)
    return out


@pytest.mark.parametrize("which", ["demo", "stories260K"])
def test_exported_sentencepiece_gives_the_training_tokenizers_ids(which, demo_model, tmp_path):
    from transformers import AutoTokenizer

    model = demo_model if which == "demo" else STORIES_TOKENIZER
    out = _export(model, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)  # the export directory alone
    ours = Tokenizer(TokenizerConfig(path=str(model)))
    # the training tokenizer loading the export (an HF directory: "<s>" + prompt, no special tokens added)
    ours_hf = Tokenizer(TokenizerConfig(path=str(out)))
    texts = _texts()
    prompts = [t for t in texts if t]  # a prompt is never empty
    framed = ours.encode_prompts([ours.render_prompt(p, {}) for p in prompts])
    assert framed[0][0] == hf.bos_token_id == ours.bos_id
    assert hf(prompts)["input_ids"] == framed
    assert ours_hf.encode_prompts([ours_hf.render_prompt(p, {}) for p in prompts]) == framed
    responses, starts = ours.encode_responses(texts, [True] * len(texts))
    assert hf(texts, add_special_tokens=False)["input_ids"] == responses
    hf_responses, hf_starts = ours_hf.encode_responses(texts, [True] * len(texts))
    assert hf_responses == responses
    # the character offsets process rewards are placed by; a model that collapses runs of spaces (stories260K)
    # places the piece of a collapsed run at another of its spaces
    same = [i for i, t in enumerate(texts) if which == "demo" or ("  " not in t and t == t.strip(" "))]
    assert [hf_starts[i] for i in same] == [list(starts[i]) for i in same]
    assert [hf.decode(ids, skip_special_tokens=True) for ids in responses] == [ours.decode(ids) for ids in responses]
    assert hf.eos_token_id == ours.eos_id and len(hf) == ours.vocab_size
    assert hf.decode([hf.bos_token_id, *responses[-1], hf.eos_token_id], skip_special_tokens=True) == ours.decode(
        responses[-1]
    )


def test_the_export_is_complete_and_generation_config_greedy(demo_model, tmp_path):
    out = _export(demo_model, tmp_path / "hf", max_position_embeddings=88)
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert (out / "tokenizer.model").read_bytes() == demo_model.read_bytes()  # the data's tokenizer identity
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["do_sample"] is False
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_config["model_max_length"] == 88
    assert json.loads((out / "special_tokens_map.json").read_text()) == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
    }
    from dqo_megatron.data.tokenize import tokenizer_difference, tokenizer_fingerprint

    assert tokenizer_difference(tokenizer_fingerprint(str(demo_model)), tokenizer_fingerprint(str(out))) is None


def test_a_model_without_pad_pads_with_eos_and_config_ids_are_kept(tmp_path):
    out = _export(STORIES_TOKENIZER, tmp_path / "hf", eos_token_id=[2, 7])
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 7] and generation["pad_token_id"] == 2  # the model's own ids win
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [2, 7]


def test_hf_directories_are_copied_with_their_chat_template(demo_model, tmp_path):
    from transformers import AutoTokenizer

    src = _export(demo_model, tmp_path / "src")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": True}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    written = export_tokenizer(src, out, 1024)
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json"} <= set(written)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == config["chat_template"]
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 2, "do_sample": True}
    # a directory holding only a sentencepiece model is converted (transformers would frame it differently)
    only = tmp_path / "only"
    only.mkdir()
    (only / "tokenizer.model").write_bytes(demo_model.read_bytes())
    out2 = tmp_path / "out2"
    out2.mkdir()
    export_tokenizer(only, out2, 1024)
    assert AutoTokenizer.from_pretrained(str(out2))("What is")["input_ids"][0] == 1


def test_without_a_tokenizer_there_is_still_a_generation_config(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert export_tokenizer(None, out, 16) == ["generation_config.json"]
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 2
    assert "exported without a tokenizer" in caplog.text


def test_bad_tokenizer_arguments_are_named(demo_model, tmp_path):
    with pytest.raises(ConversionError, match=r"--tokenizer .*nope does not exist"):
        checked_tokenizer_source(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match=r"config.json is a file but not a sentencepiece \.model"):
        checked_tokenizer_source(tmp_path / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="empty holds no tokenizer files"):
        checked_tokenizer_source(tmp_path / "empty")
    assert checked_tokenizer_source(demo_model).path == demo_model and checked_tokenizer_source(None) is None
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01not a model" * 10)
    with pytest.raises(ConversionError, match="garbage.model: not a sentencepiece model"):
        sentencepiece_to_hf(garbage)
    out = tmp_path / "small"
    out.mkdir()
    with pytest.raises(ConversionError, match="has 128 tokens, the model 100"):
        export_tokenizer(demo_model, out, 100)
    from dqo_megatron.conversion.convert import check_tokenizer_fits

    with pytest.raises(ConversionError, match="has 128 tokens, the model 100"):  # before the weights load
        check_tokenizer_fits(demo_model, 100)
    check_tokenizer_fits(demo_model, 128)


def test_models_whose_ids_cannot_be_reproduced_are_refused(tmp_path):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    texts = [f"what is {a} plus {b}" for a in range(30) for b in range(30)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=40, model_type="unigram", minloglevel=2
    )
    (tmp_path / "u.model").write_bytes(buf.getvalue())
    with pytest.raises(ConversionError, match="u.model: cannot be converted .*not a BPE model"):
        sentencepiece_to_hf(tmp_path / "u.model")
    # refused by the cheap check an export runs before it loads a checkpoint, not after the weights
    from dqo_megatron.conversion.hf_tokenizer import checked_tokenizer_source

    with pytest.raises(ConversionError, match="u.model: cannot be converted .*not a BPE model"):
        checked_tokenizer_source(tmp_path / "u.model")
    # as the run's eval.tokenizer (a fallback nobody asked for): the export goes on without a tokenizer
    from dqo_megatron.config import RunConfig
    from dqo_megatron.training.export import export_tokenizer_source

    run = RunConfig()
    run.eval.tokenizer = str(tmp_path / "u.model")
    assert export_tokenizer_source(run) is None


def test_export_checks_the_tokenizer_before_loading_the_checkpoint(tmp_path):
    """`export --tokenizer` of a wrong path fails at once, naming it (it used to load the checkpoint first)."""
    from dqo_megatron.config import RunConfig
    from dqo_megatron.training.export import export_policy_to_hf, export_tokenizer_source

    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    for marker in ("COMPLETE", "extra_state.pt"):  # passes the path checks; nothing loadable inside
        (step / marker).write_text("{}")
    for bad in (tmp_path / "missing.model", tmp_path / "run"):
        with pytest.raises(ConversionError, match=re.escape(f"--tokenizer {bad} ")):
            export_policy_to_hf(RunConfig(), step, tmp_path / "out", tokenizer=str(bad))
    assert not (tmp_path / "out").exists()
    run = RunConfig()
    run.eval.tokenizer = str(STORIES_TOKENIZER)  # no init checkpoint: the run's own tokenizer is exported
    assert export_tokenizer_source(run).path == STORIES_TOKENIZER
