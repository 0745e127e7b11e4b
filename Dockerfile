# The image of every pod in configs/kuberay/rayservice.yaml: Python 3.11, torch with CUDA, and
# this package with its pinned Ray Serve and FunASR. Runs as the non-root user 1000.
#   docker build -t emotion2vec-serve:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1000 --user-group ray

# Every dependency at its locked version and hash (`make lock` writes requirements/image.txt):
# PyPI's Linux x86_64 torch, the CUDA build, with its CUDA libraries; the GPU node's NVIDIA
# driver (through the device plugin) does the rest. A layer of its own: a change of code
# reinstalls nothing.
WORKDIR /opt/emotion2vec-serve
COPY requirements/image.txt requirements/
RUN pip install --require-hashes -r requirements/image.txt

# This package alone: no dependency resolved again, built with the locked setuptools.
COPY pyproject.toml README.md ./
COPY serve_app ./serve_app
RUN pip install --no-deps --no-build-isolation . && rm -rf /opt/emotion2vec-serve/build

USER 1000:1000
# Every Ray node started from this image runs the proxy's replay middleware
# (serve_app/api/failover.py: a request lost with a Router replica is sent again or answered
# 503 with Retry-After); GET /health says whether it is on.
ENV HOME=/home/ray \
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.api.failover.proxy_middlewares
WORKDIR /home/ray
