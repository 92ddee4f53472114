"""Triton Python-backend model for benchmarks/compare.py: segserve's own pipeline inside Triton.

Input `image` (BYTES, one encoded image per batch entry); outputs `mask` (BYTES: the SRLE label
map at the image's size) and `timings_us` (INT64: decode, preprocess, infer, postprocess, encode
microseconds, batch size). Triton's dynamic batcher forms the batches; each `execute` call decodes
and preprocesses every image, runs ONNX Runtime once on the stacked batch, then postprocesses and
encodes every answer: the same functions segserve runs (imported from this repository's server/
and clients/ folders), so that the comparison measures the serving architecture, not the code.

The model's parameters (written by compare.py): `repo_root` (this repository), `segserve_model_dir`
(the segserve model folder, whose config.pbtxt and ONNX file are used), `ort_threads`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by the Python backend's stub


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = {
            k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()
        }
        root = Path(params["repo_root"])
        sys.path[:0] = [str(root / "server"), str(root / "clients")]
        from segserve_client import masks
        from segserve_server.model_repository import parse_config
        from segserve_server.pipeline import decode as imaging
        from segserve_server.pipeline import postprocess
        from segserve_server.pipeline.preprocess import Preprocessor

        self._imaging, self._postprocess, self._masks = imaging, postprocess, masks
        model_dir = Path(params["segserve_model_dir"])
        self._config = parse_config((model_dir / "config.pbtxt").read_text(), model_dir)
        versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(params.get("ort_threads", "0"))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # As segserve's own backend (backends/onnxruntime.py): idle threads do not spin, so
        # the comparison runs both sides under the same thread behaviour.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(model_dir / str(versions[-1]) / self._config.model_filename),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        self._preprocess = Preprocessor(self._config)
        self._limits = imaging.ImageLimits(40_000_000, 16384)
        c = self._config
        self._min_size = (c.input_width, c.input_height)
        self._order = "BGR" if c.channel_order == "BGR" else "RGB"

    def execute(self, requests: list) -> list:
        """One dynamic batch: decode and preprocess each image, infer once, finish each image."""
        c = self._config
        responses: list = [None] * len(requests)
        tensors, prepared = (
            [],
            [],
        )  # prepared: (request index, width, height, decode, preprocess us)
        for i, request in enumerate(requests):
            data = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)[0]
            t0 = time.perf_counter()
            try:
                decoded = self._imaging.decode(
                    data, self._limits, order=self._order, min_size=self._min_size
                )
            except Exception as exc:  # a bad image fails its own request only
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            t1 = time.perf_counter()
            tensors.append(self._preprocess(decoded))
            t2 = time.perf_counter()
            width, height = decoded.original_width, decoded.original_height
            prepared.append((i, width, height, (t1 - t0) * 1e6, (t2 - t1) * 1e6))
        if not tensors:
            return responses
        t0 = time.perf_counter()
        (labels,) = self._session.run([c.output_name], {c.input_name: np.stack(tensors)})
        infer_us = (time.perf_counter() - t0) * 1e6
        for (i, width, height, decode_us, preprocess_us), output in zip(
            prepared, labels, strict=True
        ):
            t0 = time.perf_counter()
            label_map = self._postprocess.resize_labels(
                self._postprocess.to_label_map(output, c), width, height
            )
            t1 = time.perf_counter()
            mask = self._masks.encode_srle(label_map, zlib_level=1)
            t2 = time.perf_counter()
            timings = [decode_us, preprocess_us, infer_us, (t1 - t0) * 1e6, (t2 - t1) * 1e6]
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("mask", np.array([[mask]], dtype=np.object_)),
                    pb_utils.Tensor(
                        "timings_us", np.array([[*timings, len(tensors)]], dtype=np.int64)
                    ),
                ]
            )
        return responses
