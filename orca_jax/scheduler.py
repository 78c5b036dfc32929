"""Orca's iteration-level scheduler (Yu et al., OSDI'22, Algorithm 1), host side, no JAX.

`schedule()` picks the work of ONE iteration:

1. requests already running, in arrival (FCFS) order: every decode request gets one token;
   a request still in prefill gets the next chunk of its prompt, within the token budget;
2. then waiting requests, FCFS, while the batch has fewer than `max_batch_size` requests,
   a KV slot is free (Orca reserves prompt + max_tokens up front, so a running request never
   runs out of KV memory), and the token budget has room. The first waiting request that does
   not fit stops admission: no overtaking.

A request joins the batch the iteration after it arrives and leaves it (`finish`) the
iteration it finishes. The `static` policy is the paper's baseline (FasterTransformer-style
request-level batching): a new batch of up to `max_batch_size` requests is formed only when the
previous one has completely finished; its prompts are prefilled within the token budget over
as many iterations as they need.

Pipelines (Orca §4.3): with `n_stages` > 1 iterations in flight, a request in one of them is
skipped until `iteration_done()` reports that iteration's results back, so each iteration in
flight has different requests and the stages work on them at once; each iteration takes at
most 1/n_stages of the running and waiting requests, so the groups stay balanced. With one
stage the engine still dispatches iteration N+1 before reading N back, and N+1 may hold the same requests: their
next input token is read on device.

Chunked prefill keeps the step shapes bounded: at most one request per iteration can be
stopped mid-prompt by the budget, so at most one prefill segment per step continues a prompt
that is already partly in its slot (what the attention kernel's history path expects).
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
from typing import Literal

from .request import FinishReason, Request, Status


class QueueFullError(RuntimeError):
    """The waiting queue is full: retry later (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Iteration-level scheduling knobs."""

    max_batch_size: int = 64             # requests in one iteration at most (Orca's max_bs)
    max_num_batched_tokens: int = 512    # token budget per iteration (decode + prefill chunks)
    max_prefill_seqs: int = 16           # prompt segments per iteration at most
    max_waiting: int = 1024              # waiting queue bound; beyond it add() raises QueueFullError
    policy: Literal["iteration", "static"] = "iteration"  # static = request-level baseline
    n_stages: int = 1                   # iterations in flight (pipeline stages); > 1: a request
                                         # is not scheduled again until its result is back

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError("max_num_batched_tokens must be >= max_batch_size so every running "
                             f"request can decode each iteration ({self.max_num_batched_tokens} < "
                             f"{self.max_batch_size})")
        if not 1 <= self.max_prefill_seqs <= self.max_batch_size:
            raise ValueError(f"max_prefill_seqs must be in [1, max_batch_size], got {self.max_prefill_seqs}")
        if self.max_waiting < 1:  # every request waits at least until the next schedule()
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if self.n_stages < 1:
            raise ValueError(f"n_stages must be >= 1, got {self.n_stages}")
        if self.policy not in ("iteration", "static"):
            raise ValueError(f"policy must be 'iteration' or 'static', got {self.policy!r}")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Prompt positions [start, start + length) of `request`, computed this iteration."""

    request: Request
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        """The last chunk of a prompt samples the request's first token."""
        return self.start + self.length == self.request.prompt_len


@dataclasses.dataclass(frozen=True)
class Batch:
    """One iteration's work: decode requests (one token each), then prompt chunks."""

    decodes: list[Request]
    prefills: list[Chunk]

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.length for c in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)

    def requests(self) -> list[Request]:
        return self.decodes + [c.request for c in self.prefills]


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_slots: int, max_len: int):
        self.config = config
        self.max_len = max_len
        self.num_slots = num_slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []          # in admission (= arrival) order
        self._free_slots = list(range(num_slots))  # min-heap: lowest slot first
        heapq.heapify(self._free_slots)

    # -- requests in and out ---------------------------------------------------------------

    def add(self, req: Request) -> None:
        """Queue a request; raises ValueError if it can never fit, QueueFullError if full."""
        if req.prompt_len == 0:
            raise ValueError("prompt is empty: give at least one token")
        if req.prompt_len >= self.max_len:
            raise ValueError(f"prompt is {req.prompt_len} tokens; the maximum context length is "
                             f"{self.max_len} tokens, which leaves no room for a new token")
        if req.max_total_len > self.max_len:
            raise ValueError(f"max_tokens={req.params.max_tokens} with a {req.prompt_len}-token prompt "
                             f"needs {req.max_total_len} tokens, over the maximum context length of "
                             f"{self.max_len}; lower max_tokens to at most {self.max_len - req.prompt_len}")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests); retry later")
        self.waiting.append(req)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Remove `req` from the batch (finished, aborted or failed) and free its slot."""
        if req.status is Status.FINISHED:
            return
        if req.status is Status.RUNNING:
            self.running.remove(req)
            heapq.heappush(self._free_slots, req.slot)
        else:
            self.waiting.remove(req)
        req.status, req.finish_reason = Status.FINISHED, reason

    # -- Algorithm 1 -------------------------------------------------------------------------

    def schedule(self) -> Batch:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        ready = [r for r in self.running if not (cfg.n_stages > 1 and r.in_flight)]
        # With several iterations in flight, each takes its share of the requests, so that
        # every stage has work (one iteration holding everyone would leave the others idle).
        cap = cfg.max_batch_size
        if cfg.n_stages > 1:
            cap = max(1, -(-(len(self.running) + len(self.waiting)) // cfg.n_stages))
        decodes = [r for r in ready if not r.in_prefill and self._wants_token(r)][:cap]
        budget -= len(decodes)
        prefills: list[Chunk] = []
        # At most one prompt may be cut by the budget at a time (the attention kernel reads one
        # continuing chunk per step); with iterations in flight it may not be ready, so a chunk
        # that would leave a second prompt unfinished waits instead.
        cut = {r for r in self.running if 0 < r.num_scheduled < r.prompt_len}

        def may_cut(req: Request, length: int) -> bool:
            return req.num_scheduled + length == req.prompt_len or not (cut - {req})

        def add_chunk(req: Request, length: int) -> None:
            nonlocal budget
            prefills.append(Chunk(req, req.num_scheduled, length))
            budget -= length
            (cut.discard if req.num_scheduled + length == req.prompt_len else cut.add)(req)

        for req in ready:  # a prompt started in an earlier iteration goes on first
            length = min(req.prompt_len - req.num_scheduled, budget)
            if (req.in_prefill and budget > 0 and len(prefills) < cfg.max_prefill_seqs
                    and (req in cut or len(decodes) + len(prefills) < cap) and may_cut(req, length)):
                add_chunk(req, length)
        # Static batching forms a whole batch at once, even if its prompts take several
        # iterations to prefill; iteration-level scheduling admits only what it runs now.
        static = cfg.policy == "static"
        admit = not static or not self.running
        while (admit and self.waiting and self._free_slots and len(self.running) < cfg.max_batch_size
               and (static or (budget > 0 and len(prefills) < cfg.max_prefill_seqs
                               and len(decodes) + len(prefills) < cap))):
            if not static and not may_cut(self.waiting[0], min(self.waiting[0].prompt_len, budget)):
                break  # FCFS: no overtaking of a prompt that waits for the cut one
            req = self.waiting.popleft()
            req.status, req.slot = Status.RUNNING, heapq.heappop(self._free_slots)
            self.running.append(req)
            if budget > 0 and len(prefills) < cfg.max_prefill_seqs:
                add_chunk(req, min(req.prompt_len, budget))
        for req in decodes:
            req.num_scheduled += 1
            req.in_flight += 1
        for c in prefills:
            c.request.num_scheduled += c.length
            c.request.in_flight += 1
        return Batch(decodes, prefills)

    def iteration_done(self, batch: Batch) -> None:
        """The results of `batch` are back on the host: its requests may be scheduled again."""
        for req in batch.requests():
            req.in_flight -= 1

    def _wants_token(self, req: Request) -> bool:
        """A decode row feeds the last sampled token and samples the next; stop once every
        one of max_tokens is scheduled (results of in-flight iterations may still be pending)."""
        sampled_scheduled = req.num_scheduled - req.prompt_len + 1
        return sampled_scheduled < req.params.max_tokens

    # -- introspection (metrics, admission tests) ---------------------------------------------

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def kv_usage(self) -> float:
        """Fraction of KV slots reserved by running requests."""
        return 1.0 - len(self._free_slots) / self.num_slots

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
