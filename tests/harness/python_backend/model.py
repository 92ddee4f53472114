"""A Triton Python-backend model that runs the ONNX file beside it with onnxruntime.

Copied by `tests.harness.triton_local.write_python_backend_repository` into each version
folder of a Triton repository, next to `model.onnx`, for Triton builds without the onnxruntime
backend (the tritonserver bundled with nvidia-pytriton has only the Python backend). It runs
inside Triton's Python stub, in the Triton venv (numpy < 2, onnxruntime), never in segserve.

Config parameters it reads (string values):
    segserve.onnx_filename        the ONNX file in the version folder (default model.onnx)
    segserve.ort_intra_op_threads ONNX Runtime intra-op threads (default 1)
    segserve.test_delay_s         seconds each execute call waits first (default 0): a model
                                  slower than a test's deadline, for the deadline tests

Every request Triton's dynamic batcher hands to one `execute` call runs as one ONNX Runtime
batch (when max_batch_size > 0), and the output is split back per request.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _parameter(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else str(value)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(version_dir, _parameter(config, "segserve.onnx_filename", "model.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, "segserve.ort_intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._batched = int(config.get("max_batch_size", 0)) > 0
        self._delay_s = float(_parameter(config, "segserve.test_delay_s", "0"))
        self._inputs = [i["name"] for i in config["input"]]
        self._outputs = [
            (o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]
        ]

    def execute(self, requests: list[Any]) -> list[Any]:
        if self._delay_s:
            time.sleep(self._delay_s)
        if not self._batched or len(requests) == 1:
            return [self._respond(self._run(self._feeds([r]))) for r in requests]
        feeds = self._feeds(requests)
        sizes = [pb_utils.get_input_tensor_by_name(r, self._inputs[0]).shape()[0] for r in requests]
        results = self._run(feeds)
        split_at = np.cumsum(sizes)[:-1]
        per_request = [np.split(result, split_at) for result in results]
        return [self._respond([parts[i] for parts in per_request]) for i in range(len(requests))]

    def _feeds(self, requests: list[Any]) -> dict[str, np.ndarray]:
        feeds = {}
        for name in self._inputs:
            arrays = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            feeds[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        return feeds

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run([name for name, _ in self._outputs], feeds)

    def _respond(self, results: list[np.ndarray]) -> Any:
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(result, dtype=dtype))
            for (name, dtype), result in zip(self._outputs, results, strict=True)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self._session = None
