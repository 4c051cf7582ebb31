"""The transformers backend on the real stories260K model and a tiny random Llama: the story, log-probs
against an independent full forward pass, seeds, batch independence, prefixes, stop strings."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron.rollout.backend import GenerationBackend, SamplingParams
from dqo_megatron.rollout.framing import encode_prompts
from tests.rollout.reference import reference_token_logprobs

PAPER = SamplingParams(n=4, temperature=1.0, top_p=0.9, top_k=16, max_new_tokens=40)
PROMPTS = ["Once upon a time", "Tom and Sue were friends.", "The dog ran to the park."]


def _backend(model_and_tok, **kw):
    from dqo_megatron.rollout.transformers_backend import TransformersBackend

    model, tok = model_and_tok
    return TransformersBackend(model, tok, device="cpu", **kw)


@pytest.fixture(scope="module")
def stories64(stories_hf):
    """stories260K in float64: the comparison with a separate forward pass is then free of float32 rounding
    (fp32 logits of magnitude ~17 alone carry ~1e-5 of it, measured)."""
    backend = _backend(stories_hf, dtype="float64")
    yield backend
    backend.close()


def _check_logprobs(backend, prompts, outs, params, atol):
    """Recompute every sample's raw and processed log-probs from one full forward pass (no cache, no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(backend.model_path, dtype=backend.dtype).eval()
    prompt_ids, _ = encode_prompts(backend.tokenizer, prompts)
    worst = 0.0
    for ids, completions in zip(prompt_ids, outs):
        for c in completions:
            with torch.no_grad():
                logits = model(torch.tensor([ids + c.token_ids])).logits[0, len(ids) - 1 : -1]
            raw, proc = reference_token_logprobs(logits, c.token_ids, params.temperature, params.top_k, params.top_p)
            assert len(c.logprobs) == len(c.sampled_logprobs) == len(c.token_ids)
            worst = max(worst, max(abs(a - b) for a, b in zip(raw + proc, c.logprobs + c.sampled_logprobs)))
    assert worst <= atol, worst
    return worst


def test_greedy_story_from_bos(stories_hf):
    backend = _backend(stories_hf)
    assert isinstance(backend, GenerationBackend)
    (out,) = backend.generate([""], SamplingParams(temperature=0, max_new_tokens=16), seeds=[0])
    assert out[0].text.startswith("Once upon a time, there was a little girl named Lily"), out[0].text
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 16
    assert out[0].sampled_logprobs == [0.0] * 16


def test_logprobs_equal_a_separate_forward_pass_stories(stories64):
    outs = stories64.generate(PROMPTS, PAPER, seeds=[1, 2, 3])
    _check_logprobs(stories64, PROMPTS, outs, PAPER, atol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        PAPER,
        SamplingParams(n=3, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=20),
        SamplingParams(temperature=0.0, max_new_tokens=20),
    ],
)
def test_logprobs_equal_a_separate_forward_pass_random_fp32(random_hf, params):
    backend = _backend(random_hf)
    outs = backend.generate(PROMPTS, params, seeds=[5, 6, 7])
    assert any(c.finish_reason == "eos" for o in outs for c in o)
    _check_logprobs(backend, PROMPTS, outs, params, atol=1e-5)


def test_same_seed_same_samples_at_any_batch_size(stories_hf):
    backend = _backend(stories_hf)
    first = backend.generate(PROMPTS, PAPER, seeds=[1, 2, 3])
    again = backend.generate(PROMPTS, PAPER, seeds=[1, 2, 3])
    assert [[c.token_ids for c in o] for o in first] == [[c.token_ids for c in o] for o in again]
    for batch_size in (1, 3, 5):
        backend.batch_size = batch_size
        other = backend.generate(PROMPTS, PAPER, seeds=[1, 2, 3])
        for o1, o2 in zip(first, other):
            for c1, c2 in zip(o1, o2):
                assert c1.token_ids == c2.token_ids and c1.text == c2.text
                assert max(abs(a - b) for a, b in zip(c1.logprobs, c2.logprobs)) < 1e-4
    # a prompt alone, with its own seed, gives its samples from the batch; sample j does not depend on n
    (alone,) = backend.generate(PROMPTS[1:2], SamplingParams(**{**PAPER.__dict__, "n": 2}), seeds=[2])
    assert [c.token_ids for c in alone] == [c.token_ids for c in first[1][:2]]
    different = backend.generate(PROMPTS[1:2], PAPER, seeds=[99])
    assert [c.token_ids for c in different[0]] != [c.token_ids for c in first[1]]


def test_prefix_continues_the_response(stories_hf):
    backend = _backend(stories_hf)
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    (full,) = backend.generate([""], greedy, seeds=[0])
    head = "Once upon a time"
    (cont,) = backend.generate([""], SamplingParams(temperature=0, max_new_tokens=20), seeds=[0], prefixes=[head])
    prefix_ids = backend.tokenizer.sp.encode(head)
    assert full[0].token_ids[: len(prefix_ids)] == prefix_ids
    assert cont[0].token_ids == full[0].token_ids[len(prefix_ids) :]
    assert full[0].text.startswith(head + cont[0].text)  # the space after the prefix is kept


def test_stop_strings(stories_hf):
    backend = _backend(stories_hf)
    (out,) = backend.generate([""], SamplingParams(temperature=0, max_new_tokens=40, stop=(".",)), seeds=[0])
    c = out[0]
    assert c.finish_reason == "stop" and c.text.endswith(".") and c.text.count(".") == 1, c.text
    assert "." not in backend.tokenizer.decode(c.token_ids[:-1])  # it stopped at the first token completing "."
