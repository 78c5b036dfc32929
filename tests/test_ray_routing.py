"""The global scheduler's choice function (orca_jax/ray/routing.py): pure scores in, replica
out. No Ray: these run in milliseconds."""
import collections
import random

import pytest

from orca_jax.kv_pages import PagePool, chain_hashes
from orca_jax.ray.routing import (LEAST_LOADED, NEW_PREFIX, ONLY_REPLICA, POWER_OF_TWO, PREFIX, PREFIX_OVERLOADED,
                                  ROUND_ROBIN, AffinityMemory, ReplicaState, RouterConfig,
                                  cached_prefix_pages, choose, load_score, lookup_hashes)

PAGE = 4


def keys(tokens):
    return lookup_hashes(tokens, PAGE)


def replica(rid, **kw):
    kw.setdefault("max_running", 8)
    kw.setdefault("kv_pages_total", 100)
    kw.setdefault("kv_pages_free", 100)
    return ReplicaState(rid, **kw)


def test_load_score_counts_queue_in_batches_and_kv_in_use():
    assert load_score(replica("a")) == 0.0
    assert load_score(replica("a", num_waiting=4, num_running=4)) == 1.0
    assert load_score(replica("a", kv_pages_free=25)) == 0.75
    # The router's own in-flight count stands in for a stale report when it is higher.
    assert load_score(replica("a", num_running=1, in_flight=8)) == 1.0
    assert load_score(replica("a", num_running=8, in_flight=1)) == 1.0


def test_lookup_hashes_are_the_engine_page_keys_minus_the_last_token_page():
    tokens = list(range(13))                      # 3 full pages + 1 token
    assert keys(tokens) == chain_hashes(tokens, PAGE)[:3]
    assert len(keys(list(range(12)))) == 2         # last token on page 3: not looked up
    assert keys([1]) == [] and keys([]) == []
    # The same keys the engine's page pool finds cached.
    pool = PagePool(8, PAGE)
    for page, h in zip(pool.allocate(3), chain_hashes(tokens, PAGE)):
        pool.register(page, h)
    assert pool.num_cached(keys(tokens)) == cached_prefix_pages(frozenset(pool.cached), keys(tokens)) == 3


def test_prefix_goes_where_the_longest_cached_prefix_is():
    system = list(range(100, 120))                # 5 pages shared
    prompt = system + [7, 8, 9]
    h = keys(prompt)
    reps = [replica("a", cached=frozenset(h[:2])), replica("b", cached=frozenset(h)), replica("c")]
    c = choose(reps, h, RouterConfig("prefix"))
    assert (c.replica_id, c.reason, c.prefix_pages) == ("b", PREFIX, 5)


def test_prefix_run_stops_at_first_miss():
    h = keys(list(range(21)))
    assert cached_prefix_pages(frozenset(h[1:]), h) == 0
    assert cached_prefix_pages(frozenset(h[:2] + h[3:]), h) == 2


def test_prefix_skips_an_overloaded_holder():
    h = keys(list(range(40)))
    busy = replica("a", cached=frozenset(h), num_waiting=16, num_running=8)   # load 3
    idle = replica("b")
    c = choose([busy, idle], h, RouterConfig("prefix", overload_margin=1.0))
    assert (c.replica_id, c.reason) == ("b", PREFIX_OVERLOADED)
    # Within the margin it still wins: a cached prefix saves more than a little queueing.
    warm = replica("a", cached=frozenset(h), num_running=8)                   # load 1
    assert choose([warm, idle], h, RouterConfig("prefix", overload_margin=1.0)).replica_id == "a"


def test_equal_prefix_holders_least_loaded_wins():
    h = keys(list(range(40)))
    reps = [replica("a", cached=frozenset(h), num_running=6), replica("b", cached=frozenset(h), num_running=2)]
    assert choose(reps, h, RouterConfig()).replica_id == "b"


def test_no_full_page_least_loaded_then_turns():
    reps = [replica("a", num_running=3), replica("b", num_running=1), replica("c", num_running=2)]
    c = choose(reps, keys([1, 2, 3]), RouterConfig())
    assert (c.replica_id, c.reason) == ("b", LEAST_LOADED)
    idle = [replica(x) for x in "abc"]
    assert [choose(idle, [], RouterConfig(), turn=t).replica_id for t in range(4)] == list("abca")


def test_new_prefix_goes_where_the_cache_has_most_room_unless_overloaded():
    other = frozenset(keys(list(range(500, 540))))
    few, many = frozenset(list(other)[:2]), other
    reps = [replica("a", cached=many), replica("b", cached=few, num_running=4), replica("c", cached=many)]
    c = choose(reps, keys(list(range(40))), RouterConfig())
    assert (c.replica_id, c.reason) == ("b", NEW_PREFIX)      # load 0.5 is within the margin
    reps[1] = replica("b", cached=few, num_running=8, num_waiting=8)          # load 2: overloaded
    assert choose(reps, keys(list(range(40))), RouterConfig()).replica_id in "ac"
    idle = [replica(x) for x in "ab"]                          # empty caches: in turn
    assert [choose(idle, keys(list(range(40))), RouterConfig(), turn=t).replica_id for t in range(3)] == list("aba")


def test_load_policy_ignores_prefixes():
    h = keys(list(range(40)))
    reps = [replica("a", cached=frozenset(h), num_running=2), replica("b")]
    c = choose(reps, h, RouterConfig("load"))
    assert (c.replica_id, c.reason) == ("b", LEAST_LOADED)


def test_round_robin_ignores_load_and_prefix():
    reps = [replica("a", num_running=8), replica("b"), replica("c")]
    picks = [choose(reps, [], RouterConfig("round-robin"), turn=t) for t in range(6)]
    assert [p.replica_id for p in picks] == list("abcabc")
    assert {p.reason for p in picks} == {ROUND_ROBIN}


