"""dqo-megatron: Direct Q-function Optimization (DQO) and its offline-RL baselines on Megatron-Core.

Rooms, one per concern, stacked so that imports go one way (docs/architecture.md lists every
module; tests/test_house_rules.py enforces the order): config, parallel/compat, logprobs, models,
conversion, data/tasks, training, rollout/process_scores, eval/analysis, demo, cli; losses and
algorithms are pure math and sit below them all.
"""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core warns once per module that TE/apex are missing; we say it once, in plain words,
# when a model is built (dqo_megatron.models.builder.select_backend).
_warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex is not installed")
_warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed")
