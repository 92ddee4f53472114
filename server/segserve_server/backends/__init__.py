"""Backends run a model's batches: ONNX Runtime in-process (`onnxruntime`, a SyncBackend), or
remote Triton servers (`triton`, an AsyncBackend). `factory.create_backend` picks one per model."""

__all__: list[str] = []
