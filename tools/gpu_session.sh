#!/usr/bin/env bash
# GPU checks and the GPU benchmark in one command, for a lent GPU machine (the device tool) or any CUDA box.
#
#   bash tools/gpu_session.sh prepare      # HERE (PyPI reachable): wheels the GPU machine lacks -> .gpu-wheels/
#   bash tools/gpu_session.sh run          # THERE: install them, `pytest -m gpu`, then benchmarks/gpu_step.py
#   bash tools/gpu_session.sh tests|bench  # THERE: only one half (each fits one 10-minute call comfortably)
#   bash tools/gpu_session.sh versions     # THERE: the GPU tests once per megatron-core of MCORE_VERSIONS
#
# megatron-core: MCORE_VERSION (default 0.16.1, CI's first leg) is the one `run`/`tests`/`bench` use;
# `prepare` fetches every release of MCORE_VERSIONS (default "0.16.1 0.19.2": CI's two legs), one wheel
# directory each, so `MCORE_VERSION=0.19.2 bash tools/gpu_session.sh tests` or `versions` needs no network.
#
# The lent machine has Python 3.12, CUDA torch, Triton, NCCL, transformers, safetensors, sentencepiece,
# pyyaml, typer, rich, psutil, pytest and pytest-timeout, but no megatron-core, no Transformer Engine and
# no network. megatron-core 0.16.1 is a 2.6 MB wheel (pure Python plus one small CPython extension for
# dataset index helpers, hence the cp312 build) and depends only on torch, numpy and packaging, all there.
# Our package is not installed there: the repository root goes on PYTHONPATH. Transformer Engine's wheels
# (~0.7 GB) cannot travel, so there the TE/FP8 tests skip with their reason; they run in NVIDIA's
# container (docs/gpu.md).
#
# Results (at most 8 files, the device tool's limit) go to $OUT (default: ./gpu-results):
#   environment.txt  nvidia-smi, versions, what is importable
#   pytest.log, pytest.xml   the GPU suite, every test's outcome and skip reason
#   gpu_step.md, gpu_step.json, gpu_step.log   the benchmark table (Markdown), its rows, its stderr
#   summary.txt      exit codes and timings of the parts
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=${GPU_WHEELS:-$ROOT/.gpu-wheels}
MCORE_VERSION=${MCORE_VERSION:-0.16.1}
MCORE_VERSIONS=${MCORE_VERSIONS:-0.16.1 0.19.2}
PY=${PYTHON:-python3}
TEST_BUDGET=${GPU_TEST_BUDGET:-330}     # seconds; `run` keeps tests + benchmark inside one 10-minute call
BENCH_BUDGET=${GPU_BENCH_BUDGET:-240}
BENCH_ARGS=${GPU_BENCH_ARGS:-}

prepare() {
    local pip_py=${PYTHON:-$ROOT/.venv/bin/python}
    [ -x "$pip_py" ] || pip_py=python3
    local version
    for version in $MCORE_VERSIONS; do
        mkdir -p "$WHEELS/mcore-$version"
        # The GPU machine is x86-64 with Python 3.12; pip must fetch that build whatever this machine is.
        "$pip_py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS/mcore-$version" "megatron-core==$version" || return 1
    done
    # Keep the wheels out of git (locally: .git/info/exclude is never committed); the device tool sends an
    # ignored path only when the call names it in `carry`.
    local exclude="$ROOT/.git/info/exclude"
    if [ -d "$ROOT/.git" ] && ! grep -qxF "/.gpu-wheels/" "$exclude" 2>/dev/null; then
        mkdir -p "$(dirname "$exclude")" && echo "/.gpu-wheels/" >> "$exclude"
    fi
    ls -l "$WHEELS"
    echo
    echo "next, with the device tool:  run(command=\"bash tools/gpu_session.sh run\", carry=[\".gpu-wheels\"], timeout_s=600)"
}

