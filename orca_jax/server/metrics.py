"""Prometheus metrics for GET /metrics, named like vLLM's (V1) so its dashboards and routers work.

    vllm:num_requests_waiting / _running   gauges, from the engine snapshot at scrape time
    vllm:kv_cache_usage_perc               gauge, fraction (0..1) of KV pages in use
    vllm:gpu_cache_usage_perc              the same, under vLLM's older (v0) name
    vllm:num_preemptions_total             counter: requests preempted (KV pages ran out)
    vllm:prefix_cache_queries_total / _hits_total   counters, prompt tokens (docs/kv-cache.md)
    orca_jax:num_requests_swapped          gauge: preempted requests with KV in host memory
    vllm:time_to_first_token_seconds       histogram per request (arrival -> first token)
    vllm:inter_token_latency_seconds       histogram: one observation per gap between two
                                           consecutive output tokens of a request
    vllm:time_per_output_token_seconds     the same observations under vLLM's deprecated name
    vllm:request_time_per_output_token_seconds   histogram per finished request: its mean gap
                                           (first -> last token over tokens - 1; 0 for one token)
    vllm:e2e_request_latency_seconds       histogram per finished request (arrival -> finish)
    vllm:request_queue_time_seconds        ... arrival -> first scheduled (waiting)
    vllm:request_prefill_time_seconds      ... first scheduled -> first token
    vllm:request_decode_time_seconds       ... first token -> finish
    vllm:request_inference_time_seconds    ... first scheduled -> finish (prefill + decode)
    vllm:request_prompt_tokens / _generation_tokens   histograms per finished request
    vllm:prompt_tokens_total / vllm:generation_tokens_total   counters
    vllm:request_success_total{finished_reason}        counter (stop, length, abort, error)
    vllm:iteration_tokens_total            histogram: tokens each engine iteration computed
                                           (prompt chunks + decode tokens)
    orca_jax:iteration_batch_size          histogram: requests in each engine iteration (Orca's
                                           batch; vLLM has no per-iteration request count)
    orca_jax:engine_healthy                gauge: 1 while the engine loop is alive and moving
    process_* / python_*                   prometheus_client's process, platform and GC collectors

Every series of ours carries `model_name` and `engine` like vLLM's (`engine="0"`: a server has
one engine). The per-request histograms observe requests that finished normally (stop, length);
the phases split the e2e latency exactly (queue + prefill + decode = e2e), with preemptions
inside the phase they interrupted, as vLLM counts them. Inter-token gaps are measured where the
server reads each request's deltas (`Server.outputs`): tokens a lagging reader receives in one
merged delta share its gap evenly, so every request adds exactly tokens - 1 observations.
Buckets are vLLM's (vllm/v1/metrics/loggers.py). Each server owns its registry (no
process-wide global), so several servers in one process (tests) do not collide.
"""
from __future__ import annotations

import logging

