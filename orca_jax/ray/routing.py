"""The global scheduler's choice: what each replica reports in, one replica out. Pure Python, no
Ray, so that it is tested in milliseconds (tests/test_ray_routing.py); orca_jax/ray/router.py
calls it from Ray Serve's request router.

The Orca paper's global scheduler routes each request to the most appropriate replica by its
load and memory. Here a replica is described by what its engine reports (`ReplicaState`:
waiting and running requests, KV pages free, the page hashes in its prefix cache) plus what the
router itself knows fresher than any report (requests it chose it for that have not finished,
page keys it sent there: `AffinityMemory`).

Policies (`--router`):

    prefix         (default) the replica whose prefix cache holds the longest leading run of
                   the prompt's full pages, unless it is overloaded (its load exceeds the
                   least loaded replica's by more than `overload_margin`): then least loaded.
                   A prefix nobody holds goes where the caches have the most room (fewest
                   cached pages) among the replicas not overloaded, so that distinct prefixes
                   spread evenly over the replicas' caches
    load           the least loaded replica, ignoring prefixes
    round-robin    replicas in turn (a baseline)
    power-of-two   two replicas drawn at random, the less loaded of the two (a baseline)

A replica's load, in batches: (queued requests) / (its batch size) + (fraction of its KV
pages in use). Ties go round the replicas in turn, so that an idle cluster spreads requests.

Prefix keys are the engine's own page keys (orca_jax/kv_pages.py `chain_hashes`: a chain of
hashes over full pages), so a key the router computes from a prompt equals the key the
replica's prefix cache stores for that page. The engine looks up all but the page holding
the prompt's last token (that token is always computed): `lookup_hashes` drops it the same way.
"""
from __future__ import annotations

import collections
import dataclasses
import random
from typing import AbstractSet, Any, Sequence

from ..kv_pages import chain_hashes

POLICIES = ("prefix", "load", "round-robin", "power-of-two")

# Why a replica was chosen (the router's decisions counter is labelled by these).
PREFIX = "prefix"                        # it holds the longest cached prefix of the prompt
PREFIX_OVERLOADED = "prefix_overloaded"  # the replica with the prefix was overloaded: least loaded
NEW_PREFIX = "new_prefix"                # no replica holds the prompt's first page: the one
                                         # whose cache holds fewest pages, unless overloaded
LEAST_LOADED = "least_loaded"            # no full page to key by (or policy "load")
ROUND_ROBIN = "round_robin"
POWER_OF_TWO = "power_of_two"
ONLY_REPLICA = "only_replica"            # one candidate: no choice to make
FALLBACK = "fallback"                    # the choice refused the request (queue full): another took it
REASONS = (PREFIX, PREFIX_OVERLOADED, NEW_PREFIX, LEAST_LOADED, ROUND_ROBIN, POWER_OF_TWO, ONLY_REPLICA, FALLBACK)


@dataclasses.dataclass(frozen=True)
class ReplicaState:
    """One replica as the router sees it when a request arrives."""

    replica_id: str
    num_waiting: int = 0          # reported: requests in its engine's waiting queue
    num_running: int = 0          # reported: requests in its running batch
    in_flight: int = 0            # the router's own count: sent there, not finished yet
    max_running: int = 1          # its batch size (EngineConfig.max_batch_size)
    kv_pages_free: int = 1        # reported: pages its allocator can hand out
    kv_pages_total: int = 1
    cached: AbstractSet[bytes] = frozenset()  # page keys in its prefix cache (reported or assumed)

    def __post_init__(self):
        if self.max_running < 1 or self.kv_pages_total < 1:
            raise ValueError(f"replica {self.replica_id}: max_running and kv_pages_total must be >= 1")
        if min(self.num_waiting, self.num_running, self.in_flight, self.kv_pages_free) < 0:
            raise ValueError(f"replica {self.replica_id}: counts must be >= 0")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How the global scheduler picks (the `--router` flags)."""

    policy: str = "prefix"        # one of POLICIES
    overload_margin: float = 1.0  # prefix: skip the replica holding the prefix when its load
                                  # exceeds the least loaded one's by more than this (batches)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"router policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.overload_margin < 0:
            raise ValueError(f"overload_margin must be >= 0, got {self.overload_margin}")


@dataclasses.dataclass(frozen=True)
class Choice:
    replica_id: str
    reason: str                   # one of REASONS
    prefix_pages: int = 0         # leading pages of the prompt cached there (as far as known)


@dataclasses.dataclass(frozen=True)
class RouteKey:
    """What the router needs of one request (the ingress passes it as the handle call's `route`
    keyword): its prompt's page keys (`lookup_hashes`)."""

    hashes: tuple[bytes, ...] = ()


def load_score(r: ReplicaState) -> float:
    """Load in batches: queued requests over the batch size, plus the fraction of KV pages in
    use. The router's in-flight count stands in for the report when it is higher (reports are
    periodic; a burst arrives between two of them)."""
    queued = max(r.num_waiting + r.num_running, r.in_flight)
    return queued / r.max_running + 1.0 - r.kv_pages_free / r.kv_pages_total


