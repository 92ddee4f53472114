"""ONNX Runtime backend: the embedded default, CPU here, CUDA / TensorRT providers where installed.

On the CPU with ONNX Runtime's thread count left to segserve (`ort_intra_op_threads` 0), the
cores are split into single-threaded lanes, one per core, each running one image at a time: on
2 cores a 360x480 DeepLabV3+ costs 46 ms in one thread against 24 ms in two, so two lanes serve
more frames (34.8 against 31.2 per second measured end to end), and nothing waits for the slower
of two threads after every operator while decoding shares the cores. When only one image is
being inferred, it runs on a session that uses every core, so a lone request keeps the short
latency. Elsewhere (a GPU, or a thread count set) the model runs as configured: one session, the
config's instances and batching. Threads never spin waiting for work (allow_spinning 0): the
cores are shared with decoding and encoding, and spinning burned 5 ms of CPU per frame.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from segserve_server.backends.base import SyncBackend, stack_outputs
from segserve_server.cpus import available_cpus
from segserve_server.errors import ModelConfigError
from segserve_server.model_repository import ModelConfig, flip_average_filename
from segserve_server.settings import Settings

__all__ = ["OnnxRuntimeBackend", "choose_providers", "cpu_count", "provider_options"]

log = logging.getLogger(__name__)


def choose_providers(config: ModelConfig, settings: Settings) -> list[str]:
    """Execution providers from the settings, else from config.pbtxt (KIND_GPU, accelerators).

    Providers that this onnxruntime build lacks are dropped with a warning; CPU is always last.
    """
    if settings.ort_providers:
        wanted = list(settings.ort_providers)
    elif config.use_gpu:
        wanted = ["CUDAExecutionProvider"]
        if "tensorrt" in config.accelerators:
            wanted.insert(0, "TensorrtExecutionProvider")
    else:
        wanted = []
    available = set(ort.get_available_providers())
    missing = [p for p in wanted if p not in available]
    if missing:
        log.warning("model %s: providers %s not installed; using the rest", config.name, missing)
    chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def provider_options(
    providers: list[str], config: ModelConfig, model_path: Path
) -> list[dict[str, str]]:
    """Options per provider: the GPU of segserve.device for CUDA and TensorRT; TensorRT builds
    FP16 engines and caches them (and its timing cache) beside the model, in .ort_trt_cache."""
    device_id = config.device.partition(":")[2] or "0"
    cache = str(model_path.parent / ".ort_trt_cache")
    options: dict[str, dict[str, str]] = {
        "CUDAExecutionProvider": {"device_id": device_id},
        "TensorrtExecutionProvider": {
            "device_id": device_id,
            "trt_fp16_enable": "True",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": cache,
        },
    }
    return [options.get(p, {}) for p in providers]


def cpu_count() -> int:
    """Cores this process may run on (affinity, capped by a container's CPU quota)."""
    return available_cpus()


class OnnxRuntimeBackend(SyncBackend):
    def __init__(self, config: ModelConfig, model_path: Path, settings: Settings) -> None:
        if not model_path.is_file():
            raise ModelConfigError(f"model file {model_path} is missing")
        providers = choose_providers(config, settings)
        cores = cpu_count()
        self._lanes = (
            cores
            if providers == ["CPUExecutionProvider"] and settings.ort_intra_op_threads == 0
            else 0
        )
        threads = 1 if self._lanes else settings.ort_intra_op_threads
        if config.flip_average:  # the variant `segserve flip-average` wrote beside the model
            model_path = model_path.with_name(flip_average_filename(model_path.name))
            if not model_path.is_file():
                raise ModelConfigError(
                    f"segserve.flip_average is true but {model_path} is missing; write it with "
                    f"`segserve flip-average {config.name}`"
                )
        self._provider_options = provider_options(providers, config, model_path)
        session = self._load(model_path, providers, threads)
        # Both None once closed.
        self._session: ort.InferenceSession | None = session
        self._wide_session: ort.InferenceSession | None = (
            self._load(model_path, providers, cores) if self._lanes > 1 else None
        )
        self._running = 0
        self._running_lock = threading.Lock()
        self._check_signature(session, config)
        self._input_name = config.input_name
        self._output_names = list(config.output_names)
        self._provider: str = session.get_providers()[0]
        self._warm_up(config)

    def _load(self, model_path: Path, providers: list[str], threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(
                str(model_path),
                sess_options=options,
                providers=providers,
                provider_options=self._provider_options,
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors on bad models
            raise ModelConfigError(f"onnxruntime cannot load {model_path}: {exc}") from exc

    @property
    def max_concurrent_batches(self) -> int | None:
        """One batch per lane on the CPU; otherwise the config's instance count."""
        return self._lanes or None

    @property
    def batch_size_limit(self) -> int | None:
        """Lanes run one image at a time: on the CPU a batch saves nothing and adds latency."""
        return 1 if self._lanes else None

    def _warm_up(self, config: ModelConfig) -> None:
        """Runs one zero batch so that the first request does not pay for lazy initialisation."""
        shape = (1, *config.input_shape)
        try:
            for session in (self._session, self._wide_session):
                if session is not None:
                    session.run(
                        self._output_names,
                        {self._input_name: np.zeros(shape, dtype=config.input_dtype)},
                    )
        except Exception as exc:  # a model that cannot run a zero batch cannot serve
            raise ModelConfigError(f"warm-up inference failed: {exc}") from exc

    @staticmethod
    def _check_signature(session: ort.InferenceSession, config: ModelConfig) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if config.input_name not in inputs:
            raise ModelConfigError(
                f"config input {config.input_name!r} is not in the ONNX model (has {list(inputs)})"
            )
        for name in config.output_names:
            if name not in outputs:
                raise ModelConfigError(
                    f"config output {name!r} is not in the ONNX model (has {list(outputs)})"
                )
        shape = inputs[config.input_name].shape
        expected = list(config.input_shape)
        fixed = [d if isinstance(d, int) else -1 for d in shape[1:]]
        if len(fixed) != 3 or any(d not in (-1, e) for d, e in zip(fixed, expected, strict=True)):
            raise ModelConfigError(f"ONNX input shape {shape} does not fit config dims {expected}")
        batch_dim = shape[0]
        if config.batching.max_batch_size > 1 and isinstance(batch_dim, int) and batch_dim != -1:
            raise ModelConfigError(
                f"ONNX input has a fixed batch dim {batch_dim} but max_batch_size is "
                f"{config.batching.max_batch_size}; export it with a dynamic batch axis"
            )

    @property
    def description(self) -> str:
        return f"onnxruntime:{self._provider}"

    def close(self) -> None:
        """Releases the sessions (for callers without a loop, such as `segserve eval`)."""
        self._session = self._wide_session = None

    async def aclose(self) -> None:
        self.close()

    @property
    def input_name(self) -> str:
        return self._input_name

    @property
    def output_names(self) -> list[str]:
        return list(self._output_names)

    @property
    def provider(self) -> str:
        """The execution provider that runs the model (the first of the session's)."""
        return self._provider

    def output_types(self) -> dict[str, str]:
        """Each output's ONNX type, e.g. "tensor(float)"; {} once closed."""
        session = self._session
        return {o.name: o.type for o in session.get_outputs()} if session is not None else {}

    @contextlib.contextmanager
    def session_for_batch(self) -> Iterator[ort.InferenceSession]:
        """The session to run one batch on: the every-core one when nothing else is running on
        a lane (see the module docstring), else a lane's."""
        with self._running_lock:
            alone = self._running == 0
            self._running += 1
        try:
            session = self._wide_session if alone and self._wide_session else self._session
            if session is None:
                raise RuntimeError(f"{self.description} backend is closed")
            yield session
        finally:
            with self._running_lock:
                self._running -= 1

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self.session_for_batch() as session:
            outputs = session.run(self._output_names, {self._input_name: batch})
        return stack_outputs(outputs)
