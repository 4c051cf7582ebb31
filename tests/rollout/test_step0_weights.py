"""End to end, rollout -> preprocess -> the trainer's view: at training step 0 (policy = the model that
sampled) the importance weight exp(sum_h log pi(a_h|s_h) - behavior_h) of every response is 1.

The rollout samples with every knob of the sampling distribution away from the model's own (temperature
0.8, top-k 16, top-p 0.9) and a length limit that cuts some samples (written `truncated`, without EOS).
The policy's log-probs come from one plain transformers forward pass over each preprocessed document's
tokens, as the trainer's reference would compute them. With the default (raw) behavior log-probs the
weight is 1 within 1e-4 on EOS-ended and truncated responses alike; with `--behavior-logprobs sampled`
it is not, which is why raw is the default (and what makes this test able to fail).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dqo_megatron.data.dataset import TrajectoryDataset
from dqo_megatron.data.preprocess import PreprocessConfig, preprocess
from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig
from dqo_megatron.rollout.config import RolloutConfig
from dqo_megatron.rollout.rollout import run_rollout

SAMPLING = dict(temperature=0.8, top_k=16, top_p=0.9)


@pytest.fixture(scope="module")
def policy(random_hf):
    """The sampler's weights as the trainer starts from them (float32, a plain forward pass, no KV cache)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(random_hf[0], dtype=torch.float32).eval()


def _rollout_and_preprocess(random_hf, problems: str, out: Path, kind: str | None) -> TrajectoryDataset:
    """Rollout (`kind` None: the default behavior log-probs) then preprocess; the dataset."""
    model, tok = random_hf
    name = kind or "default"
    cfg = RolloutConfig(
        problems=problems,
        output=str(out / f"{name}.jsonl"),
        model=model,
        tokenizer=tok,
        backend="transformers",
        device="cpu",
        n=8,
        max_new_tokens=12,
        label=True,
        progress=False,
        **SAMPLING,
        **({"behavior_logprobs": kind} if kind else {}),
    )
    run_rollout(cfg)
    prefix = str(out / name / "data")
    preprocess(
        PreprocessConfig(
            inputs=[cfg.output],
            output_prefix=prefix,
            progress=False,
            tokenize=TokenizeConfig(tokenizer=TokenizerConfig(path=tok)),
        )
    )
    return TrajectoryDataset(prefix)


def _log_weights(ds: TrajectoryDataset, policy) -> tuple[np.ndarray, np.ndarray]:
    """log w = sum over each response of (policy log-prob - stored behavior log-prob), through the trainer's
    own batch path (`pad_collate` -> `to_model_batch`: shifted labels, response mask, behavior log-probs,
    `truncated`) and log-prob code (`token_logprobs_from_logits`), for the documents with behavior
    log-probs. Returns float64 ``[D]`` and the documents' truncated flags, bool ``[D]``."""
    from dqo_megatron.data.batching import pad_collate
    from dqo_megatron.logprobs import token_logprobs_from_logits
    from dqo_megatron.training.microbatches import to_model_batch

    docs = [i for i in range(len(ds)) if ds.has_behavior[i]]
    batch = to_model_batch(pad_collate([ds[i] for i in docs], pad_id=0), with_ref_logprobs=False)
    assert batch["truncated"].dtype == torch.bool and batch["truncated"].tolist() == ds.truncated[docs].tolist()
    with torch.no_grad():  # right padding: a causal model's real positions never see it
        logits = policy(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
    logp = token_logprobs_from_logits(logits.double(), batch["labels"])
    mask = batch["response_mask"].double()
    log_w = ((logp - batch["behavior_logprobs"].double()) * mask).sum(-1)
    return log_w.numpy(), batch["truncated"].numpy()


def test_step0_importance_weights_are_one_with_raw_and_not_with_sampled(random_hf, story_problems, tmp_path, policy):
    assert RolloutConfig(problems="p", output="o").behavior_logprobs == "raw"
    raw = _rollout_and_preprocess(random_hf, story_problems, tmp_path, None)
    log_w, truncated = _log_weights(raw, policy)
    # both kinds of response are checked: ended with EOS (the stored EOS log-prob included) and cut without one
    assert len(log_w) >= 12 and truncated.sum() >= 2 and (~truncated).sum() >= 2, (len(log_w), truncated.sum())
    assert raw.truncated.sum() == sum(bool(json.loads(x).get("truncated")) for x in open(tmp_path / "default.jsonl"))
    for i in np.flatnonzero(raw.truncated):  # a truncated document ends on its last sampled token, no EOS
        assert raw[int(i)]["tokens"][-1] != 2
    worst = float(np.abs(np.exp(log_w) - 1).max())
    assert worst < 1e-4, worst

    sampled = _rollout_and_preprocess(random_hf, story_problems, tmp_path, "sampled")
    log_w_s, truncated_s = _log_weights(sampled, policy)
    assert truncated_s.tolist() == truncated.tolist()  # the same samples (same seeds), other log-probs
    w = np.exp(log_w_s)
    # sampled log-probs are those of a sharper, truncated distribution: the weights sit clearly below 1
    assert np.median(np.abs(w - 1)) > 0.05 and (w < 0.99).mean() > 0.8, w
