"""Orca's iteration-level scheduler (Yu et al., OSDI'22, Algorithm 1), host side, no JAX.

`schedule()` picks the work of ONE iteration:

1. requests already running, in arrival (FCFS) order: every decode request gets one token;
   a request still in prefill gets the next chunk of its prompt, within the token budget;
2. then waiting requests, FCFS, while the batch has fewer than `max_batch_size` requests and
   the token budget has room, if the KV pages they need are free (kv_pages.py). The first
   waiting request that does not fit stops admission: no overtaking.

KV admission (`kv_admission`):
* `reserve` (Orca's): a request is admitted only when pages for prompt + max_tokens are free,
  taken at once; a running request never runs out of KV memory and is never preempted.
* `on-demand` (vLLM's): a request takes pages as its tokens are scheduled. When a running
  request needs a page and none is free, the most recently admitted request is preempted
  (possibly itself): its pages are freed and it goes back to the front of the queue, to
  resume by recomputing its prompt and outputs as one prefill, so it makes exactly the tokens
  it would have made. Admission keeps a 1% watermark of pages free for running requests.

Prefix caching: on admission a prompt's leading full pages that are cached (kv_pages.py) are
taken as they are and skip prefill; each page a request fills is offered to the cache.

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

Chunked prefill keeps the step shapes bounded: a prompt longer than the budget is computed over
several iterations; every prefill segment may continue a prompt whose first positions are
already in its pages (an earlier chunk, or a cached prefix): attention reads them there.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import time
from typing import Literal

from .kv_pages import PagePool, SwapSpace, chain_hashes, pages_for, watermark_pages
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
    kv_admission: Literal["on-demand", "reserve"] = "on-demand"  # reserve: Orca's, never preempts
    prefill_buckets: tuple[int, ...] = ()  # prefill row counts a step is padded to (plan.Buckets)

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
        if self.kv_admission not in ("on-demand", "reserve"):
            raise ValueError(f"kv_admission must be 'on-demand' or 'reserve', got {self.kv_admission!r}")
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
        """The last chunk of a prefill samples the request's next token (its first, or after
        a preemption the one after its recomputed outputs)."""
        return self.start + self.length == self.request.prefill_len


@dataclasses.dataclass(frozen=True)
class Batch:
    """One iteration's work: decode requests (one token each), then prompt chunks."""

    decodes: list[Request]
    prefills: list[Chunk]
    # KV copies to run before the step (in this order): pages of preempted requests to host
    # memory, and of resumed ones back into their new pages (swap space on).
    swap_out: list[tuple[Request, list[int]]] = dataclasses.field(default_factory=list)
    swap_in: list[Request] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.length for c in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)

    def requests(self) -> list[Request]:
        return self.decodes + [c.request for c in self.prefills]


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_slots: int, max_len: int, pool: PagePool,
                 swap: SwapSpace | None = None):
        """`num_slots`: rows of the device's per-sequence state (at most this many requests
        run); `pool`: the KV pages; `swap`: the host-memory tier, if any (kv_pages.py)."""
        self.config = config
        self.max_len = max_len
        self.num_slots = num_slots
        self.pool, self.swap = pool, swap
        self.page_size = pool.page_size
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []          # in admission order
        self._free_slots = list(range(num_slots))  # min-heap: lowest slot first
        heapq.heapify(self._free_slots)
        self.num_preemptions = 0
        self.num_swapped_out = 0   # preemptions that swapped to host memory (the rest recompute)
        self.num_swapped = 0       # waiting requests whose KV is in host memory now
        # On demand, admission leaves this many pages free for the running requests to grow
        # into (vLLM's 1% watermark), so a new request does not cause a preemption at once.
        self.watermark = 0 if config.kv_admission == "reserve" else watermark_pages(pool.num_pages)

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
        pages = pages_for(req.max_total_len - 1, self.page_size)
        if pages > self.pool.num_pages:
            raise ValueError(f"prompt + max_tokens needs {pages} KV pages of {self.page_size} tokens, "
                             f"more than the {self.pool.num_pages} the KV memory holds; lower "
                             "max_tokens or give the engine more KV memory")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests); retry later")
        self.waiting.append(req)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Remove `req` from the batch (finished, aborted or failed); free its slot and pages."""
        if req.status is Status.FINISHED:
            return
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self._release(req)
        else:
            self.waiting.remove(req)
            self._drop_swapped(req)
        req.status, req.finish_reason = Status.FINISHED, reason

    def _drop_swapped(self, req: Request) -> None:
        if req.num_swapped_pages:
            self.swap.give_back(req.num_swapped_pages)
            self.num_swapped -= 1
            req.swapped, req.num_swapped_pages = None, 0

    def _release(self, req: Request) -> None:
        heapq.heappush(self._free_slots, req.slot)
        self.pool.free(req.pages)
        req.slot, req.pages, req.num_registered = None, [], 0

    # -- Algorithm 1 -------------------------------------------------------------------------

    def schedule(self) -> Batch:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        # With several iterations in flight, each takes its share of the requests, so that
        # every stage has work (one iteration holding everyone would leave the others idle).
        cap = cfg.max_batch_size
        if cfg.n_stages > 1:
            cap = max(1, -(-(len(self.running) + len(self.waiting)) // cfg.n_stages))
        # A request whose last token is still on the device waits: with pipeline stages (it is
        # in an earlier stage's batch), or with a grammar once it samples (its next mask needs
        # that token; its prompt's chunks go on meanwhile).
        staged = cfg.n_stages > 1
        ready = [r for r in self.running if not (r.in_flight and (
            staged or (r.matcher is not None and r.num_scheduled >= r.prefill_len)))]
        batch = Batch([], [])
        decodes, B, RUNNING = batch.decodes, self.page_size, Status.RUNNING
        for req in ready:  # decode rows first, FCFS (this loop runs for every running request)
            if len(decodes) >= cap:
                break
            n = req.num_scheduled
            # A decode row feeds the last sampled token and samples the next: none once every
            # one of max_tokens is scheduled (results of in-flight iterations may be pending).
            if (req.status is not RUNNING or n < req.prefill_len
                    or n - req.prompt_len + 1 >= req.params.max_tokens):
                continue
            # Inline `_grow(req, 1)` while its pages hold position n (most iterations).
            if n < len(req.pages) * B or self._grow(req, 1, batch):
                decodes.append(req)
        budget -= len(decodes)
        for req in ready:  # then prompts started earlier (chunked, or resumed after a preemption)
            if req.num_scheduled >= req.prefill_len:  # decoding (the cheap test first)
                continue
            length = min(req.prefill_len - req.num_scheduled, budget)
            if (req.status is RUNNING and budget > 0
                    and len(batch.prefills) < cfg.max_prefill_seqs
                    and len(batch.decodes) + len(batch.prefills) < cap and self._grow(req, length, batch)):
                batch.prefills.append(Chunk(req, req.num_scheduled, length))
                budget -= length
        # Static batching forms a whole batch at once, even if its prompts take several
        # iterations to prefill; iteration-level scheduling admits only what it runs now.
        static = cfg.policy == "static"
        admit = not static or not self.running
        while (admit and self.waiting and self._free_slots and len(self.running) < cfg.max_batch_size
               and (static or (budget > 0 and len(batch.prefills) < cfg.max_prefill_seqs
                               and len(batch.decodes) + len(batch.prefills) < cap))):
            req = self.waiting[0]
            chunk = budget if budget > 0 and len(batch.prefills) < cfg.max_prefill_seqs else 0
            length = self._admit(req, chunk, batch)
            if length is None:
                break  # FCFS: no overtaking of a request that does not fit yet
            if length:
                batch.prefills.append(Chunk(req, req.num_scheduled, length))
                budget -= length
        if not static:
            self._fit_prefill_bucket(batch)
        for req in batch.decodes:
            req.num_scheduled += 1
            req.in_flight += 1
        for c in batch.prefills:
            c.request.num_scheduled += c.length
            c.request.in_flight += 1
        return batch

    def _fit_prefill_bucket(self, batch: Batch) -> None:
        """Bucket-aware chunking: a step's prefill rows are padded up to the next bucket
        (plan.py `Buckets`: 16, 64, 256, 512, ...). When they pass a bucket by less than the
        padding up to the next one would add, cut the last chunks back to that bucket; the
        rest runs next iteration. A lone 272-token prompt takes 256 rows now and 16 next, not
        512 rows of work with every decoding stream waiting on it. A chunk cut to nothing
        leaves its request admitted, with its pages, to continue next iteration."""
        n = sum(c.length for c in batch.prefills)
        above = next((b for b in self.config.prefill_buckets if b >= n), None)
        below = max((b for b in self.config.prefill_buckets if b < n), default=0)
        if above is None or not below or above - n <= n - below:
            return
        excess = n - below
        while excess:
            last = batch.prefills[-1]
            cut = min(excess, last.length)
            excess -= cut
            if cut == last.length:
                batch.prefills.pop()
            else:
                batch.prefills[-1] = Chunk(last.request, last.start, last.length - cut)
            req = last.request
            if self.config.kv_admission == "on-demand":  # give back the pages of the cut positions
                keep = pages_for(last.start + last.length - cut, self.page_size)
                self.pool.free(req.pages[keep:])
                del req.pages[keep:]

    def launched(self, batch: Batch) -> None:
        """`batch` was dispatched (its requests' KV will be in their pages before any later
        step reads them): offer the prefix cache the full pages it fills. Not earlier: a
        request dropped from the batch while it was prepared never fills them."""
        if self.pool.enable_prefix_caching:
            B = self.page_size
            for req in batch.requests():
                if req.num_scheduled // B > req.num_registered:  # a page filled (cheap check first)
                    self._offer_full_pages(req)

    def _admit(self, req: Request, budget: int, batch: Batch) -> int | None:
        """Move the first waiting request into the batch with the pages it needs now (its
        cached prefix, then fresh pages: for its first chunk of at most `budget` tokens, or,
        reserving, for prompt + max_tokens). Returns the chunk's length, or None (nothing
        changed) when its pages are not free or its previous iteration is still in flight."""
        if req.in_flight:  # preempted while in flight: its last token is not back yet
            return None
        if req.num_swapped_pages:
            return self._swap_in(req, batch)
        B = self.page_size
        n_ids = req.prompt_len + len(req.output_ids)  # a resumed request recomputes its outputs
        hashes = []
        if self.pool.enable_prefix_caching:
            req.page_hashes = chain_hashes(req.token_ids(0, n_ids), B, req.page_hashes)
            # Its last token is always computed (it samples), so a page holding it is not a hit.
            hashes = req.page_hashes[:(n_ids - 1) // B]
        hit = self.pool.num_cached(hashes)
        start = hit * B
        length = min(n_ids - start, budget)
        end = req.max_total_len - 1 if self.config.kv_admission == "reserve" else start + length
        need = pages_for(end, B) - hit
        if need + (self.watermark if self.running else 0) > self.pool.num_free - self.pool.num_cached_free(hashes[:hit]):
            return None
        self.waiting.popleft()
        if not req.num_preemptions:  # a resumed request finding its own pages is not a hit
            self.pool.count_query(n_ids, start)
        req.pages = self.pool.acquire(hashes[:hit]) + self.pool.allocate(need)
        req.status, req.slot = Status.RUNNING, heapq.heappop(self._free_slots)
        if req.first_scheduled_time is None:  # not reset when a preempted request resumes
            req.first_scheduled_time = time.monotonic()
        req.prefill_len, req.num_scheduled = n_ids, start
        req.num_cached_tokens, req.num_registered = start, hit
        self.running.append(req)
        return length

    def _swap_in(self, req: Request, batch: Batch) -> int | None:
        """Admit a swapped-out request into fresh pages (its KV is copied back before the
        step): it decodes again from the next iteration, no prefill."""
        n = req.num_swapped_pages
        if n + (self.watermark if self.running else 0) > self.pool.num_free:
            return None
        self.waiting.popleft()
        req.pages = self.pool.allocate(n)
        req.status, req.slot = Status.RUNNING, heapq.heappop(self._free_slots)
        self.swap.give_back(n)
        self.num_swapped -= 1
        req.num_swapped_pages = 0
        batch.swap_in.append(req)
        self.running.append(req)
        return 0

    def _grow(self, req: Request, n: int, batch: Batch) -> bool:
        """Give `req` the pages for `n` more positions, preempting the most recently admitted
        requests while the pool is short. False if `req` itself had to be preempted."""
        need = pages_for(req.num_scheduled + n, self.page_size) - len(req.pages)
        while need > self.pool.num_free:
            victim = self.running[-1]
            self._preempt(victim, batch)
            if victim is req:
                return False
        if need > 0:
            req.pages += self.pool.allocate(need)
        return True

    def _preempt(self, req: Request, batch: Batch) -> None:
        """Back to the front of the queue without its pages: it resumes with the tokens it
        would have made, either by recomputing its prompt and outputs (cached pages of them are
        reused) or, with swap space, from a copy of its pages in host memory, whichever the
        swap space's cost model finds cheaper."""
        assert self.config.kv_admission != "reserve", "reserved requests are never preempted"
        swap = self.swap is not None and self.swap.should_swap(len(req.pages), req.num_scheduled)
        if swap:
            batch.swap_out.append((req, list(req.pages)))
            self.swap.take(len(req.pages))
            req.num_swapped_pages = len(req.pages)
            self.num_swapped_out += 1
            self.num_swapped += 1
        self.running.remove(req)
        self._release(req)
        if req in batch.decodes:
            batch.decodes.remove(req)
        batch.prefills[:] = [c for c in batch.prefills if c.request is not req]
        req.status = Status.WAITING
        if not swap:
            req.num_scheduled = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _offer_full_pages(self, req: Request) -> None:
        """Offer the prefix cache each page of `req` that this iteration fills and whose tokens
        the host knows (a decode row's input token may still be on the device)."""
        B = self.page_size
        n_full = min(req.num_scheduled, req.prompt_len + len(req.output_ids)) // B
        if n_full > req.num_registered:
            req.page_hashes = chain_hashes(req.token_ids(0, n_full * B), B, req.page_hashes)
            for i in range(req.num_registered, n_full):
                self.pool.register(req.pages[i], req.page_hashes[i])
            req.num_registered = n_full

    def iteration_done(self, batch: Batch) -> None:
        """The results of `batch` are back on the host: its requests may be scheduled again."""
        for req in batch.requests():
            req.in_flight -= 1

    # -- introspection (metrics, admission tests) ---------------------------------------------

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def swap_used_pages(self) -> int:
        """Pages of KV held in the host tier."""
        return self.swap.used if self.swap is not None else 0

    def kv_usage(self) -> float:
        """Fraction of KV pages held by running requests."""
        return self.pool.usage()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
