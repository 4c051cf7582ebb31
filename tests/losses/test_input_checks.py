"""Bad inputs fail loudly with a ValueError naming the argument; the package stands without megatron."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import dqo_megatron.losses as losses
from dqo_megatron.losses import (
    dpo_loss,
    dqo_losses,
    dro_losses,
    kto_loss,
    lambda_returns,
    preference_pairs,
    rejection_sampling_loss,
    sft_loss,
    truncated_importance_weights,
)

B, T = 2, 5


def _inputs(**changes):
    x = torch.randn(B, T)
    args = dict(
        logprobs=x,
        ref_logprobs=x.clone(),
        behavior_logprobs=None,
        values=x.clone(),
        rewards=x.clone(),
        response_mask=torch.ones(B, T),
    )
    args.update(changes)
    return args


def _dqo(changes=(), **settings):
    kwargs = dict(beta=0.1, lam=1.0)
    kwargs.update(settings)
    return dqo_losses(**_inputs(**dict(changes)), **kwargs)


@pytest.mark.parametrize("name", ["logprobs", "ref_logprobs", "behavior_logprobs", "values", "rewards"])
def test_shape_mismatch_names_the_argument(name):
    with pytest.raises(ValueError, match=name):
        _dqo({name: torch.randn(B, T + 1)})


@pytest.mark.parametrize("mask", [torch.full((B, T), 0.5), torch.full((B, T), 2), torch.tensor([[1, -1, 0, 1, 1]] * 2)])
def test_soft_or_invalid_masks_are_rejected(mask):
    with pytest.raises(ValueError, match="response_mask"):
        _dqo({"response_mask": mask})


@pytest.mark.parametrize(
    "setting,value",
    [
        ("is_level", "sequence"),
        ("reduction", "mean"),
        ("lam", 1.5),
        ("lam", -0.1),
        ("beta", 0.0),
        ("is_clip", 0.0),
        ("is_clip", float("nan")),
    ],
)
def test_bad_settings_name_the_argument(setting, value):
    with pytest.raises(ValueError, match=setting):
        _dqo(**{setting: value})


def test_other_bad_tensors():
    with pytest.raises(ValueError, match="response_mask"):
        _dqo({"response_mask": torch.ones(T)})
    with pytest.raises(ValueError, match="logprobs"):
        _dqo({"logprobs": torch.zeros(B, T, dtype=torch.long)})
    with pytest.raises(ValueError, match="document_ids"):
        _dqo(document_ids=torch.zeros(B, T))  # float ids
    with pytest.raises(ValueError, match="document_ids"):
        _dqo(document_ids=torch.zeros(B, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="values"):
        _dqo({"values": [[0.0] * T] * B})


def test_every_public_function_checks_its_inputs():
    x, mask = torch.randn(B, T), torch.ones(B, T)
    with pytest.raises(ValueError, match="values"):
        lambda_returns(x, x, x, torch.randn(B + 1, T), mask, beta=0.1, lam=0.5)
    with pytest.raises(ValueError, match="lam"):
        lambda_returns(x, x, x, x, mask, beta=0.1, lam=2.0)
    with pytest.raises(ValueError, match="level"):
        truncated_importance_weights(x, x, mask, level="token")
    with pytest.raises(ValueError, match="clip"):
        truncated_importance_weights(x, x, mask, clip=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        sft_loss(x, mask, reduction="sum")
    with pytest.raises(ValueError, match="rewards"):
        rejection_sampling_loss(x, torch.randn(B, T - 1), mask)
    with pytest.raises(ValueError, match="ref_logprobs"):
        dro_losses(x, torch.randn(T), x, x, mask, beta=1.0)
    v = torch.randn(4)
    with pytest.raises(ValueError, match="rejected_logps"):
        dpo_loss(v, v, torch.randn(3), v, beta=0.1)
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(v, v, torch.ones(4), v, v, beta=0.1)
    with pytest.raises(ValueError, match="policy_kl_logps"):
        kto_loss(v, v, v > 0, torch.zeros(0), torch.zeros(0), beta=0.1)
    with pytest.raises(ValueError, match="max_pairs_per_group"):
        preference_pairs(torch.arange(4), v, max_pairs_per_group=0)
    with pytest.raises(ValueError, match="group_ids"):
        preference_pairs(v, v)


def test_public_api_is_documented():
    for name in losses.__all__:
        obj = getattr(losses, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 40, f"{name} needs a docstring"


def test_package_imports_without_megatron():
    # Make `import megatron` fail outright, then check nothing tried to import it.
    code = (
        "import sys; sys.modules['megatron'] = None; import dqo_megatron.losses; "
        "bad = [m for m in sys.modules if m.startswith('megatron.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
