"""The value head and access to a GPTModel's final hidden states.

DQO learns ``V(s_h)`` next to the policy. The head is ``V = w . x + b`` on the final hidden state ``x``
(after the final norm) at each position: ``Linear(hidden, 1)``.

* **Replicated across TP.** It is tiny; every TP rank holds the same ``w, b``. Without SP every TP rank
  sees the same hidden states and computes the same gradient. Under SP rank r only sees positions
  ``[r*s/tp, (r+1)*s/tp)``, so its gradient is partial: the parameters carry
  ``sequence_parallel = True`` and Megatron's ``finalize_model_grads`` all-reduces them over TP (the same
  mechanism as the norms). The per-token values ``[b, s/tp]`` are then gathered with
  `dqo_megatron.logprobs.gather_from_sequence_parallel(v, dim=1)` (whose backward slices).
* **Zero-initialized** (weight and bias) by default: ``V = 0`` at the start, so the first returns are the
  plain rewards and the value loss starts from a known point; the gradient ``dL/dw = sum_t g_t x_t`` is
  not zero, so it learns from the first step.
* **fp32 output** whatever the trunk's dtype (the parameters are fp32 unless told otherwise).
* **Own parameter group**: every parameter carries ``is_value_head = True`` (`VALUE_HEAD_ATTR`). With
  Megatron's optimizer pass ``config_overrides={value_head_param_key(): {"max_lr": lr_v, "min_lr": ...}}``
  to `get_megatron_optimizer`; with a torch optimizer use `split_value_head_params`.

Two ways to get hidden states:

* a dedicated value network: a second GPTModel (same builder) plus a `ValueHead`; run it inside
  `final_hidden_states_only(model)` so that its forward returns the decoder output ``[s, b, h]`` and never
  computes the ``[s, b, V]`` logits.
* the shared-trunk mode: the policy's own forward, with `FinalHiddenStates(model)` (a forward hook on
  ``model.decoder``) capturing the same tensor while the logits are computed as usual. Attach the head as
  a submodule (``gpt.value_head = ValueHead(...)``) before wrapping in Megatron DDP, so its gradients get
  a ``main_grad`` buffer and are reduced. Under PP the head lives on the last stage.

Both give Megatron's decoder output: ``[s, b, h]`` (``[s/tp, b, h]`` under SP, ``s/cp`` under CP).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F

from dqo_megatron.parallel import unwrap

VALUE_HEAD_ATTR = "is_value_head"
"""Attribute set to True on every value-head parameter (the key for its own parameter group)."""


class ValueHead(torch.nn.Module):
    """``V(s_t) = w . x_t + b`` on final hidden states; fp32 output.

    Args:
        hidden_size: width ``h`` of the hidden states.
        sequence_parallel: mark the parameters so Megatron all-reduces their gradients over TP (set it to
            the model config's ``sequence_parallel``).
        init_std: 0 (default) zero-initializes the weight; otherwise normal(0, init_std). The bias
            always starts at 0.
        params_dtype: dtype of ``w, b`` (fp32 by default, also in bf16 training: the head is tiny).
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        sequence_parallel: bool = False,
        init_std: float = 0.0,
        params_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=params_dtype))
        if init_std:
            torch.nn.init.normal_(self.weight, std=init_std)
        for param in (self.weight, self.bias):
            param.sequence_parallel = sequence_parallel
            setattr(param, VALUE_HEAD_ATTR, True)

    @classmethod
    def from_config(cls, config, **kwargs) -> "ValueHead":
        """A head for a Megatron ``TransformerConfig``: its hidden size and ``sequence_parallel``."""
        kwargs.setdefault("sequence_parallel", config.sequence_parallel)
        return cls(config.hidden_size, **kwargs)

    def forward(self, hidden: torch.Tensor, layout: Literal["sbh", "bsh"] = "sbh") -> torch.Tensor:
        """Values ``[b, s]`` (fp32) from hidden states ``[s, b, h]`` (``"sbh"``, Megatron's) or ``[b, s, h]``.

        Under SP pass the local ``[s/tp, b, h]`` and get ``[b, s/tp]``.
        """
        values = F.linear(hidden.float(), self.weight.float(), self.bias.float()).squeeze(-1)
        return values.transpose(0, 1) if layout == "sbh" else values


def is_value_head_param(param: torch.nn.Parameter) -> bool:
    """True for parameters of a `ValueHead`."""
    return bool(getattr(param, VALUE_HEAD_ATTR, False))


def value_head_param_key():
    """Megatron ``ParamKey`` selecting the value head's parameters (for ``get_megatron_optimizer``'s
    ``config_overrides``, e.g. ``{value_head_param_key(): {"max_lr": 1e-5, "min_lr": 0.0}}``)."""
    from megatron.core.optimizer import ParamKey

    return ParamKey(attr=VALUE_HEAD_ATTR)


def split_value_head_params(module: torch.nn.Module) -> tuple[list, list]:
    """``(value-head params, other params)`` of `module`, for two torch-optimizer parameter groups."""
    head, rest = [], []
    for param in module.parameters():
        (head if is_value_head_param(param) else rest).append(param)
    return head, rest


def unwrap_gpt(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Megatron DDP / Float16Module wrappers (anything with a ``decoder``)."""
    return unwrap(model, lambda m: hasattr(m, "decoder"), "decoder (not a Megatron GPTModel?)")


class FinalHiddenStates:
    """Capture a GPTModel's final hidden states (the decoder output, after the final norm) on each forward.

    A forward hook on ``model.decoder``; the model's own output (logits) is unchanged::

        with FinalHiddenStates(model) as captured:
            logits = model(tokens, position_ids, None)
            values = value_head(captured.hidden)       # [s, b, h] -> [b, s]

    ``hidden`` is ``[s, b, h]`` (``[s/tp, b, h]`` under SP) and stays in the autograd graph, so a loss on it
    trains the trunk (shared-trunk mode); detach it for a head that must not. Call `remove` (or leave
    the ``with``) to drop the hook.
    """

    def __init__(self, model: torch.nn.Module):
        self.hidden: Optional[torch.Tensor] = None
        self._handle = unwrap_gpt(model).decoder.register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        self.hidden = output[0] if isinstance(output, tuple) else output

    def remove(self) -> None:
        """Remove the hook (the last captured tensor stays readable)."""
        self._handle.remove()

    def __enter__(self) -> "FinalHiddenStates":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextlib.contextmanager
def final_hidden_states_only(model: torch.nn.Module) -> Iterator[None]:
    """While active, ``model(...)`` returns the decoder output ``[s, b, h]`` instead of logits.

    GPTModel's forward returns right after the decoder when its ``post_process`` is False; the decoder
    was built with its own ``post_process`` (final norm included) and is unaffected. So this skips the
    output layer -- the ``[s, b, V]`` logits -- for a dedicated value network, or for the fused log-prob
    path (`dqo_megatron.logprobs.token_logprobs_from_hidden` with `output_weight(model)`). The flag is
    restored on exit; backward and Megatron's finalize run outside and are unaffected. Only meaningful
    on the last pipeline stage (other stages return hidden states anyway).
    """
    gpt = unwrap_gpt(model)
    previous = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = previous
