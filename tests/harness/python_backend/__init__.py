"""Files copied into Triton repositories: `model.py`, a Python-backend model that runs ONNX.

Nothing here is imported by segserve; `tests.harness.triton_local` copies `model.py` next to
each model's ONNX file when it builds a repository for the Python-only tritonserver build.
"""
