#!/usr/bin/env python
"""Megatron-style entry point: same options as `dqo-megatron preprocess` (this is a thin wrapper).

python tools/preprocess_data.py records.jsonl -o data/train -t path/to/tokenizer -j 4 --skip-invalid
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dqo_megatron.cli import data  # noqa: E402,F401  (registers the command)
from dqo_megatron.cli._app import app  # noqa: E402

if __name__ == "__main__":
    app(["preprocess", *sys.argv[1:]])
