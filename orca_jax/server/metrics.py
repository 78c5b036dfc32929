"""Prometheus metrics for GET /metrics, named like vLLM's so its dashboards and routers work.

    vllm:num_requests_waiting / _running   gauges, from the engine snapshot at scrape time
    vllm:kv_cache_usage_perc               gauge, fraction (0..1) of KV pages in use
    vllm:gpu_cache_usage_perc              the same, under vLLM's older (v0) name
    vllm:num_preemptions_total             counter: requests preempted (KV pages ran out)
    vllm:prefix_cache_queries_total / _hits_total   counters, prompt tokens (docs/kv-cache.md)
    orca_jax:num_requests_swapped          gauge: preempted requests with KV in host memory
    vllm:time_to_first_token_seconds       histogram per request (arrival -> first token)
    vllm:time_per_output_token_seconds     histogram per request: mean time between its tokens
    vllm:e2e_request_latency_seconds       histogram per finished request (arrival -> finish)
    vllm:request_prompt_tokens / _generation_tokens   histograms per finished request
    vllm:prompt_tokens_total / vllm:generation_tokens_total   counters
    vllm:request_success_total{finished_reason}        counter (stop, length, abort, error)
    orca_jax:iteration_batch_size          histogram: requests in each engine iteration (Orca's
                                           batch; vLLM has no per-iteration request count)
    orca_jax:engine_healthy                gauge: 1 while the engine loop is alive and moving

Every series carries `model_name` like vLLM's. Each server owns its registry (no process-wide
global), so several servers in one process (tests) do not collide.
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..async_engine import AsyncEngine
from ..request import FinishReason, RequestOutput

log = logging.getLogger("orca_jax.server")

# vLLM's bucket edges (vllm/engine/metrics.py), so histograms line up on shared dashboards.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


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
        lab = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.",
                              lab, buckets=TTFT_BUCKETS, registry=reg).labels(model_name)
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Mean time per output token of each request in seconds.",
                              lab, buckets=TPOT_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "End-to-end latency of finished requests in seconds.",
                             lab, buckets=E2E_BUCKETS, registry=reg).labels(model_name)
        tok_buckets = _powers_of_two(max_model_len)
        self.req_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per finished request.",
                                    lab, buckets=tok_buckets, registry=reg).labels(model_name)
        self.req_gen = Histogram("vllm:request_generation_tokens", "Generated tokens per finished request.",
                                 lab, buckets=tok_buckets, registry=reg).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", lab,
                                     registry=reg).labels(model_name)
        self.gen_tokens = Counter("vllm:generation_tokens", "Tokens generated.", lab,
                                  registry=reg).labels(model_name)
        self.success = Counter("vllm:request_success", "Requests finished, by finish reason.",
                               lab + ["finished_reason"], registry=reg)
        for reason in FinishReason:  # export zeros so rate() works from the first scrape
            self.success.labels(model_name, reason.value)
        self.batch = Histogram("orca_jax:iteration_batch_size", "Requests in each engine iteration.",
                               lab, buckets=_powers_of_two(engine.num_slots),
                               registry=reg).labels(model_name)
        reg.register(_EngineGauges(self))
        engine.add_listener(self._on_finished)
        engine.add_iteration_listener(lambda batch_size, _tokens: self.batch.observe(batch_size))

    def _on_finished(self, out: RequestOutput) -> None:
        """Runs on the engine thread for every final output: cheap, and never raises (an
        exception here would escape into the engine loop)."""
        try:
            m = out.metrics or {}
            arrival, first, finish = m.get("arrival_time"), m.get("first_token_time"), m.get("finish_time")
            n = out.usage.completion_tokens
            reason = out.finish_reason.value if out.finish_reason else "error"
            self.success.labels(self.model_name, reason).inc()
            self.prompt_tokens.inc(out.usage.prompt_tokens)
            self.gen_tokens.inc(n)
            if arrival is not None and first is not None:
                self.ttft.observe(first - arrival)
            if out.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and arrival is not None \
                    and finish is not None:
                self.e2e.observe(finish - arrival)
                self.req_prompt.observe(out.usage.prompt_tokens)
                self.req_gen.observe(n)
                if first is not None and n > 1:
                    self.tpot.observe((finish - first) / (n - 1))
        except Exception:  # noqa: BLE001 - metrics must never take the engine down
            log.exception("metrics listener failed")

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
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric([name], float(value))
            yield g
        for metric, doc, value in [
            ("vllm:num_preemptions", "Cumulative number of preemptions (KV pages ran out).",
             s.num_preemptions),
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             s.prefix_cache_queries),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
        ]:
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric([name], float(value))
            yield c
