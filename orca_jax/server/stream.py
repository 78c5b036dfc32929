"""How failed submissions map onto gRPC status codes and HTTP statuses.

Cancellation has one owner, `AsyncEngine.generate`: a cancel while the submission is queued
skips it, one while it runs aborts it as soon as it is added, one after it aborts it by id.
"""
from __future__ import annotations

import enum
import logging

from ..async_engine import EngineDeadError
from ..scheduler import QueueFullError

log = logging.getLogger("orca_jax.server")


class ErrorKind(enum.Enum):
    """How a failed submission maps onto gRPC status codes and HTTP statuses."""

    INVALID = ("INVALID_ARGUMENT", 400)       # ValueError: fix the request
    QUEUE_FULL = ("RESOURCE_EXHAUSTED", 429)  # QueueFullError: retry later
    UNAVAILABLE = ("UNAVAILABLE", 503)        # EngineDeadError: draining or dead; retry elsewhere
    INTERNAL = ("INTERNAL", 500)              # the engine failed the request

    @property
    def grpc_code(self) -> str:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]


def classify(exc: BaseException) -> ErrorKind:
    """The kind of a submission error; anything unexpected (a bug) is INTERNAL, never a
    dropped call."""
    if isinstance(exc, ValueError):
        return ErrorKind.INVALID
    if isinstance(exc, QueueFullError):
        return ErrorKind.QUEUE_FULL
    if isinstance(exc, EngineDeadError):
        return ErrorKind.UNAVAILABLE
    log.error("unexpected error submitting a request", exc_info=exc)
    return ErrorKind.INTERNAL