setup_there() {
    OUT=${OUT:-$ROOT/gpu-results}
    mkdir -p "$OUT"
    # The prepared wheel of MCORE_VERSION wins over an installed megatron-core (a container's own); with
    # neither, stop with what to do.
    local wheels="$WHEELS/mcore-$MCORE_VERSION"
    if ls "$wheels"/megatron_core-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "/tmp/dqo-site-$MCORE_VERSION" "$wheels"/*.whl || exit 2
        export PYTHONPATH=/tmp/dqo-site-$MCORE_VERSION${PYTHONPATH:+:$PYTHONPATH}
    elif ! "$PY" -c "import megatron.core" 2>/dev/null; then
        echo "no megatron-core here and no wheel in $wheels: run 'bash tools/gpu_session.sh prepare' where PyPI"\
             "is reachable and carry .gpu-wheels" | tee -a "$OUT/summary.txt"; exit 2
    fi
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    cd "$ROOT" || exit 2
    {
        echo "date: $(date -u +%FT%TZ)"; echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
        "$PY" - <<'PYEOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPUs", torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
if torch.cuda.is_available():
    print("compute capability", torch.cuda.get_device_capability(), "| NCCL", torch.cuda.nccl.version())
for name in ("megatron.core", "transformer_engine", "apex", "transformers", "triton", "flash_attn"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', '?')} ({getattr(module, '__file__', '?')})")
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: not importable ({type(exc).__name__}: {str(exc)[:120]})")
from dqo_megatron.compat import transformer_engine_status
print("TE layer spec usable:", transformer_engine_status())
PYEOF
    } > "$OUT/environment.txt" 2>&1
    cat "$OUT/environment.txt"
}

run_tests() {  # [name suffix]: pytest$1.log / pytest$1.xml
    local start=$SECONDS rc
    timeout -k 10 "$TEST_BUDGET" "$PY" -m pytest -m gpu tests/gpu -p no:cacheprovider -rA -q \
        --junitxml="$OUT/pytest${1:-}.xml" > "$OUT/pytest${1:-}.log" 2>&1
    rc=$?
    tail -n 60 "$OUT/pytest${1:-}.log"
    echo "tests${1:-}: exit $rc in $((SECONDS - start)) s (124: stopped at the ${TEST_BUDGET} s budget)" \
        | tee -a "$OUT/summary.txt"
}

run_versions() {  # the GPU tests once per release of MCORE_VERSIONS, each in a fresh shell, budget shared
    local count version
    count=$(wc -w <<< "$MCORE_VERSIONS")
    for version in $MCORE_VERSIONS; do
        # Without its wheel the installed megatron-core would run under this release's label.
        if ! ls "$WHEELS/mcore-$version"/megatron_core-*.whl >/dev/null 2>&1; then
            echo "tests-$version: skipped, no wheel in $WHEELS/mcore-$version (run prepare)" | tee -a "$OUT/summary.txt"
            continue
        fi
        (MCORE_VERSION=$version TEST_BUDGET=$((${GPU_TEST_BUDGET:-560} / count)); setup_there > /dev/null
         "$PY" -c "import megatron.core as m; print('megatron-core', m.__version__)" | tee -a "$OUT/summary.txt"
         run_tests "-$version")
    done
}

run_bench() {
    local start=$SECONDS rc
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    timeout -k 10 "$BENCH_BUDGET" "$PY" benchmarks/gpu_step.py --json "$OUT/gpu_step.json" \
        --markdown "$OUT/gpu_step.md" $BENCH_ARGS > "$OUT/gpu_step.log" 2>&1
    rc=$?
    tail -n 40 "$OUT/gpu_step.log"
    echo "benchmark: exit $rc in $((SECONDS - start)) s (124: stopped at the ${BENCH_BUDGET} s budget)" | tee -a "$OUT/summary.txt"
}

case "${1:-run}" in
    prepare) prepare ;;
    run) setup_there; run_tests; run_bench ;;
    tests) TEST_BUDGET=${GPU_TEST_BUDGET:-560}; setup_there; run_tests ;;
    bench) BENCH_BUDGET=${GPU_BENCH_BUDGET:-560}; setup_there; run_bench ;;
    versions) OUT=${OUT:-$ROOT/gpu-results}; mkdir -p "$OUT"; run_versions ;;
    *) echo "usage: bash tools/gpu_session.sh prepare|run|tests|bench|versions" >&2; exit 2 ;;
esac
