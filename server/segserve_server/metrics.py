"""Prometheus metrics of one server instance, in a registry of its own, served on /metrics.

Beside segserve's own families the registry carries the process's (`process_resident_memory_bytes`,
`process_cpu_seconds_total`, `process_open_fds`, ...), Python's (`python_info`, `python_gc_*`)
collectors. The metrics port serves only these aggregates: no request data, no model inputs."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from segserve_server.gpu_metrics import GpuCollector

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS_S", "STAGES", "Metrics"]

LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
STAGES = ("decode", "preprocess", "queue", "infer", "postprocess", "encode")


class Metrics:
    """The metric families; names and labels are listed in docs/metrics.md."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # RSS, CPU seconds, open and max fds, start time
        r.register(PLATFORM_COLLECTOR)
        r.register(GC_COLLECTOR)
        self.gpu = GpuCollector()  # per-GPU series once a model runs on one (gpu_metrics)
        r.register(self.gpu)
        self.requests = Counter(
            "segserve_requests",
            "Segmentation requests answered, by model and gRPC status code.",
            ["model", "code"],
            registry=r,
        )
        self.request_latency = Histogram(
            "segserve_request_duration_seconds",
            "End-to-end server time of a segmentation request.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.stage_latency = Histogram(
            "segserve_stage_duration_seconds",
            "Time per request in each stage: decode, preprocess, queue, infer, postprocess, encode.",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "segserve_batch_size",
            "Requests per batch run on a backend.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_latency = Histogram(
            "segserve_batch_duration_seconds",
            "Backend time of one batch.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_depth = Gauge(
            "segserve_queue_depth",
            "Requests waiting in a model's batch queue.",
            ["model"],
            registry=r,
        )
        self.inflight = Gauge(
            "segserve_inflight_requests",
            "Requests being processed, by model.",
            ["model"],
            registry=r,
        )
        self.upload_bytes = Gauge(
            "segserve_upload_bytes_in_flight",
            "Bytes the SegmentUploads running now hold (limit: max_upload_bytes_in_flight).",
            registry=r,
        )
        self.queue_wait = Histogram(
            "segserve_queue_wait_seconds",
            "Time a request waited in its model's queue for a batch, by priority level.",
            ["model", "priority"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.stream_frames_received = Counter(
            "segserve_stream_frames_received",
            "Stream frames read, by model and stream policy (queue, latest).",
            ["model", "policy"],
            registry=r,
        )
        self.stream_frames_answered = Counter(
            "segserve_stream_frames_answered",
            "Stream frames answered, by model, policy and status (OK, DROPPED, EXPIRED, ERROR).",
            ["model", "policy", "status"],
            registry=r,
        )
        self.stream_frame_latency = Histogram(
            "segserve_stream_frame_duration_seconds",
            "From reading a stream frame to its OK answer, by model and policy.",
            ["model", "policy"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.stream_capture_to_answer = Histogram(
            "segserve_stream_capture_to_answer_seconds",
            "From a frame's capture_time_us (the client's clock) to its OK answer, by model and "
            "policy; only meaningful where the clocks agree.",
            ["model", "policy"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.model_ready = Gauge(
            "segserve_model_ready",
            "1 if the model version is loaded and serving, else 0.",
            ["model", "version"],
            registry=r,
        )

    def serve(self, host: str, port: int) -> WSGIServer:
        """Starts the /metrics HTTP server in a thread; its server_port is the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
