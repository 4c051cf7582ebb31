"""dqo-megatron: Direct Q-function Optimization (DQO) and its offline-RL baselines on Megatron-Core.

Rooms, one per concern, stacked so that imports go one way (docs/architecture.md lists every
module; tests/test_house_rules.py enforces the order): config, parallel/compat, logprobs, models,
conversion, data/tasks, training, rollout/process_scores, eval/analysis, demo, cli; losses and
algorithms are pure math and sit below them all.
"""

__version__ = "0.1.0"

import warnings as _warnings

KNOWN_HARMLESS_WARNINGS = (
    # megatron-core warns once per module that TE/apex are missing; we say it once, in plain words,
    # when a model is built (dqo_megatron.models.builder.select_backend)
    (UserWarning, r"(Transformer Engine and )?Apex is not installed"),
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    # torch.distributed.checkpoint about the ShardedTensor that megatron-core's dist_checkpointing
    # saves and loads with, and about the old load_state_dict it calls: nothing for a user to change
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions"),
)
"""(category, message regex) of the dependencies' warnings that every command would otherwise print
(subprocess logs included) and that ask nothing of a user; other warnings are left alone. The one list:
add a message here, never a whole category."""


def filter_known_warnings() -> None:
    """Silence `KNOWN_HARMLESS_WARNINGS` in this process (run on import of the package, so every command,
    worker and child process that imports dqo_megatron has it)."""
    for category, message in KNOWN_HARMLESS_WARNINGS:
        _warnings.filterwarnings("ignore", message=message, category=category)


filter_known_warnings()
