"""dqo-megatron: Direct Q-function Optimization (DQO) and its offline-RL baselines on Megatron-Core.

Rooms, one per concern:
  config      typed dataclasses for every setting, YAML + overrides
  parallel    torch.distributed and Megatron parallel state, in one place
  models      Llama / Qwen2 / Gemma as Megatron-Core GPTModels, layer specs (TE or CPU-capable local)
  compat      the one documented patch that lets megatron-core run on CPU (no-op on GPU)
  losses      pure-tensor DQO math and baselines (no megatron import)
  training    forward_step / loss_func and the train step
"""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core warns once per module that TE/apex are missing; we say it once, in plain words,
# when a model is built (dqo_megatron.models.builder.select_backend).
_warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex is not installed")
_warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed")
