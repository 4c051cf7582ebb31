"""Time and peak memory of `hf_to_megatron` against transformers loading and saving the same checkpoint.

A random Qwen2 of the Qwen2-0.5B shape (hidden 896, 24 layers, 14 heads / 2 KV groups, FFN 4864, vocab
151936, tied; ~494M parameters, bf16, in two safetensors shards) is written once; then, each in a fresh
process:
  transformers  AutoModelForCausalLM.from_pretrained(src, dtype="auto") + save_pretrained(out)
  ours          dqo_megatron.conversion.hf_to_megatron(src, out)
Imports happen before the clock starts (both pay ~2-4 s of imports outside it): transformers' Qwen2
modeling module, and the modules hf_to_megatron imports on first use (the model builder, Megatron's GPT
model and dist_checkpointing strategies). Ours saves with `dist_checkpointing.save` as megatron-core
ships it (torch.save records, every file fsync'd; transformers fsyncs nothing). Memory is the peak, over
20 ms samples, of the proportional set size (PSS) summed over the process and its children
(megatron-core <= 0.16 forks a writer process per file, sharing the parent's pages, which plain RSS
would count twice; every release spawns a multiprocessing Manager for the write results). The process's
own ru_maxrss is reported too. Times: best of the runs (and the median); memory: the lowest peak.
Targets (issue #20): time <= 3x transformers', peak memory <= transformers'.

    python benchmarks/convert_throughput.py [--workdir DIR] [--repeats 2] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QWEN2_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
SMALL = dict(
    QWEN2_05B,
    hidden_size=128,
    num_hidden_layers=2,
    intermediate_size=256,
    vocab_size=4096,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def write_random_qwen2(path: Path, shape: dict, shards: int = 2) -> int:
    """An HF Qwen2 directory with N(0, 0.02) bf16 weights in `shards` files; returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    heads, groups = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = h // heads
    gen = torch.Generator().manual_seed(0)

    def rand(*dims):
        return (torch.randn(*dims, generator=gen) * 0.02).to(torch.bfloat16)

    names: list[tuple[str, tuple]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (heads * d, h)),
            (p + "self_attn.q_proj.bias", (heads * d,)),
            (p + "self_attn.k_proj.weight", (groups * d, h)),
            (p + "self_attn.k_proj.bias", (groups * d,)),
            (p + "self_attn.v_proj.weight", (groups * d, h)),
            (p + "self_attn.v_proj.bias", (groups * d,)),
            (p + "self_attn.o_proj.weight", (h, heads * d)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    names.append(("model.norm.weight", (h,)))
    path.mkdir(parents=True)
    per_shard = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {name: rand(*dims) for name, dims in names[s * per_shard : (s + 1) * per_shard]}
        for name, t in chunk.items():
            weight_map[name] = file
            total += t.numel()
        save_file(chunk, str(path / file), metadata={"format": "pt"})
        del chunk
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map})
    )
    config = dict(
        shape,
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_act="silu",
        torch_dtype="bfloat16",
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return total


_CHILD = r"""
import os, resource, sys, time, json
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
which, src, out = sys.argv[1:4]
if which == "transformers":
    from transformers import AutoModelForCausalLM
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    model.save_pretrained(out)
else:
    import megatron.core  # noqa: F401
    from dqo_megatron.conversion import hf_to_megatron
    # what hf_to_megatron imports on first use (as the transformers side imports its modeling module)
    import safetensors  # noqa: F401
    import dqo_megatron.models.builder, dqo_megatron.models.local_spec, dqo_megatron.parallel  # noqa: F401,E401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.filesystem_async  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
    from dqo_megatron.conversion.registry import families
    families()
    start = time.perf_counter()
    hf_to_megatron(src, out, progress=False)
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def _tree_pss(proc) -> int:
    import psutil

    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_one(which: str, src: Path, out: Path, sample_memory: bool) -> dict:
    """Run one conversion in a fresh process; its seconds (imports excluded), wall seconds, and with
    `sample_memory` the peak tree PSS. Reading smaps takes the child's memory-map lock and slows its page
    faults, so timed runs do not sample.

    Each run starts with nothing left to write back: the source just written, or the previous run's output
    (transformers does not fsync its files, so ~1 GB of them is still dirty), would otherwise be flushed
    by the kernel during the next run, and our fsync can wait for that too (ext4, data=ordered)."""
    import psutil

    if out.exists():
        shutil.rmtree(out)
    os.sync()
    code = _CHILD.format(repo=str(REPO))
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", code, which, str(src), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc, peak, done = psutil.Process(child.pid), [0], threading.Event()

    def sample():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _tree_pss(proc))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        thread.start()
    stdout, stderr = child.communicate()
    done.set()
    if sample_memory:
        thread.join()
    if child.returncode:
        raise RuntimeError(f"{which} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(wall_seconds=time.perf_counter() - start, peak_pss_mib=peak[0] / 2**20)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="Where to write the checkpoints (default: a temp dir)."
    )
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each, alternating (the best is reported).")
    parser.add_argument("--small", action="store_true", help="A tiny shape (smoke-test the benchmark itself).")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="convert_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "hf_src"
    try:
        if not src.exists():  # in a process of its own: a child inherits its parent's peak RSS as ru_maxrss
            code = (
                f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
                f"from convert_throughput import *; from pathlib import Path; "
                f"print(write_random_qwen2(Path({str(src)!r}), {'SMALL' if args.small else 'QWEN2_05B'}))"
            )
            count = int(
                subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[
                    -1
                ]
            )
            print(f"source: random Qwen2, {count / 1e6:.0f}M parameters, bf16, {src}")
        runs: dict[str, list[dict]] = {"transformers": [], "ours": []}
        mem: dict[str, list[dict]] = {"transformers": [], "ours": []}
        for repeat in range(args.repeats):
            # which one goes first alternates: the first run after writing the source is often the slowest
            for which in ("transformers", "ours")[:: 1 if repeat % 2 == 0 else -1]:
                runs[which].append(run_one(which, src, work / f"out_{which}", sample_memory=False))
                mem[which].append(run_one(which, src, work / f"out_{which}", sample_memory=True))
                print(
                    which,
                    json.dumps({k: round(v, 2) for k, v in runs[which][-1].items()}),
                    f"peak PSS {mem[which][-1]['peak_pss_mib']:.0f} MiB",
                )
        best = {w: min(r, key=lambda x: x["seconds"]) for w, r in runs.items()}
        peak = {w: min(x["peak_pss_mib"] for x in r) for w, r in mem.items()}
        ratio = best["ours"]["seconds"] / best["transformers"]["seconds"]
        print(
            "\n| | time (s, imports excluded) | wall incl. start-up (s) "
            "| peak PSS, process tree (MiB) | ru_maxrss (MiB) |"
        )
        print("| --- | --- | --- | --- | --- |")
        for which in ("transformers", "ours"):
            b = best[which]
            print(
                f"| {which} | {b['seconds']:.2f} | {b['wall_seconds']:.2f} "
                f"| {peak[which]:.0f} | {b['maxrss_mib']:.0f} |"
            )
        median = {w: statistics.median(x["seconds"] for x in r) for w, r in runs.items()}
        print(
            f"\ntime ratio ours/transformers = {ratio:.2f} (target <= 3; medians "
            f"{median['ours']:.2f} / {median['transformers']:.2f} s = {median['ours'] / median['transformers']:.2f}); "
            f"peak memory ours/transformers = {peak['ours'] / peak['transformers']:.2f} (target <= 1.0)"
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
