# dqo-megatron on NVIDIA's PyTorch container, which already carries CUDA torch, Transformer Engine
# and NVIDIA apex (never install "apex" from PyPI: that name is an unrelated web toolkit).
#   docker build -t dqo-megatron .
#   docker run --gpus all --ipc=host --rm dqo-megatron version
# Not built in CI: our CI machines have no Docker engine (see README, "GPU machines").
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/dqo-megatron
COPY pyproject.toml README.md ./
COPY dqo_megatron ./dqo_megatron
COPY tools ./tools
COPY examples ./examples

# Keep the container's torch/TE/apex: install our other dependencies explicitly, then the package
# itself without dependency resolution (a resolver could replace the container's torch build).
RUN pip install "megatron-core==0.16.1" "sentencepiece>=0.2" "transformers>=4.45" "safetensors>=0.4" \
        "datasets>=2.20" "typer>=0.12" "rich>=13" "pyyaml>=6" "tensorboard>=2.15" "psutil>=5.9" \
        "math-verify>=0.7" \
    && pip install --no-deps . \
    && dqo-megatron version

RUN useradd --create-home --uid 1000 dqo
USER dqo
WORKDIR /home/dqo

ENTRYPOINT ["dqo-megatron"]
CMD ["--help"]
