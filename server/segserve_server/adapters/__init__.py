"""API adapters: each converts one protocol's messages to the core's types and back, nothing more.

- `segserve_v1`: the segserve.v1 gRPC API (Segment, SegmentStream, ListModels, GetModel).
- `kserve_v2`: the KServe v2 / Triton gRPC protocol (inference.GRPCInferenceService), with
  `kserve_tensors` converting its tensors to numpy.
- `grpc_helpers`: what both gRPC adapters share: message parsing, deadlines, the one place a
  SegserveError becomes a status, handler tables and the drain answer.
"""

__all__: list[str] = []
