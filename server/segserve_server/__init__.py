"""segserve server: serves a Triton-style model repository of segmentation models over gRPC."""

__all__ = ["__version__"]

__version__ = "0.1.0"
