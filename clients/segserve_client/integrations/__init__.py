"""HTTP adapters that annotation tools call directly, each forwarding to segserve over gRPC.

- `labelstudio`: a Label Studio ML backend (`segserve-client labelstudio-backend`): brush
  predictions from segserve's LABEL_STUDIO_RLE annotations.
- `cvat`: a CVAT serverless detector (`segserve-client cvat-function serve`), its nuclio
  `function.yaml` (`segserve-client cvat-function yaml`) and `nuclio_main`, the `main.py` shim
  nuclio runs.

The HTTP services need the `integrations` extra (Starlette, uvicorn, httpx), imported only when
a service is built: the client library imports without it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRA_HINT", "require"]

EXTRA_HINT = "pip install 'segserve[integrations]'"


def require(module: str) -> ModuleType:
    """Imports one module of the `integrations` extra, or says which extra is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is not installed: the annotation-tool integrations need the "
            f"segserve[integrations] extra ({EXTRA_HINT})"
        ) from exc
