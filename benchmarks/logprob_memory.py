"""Peak extra memory and time of token log-probs (forward + backward): naive vs chunked vs fused.

    .venv/bin/python benchmarks/logprob_memory.py                      # all 12 cases, ~4 min on 2 cores
    .venv/bin/python benchmarks/logprob_memory.py --vocab 152064 --seq 4096

Every case starts from what the trainer has after the decoder -- final hidden states ``[s, 1, h]``
(fp32, requires grad), the output weight ``[V, h]`` (fp32, requires grad, with a preallocated fp32
``main_grad`` like Megatron DDP's gradient buffer) and labels -- and runs forward + backward of
``sum_t log pi(y_t)``:

* naive:   logits = H W^T ``[1, s, V]``; ``log_softmax(logits.float()).gather(labels)``
* chunked: logits = H W^T; `token_logprobs_from_logits(logits, labels, chunk_size=auto)`
* fused:   `token_logprobs_from_hidden(H, W, labels, accumulate_into_main_grad=True)`; no logits

In all three the weight gradient is added into ``W.main_grad`` without a ``[V, h]`` temporary (naive and
chunked through a linear that does what Megatron's gradient-accumulation fusion does; fused natively),
so the comparison is about the log-prob computation, not about one ``[V, h]`` gradient all paths need
(add ``V * h * 4`` bytes to every row when the weight gradient is materialized instead).

Method: one fresh process per case (subprocess). After the inputs are allocated and a tiny warm-up,
the kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), the current
RSS is the baseline, and after forward + backward ``VmHWM - baseline`` is the peak extra memory. The
kernel tracks the high-water mark itself, so no short peak is missed (a sampling thread would miss
some). glibc returns large (mmap'ed) blocks to the OS on free, so RSS follows live memory for the big
tensors. Time: wall clock and process CPU time of forward + backward; the first run is also the
memory run, ``--repeats N`` adds timed runs in the same process and keeps the fastest (the machine
may be shared; CPU time is less sensitive to other load than wall time).

Prints a Markdown table with hardware, versions, commit and date, for docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

PATHS = ("naive", "chunked", "fused")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(
    path: str, vocab: int, seq: int, hidden_size: int, chunk_size: int | None, threads: int, repeats: int = 1
) -> dict:
    """Run one case in this process; return its measurements (call in a fresh process)."""
    import torch

    from dqo_megatron.logprobs import auto_chunk_size, token_logprobs_from_hidden, token_logprobs_from_logits

    torch.set_num_threads(threads)

    class LinearIntoMainGrad(torch.autograd.Function):
        """``H W^T`` whose backward adds dW into ``W.main_grad`` (Megatron's gradient-accumulation fusion)."""

        @staticmethod
        def forward(ctx, hidden, weight):
            ctx.save_for_backward(hidden, weight)
            return torch.matmul(hidden, weight.t())

        @staticmethod
        def backward(ctx, grad):
            hidden, weight = ctx.saved_tensors
            weight.main_grad.addmm_(grad.reshape(-1, weight.shape[0]).t(), hidden.reshape(-1, weight.shape[1]))
            return torch.matmul(grad, weight), None

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(seq, 1, hidden_size, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).requires_grad_()
    weight.main_grad = torch.zeros_like(weight)
    labels = torch.randint(0, vocab, (1, seq), generator=gen)
    chunk = chunk_size or auto_chunk_size(1, vocab)
    # Warm-up: thread pools and kernels, on tensors too small to matter.
    small = torch.randn(64, 64, requires_grad=True)
    torch.log_softmax(small @ small.t(), -1).sum().backward()
    del small

    def step():
        if path == "fused":
            logp = token_logprobs_from_hidden(hidden, weight, labels, chunk_size=chunk, accumulate_into_main_grad=True)
        else:
            logits = LinearIntoMainGrad.apply(hidden, weight).transpose(0, 1)  # [1, s, V]
            if path == "naive":
                logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            else:
                logp = token_logprobs_from_logits(logits, labels, chunk_size=chunk)
            del logits  # the graph keeps what backward needs
        logp.sum().backward()
        return logp.detach()

    exact = _reset_peak()
    baseline = _status_kib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    logp = step()
    times = [(time.perf_counter() - wall, time.process_time() - cpu)]
    peak = _status_kib("VmHWM")  # without a reset: the high-water mark since process start (upper bound)
    for _ in range(repeats - 1):  # more timings only (the machine may be shared: keep the fastest)
        hidden.grad = None
        weight.main_grad.zero_()
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    seconds, cpu_seconds = min(times)
    check = float(logp.detach().double().sum())
    return {
        "path": path,
        "vocab": vocab,
        "seq": seq,
        "hidden": hidden_size,
        "chunk": chunk if path != "naive" else None,
        "peak_extra_mib": (peak - baseline) / 1024,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "exact_peak": exact,
        "checksum": check,
    }


def _environment() -> str:
    import torch

    try:
        cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
    except (OSError, AttributeError):
        cpu = platform.processor()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB; Python {platform.python_version()}, "
        f"torch {torch.__version__}; commit {commit}; {datetime.date.today().isoformat()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 152_064])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=None, help="positions per chunk (default: auto, 128 MiB)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (memory: the first); min is kept")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child mode: one case, JSON out
    args = parser.parse_args()
    if args.one:
        (vocab,), (seq,), (path,) = args.vocab, args.seq, args.paths
        print(json.dumps(run_case(path, vocab, seq, args.hidden, args.chunk_size, args.threads, args.repeats)))
        return

    rows = []
    for vocab in args.vocab:
        for seq in args.seq:
            for path in args.paths:
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    "--vocab",
                    str(vocab),
                    "--seq",
                    str(seq),
                    "--paths",
                    path,
                    "--hidden",
                    str(args.hidden),
                    "--threads",
                    str(args.threads),
                    "--repeats",
                    str(args.repeats),
                ]
                if args.chunk_size:
                    cmd += ["--chunk-size", str(args.chunk_size)]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    raise RuntimeError(f"{path} V={vocab} s={seq} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"  {path:8s} V={vocab:>7d} s={seq:>5d}: {row['peak_extra_mib']:9.1f} MiB {row['seconds']:7.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    print(render(rows, args))


def render(rows: list[dict], args) -> str:
    """Markdown table: per (vocab, seq) the three paths, with ratios to naive."""
    lines = [
        f"Command: `.venv/bin/python benchmarks/logprob_memory.py` (hidden {args.hidden}, batch 1, fp32, "
        f"{args.threads} threads, best of {args.repeats} timed run(s), "
        f"chunk {args.chunk_size or 'auto (128 MiB of fp32 logits)'})",
        "",
        f"Machine: {_environment()}",
        "",
        "| vocab | seq | path | chunk | peak extra MiB | vs naive | time s | vs naive | CPU s | vs naive |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    naive = {(r["vocab"], r["seq"]): r for r in rows if r["path"] == "naive"}
    for r in rows:
        base = naive.get((r["vocab"], r["seq"]))
        mem_ratio = f"{r['peak_extra_mib'] / base['peak_extra_mib']:.1%}" if base else ""
        time_ratio = f"{r['seconds'] / base['seconds']:.2f}x" if base else ""
        cpu_ratio = f"{r['cpu_seconds'] / base['cpu_seconds']:.2f}x" if base else ""
        lines.append(
            f"| {r['vocab']:,} | {r['seq']:,} | {r['path']} | {r['chunk'] or '-'} | "
            f"{r['peak_extra_mib']:,.0f} | {mem_ratio} | {r['seconds']:.2f} | {time_ratio} | "
            f"{r['cpu_seconds']:.2f} | {cpu_ratio} |"
        )
    if not all(r["exact_peak"] for r in rows):
        lines.append("\n(peak RSS could not be reset here: figures are since process start, an upper bound)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
