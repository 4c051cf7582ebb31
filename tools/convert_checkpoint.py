#!/usr/bin/env python
"""`dqo-megatron convert` under the flags of Megatron-LM's tools/checkpoint/convert.py.

Megatron-LM's flags (mapped onto ours; where the meaning differs, --help says so and a run prints one
`note:` line):

    python tools/convert_checkpoint.py --model-type GPT --loader llama_mistral --saver mcore \\
        --load-dir /models/Qwen2-7B-Instruct --save-dir ckpt/qwen2-7b --target-tensor-parallel-size 4
    python tools/convert_checkpoint.py --model-type GPT --loader mcore --saver hf \\
        --load-dir ckpt/trained --save-dir hf/trained

Our own options work too, after Megatron's (e.g. `--verify`), and with a subcommand first the
arguments are exactly `dqo-megatron convert`'s:

    python tools/convert_checkpoint.py hf-to-megatron HF_DIR OUT_DIR [--verify] [--value] ...

See docs/pipeline.md, "Megatron-LM users", and docs/checkpoints.md.
"""

from __future__ import annotations

import os
import sys

# run as `python tools/convert_checkpoint.py` from a clone: the package (and the parser shared with the other tool) is
# found at the repository root, installed or not
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dqo_megatron.cli.megatron_flags import MegatronFlagParser, flag_parser, print_notes  # noqa: E402

HF_SIDE = ("llama_mistral", "hf", "huggingface")
"""Loader / saver names that mean a Hugging Face model directory."""
MEGATRON_SIDE = ("mcore", "megatron", "legacy")
"""Loader / saver names that mean our Megatron checkpoint directory."""
SUBCOMMANDS = ("hf-to-megatron", "megatron-to-hf", "value-from-megatron")

EPILOG = """\
Where the meaning differs from Megatron-LM:
  --loader/--saver  llama_mistral, hf or huggingface: a Hugging Face directory (config.json + safetensors;
                    Llama, Qwen2, Gemma); mcore, megatron or legacy: a dqo-megatron checkpoint (written
                    by `convert hf-to-megatron` or `export --format megatron`), not a Megatron-LM training
                    checkpoint. One side must be HF and the other Megatron.
  --target-tensor-parallel-size, --target-pipeline-parallel-size
                    our checkpoints are layout-free (training loads them under any TP/PP): HF -> Megatron
                    only checks that the model splits into that layout (our --tp/--pp); ignored otherwise.
  --model-type      GPT only.
  --checkpoint-type hf only (Meta's original llama format is not read).
  --tokenizer-model megatron -> HF: the tokenizer files to copy (our --tokenizer); HF -> Megatron: ignored
                    (the HF directory's tokenizer is copied into the checkpoint's hf/).
  --bf16/--fp16     the stored dtype (our --dtype); default: the source's.
  --model-size, --megatron-path, --max-queue-size, --no-checking, --true-vocab-size,
  --loader-transformer-impl, --saver-transformer-impl: ignored (read from config.json, or not needed).
Any other option is passed to `dqo-megatron convert` (e.g. --verify, --overwrite; see its --help).
"""

_IGNORED = (
    "--model-size",
    "--megatron-path",
    "--max-queue-size",
    "--true-vocab-size",
    "--loader-transformer-impl",
    "--saver-transformer-impl",
)


def parser() -> MegatronFlagParser:
    """Megatron-LM's convert.py flags (and its llama_mistral loader's) that mean something here."""
    p = flag_parser(
        "convert_checkpoint.py",
        "Convert checkpoints between Hugging Face and Megatron (dqo-megatron convert).",
        EPILOG,
    )
    p.add_argument("--model-type", default="GPT", choices=["GPT", "BERT"], help="GPT only.")
    p.add_argument("--loader", required=True, help="Source format: " + ", ".join(HF_SIDE + MEGATRON_SIDE) + ".")
    p.add_argument("--saver", required=True, help="Target format (as --loader).")
    p.add_argument("--load-dir", required=True, help="Source directory.")
    p.add_argument("--save-dir", required=True, help="Output directory.")
    p.add_argument("--target-tensor-parallel-size", type=int, default=None, help="Checked only (see below).")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=None, help="Checked only (see below).")
    p.add_argument("--checkpoint-type", default="hf", choices=["hf", "meta"], help="hf only.")
    p.add_argument("--tokenizer-model", default=None, help="See below.")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="Store bf16 (our --dtype bf16).")
    precision.add_argument("--fp16", action="store_true", help="Store fp16 (our --dtype fp16).")
    p.add_argument("--no-checking", action="store_true", help="Ignored.")
    for flag in _IGNORED:
        p.add_argument(flag, default=None, help="Ignored.")
    return p


