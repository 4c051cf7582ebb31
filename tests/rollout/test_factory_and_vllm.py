"""`build_backend` choices and errors; the vLLM backend (tested wherever vLLM imports and CUDA is present,
otherwise skipped with the reason in the default suite's summary; its missing-vLLM error is tested everywhere)."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron.rollout.backend import SamplingParams
from dqo_megatron.rollout.factory import build_backend, resolve_kind
from dqo_megatron.rollout.vllm_backend import vllm_available

VLLM_OK, VLLM_WHY = vllm_available()


def test_resolve_kind(random_hf, tmp_path):
    model, _ = random_hf
    expected = "vllm" if VLLM_OK and torch.cuda.is_available() else "transformers"
    assert resolve_kind("auto", model) == expected
    assert resolve_kind("transformers", model) == "transformers"
    with pytest.raises(ValueError, match="backend='tgi'"):
        resolve_kind("tgi", model)


def test_factory_errors(random_hf, tmp_path):
    model, tok = random_hf
    with pytest.raises(ValueError, match="tensor_parallel=2 needs the vllm backend"):
        build_backend("transformers", model, tok, tensor_parallel=2)
    with pytest.raises(ValueError, match="vLLM engine arguments"):
        build_backend("transformers", model, tok, gpu_memory_utilization=0.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backend("auto", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        build_backend("transformers", model)  # the random model directory has no tokenizer
    with pytest.raises(FileNotFoundError, match="neither a `convert hf-to-megatron` directory"):
        build_backend("megatron", model, tok)


@pytest.mark.skipif(VLLM_OK, reason="vLLM is installed: the missing-vLLM error cannot be shown")
def test_vllm_missing_is_a_clear_error(random_hf):
    with pytest.raises(ImportError, match="pip install vllm"):
        build_backend("vllm", *random_hf)


_VLLM_SKIP = "; ".join(
    why
    for bad, why in (
        (not VLLM_OK, f"{VLLM_WHY} (install vLLM on a GPU machine)"),
        (not torch.cuda.is_available(), "no CUDA GPU here"),
    )
    if bad
)


@pytest.mark.skipif(bool(_VLLM_SKIP), reason=f"vLLM backend not tested: {_VLLM_SKIP}")
def test_vllm_logprobs_and_seeds(tmp_path):
    """Runs in a spawned process (this one must not hold a CUDA context: other tests fork)."""
    from tests.gpu.support import run_spawned

    run_spawned(vllm_body, 1, str(tmp_path), timeout=900)


def vllm_body(tmp: str) -> None:
    """A random Llama with head_dim 64 (what vLLM's attention kernels take) and a byte-level HF tokenizer:
    the same seed gives the same samples alone or in a batch, greedy equals the transformers backend's,
    and the recorded raw / processed log-probs equal a separate forward pass of the sampled tokens."""
    import transformers

    from dqo_megatron.rollout.framing import encode_prompts
    from tests.rollout.reference import reference_token_logprobs

    model = f"{tmp}/model"
    tok_dir = _gpt2_like_tokenizer(model)
    config = transformers.LlamaConfig(
        vocab_size=len(transformers.AutoTokenizer.from_pretrained(tok_dir)),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(model)
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, top_k=16, max_new_tokens=16)
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    vb = build_backend("vllm", model, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    try:
        assert vb.name == "vllm"
        out = vb.generate(["hello world", "abc"], params, seeds=[1, 2])
        again = vb.generate(["abc"], params, seeds=[2])
        vgreedy = vb.generate(["hello world"], greedy, seeds=[0])
    finally:
        vb.close()
    assert [c.token_ids for c in again[0]] == [c.token_ids for c in out[1]]
    tb = build_backend("transformers", model, device="cuda", dtype="float32")
    try:
        (tgreedy,) = tb.generate(["hello world"], greedy, seeds=[0])
        assert vgreedy[0][0].token_ids == tgreedy[0].token_ids
        prompt_ids, _ = encode_prompts(tb.tokenizer, ["hello world", "abc"])
        for ids, completions in zip(prompt_ids, out):
            for c in completions:
                with torch.no_grad():
                    logits = tb.model(torch.tensor([ids + c.token_ids], device="cuda")).logits[0, len(ids) - 1 : -1]
                raw, proc = reference_token_logprobs(logits.cpu(), c.token_ids, 1.0, 16, 0.9)
                assert max(abs(a - b) for a, b in zip(raw, c.logprobs)) < 1e-3
                assert max(abs(a - b) for a, b in zip(proc, c.sampled_logprobs)) < 1e-3
    finally:
        tb.close()


def _gpt2_like_tokenizer(out) -> str:
    """A byte-level BPE tokenizer built locally (no download): the bytes as the vocabulary, EOS appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return str(out)
