"""segserve.v1.ModelRepository: load, reload and unload models while the server runs (admin).

Converts the protobuf messages and calls core.models.ModelManager (`load`, `unload`); statuses
come from grpc_helpers as for every other segserve call. A load whose versions did not all come
up answers INVALID_ARGUMENT with the reason (the versions loaded before keep serving), as
KServe's RepositoryModelLoad does.

ADMIN_METHODS names every call, on either port, that changes what the server serves: the ones
an "admin" token scope guards.
"""

from __future__ import annotations

import grpc

from segserve.v1 import segserve_pb2 as pb
from segserve_server.adapters.grpc_helpers import handler_table
from segserve_server.adapters.kserve_v2 import SERVICE_NAME as KSERVE_SERVICE
from segserve_server.core.models import Model, ModelManager, ModelState
from segserve_server.errors import InvalidArgument

__all__ = [
    "ADMIN_METHODS",
    "REPOSITORY_SERVICE",
    "RepositoryServicer",
    "model_status",
    "repository_handler",
]

SERVICE = pb.DESCRIPTOR.services_by_name["ModelRepository"]
REPOSITORY_SERVICE = SERVICE.full_name
ADMIN_METHODS = (
    f"/{REPOSITORY_SERVICE}/LoadModel",
    f"/{REPOSITORY_SERVICE}/UnloadModel",
    f"/{KSERVE_SERVICE}/RepositoryModelLoad",
    f"/{KSERVE_SERVICE}/RepositoryModelUnload",
)
"""Full gRPC method names of the calls that load or unload models (segserve.v1 and KServe)."""

_STATES: dict[ModelState, pb.ModelState] = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
    ModelState.UNLOADED: pb.MODEL_STATE_UNLOADED,
}


def model_status(model: Model, *, ready_only: bool = False) -> pb.ModelStatus:
    """A model with each of its versions (those being loaded too), as ModelStatus."""
    serving = model.serving
    status = pb.ModelStatus(
        name=model.name,
        state=_STATES[model.state],
        reason=model.reason,
        serving_version=serving.version if serving else 0,
    )
    for number, version in sorted({**model.loading, **model.versions}.items()):
        if ready_only and version.state is not ModelState.READY:
            continue
        status.versions.add(
            version=number,
            state=_STATES[version.state],
            reason=version.reason or version.unavailable_reason,
        )
    return status


def repository_handler(models: ModelManager) -> grpc.GenericRpcHandler:
    """gRPC handlers for segserve.v1.ModelRepository (see grpc_helpers.handler_table)."""
    return handler_table(SERVICE, pb, RepositoryServicer(models))


class RepositoryServicer:
    """The methods of segserve.v1.ModelRepository, on parsed messages."""

    def __init__(self, models: ModelManager) -> None:
        self._models = models

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        if not request.name:
            raise InvalidArgument("LoadModel names no model")
        model = await self._models.load(request.name)
        failure = model.load_failure
        if failure:
            raise InvalidArgument(f"failed to load model {model.name!r}: {failure}")
        return pb.LoadModelResponse(model=model_status(model))

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        if not request.name:
            raise InvalidArgument("UnloadModel names no model")
        model = await self._models.unload(request.name)
        return pb.UnloadModelResponse(model=model_status(model))

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        models = self._models.models
        return pb.RepositoryIndexResponse(
            models=[
                model_status(models[name], ready_only=request.ready_only)
                for name in sorted(models)
                if not request.ready_only or models[name].state is ModelState.READY
            ]
        )