def _side(p: MegatronFlagParser, flag: str, name: str) -> str:
    if name in HF_SIDE:
        return "hf"
    if name in MEGATRON_SIDE:
        return "megatron"
    p.error(f"{flag} {name}: choose one of {', '.join(HF_SIDE + MEGATRON_SIDE)}")


def to_our_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Megatron-LM's arguments -> (`dqo-megatron convert` arguments, notes on what differs).

    SystemExit(2) with argparse's one-line message when a flag has no counterpart here."""
    p = parser()
    ns, rest = p.parse_known_args(argv)
    if ns.model_type != "GPT":
        p.error(f"--model-type {ns.model_type}: only GPT models (Llama, Qwen2, Gemma) are converted")
    if ns.checkpoint_type != "hf":
        p.error("--checkpoint-type meta: Meta's original format is not read; give a Hugging Face directory")
    source, target = _side(p, "--loader", ns.loader), _side(p, "--saver", ns.saver)
    if source == target:
        p.error(
            f"--loader {ns.loader} --saver {ns.saver}: nothing to convert (dqo-megatron checkpoints load "
            "under any TP/PP, so there is no resharding step)"
        )
    layout = [ns.target_tensor_parallel_size, ns.target_pipeline_parallel_size]
    notes, ours = [], []
    if source == "hf":
        ours = ["hf-to-megatron", ns.load_dir, ns.save_dir]
        ours += ["--tp", str(layout[0])] if layout[0] else []
        ours += ["--pp", str(layout[1])] if layout[1] else []
        if any(layout):
            notes.append("the checkpoint is layout-free: the target TP/PP are only checked to split the model")
        if ns.tokenizer_model:
            notes.append("--tokenizer-model is ignored: the HF directory's tokenizer goes into the checkpoint's hf/")
    else:
        ours = ["megatron-to-hf", ns.load_dir, ns.save_dir]
        ours += ["--tokenizer", ns.tokenizer_model] if ns.tokenizer_model else []
        if any(layout):
            notes.append("the target TP/PP are ignored: an HF model has no layout")
    if ns.bf16 or ns.fp16:
        ours += ["--dtype", "bf16" if ns.bf16 else "fp16"]
    ignored = [f for f in _IGNORED if getattr(ns, f[2:].replace("-", "_")) is not None]
    ignored += ["--no-checking"] if ns.no_checking else []
    if ignored:
        notes.append(f"ignored: {', '.join(ignored)} (read from config.json, or not needed here)")
    return ours + rest, notes


def main(argv: list[str] | None = None) -> None:
    """Run `dqo-megatron convert` with Megatron-LM's flags (or with ours, after a subcommand)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from dqo_megatron.cli.convert import convert_app

    if argv and argv[0] in SUBCOMMANDS:
        convert_app(argv, prog_name="convert_checkpoint.py")
        return
    if argv in ([], ["-h"], ["--help"]):
        parser().print_help()
        print("\nOr `dqo-megatron convert`'s own subcommands (" + ", ".join(SUBCOMMANDS) + "):\n")
        convert_app(["--help"], prog_name="convert_checkpoint.py")
    argv, notes = to_our_args(argv)
    print_notes(notes)
    convert_app(argv, prog_name="convert_checkpoint.py")


if __name__ == "__main__":  # dist_checkpointing's writer starts processes: keep the guard
    main()
