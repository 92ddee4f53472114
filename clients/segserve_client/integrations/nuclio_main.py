"""nuclio's `main.py` of the segserve CVAT detector (handler `main:handler`).

`segserve-client cvat-function yaml` copies this file next to the function.yaml it writes. nuclio
calls `init_context(context)` once per worker and `handler(context, event)` per request; the
segserve address and model come from the environment the function.yaml sets ($SEGSERVE_SERVER,
$SEGSERVE_MODEL). The work is segserve_client.integrations.cvat's (`SyncCvatFunction`), the same
code as the HTTP service's, with the sync client.
"""

from __future__ import annotations

import json
import os
from typing import Any

from segserve_client.errors import SegserveError
from segserve_client.integrations.cvat import (
    MODEL_ENV,
    SERVER_ENV,
    FunctionConfig,
    RequestError,
    SyncCvatFunction,
)

__all__ = ["handler", "init_context"]


def init_context(context: Any) -> None:
    server = os.environ.get(SERVER_ENV, "localhost:50051")
    model = os.environ[MODEL_ENV]
    context.user_data.function = SyncCvatFunction(FunctionConfig(server, model))
    context.logger.info(f"segserve detector: model {model} on {server}")


def handler(context: Any, event: Any) -> Any:
    function: SyncCvatFunction = context.user_data.function
    try:
        body = json.dumps(function.detect(event.body))
        status = 200
    except RequestError as exc:
        body, status = json.dumps({"error": str(exc)}), 400
    except SegserveError as exc:
        context.logger.warn(f"segserve: {exc}")
        body, status = json.dumps({"error": str(exc)}), 503
    return context.Response(
        body=body, headers={}, content_type="application/json", status_code=status
    )
