#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron: the `dqo-megatron convert` commands as a script.

    python tools/convert_checkpoint.py hf-to-megatron HF_DIR OUT_DIR [--verify] [--value] ...
    python tools/convert_checkpoint.py megatron-to-hf MEGATRON_DIR OUT_DIR [--verify] ...

Same options as `dqo-megatron convert --help`; see docs/checkpoints.md.
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # dist_checkpointing's writer starts processes: keep the guard
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dqo_megatron.cli.convert import convert_app

    convert_app(prog_name="convert_checkpoint.py")
