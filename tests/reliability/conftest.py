"""Fixtures the reliability tests share with the module tests (the tiny sentencepiece model and the
stories260K files of the shared data)."""

from tests.data.conftest import hf_tok_dir, sp_model  # noqa: F401
from tests.rollout.conftest import stories_files  # noqa: F401
