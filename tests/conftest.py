"""Shared fixtures: the shared data directory (skipped with a reason when absent), quiet logs."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron.paths import SHARED_DATA_ENV, shared_data_dir


@pytest.fixture(scope="session")
def shared_data():
    """Path of ../shared/data (or $DQO_SHARED_DATA); skips the test when it is not there."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}: set {SHARED_DATA_ENV} or put ../shared beside the clone")
    return path


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    # 2 cores run several ranks at once; oversubscribed OpenMP threads make everything slower.
    torch.set_num_threads(1)
