"""The global scheduler as a Ray Serve request router (`ray.serve.request_router.RequestRouter`).

Ray Serve calls `choose_replicas` for every request the ingress sends to the engine
deployment; this router turns what it knows into `routing.ReplicaState`s and lets
`routing.choose` (pure) pick. What it knows:

- each replica's report (`EngineReplica.record_routing_stats`: waiting, running, KV pages
  free, the page keys in its prefix cache), which Serve collects every
  `request_routing_stats_period_s` and hands over as `RunningReplica.routing_stats`;
- its own count of requests in flight per replica, counted from the moment it chooses one
  until Serve reports it completed (`on_request_completed`): fresher than any report, and
  a burst of simultaneous requests sees its own earlier choices;
- the page keys it chose each replica for (`routing.AffinityMemory`), so that a burst of
  requests sharing a system prompt follows the first one before any report shows the prefix.

The ingress passes each request's page keys as the `route` keyword argument of the handle
call (`RouteKey`). Serve keeps its own machinery: FIFO order, retries with backoff when the
chosen replica's queue is full (the other replicas are returned as the second rank), removal
of dead replicas. Every decision is logged and counted by reason and replica
(`orca_jax:router_decisions_total`, on the ingress's /metrics: metrics.py).
"""
from __future__ import annotations

import collections
import collections.abc
import random
import time
from typing import AbstractSet, Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from . import metrics
from .routing import FALLBACK, AffinityMemory, Choice, ReplicaState, RouteKey, RouterConfig, choose

PENDING_TTL_S = 30.0

# Serve ships this module to the ingress *by value* (RequestRouterConfig cloudpickles the
# router's module), so process-wide state and the types the ingress shares with it live
# elsewhere: the decisions counter, the logger and the registry of live routers in `metrics`,
# RouteKey in `routing`, modules imported by reference there.


def replica_name(replica_id: ReplicaID) -> str:
    return replica_id.unique_id


class Either(collections.abc.Set):
    """Two sets read as their union without copying either (a replica's reported keys and
    those the router assumes, per request). Its length counts keys in both twice: an
    estimate of cache occupancy, biased the same way for every replica."""

    def __init__(self, a: AbstractSet, b: AbstractSet):
        self.a, self.b = a, b

    def __contains__(self, key) -> bool:
        return key in self.a or key in self.b

    def __iter__(self):
        return iter(set(self.a) | set(self.b))

    def __len__(self) -> int:
        return len(self.a) + len(self.b)


def replica_state(r: RunningReplica, in_flight: int, assumed: AbstractSet[bytes],
                  reported: AbstractSet[bytes]) -> ReplicaState:
    """A replica's `ReplicaState` from its last report (none yet: an empty, idle replica)."""
    s: dict[str, Any] = r.routing_stats or {}
    total = max(1, int(s.get("kv_pages_total", 1)))
    return ReplicaState(replica_name(r.replica_id), num_waiting=int(s.get("num_waiting", 0)),
                        num_running=int(s.get("num_running", 0)), in_flight=in_flight,
                        max_running=max(1, int(s.get("max_running", 1))),
                        kv_pages_free=min(total, int(s.get("kv_pages_free", total))),
                        kv_pages_total=total, cached=Either(reported, assumed))


