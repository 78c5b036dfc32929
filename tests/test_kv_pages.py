"""The KV page pool (orca_jax/kv_pages.py) by hand, then the engine over a small pool on random
traces: arrivals, cancels, EOS, preemptions, prefix-cache hits and failing requests.

Host side only, no JAX. The engine runs over the hand-computable fake model
(tests/fake_model.py), whose device checks every plan: KV writes land at kv_index, decode rows
and history segments read only written positions, a finished request's pages hold its tokens.
"""
import numpy as np
import pytest

from fake_model import FakeEngine, expected_output
from orca_jax.kv_pages import PagePool, chain_hashes, page_hash
from orca_jax.request import FinishReason, Request, Status
from orca_jax.scheduler import SchedulerConfig

# -- the pool by hand ---------------------------------------------------------------------------


def cached_pages(pool: PagePool, tokens: list[int]) -> tuple[list[int], list[int]]:
    """Allocate and register the full pages of `tokens` (as a request that computed them)."""
    hashes = chain_hashes(tokens, pool.page_size)
    pages = pool.allocate(len(hashes))
    for p, h in zip(pages, hashes):
        pool.register(p, h)
    return pages, hashes


def test_allocate_hands_out_distinct_pages_and_refuses_when_short():
    pool = PagePool(num_pages=5, page_size=4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and all(0 <= p < 5 for p in a)
    assert (pool.num_free, pool.num_used, pool.usage()) == (2, 3, 3 / 5)
    assert pool.allocate(3) is None and pool.num_free == 2          # nothing taken
    assert pool.allocate(0) == []
    b = pool.allocate(2)
    assert not set(a) & set(b) and pool.num_free == 0 and pool.usage() == 1.0
    pool.check([a, b])
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 5
    pool.check([])


def test_free_reuses_the_least_recently_freed_first_and_a_tail_before_its_head():
    pool = PagePool(num_pages=6, page_size=2)
    a, b = pool.allocate(3), pool.allocate(3)
    pool.free(b)                                                     # b's tail first, then a's
    pool.free(a)
    assert pool.allocate(6) == b[::-1] + a[::-1]


def test_double_free_asserts():
    pool = PagePool(num_pages=3, page_size=2)
    pages = pool.allocate(2)
    pool.free(pages)
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free(pages[:1])
    pool.check([])


def test_a_shared_page_stays_held_until_its_last_holder_frees_it():
    pool = PagePool(num_pages=4, page_size=2)
    mine, hashes = cached_pages(pool, [1, 2, 3, 4])
    theirs = pool.acquire(hashes)                                    # a second request with that prefix
    assert theirs == mine and [pool.ref[p] for p in mine] == [2, 2] and pool.num_free == 2
    pool.check([mine, theirs])
    pool.free(mine)
    assert pool.num_free == 2 and pool.num_cached(hashes) == 2
    pool.check([theirs])
    pool.free(theirs)
    assert pool.num_free == 4 and pool.num_cached(hashes) == 2      # free, still cached
    pool.check([])


def test_register_and_acquire_cached_pages():
    pool = PagePool(num_pages=6, page_size=2)
    tokens = [5, 6, 7, 8, 9, 10, 11]                                 # 3 full pages + 1 token
    pages, hashes = cached_pages(pool, tokens)
    assert len(hashes) == 3 and pool.num_cached(hashes) == 3
    pool.free(pages)
    # A prompt with the same first two pages, then others: two leading pages hit.
    other = chain_hashes([5, 6, 7, 8, 0, 0], 2)
    assert other[:2] == hashes[:2] and other[2] != hashes[2]
    assert pool.num_cached(other) == 2 and pool.num_cached_free(other[:2]) == 2
    got = pool.acquire(other[:2])
    assert got == pages[:2] and pool.num_free == 6 - 2               # taken off the free list
    assert pool.num_cached_free(hashes) == 1                         # only the third is unheld
    fresh = pool.allocate(pool.num_free)                             # evicts every free page
    assert pages[2] in fresh and pool.num_cached(hashes) == 2        # the held prefix survives
    pool.check([got, fresh])


def test_eviction_forgets_the_tail_first_so_a_prefix_outlives_it():
    pool = PagePool(num_pages=4, page_size=2)
    pages, hashes = cached_pages(pool, [1, 2, 3, 4, 5, 6])           # 3 pages, all cached
    pool.free(pages)
    assert pool.num_cached(hashes) == 3
    pool.allocate(2)                                                 # the never-used page, then the tail
    assert pool.num_cached(hashes) == 2 and hashes[2] not in pool.cached
    pool.allocate(1)
    assert pool.num_cached(hashes) == 1
    assert pool.acquire(hashes[:1]) == pages[:1]
    assert pool.num_free == 0


def test_a_second_page_with_a_cached_key_stays_private():
    pool = PagePool(num_pages=4, page_size=2)
    first, hashes = cached_pages(pool, [3, 4])
    second, _ = cached_pages(pool, [3, 4])                           # computed twice (same iteration)
    assert pool.cached == {hashes[0]: first[0]} and pool.hash_of[second[0]] is None
    pool.free(first + second)
    assert pool.num_cached(hashes) == 1
    pool.check([])


def test_chain_hashes_key_a_page_by_everything_before_it():
    tokens = list(range(10))
    hashes = chain_hashes(tokens, 4)
    assert len(hashes) == 2                                          # the partial page has no key
    assert hashes == [page_hash(None, tokens[:4]), page_hash(hashes[0], tokens[4:8])]
    assert chain_hashes(tokens + [10, 11], 4, start=hashes) == chain_hashes(tokens + [10, 11], 4)
    # Equal tokens after a different prefix: a different key.
    assert chain_hashes([9, 9, 9, 9] + tokens[4:8], 4)[1] != hashes[1]


def test_prefix_caching_disabled_caches_and_counts_nothing():
    pool = PagePool(num_pages=4, page_size=2, enable_prefix_caching=False)
    pages, hashes = cached_pages(pool, [1, 2, 3, 4])
    assert pool.num_cached(hashes) == 0 and not pool.cached
    pool.count_query(4, 2)
    assert (pool.queries, pool.hits) == (0, 0)
    pool.free(pages)
    pool.check([])


def test_count_query_counts_tokens():
    pool = PagePool(num_pages=4, page_size=2)
    pool.count_query(10, 0)
    pool.count_query(10, 8)
    assert (pool.queries, pool.hits) == (20, 8)


def test_check_catches_a_holder_the_pool_does_not_know():
    pool = PagePool(num_pages=3, page_size=2)
    pages = pool.allocate(2)
    pool.check([pages])
    with pytest.raises(AssertionError):
        pool.check([pages[:1]])                                      # a reference nobody holds
    with pytest.raises(AssertionError):
        pool.check([pages, pages[:1]])                               # a holder the counts miss


# -- the engine over a small pool ------------------------------------------------------------------


def fail_when(eng: FakeEngine, doomed: dict[str, tuple[str, int]]):
    """A fault hook: request `rid` in `doomed` with (stage, n) fails at that stage once it has
    n tokens scheduled ("prepare": its inputs) or n outputs ("output": its post-processing).
    At most one request fails in "prepare" per iteration, and only after an iteration launched
    since the last such failure: a batch whose every request keeps failing would (rightly)
    make the engine give up (engine.py, _isolate)."""
    launches = {"now": 0, "at_fault": -1, "fault_step": None, "culprit": None}

    real_run = eng.runner.run

    def run(plan, sampling):
        launches["now"] += 1
        return real_run(plan, sampling)
    eng.runner.run = run

    def culprit():  # the first running request due to fail in prepare (None: none)
        for r in eng.scheduler.running:
            stage, n = doomed.get(r.request_id, ("", 0))
            if stage == "prepare" and r.num_scheduled >= n:
                return r
        return None

    def hook(stage: str, req: Request) -> None:
        want, n = doomed.get(req.request_id, ("", 0))
        if stage != want:
            return
        if stage == "output" and len(req.output_ids) >= n:
            raise RuntimeError(f"injected output fault for {req.request_id}")
        # (the engine prepares the batch, then each request alone: the same one fails each time)
        if stage != "prepare":
            return
        if launches["fault_step"] == eng.iteration:      # this step already has its culprit
            fails = req is launches["culprit"]
        else:                                            # first fault since a launch, if any
            fails = req is culprit() and launches["at_fault"] < launches["now"]
        if fails:
            eng.failed_in_prepare.add(req.request_id)
            launches.update(at_fault=launches["now"], fault_step=eng.iteration, culprit=req)
            raise RuntimeError(f"injected prepare fault for {req.request_id}")
    eng.failed_in_prepare = set()
    eng.engine.fault_hook = hook
    return launches


def check_pages(eng: FakeEngine) -> None:
    """After every step: the pool's counts are the running requests' pages; each request holds
    the pages of what it scheduled (on demand) or of prompt + max_tokens (reserve); a page two
    requests hold is a cached one; waiting requests hold nothing."""
    sch, pool = eng.scheduler, eng.engine.pool
    pool.check([r.pages for r in sch.running])
    B = pool.page_size
    for r in sch.running:
        want = r.max_total_len - 1 if sch.config.kv_admission == "reserve" else r.num_scheduled
        assert len(r.pages) == -(-want // B), (r.request_id, r.pages, r.num_scheduled)
        assert r.slot is not None and r.status is Status.RUNNING
    assert len({r.slot for r in sch.running}) == len(sch.running)
    assert all(pool.hash_of[p] is not None for p in range(pool.num_pages) if pool.ref[p] > 1)
    assert all(r.pages == [] and r.slot is None for r in sch.waiting)


def random_engine(rng, prefix_caching: bool, pipelined: bool, kv_admission: str):
    page_size = int(rng.choice([2, 4, 8]))
    max_len, vocab = 40, 23
    max_bs = int(rng.integers(2, 9))
    config = SchedulerConfig(max_batch_size=max_bs, max_num_batched_tokens=int(rng.integers(max_bs, max_bs + 24)),
                             max_prefill_seqs=int(rng.integers(1, max_bs + 1)), kv_admission=kv_admission,
                             policy="static" if rng.random() < 0.2 else "iteration")
    W = -(-max_len // page_size)
    num_pages = W + int(rng.integers(0, W // 2 + 1))         # room for one or 1.5 long sequences
    eos = 0 if rng.random() < 0.5 else None
    eng = FakeEngine(config, num_slots=max_bs, max_len=max_len, vocab=vocab, eos_id=eos,
                          pipelined=pipelined, num_pages=num_pages, page_size=page_size,
                          prefix_caching=prefix_caching)
    return eng, vocab, eos


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "pipelined"])
@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-cache", "prefix-cache"])
@pytest.mark.parametrize("seed", range(4))
def test_random_traces_keep_the_pool_consistent(seed, prefix_caching, pipelined):
    kv_admission = "reserve" if seed == 3 else "on-demand"
    rng = np.random.default_rng(100 * seed + 10 * prefix_caching + pipelined)
    eng, vocab, eos = random_engine(rng, prefix_caching, pipelined, kv_admission)
    max_len, sch, pool = eng.runner.max_len, eng.scheduler, eng.engine.pool
    # Prompts share prefixes (a few bases), or continue an earlier prompt with what the model
    # makes of it: both hit the prefix cache.
    bases = [rng.integers(0, vocab, 30).tolist() for _ in range(3)]
    arrivals: dict[int, list] = {}
    doomed: dict[str, tuple[str, int]] = {}
    for i in range(120):
        if rng.random() < 0.7:
            prompt = bases[int(rng.integers(3))][:int(rng.integers(1, 31))]
            prompt = prompt + rng.integers(0, vocab, int(rng.integers(0, 4))).tolist()
        else:
            prompt = rng.integers(0, vocab, int(rng.integers(1, 25))).tolist()
        if rng.random() < 0.15:
            prompt = prompt + expected_output(prompt, int(rng.integers(1, 8)), vocab)
        prompt = prompt[:30]
        max_tokens = int(rng.integers(1, max_len - len(prompt) + 1))
        rid = f"r{i}"
        arrivals.setdefault(int(rng.integers(1, 150)), []).append((prompt, max_tokens, rid))
        if rng.random() < 0.08:
            stage = "output" if rng.random() < 0.5 else "prepare"
            doomed[rid] = (stage, int(rng.integers(1, len(prompt) + max_tokens)) if stage == "prepare"
                           else int(rng.integers(0, max_tokens)))
    fail_when(eng, doomed)
    aborted = set()
    while eng.busy() or any(it > eng.iteration for it in arrivals):
        for args in arrivals.pop(eng.iteration + 1, []):
            eng.submit(*args)
        live = rng.random() < 0.02 and [r for r in list(sch.waiting) + sch.running]
        if live:                                             # a client cancels
            victim = live[int(rng.integers(len(live)))]
            eng.abort(victim)
            aborted.add(victim.request_id)
            check_pages(eng)
        eng.step()
        check_pages(eng)
        assert eng.iteration < 5_000, "the engine loop does not terminate"

    # Every page is free again (cached ones included); nobody holds a slot.
    assert pool.num_free == pool.num_pages and pool.num_used == 0
    pool.check([])
    assert sch.num_free_slots == sch.num_slots and not sch.has_work()
    reasons = {}
    for rid, r in eng.requests.items():
        want = expected_output(r.prompt_ids, r.params.max_tokens, vocab, eos)
        reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
        if r.finish_reason in (FinishReason.ABORT, FinishReason.ERROR):
            assert rid in aborted or rid in doomed
            assert r.output_ids == want[:len(r.output_ids)], rid
            assert r.finish_reason is FinishReason.ABORT or "injected" in r.error
        else:
            assert r.output_ids == want, (rid, r.num_preemptions)
            assert r.finish_reason is (FinishReason.STOP if want[-1] == eos else FinishReason.LENGTH)
    # The trace covered what it is meant to.
    assert len(eng.requests) == 120 and reasons.get(FinishReason.ABORT) and reasons.get(FinishReason.ERROR)
    errors = {rid for rid, r in eng.requests.items() if r.finish_reason is FinishReason.ERROR}
    assert errors  # (injected while preparing an iteration, or while post-processing a token)
    if kv_admission == "on-demand":
        assert sch.num_preemptions > 0
    else:
        assert sch.num_preemptions == 0
    if prefix_caching:
        assert pool.hits > 0 and any(r.num_cached_tokens for r in eng.requests.values())
    else:
        assert pool.hits == pool.queries == 0


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "pipelined"])
def test_prepare_fault_leaves_no_unwritten_pages_in_the_prefix_cache(pipelined):
    """A request that fails while its iteration is prepared never ran it: the pages it would
    have filled must not be offered to the prefix cache (a later prompt would read garbage)."""
    config = SchedulerConfig(max_batch_size=4, max_num_batched_tokens=64, max_prefill_seqs=4)
    eng = FakeEngine(config, num_slots=4, max_len=32, page_size=4, prefix_caching=True,
                          pipelined=pipelined)
    fail_when(eng, {"a": ("prepare", 0)})
    prompt = list(range(1, 15))                              # 3 full pages + 2 tokens
    a = eng.submit(prompt, 4, "a")
    eng.run()
    assert a.finish_reason is FinishReason.ERROR and a.output_ids == []
    b = eng.submit(prompt, 4, "b")
    eng.run()                                                # the fake device: "read pages never written"
    assert b.output_ids == expected_output(prompt, 4)
    eng.engine.pool.check([])
