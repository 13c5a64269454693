# syntax=docker/dockerfile:1
# lfqa's training image: Python 3.11, the CUDA build of torch 2.13.0, lfqa with its pinned dependencies, running
# as uid 1000. The entrypoint is the pod start script, k8s/entrypoint.sh (configured from the environment).
#
#   make image IMAGE=registry.example.com/lfqa:0.1.0     # docker build
#   make push  IMAGE=registry.example.com/lfqa:0.1.0     # docker build + docker push
#   docker run --gpus all -e LFQA_JOB=jobs/tiny-cpu.yaml IMAGE train.max_steps=20    # 1 machine, all its GPUs
#
# Why not FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime: its Python is 3.12, and lfqa requires 3.11
# (pyproject.toml, requires-python). PyTorch's CUDA wheels bring their own CUDA, cuDNN and NCCL libraries
# (nvidia-* wheels), so a plain Python image and the node's NVIDIA driver are all the GPU needs.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# cu126 runs on drivers >= 525 (CUDA 12 minor-version compatibility) and covers Volta to Hopper; Blackwell
# needs a newer CUDA: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 (driver >= 580).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/lfqa/.cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false \
    LFQA_OUTPUT_DIR=/scratch/run \
    LFQA_CACHE_DIR=/scratch/cache/lfqa

# tini as PID 1: passes SIGTERM on to the start script (which passes it on to the launcher) and reaps orphans.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 lfqa \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/lfqa --shell /bin/bash lfqa

# torch first, from PyTorch's CUDA index. pyproject.toml pins torch==2.13.0, which the CUDA build
# (2.13.0+cu126) satisfies, so installing lfqa's dependencies next keeps it (README, "GPU images").
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
# The pinned dependencies in their own layer, rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install --requirement /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The code, job files and launch configs (accelerate and DeepSpeed configs are read relative to /app, which
# stays root's: runs and caches go to /scratch, an emptyDir in the pods).
COPY . .
RUN pip install --no-deps --editable . \
 && python -c "import torch, lfqa; assert torch.version.cuda, f'torch {torch.__version__} is not a CUDA build'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
 && chmod 0755 k8s/entrypoint.sh \
 && install --directory --owner 1000 --group 1000 /scratch

USER 1000:1000
ENTRYPOINT ["/usr/bin/tini", "--", "/app/k8s/entrypoint.sh"]
