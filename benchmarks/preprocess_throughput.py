"""Preprocessing throughput: ours (`dqo_megatron.data.preprocess`) vs a plain `datasets.map` tokenization.

Both tokenize the same records with the same HF tokenizer (a byte-level BPE trained here on GSM8K
text, with a chat template; nothing is downloaded) and the same number of worker processes:

* ours: read JSONL -> validate -> chat template -> tokenize prompt and response (with offsets when a
  record has process rewards) -> EOS, rewards, log-probs -> write Megatron indexed files;
* baseline: `datasets.Dataset.from_json` -> `.map(batched=True, num_proc=W)` applying the chat template
  and tokenizing prompt and response the same way, appending EOS (no validation, no indexed output).

Records: GSM8K train questions/answers (shared data) repeated to --records, half with process rewards.
Imports (torch, megatron, transformers, datasets) are done before timing; the best of --repeats runs.

    .venv/bin/python benchmarks/preprocess_throughput.py [--records 30000] [--workers 1 2] [--write]

Prints a Markdown section; --write puts it into docs/performance.md under "## Preprocessing throughput"
(replacing only that section).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SECTION = "## Preprocessing throughput"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(texts: list[str], path: str, vocab: int) -> None:
    """Train a byte-level BPE on `texts` and save it as an HF tokenizer directory with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    hf.chat_template = TEMPLATE
    hf.save_pretrained(path)


def make_records(gsm8k: str, n: int, path: str, grouped: bool) -> tuple[int, list[str]]:
    """Write n records built from GSM8K train (every other one with process rewards at line ends).

    grouped: 20 consecutive samples per prompt, as a sampler writes them (the paper: 20 per prompt);
    otherwise the prompts cycle through the whole set, so no two neighbouring records share a prompt.
    """
    rows = [json.loads(line) for line in open(gsm8k, encoding="utf-8")]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q = i // 20 if grouped else i
            r = rows[q % len(rows)]
            # responses differ between samples of a prompt (a suffix varies), as sampled ones would
            rec = {
                "prompt": r["question"],
                "response": r["answer"] + f" (sample {i % 20})",
                "reward": float(i % 2),
                "prompt_id": str(q % len(rows)),
            }
            if i % 2:
                ends = [m.end() for m in re.finditer(r"\n", rec["response"])] + [len(rec["response"])]
                rec["process_rewards"] = [[e, 0.1] for e in sorted(set(ends))]
            f.write(json.dumps(rec) + "\n")
    return n, [r["question"] + "\n" + r["answer"] for r in rows]


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_ours(src: str, tok: str, workers: int, out: str) -> tuple[float, int]:
    from dqo_megatron.data.preprocess import PreprocessConfig, preprocess
    from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig

    shutil.rmtree(out, ignore_errors=True)
    cfg = PreprocessConfig(
        inputs=[src],
        output_prefix=os.path.join(out, "d"),
        workers=workers,
        progress=False,
        chunk_size=512,
        tokenize=TokenizeConfig(tokenizer=TokenizerConfig(path=tok), max_length=8192),
    )
    t, c = time.perf_counter(), cpu_seconds()
    s = preprocess(cfg)
    return time.perf_counter() - t, s.tokens, cpu_seconds() - c


