"""segserve speaks Triton both ways.

- `kserve_service`: the KServe v2 / Triton gRPC protocol on segserve's own port (`kserve_port`),
  every repository model as raw tensors and `<model>.image` as image in, mask out; it converts
  protobuf and calls `tensor_api`, the transport-agnostic tensor path.
- `pool`: the Triton servers behind the Triton backend (`segserve_server.backends.triton`):
  least-outstanding-requests balancing, ejection and readmission.
- `local`: a real tritonserver process on this machine (the binary nvidia-pytriton bundles,
  Python backend only) serving a segserve repository through `python_backend/model.py`: for
  development, and for the tests.
"""
