# segserve images. Two targets; the CPU one is the last stage, so `docker build .` builds it:
#
#   docker build -t segserve:cpu .               # CPU: python:3.11-slim, the server extra
#   docker build --target gpu -t segserve:gpu .  # GPU: NVIDIA's Triton image, the gpu extra
#
# Both serve the bundled model repository (/models): gRPC on 50051, the KServe v2 / Triton
# protocol on 8001, metrics on 9464. Every setting is a SEGSERVE_* variable (docs/configuration.md);
# docs/deploy.md runs them (compose stack, GPU image, Kubernetes).
#
# Base images are pinned by digest (the tag beside it says what it is). Where each digest was
# found, and how to check or renew one: docs/deploy.md#base-images.

# ---- GPU: NVIDIA's Triton Inference Server image (Ubuntu 24.04, Python 3.12, CUDA, cuDNN,
# TensorRT), with segserve's gpu extra (torch, torchvision, tensorrt, nvidia-ml-py) in a venv of
# its own, apart from the image's system Python. Needs the NVIDIA container toolkit at run time
# (`docker run --gpus all`, or the nvidia.com/gpu resource on Kubernetes).
FROM nvcr.io/nvidia/tritonserver:25.06-py3@sha256:75bcfa5b0043898ece3e603c17a5bbbb1c9bddc390563db24312ef59d83735e5 AS gpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/segserve \
    PATH=/opt/segserve/bin:$PATH \
    SEGSERVE_MODEL_REPOSITORY=/models \
    SEGSERVE_PORT=50051 \
    SEGSERVE_METRICS_PORT=9464

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server/ server/
COPY clients/ clients/
# The venv has no pip of its own: the system pip installs into it (--python), so neither
# ensurepip (python3-venv) nor PEP 668's override is needed. Versions are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN python3 -m venv --without-pip /opt/segserve \
    && python3 -m pip --python /opt/segserve/bin/python install --no-cache-dir '.[gpu]' \
    && useradd --system --uid 10001 segserve
COPY model_repository/ /models/

USER 10001
EXPOSE 50051 8001 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('localhost:50051')).Check(h.HealthCheckRequest(), timeout=2).status; sys.exit(0 if s == h.HealthCheckResponse.SERVING else 1)"]
# SIGTERM drains: accepted requests are answered before the process exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["segserve", "serve"]

# ---- CPU (the default target): the server, its bundled model repository.
FROM python:3.11.10-slim-bookworm@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16 AS cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SEGSERVE_MODEL_REPOSITORY=/models \
    SEGSERVE_PORT=50051 \
    SEGSERVE_METRICS_PORT=9464

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server/ server/
COPY clients/ clients/
# Versions are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[server]' \
    && useradd --system --uid 10001 segserve
COPY model_repository/ /models/

USER 10001
EXPOSE 50051 8001 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('localhost:50051')).Check(h.HealthCheckRequest(), timeout=2).status; sys.exit(0 if s == h.HealthCheckResponse.SERVING else 1)"]
# SIGTERM drains: accepted requests are answered before the process exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["segserve", "serve"]
