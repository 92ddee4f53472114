"""segserve server: serves a Triton-style model repository of segmentation models over gRPC."""

__version__ = "0.1.0"
