#!/usr/bin/env python
"""`dqo-megatron preprocess` under the name and flags of Megatron-LM's tools/preprocess_data.py.

Megatron-LM's flags (mapped onto ours; where the meaning differs, --help says so and a run prints one
`note:` line):

    python tools/preprocess_data.py --input records.jsonl --output-prefix data/train \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/Qwen2-7B-Instruct --workers 8 --append-eod

Our own options work too, after Megatron's (e.g. `--max-length 2048 --skip-invalid`), and without
`--input` the arguments are exactly `dqo-megatron preprocess`'s:

    python tools/preprocess_data.py records.jsonl -o data/train -t /models/Qwen2-7B-Instruct -j 8

See docs/pipeline.md, "Megatron-LM users", and docs/data.md.
"""

from __future__ import annotations

import os
import sys

# run as `python tools/preprocess_data.py` from a clone: the package (and the parser shared with the other tool) is
# found at the repository root, installed or not
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dqo_megatron.cli.megatron_flags import MegatronFlagParser, flag_parser, print_notes  # noqa: E402

HF_TOKENIZERS = ("HuggingFaceTokenizer",)
SENTENCEPIECE_TOKENIZERS = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
UNSUPPORTED_TOKENIZERS = (
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "GPT2BPETokenizer",
    "Llama3Tokenizer",
    "MistralTokenizer",
    "TikTokenizer",
    "NullTokenizer",
)

EPILOG = """\
Where the meaning differs from Megatron-LM:
  --input          trajectory records (prompt, response, reward, ...: docs/data.md), not documents of
                   plain text; several files and globs are accepted.
  --output-prefix  writes <prefix>_tokens.bin/.idx, <prefix>_rewards, <prefix>_meta ... and <prefix>.json
                   (not <prefix>_text_document.bin/.idx): give <prefix> itself as data.train_prefix.
  --json-keys      only `text` (the default) is accepted: records are read by their fields, not by keys.
  --tokenizer-type HuggingFaceTokenizer (a local HF directory) or SentencePieceTokenizer /
                   GPTSentencePieceTokenizer / Llama2Tokenizer (a .model file); the kind is read from
                   --tokenizer-model either way. GPT2BPE, BERT, tiktoken and Null tokenizers are refused.
  --append-eod     always on: every response ends with the tokenizer's EOS (not a cut one: docs/data.md).
  --workers        tokenizing processes (our -j); optional here (default 1).
Any other option is passed to `dqo-megatron preprocess` (see its --help).
"""


def parser() -> MegatronFlagParser:
    """Megatron-LM's preprocess_data.py flags that mean something for our records."""
    p = flag_parser(
        "preprocess_data.py",
        "Tokenize trajectory records into Megatron indexed files (dqo-megatron preprocess).",
        EPILOG,
    )
    p.add_argument("--input", nargs="+", required=True, help="Record files (.jsonl, .parquet) or datasets dirs.")
    p.add_argument("--output-prefix", required=True, help="Output prefix (our -o).")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="Only `text` (see below).")
    p.add_argument(
        "--tokenizer-type",
        choices=HF_TOKENIZERS + SENTENCEPIECE_TOKENIZERS + UNSUPPORTED_TOKENIZERS,
        help="Checked against --tokenizer-model; the kind is read from the path.",
    )
    p.add_argument("--tokenizer-model", required=True, help="HF tokenizer directory or sentencepiece .model (our -t).")
    p.add_argument("--workers", type=int, default=1, help="Tokenizing processes (our -j).")
    p.add_argument("--append-eod", action="store_true", help="Always on here (see below).")
    p.add_argument("--log-interval", type=int, default=None, help="Ignored: a progress bar is shown instead.")
    return p


def to_our_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Megatron-LM's arguments -> (`dqo-megatron preprocess` arguments, notes on what differs).

    SystemExit(2) with argparse's one-line message when a flag has no counterpart here."""
    p = parser()
    ns, rest = p.parse_known_args(argv)
    if ns.json_keys != ["text"]:
        p.error(
            f"--json-keys {' '.join(ns.json_keys)}: records are read by their fields (prompt, response, reward; "
            "docs/data.md), not by JSON keys; leave --json-keys out"
        )
    if ns.tokenizer_type in UNSUPPORTED_TOKENIZERS:
        p.error(
            f"--tokenizer-type {ns.tokenizer_type}: not supported; give a HuggingFaceTokenizer directory or a "
            "SentencePieceTokenizer .model file as --tokenizer-model"
        )
    is_sentencepiece = ns.tokenizer_model.endswith(".model") and os.path.isfile(ns.tokenizer_model)
    if ns.tokenizer_type in HF_TOKENIZERS and is_sentencepiece:
        p.error(f"--tokenizer-type {ns.tokenizer_type} with a sentencepiece file {ns.tokenizer_model}")
    if ns.tokenizer_type in SENTENCEPIECE_TOKENIZERS and not is_sentencepiece:
        p.error(f"--tokenizer-type {ns.tokenizer_type}: --tokenizer-model {ns.tokenizer_model} is not a .model file")
    notes = [
        f"writes {ns.output_prefix}_tokens/_rewards/_meta.bin/.idx and {ns.output_prefix}.json "
        f"(not {ns.output_prefix}_text_document): use data.train_prefix={ns.output_prefix}; "
        "every response ends with EOS whatever --append-eod says"
    ]
    if ns.log_interval is not None:
        notes.append("--log-interval is ignored (a progress bar shows the rate)")
    ours = [*ns.input, "-o", ns.output_prefix, "-t", ns.tokenizer_model, "-j", str(ns.workers), *rest]
    return ours, notes


def main(argv: list[str] | None = None) -> None:
    """Run `dqo-megatron preprocess` with Megatron-LM's flags (or with ours, when --input is absent)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from dqo_megatron.cli import data  # noqa: F401  (registers the command)
    from dqo_megatron.cli._app import app

    megatron_style = any(a == "--input" or a.startswith("--input=") for a in argv)
    if megatron_style or argv in (["-h"], ["--help"]):
        if not megatron_style:
            parser().print_help()
            print("\nOr `dqo-megatron preprocess`'s own arguments (without --input):\n")
            app(["preprocess", "--help"], prog_name="preprocess_data.py")
        argv, notes = to_our_args(argv)
        print_notes(notes)
    app(["preprocess", *argv], prog_name="preprocess_data.py")


if __name__ == "__main__":
    main()