def test_power_of_two_takes_the_less_loaded_of_its_pair():
    reps = [replica("a", num_running=8), replica("b", num_running=4), replica("c")]
    rng = random.Random(0)
    picks = collections.Counter(choose(reps, [], RouterConfig("power-of-two"), t, rng).replica_id
                                for t in range(300))
    assert picks["a"] == 0                      # a is in 2 of 3 pairs and loses both
    assert picks["c"] > picks["b"] > 0          # c wins both of its pairs, b one
    assert choose(reps, [], RouterConfig("power-of-two"), 0, rng).reason == POWER_OF_TWO


def test_one_replica_and_none():
    assert choose([replica("a", num_waiting=99)], [], RouterConfig()).reason == ONLY_REPLICA
    with pytest.raises(ValueError, match="no replica"):
        choose([], [], RouterConfig())


def test_config_and_state_are_validated():
    with pytest.raises(ValueError, match="round-robin"):
        RouterConfig("random")
    with pytest.raises(ValueError, match="overload_margin"):
        RouterConfig(overload_margin=-1)
    with pytest.raises(ValueError, match="max_running"):
        ReplicaState("a", max_running=0)
    with pytest.raises(ValueError, match=">= 0"):
        ReplicaState("a", num_waiting=-1)


def test_affinity_memory_bounded_lru_per_replica():
    m = AffinityMemory(capacity=3)
    m.remember("a", [b"1", b"2"])
    m.remember("a", [b"3", b"1"])       # 1 refreshed
    m.remember("a", [b"4"])             # 2 is the least recently routed: forgotten
    assert m.view("a") == {b"1", b"3", b"4"}
    m.remember("b", [b"9"])
    m.keep_only(["b"])
    assert m.view("a") == frozenset() and m.view("b") == {b"9"}
    m.forget("b")
    assert m.view("b") == frozenset()


def test_shared_prefix_trace_affinity_beats_round_robin():
    """A replay of the benchmark's shape with cache = what was routed (AffinityMemory): 4 system
    prompts x 16 requests over 2 replicas. Affinity sends every repeat where its prefix is;
    round-robin spreads each system prompt over both replicas."""
    rng = random.Random(1)
    systems = [[1000 * s + i for i in range(32)] for s in range(4)]
    trace = [systems[rng.randrange(4)] + [rng.randrange(500) for _ in range(5)] for _ in range(64)]

    def hit_rate(policy):
        memory, hits, total = AffinityMemory(), 0, 0
        for t, prompt in enumerate(trace):
            h = keys(prompt)
            reps = [replica(r, cached=memory.view(r)) for r in "ab"]
            c = choose(reps, h, RouterConfig(policy), turn=t)
            hits, total = hits + cached_prefix_pages(memory.view(c.replica_id), h), total + len(h)
            memory.remember(c.replica_id, h)
        return hits / total

    assert hit_rate("prefix") > hit_rate("round-robin") + 0.05


def test_metrics_per_replica_and_aggregate():
    from orca_jax.ray.metrics import render
    reports = {"r1": {"num_waiting": 2, "num_running": 3, "kv_pages_free": 30, "kv_pages_total": 100,
                      "prefix_cache_queries": 100, "prefix_cache_hits": 60, "healthy": True},
               "r2": {"num_waiting": 1, "num_running": 5, "kv_pages_free": 90, "kv_pages_total": 100,
                      "prefix_cache_queries": 50, "prefix_cache_hits": 0, "healthy": False}}
    text = render("m", reports, {("r1", "prefix"): 3, ("r2", "least_loaded"): 1}).decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines['vllm:num_requests_waiting{model_name="m",replica="r1"}']) == 2
    assert float(lines['vllm:num_requests_waiting{model_name="m",replica="all"}']) == 3
    assert float(lines['vllm:num_requests_running{model_name="m",replica="all"}']) == 8
    assert float(lines['vllm:kv_cache_usage_perc{model_name="m",replica="r1"}']) == pytest.approx(0.7)
    assert float(lines['vllm:kv_cache_usage_perc{model_name="m",replica="all"}']) == pytest.approx(0.4)
    assert float(lines['vllm:prefix_cache_hits_total{model_name="m",replica="all"}']) == 60
    assert float(lines['orca_jax:engine_healthy{model_name="m",replica="all"}']) == 1
    assert float(lines['orca_jax:replicas{model_name="m"}']) == 2
    assert float(lines['orca_jax:router_decisions_total{reason="prefix",replica="r1"}']) == 3
    # No replica reported yet: the aggregate is zero, not an error.
    assert b'vllm:num_requests_waiting{model_name="m",replica="all"} 0.0' in render("m", {}, {})


def test_ingress_keys_prompts_like_the_replica():
    from orca_jax.ray.routing import prompt_tokens

    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]

    assert prompt_tokens({"prompt": "ab"}, "/v1/completions", Tok()) == [97, 98]
    assert prompt_tokens({"prompt": ["ab", "c"]}, "/v1/completions", Tok()) == [97, 98]
    assert prompt_tokens({"prompt": [5, 6]}, "/v1/completions", Tok()) == [5, 6]
    assert prompt_tokens({"prompt": [[5, 6], [7]]}, "/v1/completions", Tok()) == [5, 6]
    chat = prompt_tokens({"messages": [{"role": "system", "content": "x"}]}, "/v1/chat/completions", Tok())
    assert chat == [ord(c) for c in "system: x\n"]
    assert prompt_tokens({"prompt": 3}, "/v1/completions", Tok()) == []
    assert prompt_tokens([1], "/v1/completions", Tok()) == []
