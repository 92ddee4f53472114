"""Test and development harnesses (not part of the installed package): synthetic ONNX models and
a real local tritonserver."""
