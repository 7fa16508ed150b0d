# syntax=docker/dockerfile:1
#
# loraserve on CUDA. Build:   docker build -t loraserve:0.1.0 .
#                   Run:     docker run --gpus all -p 8000:8000 -e LORASERVE_API_KEY=... loraserve:0.1.0
# See docs/deploy.md for volumes, compose, Kubernetes and how to pick the CUDA flavour of torch.
#
# Both stages start from the same CUDA base image: the virtualenv and the Python it links to are
# copied from the build stage into the final one, so their paths must exist identically in both.
# The base is `-base` (CUDA runtime only): torch's wheels bring cuBLAS, cuDNN and NCCL themselves.
# The image's CUDA version should match the torch wheel's, because the image sets
# NVIDIA_REQUIRE_CUDA and the NVIDIA Container Toolkit then refuses to start on an older driver
# with a clear message, instead of torch failing later.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS builder
# The Python the dependency set was locked and tested with (requirements.lock).
ARG PYTHON_VERSION=3.11
# PyPI's Linux x86_64 torch 2.13.0 wheel is a CUDA 13.0 build (host driver >= 580). For older
# drivers use a PyTorch index with an older CUDA, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /build
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv
COPY requirements.lock ./
# torch first, alone, from TORCH_INDEX_URL (its exact version comes from the lock); then the
# project's dependencies from PyPI, every version held to the lock by the constraint file.
RUN --mount=type=cache,target=/root/.cache/uv \
    torch_pin="$(grep -E '^torch==' requirements.lock)" \
    && uv pip install --python /opt/venv/bin/python --index-url "${TORCH_INDEX_URL}" "${torch_pin}"
COPY pyproject.toml README.md ./
COPY loracore ./loracore
COPY trainer ./trainer
COPY service ./service
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python --constraint requirements.lock . \
    && /opt/venv/bin/python -c "import torch, service, trainer; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && /opt/venv/bin/python -c "from service.routes.console import load_console; assert 'index.html' in load_console(), 'the console files are missing'"

FROM ${CUDA_IMAGE} AS runtime
# tini as PID 1: forwards SIGTERM to the server (which shuts its worker processes down) and reaps
# the training child processes the job runner starts. CA certificates for model downloads.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 loraserve \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/loraserve --shell /usr/sbin/nologin loraserve \
    && mkdir -p /data/hf /data/adapters /data/jobs \
    && chown -R 10001:10001 /data
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
COPY scripts/entrypoint.sh /usr/local/bin/loraserve-entrypoint
# docker run --rm --gpus all IMAGE python /opt/loraserve/gpu_check.py --random-weights
COPY scripts/gpu_check.py /opt/loraserve/gpu_check.py
# LORASERVE_* are the server's settings (service/settings.py). The model cache, the adapters and
# the job data (SQLite job store, datasets, job folders) are volumes. The Prometheus multiprocess
# files live on local scratch, not on a volume: every process of the server rewrites them all the
# time (mmap), they are worthless after a restart, and the server empties the folder at start.
# The server honours this preset PROMETHEUS_MULTIPROC_DIR (it wins over LORASERVE_METRICS_DIR).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/hf \
    LORASERVE_MODEL=distilgpt2 \
    LORASERVE_ADAPTER_DIR=/data/adapters \
    LORASERVE_DATA_DIR=/data/jobs \
    LORASERVE_HOST=0.0.0.0 \
    LORASERVE_PORT=8000 \
    LORASERVE_DEVICE=cuda \
    PROMETHEUS_MULTIPROC_DIR=/tmp/loraserve-metrics \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/data/hf", "/data/adapters", "/data/jobs"]
USER 10001:10001
WORKDIR /home/loraserve
EXPOSE 8000
STOPSIGNAL SIGTERM
# Liveness only (/health answers while the process lives); readiness is /health/ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORASERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/loraserve-entrypoint"]
CMD []
