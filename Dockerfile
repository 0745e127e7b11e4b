# The image of every pod in configs/kuberay/rayservice.yaml: Python 3.11, torch with CUDA, and
# this package with its pinned Ray Serve and FunASR. Runs as the non-root user 1000.
#   docker build -t emotion2vec-serve:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1000 --user-group ray

# torch first, pinned: PyPI's Linux x86_64 wheel is the CUDA build and brings its CUDA
# libraries; the GPU node's NVIDIA driver (through the device plugin) does the rest.
RUN pip install "torch==2.13.*"

WORKDIR /opt/emotion2vec-serve
COPY pyproject.toml README.md ./
COPY serve_app ./serve_app
RUN pip install . && rm -rf /opt/emotion2vec-serve/build

USER 1000:1000
ENV HOME=/home/ray
WORKDIR /home/ray
