"""Backends run a model's batches: ONNX Runtime in-process here; Triton servers in a later module."""

from segserve_server.backends.base import Backend, create_backend

__all__ = ["Backend", "create_backend"]
