"""One request's outputs as an async iterator, safe to cancel at any point; error kinds.

`AsyncEngine.generate` submits through a `concurrent.futures.Future` that it awaits with
`asyncio.wrap_future`; the engine thread skips a submission whose future was cancelled while
queued (`set_running_or_notify_cancel`). `outputs()` still never lets a cancellation reach the
submission: it shields the first step and aborts by request id instead (or, if the first step
has not run yet, cancels it before it submits anything), so there is one way a request leaves.
Commands run on the engine thread in order, so the abort comes right after the submission and
the slot is freed within one iteration.
"""
from __future__ import annotations

import asyncio
import enum
from typing import AsyncIterator, Sequence

from ..async_engine import AsyncEngine, EngineDeadError
from ..request import RequestOutput, SamplingParams
from ..scheduler import QueueFullError


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


def classify(exc: BaseException) -> ErrorKind | None:
    """The kind of a submission error, or None for an unexpected exception (a bug)."""
    if isinstance(exc, ValueError):
        return ErrorKind.INVALID
    if isinstance(exc, QueueFullError):
        return ErrorKind.QUEUE_FULL
    if isinstance(exc, EngineDeadError):
        return ErrorKind.UNAVAILABLE
    return None


async def outputs(engine: AsyncEngine, prompt: Sequence[int], params: SamplingParams,
                  request_id: str) -> AsyncIterator[RequestOutput]:
    """The request's deltas (the last has finished=True). Submission errors (ValueError,
    QueueFullError, EngineDeadError) are raised by the first `__anext__`. Cancelling, or closing
    the iterator early, aborts the request."""
    gen = engine.generate(prompt, params, request_id)
    submitted = False

    async def first_output():
        nonlocal submitted
        submitted = True  # the first step of __anext__ submits, synchronously
        return await gen.__anext__()

    first = asyncio.ensure_future(first_output())
    try:
        out = await asyncio.shield(first)
    except asyncio.CancelledError:
        if not submitted:  # the task never ran: cancelling it submits nothing
            first.cancel()
        else:
            engine.abort(request_id)  # queued behind the submission: runs right after it
            first.add_done_callback(lambda f: _close(gen, f))
        raise
    try:
        yield out
        while not out.finished:
            out = await gen.__anext__()
            yield out
    finally:
        await gen.aclose()  # not finished: AsyncEngine.generate's finally aborts the request


def _close(gen, first: asyncio.Future) -> None:
    """After a cancelled first step completes: consume its result, close the generator."""
    if not first.cancelled():
        first.exception()  # a submission error nobody waits for any more: mark it retrieved
    asyncio.ensure_future(gen.aclose())
