# dqo-megatron on NVIDIA's PyTorch container, which already carries CUDA torch, Transformer Engine, NVIDIA apex,
# NCCL and cuDNN (never install "apex" from PyPI: that name is an unrelated web toolkit).
#   docker build -t dqo-megatron .
#   docker run --gpus all --ipc=host --rm dqo-megatron version
#   docker run --gpus all --ipc=host --rm --entrypoint python dqo-megatron -m pytest -m gpu tests/gpu
# Multi-node and the GPU checks: docs/gpu.md. Linted with hadolint (tests/test_dockerfile_lint.py); never
# built in our CI (no Docker engine on our machines).
#
# Base image and megatron-core, one pair per line (docs/gpu.md, "Which megatron-core each container gets"):
#   nvcr.io/nvidia/pytorch:25.04-py3 (Python 3.12, CUDA 12.9, TE 2.x)  -> megatron-core 0.16.1 (the default;
#       the image megatron-core 0.16's install guide names; CI's first leg tests 0.16.1 on CPU)
#   nvcr.io/nvidia/pytorch:25.12-py3 or newer (CUDA 13.x, TE 2.x)     -> megatron-core 0.19.2 (CI's second leg;
#       0.19's Transformer Engine extra is the CUDA 13 build):
#       docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3 --build-arg MCORE_VERSION=0.19.2 .
# Both need Python >= 3.12 for 0.17+, which every NGC PyTorch image of 2025 has. FP8 blockwise scaling needs
# Transformer Engine >= 2.3; pin the base by digest (name@sha256:...) for bit-for-bit rebuilds.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}
ARG MCORE_VERSION=0.16.1

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/dqo-megatron

# Dependencies first (their layer survives source edits). The container pins its Python environment through
# PIP_CONSTRAINT, which would also refuse megatron-core's own requirements (megatron-core's guide unsets it);
# we replace it with a constraint on exactly what must not move: the container's CUDA builds of torch and its
# companions, Transformer Engine, apex, flash-attn, numpy and the NVIDIA libraries. Our direct dependencies are
# pinned to the versions CI tests with (constraints-cpu.txt; constraints-py312.txt pins the same ones).
RUN pip list --format=freeze \
        | grep -iE '^(torch|torchvision|torchaudio|triton|transformer[-_]engine[-_a-z0-9]*|apex|flash[-_]attn|numpy|nvidia[-_a-z0-9]*|cuda[-_a-z0-9]*)==' \
        > /tmp/container-pins.txt \
    && PIP_CONSTRAINT=/tmp/container-pins.txt pip install \
        "megatron-core==${MCORE_VERSION}" "sentencepiece==0.2.3" "transformers==5.23.0" "safetensors==0.8.0" \
        "datasets==5.2.0" "typer==0.29.2" "rich==15.0.0" "pyyaml==6.0.3" "tensorboard==2.21.0" "psutil==7.2.2" \
        "math-verify==0.9.0" "matplotlib==3.11.2" \
    && rm /tmp/container-pins.txt

# The package itself without dependency resolution (a resolver could replace the container's torch build).
COPY pyproject.toml README.md ./
COPY dqo_megatron ./dqo_megatron
RUN pip install --no-deps . && dqo-megatron version

# Launch scripts, example configs, the GPU tests and the GPU benchmark (run them from /opt/dqo-megatron).
COPY tools ./tools
COPY examples ./examples
COPY tests ./tests
COPY benchmarks ./benchmarks

# An unprivileged user. UID 10001, not 1000: Ubuntu 24.04 images (NGC 24.xx/25.xx) already have "ubuntu" as 1000.
RUN groupadd --gid 10001 dqo && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash dqo
USER 10001:10001
ENV HOME=/home/dqo

ENTRYPOINT ["dqo-megatron"]
CMD ["--help"]
