"""The naive baseline of benchmarks/compare.py: segserve.v1 `Segment` done the obvious way.

Per request, in gRPC's thread pool: OpenCV decode at full size, resize and normalise, ONNX Runtime
(one shared session, default options, batch of one), nearest-neighbour resize of the labels to
the image's size, OpenCV PNG. No batching, no DCT-scaled decode, no tuning: what a first version
of such a service looks like. It answers with the segserve.v1 messages (a PNG mask and per-stage
timings) so that the same load generator measures it.

    python benchmarks/naive_server.py --model-dir model_repository/deeplabv3plus_camvid --port 0

prints "naive server listening on 127.0.0.1:PORT" once it serves.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import grpc
import numpy as np
import onnxruntime as ort

from segserve.v1 import segserve_pb2 as pb
from segserve_server.model_repository import parse_config


class NaiveSegmenter:
    def __init__(self, model_dir: Path) -> None:
        self.config = parse_config((model_dir / "config.pbtxt").read_text(), model_dir)
        version = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
        self.session = ort.InferenceSession(
            str(model_dir / str(version) / self.config.model_filename),
            providers=["CPUExecutionProvider"],
        )
        self.mean = np.asarray(self.config.mean, dtype=np.float32)
        self.std = np.asarray(self.config.std, dtype=np.float32)

    def segment(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        started = time.perf_counter()
        request = pb.SegmentRequest.FromString(data)
        c = self.config
        image = cv2.imdecode(np.frombuffer(request.image.encoded, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image does not decode")
            raise AssertionError("abort raises")
        decoded = time.perf_counter()
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        resized = cv2.resize(rgb, (c.input_width, c.input_height)).astype(np.float32) / 255.0
        tensor = ((resized - self.mean) / self.std).transpose(2, 0, 1)[np.newaxis]
        preprocessed = time.perf_counter()
        (labels,) = self.session.run([c.output_name], {c.input_name: tensor})
        inferred = time.perf_counter()
        height, width = image.shape[:2]
        full = cv2.resize(labels[0], (width, height), interpolation=cv2.INTER_NEAREST)
        postprocessed = time.perf_counter()
        ok, png = cv2.imencode(".png", full)
        if not ok:
            context.abort(grpc.StatusCode.INTERNAL, "PNG encoding failed")
        done = time.perf_counter()

        def us(seconds: float) -> int:
            return round(seconds * 1e6)

        return pb.SegmentResponse(
            width=width,
            height=height,
            masks=[pb.EncodedMask(encoding=pb.MASK_ENCODING_PNG, data=png.tobytes())],
            model=c.name,
            timings=pb.StageTimings(
                decode_us=us(decoded - started),
                preprocess_us=us(preprocessed - decoded),
                infer_us=us(inferred - preprocessed),
                postprocess_us=us(postprocessed - inferred),
                encode_us=us(done - postprocessed),
                total_us=us(done - started),
                batch_size=1,
            ),
        ).SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=10, help="gRPC worker threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    segmenter = NaiveSegmenter(args.model_dir)
    server = grpc.server(
        ThreadPoolExecutor(args.threads),
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )
    handler = grpc.method_handlers_generic_handler(
        "segserve.v1.Segmentation",
        {"Segment": grpc.unary_unary_rpc_method_handler(segmenter.segment)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    logging.info("naive server listening on %s:%d", args.host, port)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()


if __name__ == "__main__":
    main()
