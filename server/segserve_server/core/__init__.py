"""The transport-agnostic core: every API adapter calls it, and it drives the request path.

- `service`: `SegmentationCore`, the one place where a request (image or tensor) gets its
  deadline, is counted, timed and sent down the pipeline.
- `requests`: the request and answer types the adapters convert to and from.
- `tensors`: the Triton-protocol view of the repository (routes, tensor specs, statistics).
- `models`: the loaded repository: models, versions and their state; `ReadyVersion` serves.
- `streams`: one ordered answer per request of a bidirectional stream.
"""

__all__: list[str] = []
