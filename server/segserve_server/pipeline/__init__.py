"""The request path's stages, one module each, in the order a request meets them:
`decode` → `preprocess` → `batcher` (its rules in `scheduling`; → `segserve_server.backends`) →
`postprocess` → `encode`.
"""

__all__: list[str] = []
