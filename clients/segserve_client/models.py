"""What a segserve server says of its models: ListModels summaries, GetModel descriptions, and
the polling decisions of `wait_until_ready`, shared by the sync and the asyncio client."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from segserve.v1 import segserve_pb2 as pb
from segserve_client.errors import SegserveError

__all__ = ["BatchingInfo", "ClassInfo", "ModelInfo", "ModelSummary", "ReadinessWait"]


def _state_name(number: int) -> str:
    try:
        name: str = pb.ModelState.Name(number)
        return name.removeprefix("MODEL_STATE_")
    except ValueError:
        return f"UNKNOWN_{number}"


@dataclass(frozen=True)
class ModelSummary:
    """One model of the server's repository, as ListModels lists it.

    `state` is "READY", "LOADING", "FAILED", "UNLOADED" or "UNSPECIFIED".
    """

    name: str
    versions: list[int]
    serving_version: int
    state: str
    reason: str

    @classmethod
    def from_proto(cls, summary: pb.ModelSummary) -> ModelSummary:
        return cls(
            name=summary.name,
            versions=list(summary.versions),
            serving_version=summary.serving_version,
            state=_state_name(summary.state),
            reason=summary.reason,
        )


@dataclass(frozen=True)
class ClassInfo:
    """One class of a model: its id (the pixel value in label maps), name and display colour."""

    id: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class BatchingInfo:
    """A model's dynamic-batching settings."""

    max_batch_size: int
    preferred_batch_sizes: list[int]
    max_queue_delay_us: int
    max_queue_size: int
    priority_levels: int = 0  # Triton's; 1 is the highest level, 0: one level
    default_priority_level: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """One model version as GetModel describes it (`state` as in ModelSummary)."""

    name: str
    version: int
    state: str
    reason: str
    platform: str
    backend: str
    input_width: int
    input_height: int
    classes: list[ClassInfo]
    batching: BatchingInfo
    outputs_labels: bool
    description: str
    has_confidence: bool = False
    """Whether segment(include_confidence=True) works: the model has a confidence output or
    outputs scores (labels-only models answer it FAILED_PRECONDITION)."""

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        """The class colours indexed by class id (black for ids no class has)."""
        colors = [(0, 0, 0)] * (max((c.id for c in self.classes), default=-1) + 1)
        for c in self.classes:
            colors[c.id] = c.color
        return colors

    @classmethod
    def from_proto(cls, info: pb.ModelInfo) -> ModelInfo:
        batching = info.batching
        return cls(
            name=info.name,
            version=info.version,
            state=_state_name(info.state),
            reason=info.reason,
            platform=info.platform,
            backend=info.backend,
            input_width=info.input_width,
            input_height=info.input_height,
            classes=[ClassInfo(c.id, c.name, (c.red, c.green, c.blue)) for c in info.classes],
            batching=BatchingInfo(
                max_batch_size=batching.max_batch_size,
                preferred_batch_sizes=list(batching.preferred_batch_sizes),
                max_queue_delay_us=batching.max_queue_delay_us,
                max_queue_size=batching.max_queue_size,
                priority_levels=batching.priority_levels,
                default_priority_level=batching.default_priority_level,
            ),
            outputs_labels=info.outputs_labels,
            description=info.description,
            has_confidence=info.has_confidence,
        )


class ReadinessWait:
    """The decisions of wait_until_ready, polling ListModels, for both clients.

    Each poll is a ListModels call with wait_for_ready and the time left as deadline, so one call
    covers waiting for the server to come up; the model (if one is named) is then polled until
    READY. A FAILED or unknown model ends the wait at once.
    """

    POLL_INTERVAL_S = 0.2
    _RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

    def __init__(self, target: str, timeout_s: float, model: str | None) -> None:
        self._target = target
        self._timeout_s = timeout_s
        self._model = model
        self._deadline = time.monotonic() + timeout_s
        self._last = "no answer"

    def call_timeout(self) -> float:
        """The deadline of the next ListModels call: the time left."""
        return max(self._deadline - time.monotonic(), 0.001)

    def next_delay(self, answer: pb.ListModelsResponse | SegserveError) -> float | None:
        """None when ready; else how long to sleep before polling again. Raises SegserveError
        when the wait cannot succeed or its time is up."""
        if isinstance(answer, SegserveError):
            if answer.code not in self._RETRIED:
                raise answer
            self._last = str(answer)
        elif self._model is None:
            return None
        else:
            summary = next((m for m in answer.models if m.name == self._model), None)
            if summary is None:
                names = ", ".join(m.name for m in answer.models) or "none"
                raise SegserveError(
                    grpc.StatusCode.NOT_FOUND, f"no model {self._model!r} (models: {names})"
                )
            if summary.state == pb.MODEL_STATE_READY:
                return None
            if summary.state == pb.MODEL_STATE_FAILED:
                raise SegserveError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"model {self._model!r} failed to load: {summary.reason}",
                )
            self._last = f"model {self._model!r} is {_state_name(summary.state)}"
        left = self._deadline - time.monotonic()
        if left <= 0:
            what = f"model {self._model!r}" if self._model else "server"
            raise SegserveError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{what} at {self._target} not ready after {self._timeout_s:g} s ({self._last})",
            )
        return min(self.POLL_INTERVAL_S, left)