def run_datasets_map(src: str, tok_path: str, workers: int, cache: str) -> tuple[float, int]:
    import datasets
    from transformers import AutoTokenizer

    shutil.rmtree(cache, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    eos = tok.eos_token_id

    def fn(batch):
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in batch["prompt"]
        ]
        p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        r_ids = tok(batch["response"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [p + r + [eos] for p, r in zip(p_ids, r_ids)], "prompt_length": [len(p) for p in p_ids]}

    t, c = time.perf_counter(), cpu_seconds()
    ds = datasets.Dataset.from_json(src, cache_dir=cache)
    ds = ds.map(
        fn,
        batched=True,
        batch_size=512,
        num_proc=workers if workers > 1 else None,
        remove_columns=ds.column_names,
        load_from_cache_file=False,
    )
    n_tok = sum(len(x) for x in ds["input_ids"])
    return time.perf_counter() - t, n_tok, cpu_seconds() - c


def versions() -> str:
    from importlib.metadata import version

    import datasets
    import tokenizers
    import transformers

    return (
        f"python {platform.python_version()}, transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}, "
        f"datasets {datasets.__version__}, megatron-core {version('megatron-core')}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=30000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--write", action="store_true", help="write the section into docs/performance.md")
    args = ap.parse_args()

    import datasets  # noqa: F401  (imports outside the timings)
    import megatron.core.datasets.indexed_dataset  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401  (transformers imports its models lazily, here)

    from dqo_megatron.paths import shared_data_dir

    datasets.disable_progress_bars()
    gsm = shared_data_dir() / "gsm8k" / "train.jsonl"
    if not gsm.exists():
        sys.exit(f"{gsm} not found: set DQO_SHARED_DATA")
    work = tempfile.mkdtemp(prefix="dqo_bench_")
    try:
        rows = []
        for grouped in (True, False):
            src = os.path.join(work, f"records_{grouped}.jsonl")
            n, texts = make_records(str(gsm), args.records, src, grouped)
            tok = os.path.join(work, "tok")
            if not os.path.exists(tok):
                build_tokenizer(texts, tok, args.vocab)
            for w in args.workers:
                ours = min(
                    (run_ours(src, tok, w, os.path.join(work, "out")) for _ in range(args.repeats)), key=lambda x: x[0]
                )
                base = min(
                    (run_datasets_map(src, tok, w, os.path.join(work, "cache")) for _ in range(args.repeats)),
                    key=lambda x: x[0],
                )
                assert ours[1] == base[1], f"token counts differ: ours {ours[1]}, datasets.map {base[1]}"
                rows.append((grouped, w, ours, base))
                print(
                    f"grouped={grouped} workers={w}: ours {n / ours[0]:.0f} rec/s ({ours[2]:.1f} cpu s), "
                    f"datasets.map {n / base[0]:.0f} rec/s ({base[2]:.1f} cpu s)",
                    file=sys.stderr,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    commit = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        SECTION,
        "",
        f"{n} records built from GSM8K train (question -> answer plus a per-sample suffix; half with per-line "
        f"process rewards), an HF byte-level BPE tokenizer ({args.vocab} pieces, trained in the benchmark) with a "
        "chat template. Layout *grouped*: 20 consecutive samples per prompt, as a sampler writes them (the paper "
        "samples 20 per prompt); *ungrouped*: no two neighbouring records share a prompt. *ours*: "
        "`dqo_megatron.data.preprocess` (read JSONL, validate, chat template (each distinct prompt once per "
        "worker), tokenize with offsets, EOS, rewards, write Megatron .bin/.idx); *datasets.map*: "
        "`Dataset.from_json` + `map(batched=True, num_proc=W)` doing the same templating and tokenization for "
        "every record (no validation, no indexed output); both produce the same token count. Wall time and CPU "
        f"time (all processes), best of {args.repeats}; library imports excluded.",
        "",
        "| layout | workers | ours records/s | ours tokens/s | ours CPU s | datasets.map records/s "
        "| datasets.map tokens/s | datasets.map CPU s | wall: ours / map speed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for grouped, w, (t_o, k_o, c_o), (t_b, k_b, c_b) in rows:
        lines.append(
            f"| {'grouped' if grouped else 'ungrouped'} | {w} | {n / t_o:,.0f} | {k_o / t_o:,.0f} | {c_o:.1f} | "
            f"{n / t_b:,.0f} | {k_b / t_b:,.0f} | {c_b:.1f} | {t_b / t_o:.2f}x |"
        )
    lines += [
        "",
        f"Command: `.venv/bin/python benchmarks/preprocess_throughput.py --records {args.records} --workers "
        f"{' '.join(map(str, args.workers))}`",
        "",
        f"Hardware: {platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'}), shared with "
        "other jobs at the time; " + versions() + f"; commit {commit}; {datetime.date.today().isoformat()}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(os.path.join(REPO, "docs", "performance.md"), text)


def write_section(path: str, text: str) -> None:
    """Replace (or append) the `## Preprocessing throughput` section of `path`, leaving the rest alone."""
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Performance\n\n"
    if SECTION in old:
        start = old.index(SECTION)
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("\n" + old[nxt + 1 :] if nxt >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


if __name__ == "__main__":
    main()
