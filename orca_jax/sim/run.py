"""The simulated engine: the real scheduler and KV page pool on a virtual clock.

It runs the engine's own loop (engine.py `Engine.step`), with the device replaced by the cost
model (cost.py) and sampled ids by fake ones:

    step():  arrivals up to now join the waiting queue          (bench/systems.py: the same)
             batch = scheduler.schedule()                       (the real Scheduler)
             launch: the batch enters the pipeline when stage 0 is free; its results are back
                     `latency` later (stages x stage time + hand-offs, cost.py)
             when more than `keep_in_flight` iterations are in flight (or nothing new was
             launched): wait for the oldest, then each of its sampling rows gives its request
             one token; a request finishes at its trace output length (EOS ignored)

`keep_in_flight` is the runner's: 1 (the host prepares N+1 while N runs) or n_stages - 1 besides
the one being launched, so with pipeline stages n_stages iterations are in flight (Orca §4.3),
each with different requests (the scheduler's rule). The static policy's finished requests are
held back until their whole batch is done (outputs.py `hold_finals`).

Each request leaves a `RequestRecord` (bench/metrics.py): the same per-request timeline a
measured run leaves, so `summarize` gives vLLM's metrics and Orca's normalized latency alike.
Nothing here sleeps or touches a device: a 10,000-request run takes seconds.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Mapping

from ..config import EngineConfig, scheduler_config
from ..kv_pages import PagePool
from ..plan import Buckets
from ..request import FinishReason, Request, SamplingParams
from ..scheduler import Batch, Scheduler
from ..bench.metrics import RequestRecord
from ..bench.workloads import Trace
from .cost import Efficiency, StepCost, step_work


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """One simulated engine: the engine's knobs, its KV memory and the device's cost."""

    engine: EngineConfig           # the same knobs as `serve` / `bench` (policy, max batch, KV admission)
    cost: StepCost                 # per-iteration work of the model on the mesh (cost.py)
    efficiency: Efficiency         # fitted or assumed share of the roofline, and fixed overhead
    num_pages: int                 # KV pages of the pool (per device, as the engine sizes them)
    max_len: int                   # longest prompt + output
    padded_attention: bool = False  # attention as XLA CPU computes it (cost.py step_work)


@dataclasses.dataclass(slots=True)
class _Flight:
    batch: Batch
    done_s: float            # when its sampled ids are back on the host
    sampling: list[Request]  # its sampling rows' requests, fixed at launch (plan.py `rows`)


@dataclasses.dataclass
class SimResult:
    """A simulated run: per-request timelines and what the engine's stats would say."""

    records: list[RequestRecord]
    info: dict
    iterations: list[tuple] = dataclasses.field(default_factory=list)  # (td, tp, seconds) if kept


def engine_parts(cfg: SimConfig, num_requests: int = 0) -> tuple[Scheduler, Buckets]:
    """The scheduler and buckets exactly as `Engine.__init__` sets them up, with the waiting
    queue fitted to the trace as `orca-jax bench` fits it (bench/run.py `engine_config`)."""
    ec, n_stages = cfg.engine, cfg.cost.stages
    ec = dataclasses.replace(ec, max_waiting=max(ec.max_waiting, num_requests))
    sched = scheduler_config(ec, ec.max_batch_size, n_stages)
    buckets = Buckets.make(sched.max_batch_size, sched.max_num_batched_tokens, sched.max_prefill_seqs)
    if ec.bucket_chunking:
        sched = dataclasses.replace(sched, prefill_buckets=buckets.prefill[1:])
    pool = PagePool(cfg.num_pages, ec.page_size, ec.enable_prefix_caching)
    return Scheduler(sched, ec.max_batch_size, cfg.max_len, pool), buckets


