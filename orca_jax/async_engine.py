"""Streaming API for servers: the engine loop runs in its own thread; asyncio callers submit
requests and read token deltas from an async iterator.

    engine = AsyncEngine(Engine.from_checkpoint(path)); engine.start()
    async for delta in engine.generate("Hello", SamplingParams(max_tokens=8)):
        print(delta.text, end="")          # the last delta has finished=True and usage

The engine itself is single-threaded: every call into it (add, abort, step) happens on the
loop thread. Callers hand it commands through a queue; results come back to each caller's
event loop with `call_soon_threadsafe`, once per iteration per event loop; a caller that falls
behind reads its queued deltas merged into one. Errors a user can act on (bad input, full queue) are
raised from `generate` before the first delta. If a step raises, every request in the engine
fails with FinishReason.ERROR, the engine is marked dead (`healthy()` is False) and later
submissions raise EngineDeadError: nothing hangs.

A step that never returns (a device wait on a collective whose peer process died or hung:
NCCL never returns) cannot be failed from the loop thread, which is inside it. With
`fail_when_stuck`, a watchdog thread does it: once one iteration has run `stuck_after_s`,
every in-flight and queued request fails with an error naming the stuck iteration, the
engine is marked dead and `stuck` says why, so that a server answers UNAVAILABLE / 503, its
health turns unhealthy and it exits for a restart. Without it (the library default) a stuck
iteration only makes `healthy()` false until it completes.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
import time
import traceback
from typing import AsyncIterator, Callable, Sequence

from .engine import Engine
from .request import FinishReason, RequestOutput, SamplingParams, Usage

log = logging.getLogger("orca_jax")


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (a step failed, or it was shut down)."""


def stuck_message(iteration: int, stuck_for_s: float, stuck_after_s: float) -> str:
    """What clients and health checks are told when an iteration never completes."""
    return (f"the engine is stuck: iteration {iteration} has run for {stuck_for_s:.1f} s, longer "
            f"than --stuck-after ({stuck_after_s:g} s); a device or a peer process of the mesh "
            "is hung or dead. The server is restarting; retry")


@dataclasses.dataclass(frozen=True)
class EngineSnapshot:
    """What /metrics and health checks read, updated by the loop every iteration."""

    num_waiting: int
    num_running: int
    kv_usage: float
    iterations: int
    last_iteration_time: float      # time.monotonic() of the last iteration (or of idling)
    batch_size: int                 # requests in the last iteration
    num_preemptions: int = 0        # requests preempted so far (on-demand KV admission)
    prefix_cache_queries: int = 0   # prompt tokens looked up in the prefix cache so far
    prefix_cache_hits: int = 0      # of them, tokens found cached
    num_swapped: int = 0            # preempted requests whose KV waits in host memory
    kv_pages_free: int = 0          # KV pages a new request could take (cached free ones included)
    kv_pages_total: int = 0


