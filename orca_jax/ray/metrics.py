"""The ingress's /metrics: every replica's engine gauges and counters, one series per replica
(label `replica`) plus their aggregate (`replica="all"`), under vLLM's names, and the global
scheduler's decisions counter. Plain Python (prometheus_client, no Ray): the input is the
replicas' last reports (`EngineReplica.record_routing_stats`, as the router holds them), so
values lag by up to the report period (1 s by default).

    vllm:num_requests_waiting / _running   gauges, sum over replicas
    vllm:kv_cache_usage_perc               gauge, KV pages in use over all pages of all replicas
    vllm:num_preemptions_total             counters, sums
    vllm:prefix_cache_queries_total / _hits_total
    orca_jax:engine_healthy                gauge per replica; "all": replicas healthy
    orca_jax:replicas                      gauge: replicas Serve routes to
    orca_jax:router_decisions_total{replica, reason}   from the router (router.py)

Filter per-replica series with `replica!="all"` before summing them yourself. Latency
histograms stay on each replica's own server (they do not add up across replicas).
"""
from __future__ import annotations

import collections
import logging
import weakref
from typing import Any, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ALL = "all"

# Process-wide state of the ingress's process, which the router (router.py, shipped there by
# value) reaches through this module: a child of Ray Serve's logger (decisions land in the
# ingress replica's Serve log file), the decisions counted by (replica, reason), the routers
# Serve created.
log = logging.getLogger("ray.serve.orca_jax")
DECISIONS: collections.Counter[tuple[str, str]] = collections.Counter()
ROUTERS: weakref.WeakSet = weakref.WeakSet()


def router_reports() -> dict[str, dict] | None:
    """The live replicas' last reports as the router in this process holds them (None before
    Serve created one: it does on the first request through the handle)."""
    for router in list(ROUTERS):
        return router.replica_reports()
    return None

# (metric, help, report key, gauge?)
_SERIES = (
    ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting", True),
    ("vllm:num_requests_running", "Requests in the running batch.", "num_running", True),
    ("orca_jax:num_requests_swapped", "Preempted requests whose KV pages wait in host memory.",
     "num_swapped", True),
    ("vllm:num_preemptions", "Cumulative number of preemptions (KV pages ran out).",
     "num_preemptions", False),
    ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
     "prefix_cache_queries", False),
    ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits", False),
)


def _kv_usage(reports: Mapping[str, Mapping[str, Any]]) -> float:
    total = sum(int(r.get("kv_pages_total", 0)) for r in reports.values())
    free = sum(int(r.get("kv_pages_free", 0)) for r in reports.values())
    return 1.0 - free / total if total else 0.0


def families(model_name: str, reports: Mapping[str, Mapping[str, Any]]):
    """The metric families of the replicas' `reports` (replica name -> last report)."""
    labels = ["model_name", "replica"]
    for metric, doc, key, gauge in _SERIES:
        fam = (GaugeMetricFamily if gauge else CounterMetricFamily)(metric, doc, labels=labels)
        for name, r in sorted(reports.items()):
            fam.add_metric([model_name, name], float(r.get(key, 0)))
        fam.add_metric([model_name, ALL], float(sum(r.get(key, 0) for r in reports.values())))
        yield fam
    for metric in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        fam = GaugeMetricFamily(metric, "Fraction of KV pages in use (1 = full).", labels=labels)
        for name, r in sorted(reports.items()):
            fam.add_metric([model_name, name], _kv_usage({name: r}))
        fam.add_metric([model_name, ALL], _kv_usage(reports))
        yield fam
    fam = GaugeMetricFamily("orca_jax:engine_healthy", "1 while the engine loop is alive and "
                            "iterating; for \"all\": replicas healthy.", labels=labels)
    for name, r in sorted(reports.items()):
        fam.add_metric([model_name, name], 1.0 if r.get("healthy") else 0.0)
    fam.add_metric([model_name, ALL], float(sum(bool(r.get("healthy")) for r in reports.values())))
    yield fam
    fam = GaugeMetricFamily("orca_jax:replicas", "Engine replicas the router sends requests to.",
                            labels=["model_name"])
    fam.add_metric([model_name], float(len(reports)))
    yield fam


def decision_family(decisions: Mapping[tuple[str, str], int]) -> CounterMetricFamily:
    """orca_jax:router_decisions_total{replica, reason} of `decisions` ((replica, reason) -> n)."""
    fam = CounterMetricFamily("orca_jax:router_decisions", "Requests routed by the global "
                              "scheduler, by replica and reason (routing.REASONS).",
                              labels=["replica", "reason"])
    for (replica, reason), n in sorted(decisions.items()):
        fam.add_metric([replica, reason], float(n))
    return fam


class _Snapshot:
    def __init__(self, model_name, reports, decisions):
        self.args = model_name, reports, decisions

    def collect(self):
        model_name, reports, decisions = self.args
        yield from families(model_name, reports)
        yield decision_family(decisions)


def render(model_name: str, reports: Mapping[str, Mapping[str, Any]],
           decisions: Mapping[tuple[str, str], int]) -> bytes:
    """Prometheus text of the replicas' reports and the router's decisions."""
    reg = CollectorRegistry()
    reg.register(_Snapshot(model_name, reports, decisions))
    return generate_latest(reg)