class OrcaRequestRouter(FIFOMixin, RequestRouter):
    """Ray Serve's side of the global scheduler; configured through
    `RequestRouterConfig(request_router_kwargs={"policy": ..., "overload_margin": ...})`."""

    def initialize_state(self, policy: str = "prefix", overload_margin: float = 1.0,
                         memory_pages: int = 4096, seed: int = 0, **_):
        self.config = RouterConfig(policy, overload_margin)
        self.memory = AffinityMemory(memory_pages)
        self.rng = random.Random(seed)
        self.turn = 0
        self.in_flight: dict[ReplicaID, set[str]] = collections.defaultdict(set)
        # Chosen, not yet routed (Serve still probing the replica's queue): internal request
        # id -> (choice, time). Counted as in flight there, so that a burst of simultaneous
        # requests sees each other's choices; entries of requests cancelled before routing
        # (no hook tells) expire after PENDING_TTL_S.
        self.pending: dict[str, tuple[Choice, float]] = {}
        self.reported: dict[ReplicaID, tuple[Any, frozenset[bytes]]] = {}  # report's keys -> set
        metrics.ROUTERS.add(self)

    def _reported(self, r: RunningReplica) -> AbstractSet[bytes]:
        """The keys of `r`'s last report as a set, built once per report (thousands of keys)."""
        keys = (r.routing_stats or {}).get("cached", ())
        seen = self.reported.get(r.replica_id)
        if seen is None or seen[0] is not keys:
            seen = self.reported[r.replica_id] = (keys, frozenset(keys))
        return seen[1]

    def _in_flight(self, r: RunningReplica, now: float) -> int:
        name = replica_name(r.replica_id)
        chosen = sum(c.replica_id == name and now - t < PENDING_TTL_S for c, t in self.pending.values())
        return len(self.in_flight.get(r.replica_id, ())) + chosen

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key, now = _route_key(pending_request), time.monotonic()
        if pending_request is not None:  # a retry with backoff chooses again: not its own load
            self.pending.pop(pending_request.metadata.internal_request_id, None)
        if len(self.pending) > 1024:
            self.pending = {k: v for k, v in self.pending.items() if now - v[1] < PENDING_TTL_S}
        states = [replica_state(r, self._in_flight(r, now), self.memory.view(replica_name(r.replica_id)),
                                self._reported(r)) for r in candidate_replicas]
        choice = choose(states, key.hashes, self.config, self.turn, self.rng)
        self.turn += 1
        # Remembered now, not once routed: the next request of a burst sharing this prefix
        # follows it even before this one is placed.
        self.memory.remember(choice.replica_id, key.hashes)
        if pending_request is not None:
            self.pending[pending_request.metadata.internal_request_id] = (choice, now)
        chosen = next(r for r in candidate_replicas if replica_name(r.replica_id) == choice.replica_id)
        rest = [r for r in candidate_replicas if r is not chosen]
        return [[chosen], rest] if rest else [[chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        rid = pending_request.metadata.internal_request_id
        choice, _ = self.pending.pop(rid, (None, 0.0))
        self.in_flight[replica_id].add(rid)
        name = replica_name(replica_id)
        reason = FALLBACK if choice is None or choice.replica_id != name else choice.reason
        key = pending_request.kwargs.get("route")
        if not isinstance(key, RouteKey):
            return  # not a generation request (/v1/models, /health...): not counted
        if reason == FALLBACK:
            self.memory.remember(name, key.hashes)
        metrics.DECISIONS[name, reason] += 1
        metrics.log.info("route %s -> replica %s (%s, %d of %d prompt pages cached there)",
                         pending_request.metadata.request_id, name, reason,
                         choice.prefix_pages if choice else 0, len(key.hashes))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.in_flight.get(replica_id, set()).discard(internal_request_id)
        self.pending.pop(internal_request_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.in_flight.pop(replica_id, None)
        self.reported.pop(replica_id, None)
        self.memory.forget(replica_name(replica_id))
        metrics.log.warning("replica %s died: routing around it until Serve replaces it",
                            replica_name(replica_id))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for gone in set(self.in_flight) - live:
            del self.in_flight[gone]
        for gone in set(self.reported) - live:
            del self.reported[gone]
        self.memory.keep_only([replica_name(r) for r in live])

    def replica_reports(self) -> dict[str, dict[str, Any]]:
        """Each live replica's last report, by name (the ingress's /health and /metrics)."""
        return {replica_name(rid): dict(r.routing_stats or {}) for rid, r in self.curr_replicas.items()}


def _route_key(pending_request: PendingRequest | None) -> RouteKey:
    key = pending_request.kwargs.get("route") if pending_request is not None else None
    return key if isinstance(key, RouteKey) else RouteKey()
