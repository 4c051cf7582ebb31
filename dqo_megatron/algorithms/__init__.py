"""The algorithms a run can train, one `Algorithm` object each (docs/algorithms.md, "Adding an
algorithm"): DQO and the paper's baselines register themselves here; `register` adds another.

    from dqo_megatron.algorithms import get
    get("dqo").needs_value, get("dpo").batch_mode, get("kto").rows_per_item
"""

from dqo_megatron.algorithms import dpo, dqo, dro, kto, rs, sft
from dqo_megatron.algorithms.base import ROWS_PER_ITEM, Algorithm, LossInputs, LossTriple, loss_triple
from dqo_megatron.algorithms.registry import all_algorithms, get, names, register, unregister

for _module in (dqo, dro, dpo, kto, sft, rs):
    if _module.ALGORITHM.name not in names():
        register(_module.ALGORITHM)

__all__ = [
    "ROWS_PER_ITEM",
    "Algorithm",
    "LossInputs",
    "LossTriple",
    "all_algorithms",
    "get",
    "loss_triple",
    "names",
    "register",
    "unregister",
]
