"""The megatron backend (a converted checkpoint, never exported) samples what the transformers backend
samples from the same weights: greedy token for token, and (same seeds, same sampler) the same samples."""

from __future__ import annotations

from dqo_megatron.rollout.backend import SamplingParams
from tests.helpers.distributed import run_distributed

PROMPTS = ["", "Lily"]
GREEDY = SamplingParams(temperature=0, max_new_tokens=40)
SAMPLED = SamplingParams(n=3, temperature=1.0, top_p=0.9, top_k=16, max_new_tokens=24)


def _generate(kind: str, model: str, tok: str) -> dict:
    from dqo_megatron.rollout.factory import build_backend

    backend = build_backend(kind, model, tok)
    try:
        assert backend.name == kind
        return {
            name: [
                [(c.token_ids, c.logprobs, c.sampled_logprobs, c.text) for c in o]
                for o in backend.generate(PROMPTS, params, seeds=[3, 4])
            ]
            for name, params in (("greedy", GREEDY), ("sampled", SAMPLED))
        }
    finally:
        backend.close()


def test_megatron_greedy_equals_transformers(stories_hf, stories_megatron):
    hf_dir, tok = stories_hf
    (meg,) = run_distributed(_generate, 1, "megatron", stories_megatron, tok, timeout=300)
    ref = _generate("transformers", hf_dir, tok)
    for name in ("greedy", "sampled"):
        for o_meg, o_ref in zip(meg[name], ref[name]):
            for (ids, raw, proc, text), (ids2, raw2, proc2, text2) in zip(o_meg, o_ref):
                assert ids == ids2 and text == text2, (name, text, text2)
                assert max(abs(a - b) for a, b in zip(raw + proc, raw2 + proc2)) < 1e-4
    assert meg["greedy"][0][0][3].startswith("Once upon a time")


def _auto_kind(model: str, tok: str) -> tuple[str, str]:
    from dqo_megatron.rollout.factory import build_backend

    backend = build_backend("auto", model, None)
    try:
        return backend.name, backend.tokenizer_name
    finally:
        backend.close()


def test_auto_picks_megatron_and_names_the_tokenizer_after_the_source(stories_hf, stories_megatron):
    # tokenizer from the checkpoint's hf/ side files; named like the HF directory it was converted from,
    # which is what `preprocess -t <that directory>` calls it
    (got,) = run_distributed(_auto_kind, 1, stories_megatron, None, timeout=300)
    assert got == ("megatron", "stories260K")


def _train_then_generate(meg_dir: str, tmp: str, tok: str) -> dict:
    """One SFT step at lr 0 from the converted stories model, saved as a training checkpoint; then sample
    from that checkpoint (the weights are the converted ones, so the story must be too)."""
    from dqo_megatron.config import DataConfig, InitConfig, RunConfig, TrainConfig
    from dqo_megatron.conversion.megatron_io import read_metadata
    from dqo_megatron.rollout.factory import build_backend
    from dqo_megatron.training.trainer import train
    from tests.helpers.synthetic_data import write_synthetic_dataset

    model, _ = read_metadata(meg_dir)
    data = write_synthetic_dataset(f"{tmp}/data/train", docs=4, vocab=model.vocab_size, max_len=17)
    run = RunConfig(
        model=model,
        algorithm="sft",
        init=InitConfig(policy=meg_dir),
        data=DataConfig(train_prefix=data),
        train=TrainConfig(
            micro_batch_size=2, global_batch_size=2, seq_length=16, lr=0.0, train_steps=1, save_interval=1
        ),
        run_dir=f"{tmp}/run",
    )
    train(run)
    backend = build_backend("auto", f"{tmp}/run/checkpoints/step_00000001")
    try:
        (out,) = backend.generate([""], GREEDY, seeds=[0])
        return {"name": backend.name, "tokenizer": backend.tokenizer_name, "ids": out[0].token_ids}
    finally:
        backend.close()


def test_megatron_backend_reads_a_training_checkpoint(stories_hf, stories_megatron, tmp_path):
    (got,) = run_distributed(_train_then_generate, 1, stories_megatron, str(tmp_path), stories_hf[1], timeout=300)
    # the tokenizer comes from init.policy's hf/ side files, named after the HF directory converted
    assert got["name"] == "megatron" and got["tokenizer"] == "stories260K"
    ref = _generate("transformers", stories_hf[0], None)
    assert got["ids"] == ref["greedy"][0][0][0]
