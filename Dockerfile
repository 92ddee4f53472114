# segserve on the CPU: the server, its bundled model repository, gRPC on 50051, the KServe v2 /
# Triton protocol on 8001, metrics on 9464.
FROM python:3.11-slim

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
