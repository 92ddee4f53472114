"""API adapters: each converts one protocol's messages to the core's types and back, nothing more.

- `segserve_v1`: the segserve.v1 gRPC API (Segment, SegmentStream, ListModels, GetModel).
- `kserve_v2`: the KServe v2 / Triton gRPC protocol (inference.GRPCInferenceService), with
  `kserve_tensors` converting its tensors to numpy.
- `repository_v1`: segserve.v1.ModelRepository, the admin service (load, unload, index).
- `grpc_helpers`: what the gRPC adapters share: message parsing, deadlines, the one place a
  SegserveError becomes a status, handler tables and the drain answer.
- `auth_grpc`: the one authentication interceptor of both gRPC ports (rules in `auth`).
- The HTTP port: `http_app` (the Starlette app: auth, CORS, deadlines, the one place an error
  becomes an HTTP status), `kserve_http` (KServe v2 REST), `rest_v1` (the plain /v1 endpoints),
  and `console/` (the browser console's static files).
"""

__all__: list[str] = []
