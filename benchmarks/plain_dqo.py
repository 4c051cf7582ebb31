"""DQO written the plain way: `transformers` models + PyTorch autograd + `torch.optim.AdamW`.

The yardstick for `benchmarks/step_cost.py` ("our DQO step vs a plain implementation of the same
losses on the same model and batch"). What a careful user would write without Megatron:

* policy: a `LlamaForCausalLM`; token log-probs by `log_softmax(logits) + gather` (the full
  ``[b, s, V]`` logits exist);
* value network: a second `LlamaForCausalLM`'s trunk (`.model`, the `lm_head` is never run) and a
  ``Linear(hidden, 1)`` head on its final hidden states (after the final norm);
* the losses: `dqo_megatron.losses.dqo_losses`, the same pure function our trainer calls, with
  reference log-probs precomputed in the batch;
* one backward of ``(policy_loss_sum + value_loss_sum) / count`` (the losses' stop-gradients keep each on
  its own parameters), `clip_grad_norm_` over all parameters, `torch.optim.AdamW` (no weight decay).

The micro-batch is the dict our trainer reads (see `make_batch`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dqo_megatron.losses import dqo_losses


def make_batch(vocab: int, rows: int, seq: int, *, seed: int = 0) -> dict:
    """One micro-batch in the trainer's format (as `tests/helpers/rl_layouts.make_rl_batch`).

    Prompts of random length, right-padded responses, an outcome reward on the last response token and
    a process reward inside every other response. Behavior and reference log-probs (response tokens only)
    are near ``-log(vocab)``, what a freshly initialized model (init std 0.02) gives: the importance
    weights start near 1 (far-off behavior log-probs would truncate them to ~0 and the losses with them).
    """
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=gen)
    mask = torch.zeros(rows, seq)
    rewards = torch.zeros(rows, seq)
    for r in range(rows):
        prompt = int(torch.randint(3, seq // 2, (1,), generator=gen))
        end = seq - int(torch.randint(0, seq // 4, (1,), generator=gen))
        mask[r, prompt - 1 : end] = 1
        rewards[r, end - 1] = float(torch.randint(0, 2, (1,), generator=gen))
        if r % 2:
            rewards[r, (prompt + end) // 2] = 0.5
    uniform = -math.log(vocab)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(seq).expand(rows, seq).contiguous(),
        "response_mask": mask,
        "rewards": rewards,
        "behavior_logprobs": (uniform + 0.02 * torch.randn(rows, seq, generator=gen)) * mask,
        "ref_logprobs": (uniform + 0.05 * torch.randn(rows, seq, generator=gen)) * mask,
    }


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log pi(labels)`` ``[b, s]`` from logits ``[b, s, V]`` (fp32 log_softmax + gather)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


class PlainDQO:
    """Policy + separate value network + head + AdamW, one `step(batch)` per optimizer step.

    Args:
        hf_dir: a `LlamaForCausalLM` directory; both the policy and the value trunk start from it.
        head_weight, head_bias: initial value head ``[1, h]``, ``[1]`` (None: zeros, as ours).
        loss: a `dqo_megatron.config.LossConfig` (beta, lam, importance weights, reduction).
        lr, clip_grad, betas, eps: AdamW and gradient clipping (Megatron's defaults).
    """

    def __init__(
        self,
        hf_dir: str,
        loss,
        *,
        lr: float,
        clip_grad: float = 1.0,
        head_weight=None,
        head_bias=None,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
    ):
        import transformers

        load = dict(torch_dtype=torch.float32, attn_implementation="sdpa")
        self.policy = transformers.LlamaForCausalLM.from_pretrained(hf_dir, **load).train()
        self.value = transformers.LlamaForCausalLM.from_pretrained(hf_dir, **load).model.train()
        hidden = self.policy.config.hidden_size
        self.head = torch.nn.Linear(hidden, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.zeros(1, hidden) if head_weight is None else head_weight)
            self.head.bias.copy_(torch.zeros(1) if head_bias is None else head_bias)
        self.loss = loss
        self.clip_grad = clip_grad
        self.params = [p for m in (self.policy, self.value, self.head) for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)

    @torch.no_grad()
    def annotate(self, batch: dict, *, behavior_noise: float = 0.02, seed: int = 1) -> dict:
        """Set the batch's reference log-probs to the (initial) policy's own, and behavior log-probs to
        those plus ``N(0, behavior_noise)`` per token: as data sampled from, and annotated by, the model
        the policy starts from (the paper's setting). Response tokens only; returns `batch`."""
        gen = torch.Generator().manual_seed(seed)
        inputs = dict(input_ids=batch["tokens"], position_ids=batch["position_ids"], use_cache=False)
        logp = token_logprobs(self.policy(**inputs).logits, batch["labels"])
        mask = batch["response_mask"]
        batch["ref_logprobs"] = logp * mask
        batch["behavior_logprobs"] = (logp + behavior_noise * torch.randn(logp.shape, generator=gen)) * mask
        return batch

    def losses(self, batch: dict):
        """`PolicyValueLossOutput` of `dqo_losses` on `batch` (with gradients)."""
        inputs = dict(input_ids=batch["tokens"], position_ids=batch["position_ids"], use_cache=False)
        logp = token_logprobs(self.policy(**inputs).logits, batch["labels"])
        hidden = self.value(**inputs).last_hidden_state  # [b, s, h], after the final norm
        values = F.linear(hidden.float(), self.head.weight, self.head.bias).squeeze(-1)
        ref, behavior = batch["ref_logprobs"], batch.get("behavior_logprobs")
        if behavior is not None:
            behavior = torch.where(torch.isnan(behavior), ref, behavior)
        c = self.loss
        return dqo_losses(
            logp,
            ref,
            behavior,
            values,
            batch["rewards"],
            batch["response_mask"],
            beta=c.beta,
            lam=c.lam,
            is_level=c.is_level,
            is_clip=c.is_clip,
            is_self_normalize=c.is_self_normalize,
            reduction=c.reduction,
            document_ids=batch.get("document_ids"),
        )

    def step(self, batch: dict) -> dict:
        """One optimizer step; returns the step's ``loss``, ``policy_loss``, ``value_loss`` (token means)."""
        self.optimizer.zero_grad(set_to_none=True)
        out = self.losses(batch)
        count = out.count.clamp(min=1).float()
        (out.loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.optimizer.step()
        return {
            "loss": float(out.loss_sum.detach() / count),
            "policy_loss": float(out.policy_loss_sum.detach() / count),
            "value_loss": float(out.value_loss_sum.detach() / count),
        }