class AsyncEngine:
    def __init__(self, engine: Engine, stuck_after_s: float = 60.0, fail_when_stuck: bool = False):
        if stuck_after_s <= 0:
            raise ValueError(f"stuck_after_s must be > 0, got {stuck_after_s}")
        self.engine = engine  # touched by the loop thread only
        # What servers read about the model: fixed at start-up, safe from any thread.
        self.tokenizer, self.model_config = engine.tokenizer, engine.model_config
        self.max_len, self.num_slots, self.eos_token_id = engine.max_len, engine.num_slots, engine.eos_token_id
        self.kv_page_size = engine.kv.page_size
        self.stuck_after_s = stuck_after_s
        self.fail_when_stuck = fail_when_stuck
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        # Who waits on what; the loop and `_fail_outstanding` (any thread) share them, under
        # the lock: a request's final output goes out exactly once, from one or the other.
        self._lock = threading.Lock()
        self._sinks: dict[str, _Sink | Callable[[RequestOutput], None]] = {}
        self._queued: set[concurrent.futures.Future] = set()  # submissions not yet added
        self._failed_outside: list[str] = []  # ids failed while the loop was inside a step
        self._thread = threading.Thread(target=self._loop, name="orca-engine", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="orca-watchdog", daemon=True)
        self._stop = False
        self._accepting = True
        self.dead: str | None = None
        # Set with `dead` when the engine was failed from outside its loop: `broken` by `fail`
        # (a lost follower) or the watchdog, `stuck` by the watchdog only. No request is at
        # fault then: servers answer UNAVAILABLE / 503 (retry elsewhere), not INTERNAL / 500.
        self.broken: str | None = None
        self.stuck: str | None = None
        self.snapshot = EngineSnapshot(0, 0, 0.0, 0, time.monotonic(), 0)
        self._listeners: list[Callable[[RequestOutput], None]] = []
        self._iteration_listeners: list[Callable[[int, int], None]] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "AsyncEngine":
        self._thread.start()
        if self.fail_when_stuck:
            self._watchdog.start()
        return self

    def stop_accepting(self) -> None:
        """Drain: new submissions are refused, in-flight requests finish."""
        self._accepting = False

    def num_unfinished(self) -> int:
        return len(self._sinks)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def fail(self, error: str) -> None:
        """From any thread: the engine cannot go on (e.g. a follower process of its mesh died).
        Health turns false and every request in flight or queued fails with `error` now,
        even while the loop is inside a step that may never return (a collective with the
        dead peer); later submissions raise EngineDeadError."""
        self._fail_outstanding(error)
        self._wake.set()

    def loop_alive(self) -> bool:
        """Whether the loop thread still runs (after `shutdown`: it is inside a step that has
        not returned)."""
        return self._thread.is_alive()

    def healthy(self) -> bool:
        """False when the loop died, or has been inside one iteration for too long."""
        if self.dead is not None or not self._thread.is_alive():
            return False
        return time.monotonic() - self.snapshot.last_iteration_time < self.stuck_after_s

    def add_listener(self, fn: Callable[[RequestOutput], None]) -> None:
        """`fn(output)` is called on the loop thread for every final output (metrics)."""
        self._listeners.append(fn)

    def add_iteration_listener(self, fn: Callable[[int, int], None]) -> None:
        """`fn(batch_size, num_tokens)` is called on the loop thread after every iteration."""
        self._iteration_listeners.append(fn)

    # -- requests -------------------------------------------------------------------------------

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its deltas; cancelling the iteration aborts it."""
        deltas: asyncio.Queue[RequestOutput] = asyncio.Queue()
        submitted = self._submit(prompt, params, request_id, _Sink(asyncio.get_running_loop(), deltas))
        rid, finished = None, False
        try:
            rid = await asyncio.wrap_future(submitted)
            while not finished:
                out = await deltas.get()
                while not out.finished and not deltas.empty():  # the caller fell behind: one
                    out = merge_deltas(out, deltas.get_nowait())  # write, not one per token
                finished = out.finished
                yield out
        finally:
            if rid is None:  # cancelled while submitting: abort if the add went through
                submitted.add_done_callback(
                    lambda f: f.cancelled() or f.exception() or self.abort(f.result()))
            elif not finished:  # the consumer went away (cancel, disconnect, deadline)
                self.abort(rid)

    def _submit(self, prompt, params, request_id, sink) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # once queued, `_fail_outstanding` fails it if the engine dies first
            if self.dead is not None or not self._thread.is_alive():
                fut.set_exception(EngineDeadError(f"the engine is not running: {self.dead or 'not started'}"))
                return fut
            if not self._accepting:
                fut.set_exception(EngineDeadError("the server is shutting down"))
                return fut
            self._queued.add(fut)

        def add():
            with self._lock:
                if fut not in self._queued:  # failed meanwhile by `_fail_outstanding`
                    return
                self._queued.discard(fut)
                if not fut.set_running_or_notify_cancel():  # the caller gave up while queued
                    return
                if self.dead is not None or self._stop:
                    fut.set_exception(EngineDeadError(f"the engine is not running: {self.dead or 'shut down'}"))
                    return
                try:
                    req = self.engine.add_request(prompt, params, request_id)
                except Exception as e:  # ValueError / QueueFullError go back to the caller
                    fut.set_exception(e)
                    return
                self._sinks[req.request_id] = sink
            fut.set_result(req.request_id)  # outside the lock: it runs the caller's callbacks

        self._commands.put(add)
        self._wake.set()
        if not self._thread.is_alive():  # the loop ended meanwhile: `add` sees it and fails
            self._run_commands()
        return fut

    def prefix_cache_keys(self, limit: int) -> concurrent.futures.Future:
        """A future of the prefix cache's page keys (the `limit` most recently cached), copied
        on the engine thread between iterations (a global router's prefix affinity reads them)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def copy():
            keys = self.engine.scheduler.pool.cached
            fut.set_result(list(itertools.islice(reversed(keys), limit))[::-1])
        self._commands.put(copy)
        self._wake.set()
        if not self._thread.is_alive():
            self._run_commands()
        return fut

    def abort(self, request_id: str) -> None:
        """Abort from any thread; the slot is free for the next iteration."""
        def abort():
            out = self.engine.abort(request_id)
            if out is not None:
                self._emit(out)
        self._commands.put(abort)
        self._wake.set()

    # -- the loop -------------------------------------------------------------------------------

    def _emit(self, out: RequestOutput) -> None:
        with self._lock:  # the sink is called inside: no delta can follow a watchdog's final
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if sink is not None:
                sink(out)
        if out.finished:
            for fn in self._listeners:
                _call_safely(fn, out)

    def _emit_iteration(self, outs: Sequence[RequestOutput]) -> None:
        """One iteration's outputs, handed to each caller's event loop in one
        `call_soon_threadsafe` per loop (each call wakes that loop through its self-pipe:
        one per output cost ~10 us x running requests, every iteration)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:  # as `_emit`: no delta can follow a watchdog's final
            for out in outs:
                sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
                if isinstance(sink, _Sink):
                    batches.setdefault(sink.loop, []).append((sink.queue, out))
                elif sink is not None:
                    sink(out)
        for loop, items in batches.items():
            _call_soon(loop, _deliver, items)
        for out in outs:
            if out.finished:
                for fn in self._listeners:
                    _call_safely(fn, out)

    def _loop(self) -> None:
        eng = self.engine
        while not self._stop:
            if self.dead is not None:  # `fail` was called
                self._fail_all(self.dead)
                return
            self._run_commands()
            if not eng.has_unfinished():
                self._publish(0)
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                result = eng.step()
            except Exception as e:  # fail everyone, mark unhealthy, never hang
                self._fail_all(self.dead or f"{type(e).__name__}: {e}")  # `fail`'s reason first
                log.error("engine step failed:\n%s", traceback.format_exc())
                return
            self._emit_iteration(result)
            if result.batch_size:  # a step that only read back the last results launched none
                for fn in self._iteration_listeners:
                    _call_safely(fn, result.batch_size, result.num_tokens)
            self._publish(result.batch_size)
        self._fail_all("the engine was shut down")

    def _publish(self, batch_size: int) -> None:
        s = self.engine.scheduler
        self.snapshot = EngineSnapshot(len(s.waiting), len(s.running), s.kv_usage(),
                                       self.engine.stats.iterations, time.monotonic(), batch_size,
                                       s.num_preemptions, s.pool.queries, s.pool.hits, s.num_swapped,
                                       s.pool.num_free, s.pool.num_pages)

    def _fail_all(self, error: str) -> None:
        """On the loop thread: fail every request the engine holds, and free their slots."""
        with self._lock:
            self.dead = self.dead or error
            error = self.dead
            rids = list(self._sinks) + self._failed_outside  # the latter only to free their slots
            self._failed_outside = []
        for rid in rids:
            out = self.engine.abort(rid, FinishReason.ERROR, error)
            if out is None:
                out = RequestOutput(rid, [], "", True, FinishReason.ERROR, Usage(0, 0), error=error)
            self._emit(out)
        self._run_commands()  # submissions queued meanwhile now fail with EngineDeadError

    def _fail_outstanding(self, error: str) -> None:
        """From any thread, even while the loop is inside a step: mark the engine dead and
        fail every request waiting on it (streaming ones get a final ERROR output, queued
        submissions EngineDeadError). The loop, if it ever gets out of its step, frees their
        slots (`_fail_all`)."""
        with self._lock:
            if self.dead is None:
                self.dead = self.broken = error
            error = self.dead
            sinks, self._sinks = self._sinks, {}
            queued, self._queued = self._queued, set()
            self._failed_outside += list(sinks)
        for fut in queued:
            if fut.set_running_or_notify_cancel():  # False: its caller gave up already
                fut.set_exception(EngineDeadError(f"the engine is not running: {error}"))
        for rid, sink in sinks.items():
            sink(RequestOutput(rid, [], "", True, FinishReason.ERROR, Usage(0, 0), error=error))

    def _watch(self) -> None:
        """The watchdog (`fail_when_stuck`): fails everything once one iteration has run for
        `stuck_after_s`. It polls ten times per deadline (at most once a second), so requests
        fail within 1.1 x stuck_after_s."""
        poll_s = min(1.0, self.stuck_after_s / 10)
        while not self._stop and self.dead is None:
            time.sleep(poll_s)
            snap = self.snapshot
            stuck_for_s = time.monotonic() - snap.last_iteration_time
            if stuck_for_s >= self.stuck_after_s and self.dead is None and not self._stop:
                message = stuck_message(snap.iterations + 1, stuck_for_s, self.stuck_after_s)
                log.error("%s: failing every request", message)
                self._fail_outstanding(message)
                if self.broken == message:  # else the loop or `fail` was first
                    self.stuck = message

    def _run_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                cmd()
            except Exception:  # a command must never take the loop down with it
                log.error("engine command failed:\n%s", traceback.format_exc())


@dataclasses.dataclass(frozen=True)
class _Sink:
    """Where one request's outputs go: its caller's event loop and queue."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def __call__(self, out: RequestOutput) -> None:
        _call_soon(self.loop, self.queue.put_nowait, out)


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    """On a caller's event loop: an iteration's outputs into their requests' queues."""
    for q, out in items:
        q.put_nowait(out)


def merge_deltas(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive deltas of one request as one (tokens, text and logprobs in order; the
    rest, final fields included, from the later)."""
    logprobs = None if a.logprobs is None and b.logprobs is None else [*(a.logprobs or []), *(b.logprobs or [])]
    return dataclasses.replace(b, token_ids=[*a.token_ids, *b.token_ids], text=a.text + b.text,
                               logprobs=logprobs)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """`call_soon_threadsafe`, except that a caller whose event loop has closed meanwhile is
    skipped (it is no longer waiting) instead of raising on the engine's thread."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _call_safely(fn, *args) -> None:
    """Listeners (metrics) must never take the engine loop down."""
    try:
        fn(*args)
    except Exception:
        log.error("listener %r failed:\n%s", fn, traceback.format_exc())