class Simulator:
    """One engine on a virtual clock, run over a trace (`run`)."""

    def __init__(self, cfg: SimConfig, max_tokens: int | None = None, keep_iterations: bool = False):
        """`max_tokens`: what every request asks for (at least its output length; reserve
        admission reserves it), as `orca-jax bench --max-tokens`; it stops at its output length."""
        self.cfg, self.max_tokens, self.keep_iterations = cfg, max_tokens, keep_iterations
        self.keep_in_flight = max(1, cfg.cost.stages - 1)   # runner.py ModelRunner.keep_in_flight

    def iteration_s(self, batch: Batch, buckets: Buckets) -> tuple[float, float, tuple[int, int]]:
        """(seconds between launches, seconds until results are back, (Td, Tp)) of a batch."""
        cfg = self.cfg
        w = step_work(batch, buckets, cfg.engine.page_size, cfg.padded_attention)
        stage, hand = cfg.cost.stage_s(w, cfg.efficiency), cfg.cost.handoff_s(w)
        n = cfg.cost.stages
        tp = Buckets.pick(sum(c.length for c in batch.prefills), buckets.prefill)
        return stage + hand, n * stage + (n - 1) * hand, (w.rows - tp, tp)

    def run(self, trace: Trace) -> SimResult:
        sched, buckets = engine_parts(self.cfg, len(trace))
        static = self.cfg.engine.policy == "static"
        order = sorted(range(len(trace)), key=lambda i: (trace.requests[i].arrival_s, i))
        records = [RequestRecord(r.arrival_s, r.prompt_len) for r in trace.requests]
        index: dict[int, int] = {}          # id(Request) -> trace index
        in_flight: collections.deque[_Flight] = collections.deque()
        held: list[int] = []                # static: finished, returned with the whole batch
        t = stage0_free = 0.0
        i = iters = batch_sum = batch_max = tokens = padded = 0
        shapes = []
        while i < len(order) or sched.has_work() or in_flight:
            if not sched.has_work() and not in_flight and trace.requests[order[i]].arrival_s > t:
                t = trace.requests[order[i]].arrival_s          # idle: skip to the next arrival
            while i < len(order) and trace.requests[order[i]].arrival_s <= t:
                self._add(sched, trace, order[i], index)
                i += 1
            batch = sched.schedule()
            if batch:
                interval, latency, shape = self.iteration_s(batch, buckets)
                start = max(t, stage0_free)
                stage0_free = start + interval
                sampling = batch.decodes + [c.request for c in batch.prefills if c.completes_prompt]
                in_flight.append(_Flight(batch, start + latency, sampling))
                size = len(batch.decodes) + len(batch.prefills)
                iters, batch_sum, batch_max = iters + 1, batch_sum + size, max(batch_max, size)
                tokens, padded = tokens + batch.num_tokens, padded + sum(shape)
                if self.keep_iterations:
                    shapes.append((*shape, latency))
            if len(in_flight) > self.keep_in_flight or (in_flight and not batch):
                f = in_flight.popleft()
                t = max(t, f.done_s)
                self._process(sched, f, t, trace, records, index, held, static)
            if static and held and not sched.running:
                for k in held:
                    records[k].add(t, 1)
                held.clear()
        info = {"iterations": iters, "mean_batch_size": batch_sum / iters if iters else 0.0,
                "max_batch_size_seen": batch_max,
                "tokens": tokens, "padded_tokens": padded, "preemptions": sched.num_preemptions,
                "kv_pages": self.cfg.num_pages, "simulated_s": t}
        return SimResult(records, info, shapes)

    def _add(self, sched: Scheduler, trace: Trace, k: int, index: dict) -> None:
        r = trace.requests[k]
        params = SamplingParams(max_tokens=max(r.output_len, self.max_tokens or 0), temperature=0.0,
                                ignore_eos=True)
        req = Request(request_id=str(k), prompt_ids=list(r.prompt_ids), params=params, seed=k,
                      arrival_time=r.arrival_s)
        sched.add(req)
        index[id(req)] = k

    @staticmethod
    def _process(sched: Scheduler, f: _Flight, t: float, trace: Trace, records: list[RequestRecord],
                 index: Mapping[int, int], held: list[int], static: bool) -> None:
        """An iteration's results are back at `t`: every sampling row gives its request a token
        (fake id 0); a request that reaches its output length finishes (its "EOS")."""
        sched.iteration_done(f.batch)
        for req in f.sampling:
            if req.finished:
                continue
            req.output_ids.append(0)
            k = index[id(req)]
            done = len(req.output_ids) >= trace.requests[k].output_len
            if done and static:
                held.append(k)       # its last token returns with the whole batch
            else:
                records[k].add(t, 1)
            if done:
                sched.finish(req, FinishReason.LENGTH)