from prometheus_client import (CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..async_engine import AsyncEngine
from ..request import FinishReason, RequestOutput

log = logging.getLogger("orca_jax.server")

LABELS = ("model_name", "engine")
ENGINE = "0"  # vLLM's `engine` label value for its only engine core; a server here has one

# vLLM's bucket edges (vllm/v1/metrics/loggers.py), so histograms line up on shared dashboards.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)   # inter-token and per-request time per token
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # e2e and phases
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def buckets_1_2_5(limit: int) -> list[int]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to `limit`."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(m * scale)
        scale *= 10


def _powers_of_two(limit: int) -> list[float]:
    out, b = [], 1
    while b < limit:
        out.append(float(b))
        b *= 2
    return out + [float(limit)]


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str, max_model_len: int):
        self.engine = engine
        self.model_name = model_name
        self.registry = reg = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=reg)

        def hist(name, doc, buckets):
            return Histogram(name, doc, LABELS, buckets=buckets, registry=reg).labels(model_name, ENGINE)

        def counter(name, doc):
            return Counter(name, doc, LABELS, registry=reg).labels(model_name, ENGINE)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", TPOT_BUCKETS)
        self.tpot = hist("vllm:time_per_output_token_seconds", "Time per output token in seconds. "
                         "DEPRECATED: use vllm:inter_token_latency_seconds (the same observations).",
                         TPOT_BUCKETS)
        self.req_tpot = hist("vllm:request_time_per_output_token_seconds",
                             "Mean time per output token of each finished request in seconds.", TPOT_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end latency of finished requests "
                        "in seconds.", REQUEST_LATENCY_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds", "Time spent in WAITING phase for request.",
                          REQUEST_LATENCY_BUCKETS)
        self.prefill = hist("vllm:request_prefill_time_seconds", "Time spent in PREFILL phase for "
                            "request.", REQUEST_LATENCY_BUCKETS)
        self.decode = hist("vllm:request_decode_time_seconds", "Time spent in DECODE phase for request.",
                           REQUEST_LATENCY_BUCKETS)
        self.inference = hist("vllm:request_inference_time_seconds", "Time spent in RUNNING phase for "
                              "request.", REQUEST_LATENCY_BUCKETS)
        self.req_prompt = hist("vllm:request_prompt_tokens", "Prompt tokens per finished request.",
                               buckets_1_2_5(max_model_len))
        self.req_gen = hist("vllm:request_generation_tokens", "Generated tokens per finished request.",
                            buckets_1_2_5(max_model_len))
        self.iteration_tokens = hist("vllm:iteration_tokens_total", "Tokens computed in each engine "
                                     "iteration.", ITERATION_TOKENS_BUCKETS)
        self.batch = hist("orca_jax:iteration_batch_size", "Requests in each engine iteration.",
                          _powers_of_two(engine.num_slots))
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed.")
        self.gen_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.success = Counter("vllm:request_success", "Requests finished, by finish reason.",
                               LABELS + ("finished_reason",), registry=reg)
        for reason in FinishReason:  # export zeros so rate() works from the first scrape
            self.success.labels(model_name, ENGINE, reason.value)
        reg.register(_EngineGauges(self))
        engine.add_listener(self._on_finished)
        engine.add_iteration_listener(self._on_iteration)

    def _on_iteration(self, batch_size: int, num_tokens: int) -> None:
        """Runs on the engine thread after every iteration that computed something."""
        self.batch.observe(batch_size)
        self.iteration_tokens.observe(num_tokens)

    def observe_delta(self, num_tokens: int, now: float, last: float | None) -> float | None:
        """A delta of `num_tokens` tokens read at `now`, the request's previous token at `last`
        (None: these are its first): one inter-token observation per gap, the delta's gap
        shared evenly by its tokens. Returns when the request's latest token was read."""
        if num_tokens == 0:
            return last
        gaps = num_tokens if last is not None else num_tokens - 1  # none before the first token
        gap = (now - last) / gaps if last is not None else 0.0     # merged first tokens: no gap
        for _ in range(gaps):
            self.itl.observe(gap)
            self.tpot.observe(gap)
        return now

    def _on_finished(self, out: RequestOutput) -> None:
        """Runs on the engine thread for every final output: cheap, and never raises (an
        exception here would escape into the engine loop)."""
        try:
            m = out.metrics or {}
            arrival, first = m.get("arrival_time"), m.get("first_token_time")
            reason = out.finish_reason.value if out.finish_reason else "error"
            self.success.labels(self.model_name, ENGINE, reason).inc()
            self.prompt_tokens.inc(out.usage.prompt_tokens)
            self.gen_tokens.inc(out.usage.completion_tokens)
            if arrival is not None and first is not None:
                self.ttft.observe(first - arrival)
            if out.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and arrival is not None \
                    and m.get("finish_time") is not None:
                self._finished_normally(out, m)
        except Exception:  # noqa: BLE001 - metrics must never take the engine down
            log.exception("metrics listener failed")

    def _finished_normally(self, out: RequestOutput, m: dict) -> None:
        """The per-request histograms (vLLM's FinishedRequestStats): e2e and its phases."""
        arrival, scheduled = m["arrival_time"], m.get("first_scheduled_time")
        first, finish, n = m.get("first_token_time"), m["finish_time"], out.usage.completion_tokens
        self.e2e.observe(finish - arrival)
        self.req_prompt.observe(out.usage.prompt_tokens)
        self.req_gen.observe(n)
        if scheduled is not None:
            self.queue.observe(scheduled - arrival)
            self.inference.observe(finish - scheduled)
            if first is not None:
                self.prefill.observe(first - scheduled)
        if first is not None:
            self.decode.observe(finish - first)
            self.req_tpot.observe((finish - first) / (n - 1) if n > 1 else 0.0)  # vLLM: 0 for one

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _EngineGauges:
    """Gauges read from the engine snapshot when scraped (no polling task)."""

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics

    def collect(self):
        s, name = self.m.engine.snapshot, self.m.model_name
        for metric, doc, value in [
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            ("vllm:num_requests_running", "Requests in the running batch.", s.num_running),
            ("vllm:kv_cache_usage_perc", "Fraction of KV pages in use (1 = full).", s.kv_usage),
            ("vllm:gpu_cache_usage_perc", "Same as vllm:kv_cache_usage_perc (vLLM v0 name).", s.kv_usage),
            ("orca_jax:engine_healthy", "1 while the engine loop is alive and iterating.",
             1.0 if self.m.engine.healthy() else 0.0),
            ("orca_jax:num_requests_swapped", "Preempted requests whose KV pages wait in host memory.",
             s.num_swapped),
        ]:
            g = GaugeMetricFamily(metric, doc, labels=LABELS)
            g.add_metric([name, ENGINE], float(value))
            yield g
        for metric, doc, value in [
            ("vllm:num_preemptions", "Cumulative number of preemptions (KV pages ran out).",
             s.num_preemptions),
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             s.prefix_cache_queries),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
        ]:
            c = CounterMetricFamily(metric, doc, labels=LABELS)
            c.add_metric([name, ENGINE], float(value))
            yield c
