"""Backends run a model's batches: ONNX Runtime in-process, or remote Triton servers (triton)."""

from segserve_server.backends.base import Backend, create_backend

__all__ = ["Backend", "create_backend"]