def cached_prefix_pages(cached: AbstractSet[bytes], hashes: Sequence[bytes]) -> int:
    """How many leading pages of a prompt (keys `hashes`) are in `cached`: a chain key
    covers every token before it, so the first miss ends the run (as PagePool.num_cached)."""
    n = 0
    while n < len(hashes) and hashes[n] in cached:
        n += 1
    return n


def lookup_hashes(token_ids: Sequence[int], page_size: int) -> list[bytes]:
    """Keys of the prompt pages a replica's prefix cache can serve: the full pages before the
    one holding the last prompt token (orca_jax/scheduler.py admits with the same cut)."""
    n = max(0, len(token_ids) - 1) // page_size
    return chain_hashes(token_ids[:n * page_size], page_size)


def prompt_tokens(body: Any, path: str, tokenizer) -> list[int]:
    """The token ids the router keys a request by: a completion's prompt (its first, if several)
    as the replica tokenizes it; a chat's messages as plain text (the replica renders its
    chat template, so these keys are the router's own, consistent across requests, not the
    replica's: affinity then comes from the router's memory of what it sent where)."""
    if not isinstance(body, dict):
        return []
    if path == "/v1/chat/completions":
        msgs = body.get("messages")
        if not isinstance(msgs, list):
            return []
        text = "".join(f"{m.get('role')}: {m.get('content')}\n" for m in msgs if isinstance(m, dict))
        return tokenizer.encode(text)
    p = body.get("prompt")
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return tokenizer.encode(p)
    if isinstance(p, list) and all(isinstance(t, int) for t in p):
        return p
    return []


def _in_turn(replicas: Sequence[ReplicaState], turn: int) -> list[int]:
    """Indices of `replicas` starting at `turn` (mod n): the tie-break order."""
    n = len(replicas)
    return [(turn + k) % n for k in range(n)]


def _least_loaded(replicas: Sequence[ReplicaState], indices: Sequence[int], turn: int) -> int:
    order = {i: k for k, i in enumerate(_in_turn(replicas, turn))}
    return min(indices, key=lambda i: (load_score(replicas[i]), order[i]))


def choose(replicas: Sequence[ReplicaState], hashes: Sequence[bytes], config: RouterConfig,
           turn: int = 0, rng: random.Random | None = None) -> Choice:
    """The replica for one request whose prompt's page keys are `hashes` (`lookup_hashes`).
    `turn` counts the router's previous decisions (round-robin and ties); `rng` draws
    power-of-two's pair."""
    if not replicas:
        raise ValueError("no replica to route to")
    everyone = range(len(replicas))
    matched = [cached_prefix_pages(r.cached, hashes) for r in replicas]
    pick = lambda i, reason: Choice(replicas[i].replica_id, reason, matched[i])
    if len(replicas) == 1:
        return pick(0, ONLY_REPLICA)
    if config.policy == "round-robin":
        return pick(turn % len(replicas), ROUND_ROBIN)
    if config.policy == "power-of-two":
        pair = (rng or random.Random(turn)).sample(list(everyone), 2)
        return pick(_least_loaded(replicas, pair, turn), POWER_OF_TWO)
    least = _least_loaded(replicas, everyone, turn)
    best = max(matched)
    if config.policy == "load" or not hashes:
        return pick(least, LEAST_LOADED)
    fit = [i for i in everyone if not _overloaded(replicas[i], replicas[least], config)]
    if best == 0:  # a prefix nobody holds: where the caches have the most room for it
        order = {i: k for k, i in enumerate(_in_turn(replicas, turn))}
        return pick(min(fit, key=lambda i: (len(replicas[i].cached), order[i])), NEW_PREFIX)
    holders = [i for i in everyone if matched[i] == best]
    holder = _least_loaded(replicas, holders, turn)
    if holder not in fit:
        return pick(least, PREFIX_OVERLOADED)
    return pick(holder, PREFIX)


def _overloaded(r: ReplicaState, least: ReplicaState, config: RouterConfig) -> bool:
    return load_score(r) - load_score(least) > config.overload_margin


class AffinityMemory:
    """Page keys the router sent to each replica, assumed cached there until evicted: reports
    of each replica's real cache come every second or so, while requests sharing a prefix
    arrive in bursts between two of them. Bounded per replica (a replica cannot cache more
    pages than its pool holds), least recently routed forgotten first."""

    def __init__(self, capacity: int = 4096):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._keys: dict[str, collections.OrderedDict[bytes, None]] = {}

    def remember(self, replica_id: str, hashes: Sequence[bytes]) -> None:
        keys = self._keys.setdefault(replica_id, collections.OrderedDict())
        for h in hashes:
            keys[h] = None
            keys.move_to_end(h)
        while len(keys) > self.capacity:
            keys.popitem(last=False)

    def forget(self, replica_id: str) -> None:
        """The replica is gone (its replacement starts with an empty cache)."""
        self._keys.pop(replica_id, None)

    def keep_only(self, replica_ids: Sequence[str]) -> None:
        for rid in set(self._keys) - set(replica_ids):
            del self._keys[rid]

    def view(self, replica_id: str) -> AbstractSet[bytes]:
        """The keys remembered for `replica_id`: a live view, not a copy (read it at once)."""
        keys = self._keys.get(replica_id)
        return keys.keys() if keys is not None else frozenset()
