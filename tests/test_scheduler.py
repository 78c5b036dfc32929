"""Orca's iteration-level scheduler (Algorithm 1) and the step plan, on a hand-computable fake model.

Host side only, no JAX: every test runs in milliseconds. The fake model answers
`(last input token + 1) % V` (tests/fake_model.py), so prompt [5] generates 6, 7, 8, ...
Traces are written as one line per iteration: (decoding request ids, [(id, start, length)
of each prompt chunk]).
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fake_model import FakeEngine, StepRecord, expected_output
from orca_jax.kv_pages import PagePool
from orca_jax.plan import Buckets, PagedKV, SampleRow, build_plan
from orca_jax.request import FinishReason, Request, SamplingParams, Status
from orca_jax.scheduler import Batch, Chunk, QueueFullError, Scheduler, SchedulerConfig

MODES = pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "pipelined"])
B = 4  # the page size of the hand-made plans and pools below: small, so contexts span several pages


def cfg(max_batch_size=4, max_num_batched_tokens=64, max_prefill_seqs=None, **kw) -> SchedulerConfig:
    return SchedulerConfig(max_batch_size=max_batch_size, max_num_batched_tokens=max_num_batched_tokens,
                           max_prefill_seqs=max_prefill_seqs or max_batch_size, **kw)


def scheduler(config: SchedulerConfig, num_slots: int, max_len: int, num_pages: int | None = None) -> Scheduler:
    """A scheduler over a pool of `num_pages` pages of B positions (default: every slot at max_len)."""
    return Scheduler(config, num_slots=num_slots, max_len=max_len,
                     pool=PagePool(num_pages or num_slots * -(-max_len // B), B))


def request(rid, prompt, max_tokens=4) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens), seed=0)


def kv_index(pages: list[int], positions, page_size: int = B) -> list[int]:
    """Where positions of a sequence with block table `pages` go: page * page_size + offset."""
    return [pages[p // page_size] * page_size + p % page_size for p in positions]


def pages_for(n: int, page_size: int = B) -> int:
    return -(-n // page_size)


def trace(records: list[StepRecord]) -> list[tuple[list[str], list[tuple[str, int, int]]]]:
    return [(r.decodes, r.chunks) for r in records]


# -- the fake model itself -------------------------------------------------------------------


def test_fake_model_is_hand_computable():
    assert expected_output([5], 3) == [6, 7, 8]
    assert expected_output([1, 2, 95], 4) == [96, 0, 1, 2]          # wraps around V = 97
    assert expected_output([5], 10, eos_id=8) == [6, 7, 8]           # EOS is kept, then stops
    eng = FakeEngine(cfg(), num_slots=4, max_len=32)
    a, b = eng.submit([5], 3, "a"), eng.submit([1, 2, 95], 4, "b")
    eng.run()
    assert a.output_ids == [6, 7, 8] and b.output_ids == [96, 0, 1, 2]
    assert a.finish_reason is b.finish_reason is FinishReason.LENGTH


@MODES
def test_stop_on_eos(pipelined):
    eng = FakeEngine(cfg(), num_slots=2, max_len=32, eos_id=8, pipelined=pipelined)
    a, b = eng.submit([5], 10, "a"), eng.submit([9], 3, "b")
    eng.run()
    assert a.output_ids == [6, 7, 8] and a.finish_reason is FinishReason.STOP
    assert b.output_ids == [10, 11, 12] and b.finish_reason is FinishReason.LENGTH


def test_host_side_modules_do_not_import_jax():
    code = ("import sys; sys.path.insert(0, 'tests'); import fake_model, orca_jax.scheduler, orca_jax.plan, "
            "orca_jax.request; bad = [m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax'))]; "
            "assert not bad, bad")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# -- Algorithm 1: who runs each iteration ----------------------------------------------------


@MODES
def test_fcfs_admission_order_and_lowest_free_slot(pipelined):
    eng = FakeEngine(cfg(max_batch_size=8), num_slots=2, max_len=32, pipelined=pipelined)
    for i in range(5):
        eng.submit([10 * i], 2, f"r{i}")
    eng.run()
    admitted = [rid for rec in eng.records for rid in rec.admitted]
    assert admitted == ["r0", "r1", "r2", "r3", "r4"]
    assert [eng.joined[f"r{i}"] for i in range(5)] == sorted(eng.joined.values())
    assert eng.records[0].slots == {"r0": 0, "r1": 1}
    for i in range(5):
        assert eng.requests[f"r{i}"].output_ids == [10 * i + 1, 10 * i + 2]


def test_iteration_trace_by_hand():
    """Two slots, five requests of max_tokens=2: each finishes after two iterations and the
    next waiting request takes its slot in the very next one."""
    eng = FakeEngine(cfg(max_batch_size=8), num_slots=2, max_len=32)
    for i in range(5):
        eng.submit([1, 2, 3], 2, f"r{i}")
    eng.run()
    assert trace(eng.records) == [
        ([], [("r0", 0, 3), ("r1", 0, 3)]),
        (["r0", "r1"], []),                    # r0, r1 reach max_tokens and leave
        ([], [("r2", 0, 3), ("r3", 0, 3)]),
        (["r2", "r3"], []),
        ([], [("r4", 0, 3)]),
        (["r4"], []),
    ]
    assert [eng.records[i].finished for i in (1, 3, 5)] == [
        [("r0", FinishReason.LENGTH), ("r1", FinishReason.LENGTH)],
        [("r2", FinishReason.LENGTH), ("r3", FinishReason.LENGTH)],
        [("r4", FinishReason.LENGTH)]]


@MODES
def test_max_batch_size_respected_every_iteration(pipelined):
    eng = FakeEngine(cfg(max_batch_size=3), num_slots=8, max_len=32, pipelined=pipelined)
    for i in range(10):
        eng.submit([i], 1 + i % 4, f"r{i}")
    eng.run()
    assert max(r.batch_size for r in eng.records) == 3
    assert all(len(r.slots) <= 3 for r in eng.records)
    assert all(eng.requests[f"r{i}"].output_ids == expected_output([i], 1 + i % 4) for i in range(10))


@MODES
def test_arrival_joins_the_very_next_iteration(pipelined):
    eng = FakeEngine(cfg(), num_slots=4, max_len=32, pipelined=pipelined)
    a = eng.submit([1], 10, "a")
    for _ in range(3):
        eng.step()
    eng.submit([50, 51], 3, "b")                       # arrives while `a` is decoding
    rec = eng.step()
    assert rec.decodes == ["a"] and rec.chunks == [("b", 0, 2)]
    assert eng.joined == {"a": 1, "b": 4}
    eng.run()
    assert a.output_ids == expected_output([1], 10) and eng.requests["b"].output_ids == [52, 53, 54]


@MODES
def test_finished_request_leaves_and_its_slot_is_reused(pipelined):
    eng = FakeEngine(cfg(), num_slots=1, max_len=32, pipelined=pipelined)
    a, b = eng.submit([1], 2, "a"), eng.submit([7], 2, "b")
    eng.step()                                         # 1: a's prompt; b waits for the slot
    eng.step()                                         # 2: a decodes its last token
    if pipelined:  # ids of step N are read after step N+1 is dispatched: a leaves one step later
        assert not a.finished
        assert eng.step().decodes == []               # 3: a has every token scheduled; b still waits
    assert a.finished and a.finish_reason is FinishReason.LENGTH
    assert a not in eng.scheduler.running and eng.scheduler.num_free_slots == 1
    assert eng.records[-1].finished == [("a", FinishReason.LENGTH)]
    rec = eng.step()                                   # b joins at once, in a's slot
    assert rec.admitted == ["b"] and b.slot == 0
    eng.run()
    assert a.output_ids == [2, 3] and b.output_ids == [8, 9]
    assert eng.joined == {"a": 1, "b": 3 if not pipelined else 4}


@MODES
def test_slots_limit_the_batch_and_the_head_of_line_blocks(pipelined):
    """With 2 sequence slots at most 2 requests run, however large max_batch_size is; the head
    of the queue is served first even when a request behind it would finish sooner."""
    eng = FakeEngine(cfg(max_batch_size=8), num_slots=2, max_len=64, pipelined=pipelined, page_size=B)
    a, b = eng.submit([1], 3, "a"), eng.submit([2], 6, "b")
    eng.submit(list(range(30)), 20, "long")
    eng.submit([3], 1, "short")
    eng.step()
    assert eng.scheduler.num_free_slots == 0 and eng.records[-1].waiting_after == ["long", "short"]
    # On demand, a and b hold only the page of their one-token prompt so far.
    assert len(a.pages) == len(b.pages) == 1
    assert eng.scheduler.kv_usage() == 2 / eng.engine.pool.num_pages
    eng.run()
    assert max(len(r.slots) for r in eng.records) == 2
    assert eng.joined["long"] < eng.joined["short"]          # no overtaking
    assert eng.joined["short"] > eng.left["a"]              # ... although a freed a slot before b did
    assert eng.requests["short"].output_ids == [4]


@MODES
def test_reserve_admission_takes_prompt_plus_max_tokens_and_the_head_of_line_blocks(pipelined):
    """Orca's admission: a request joins only once pages for prompt + max_tokens are free, takes
    them all at once and never grows. The 14-page request at the head of the queue waits for
    a's page; the 1-page request behind it, which would fit at once, waits its turn."""
    eng = FakeEngine(cfg(max_batch_size=8, kv_admission="reserve"), num_slots=8, max_len=64,
                     pipelined=pipelined, page_size=B, num_pages=16)
    pool = eng.engine.pool
    eng.submit([1], 3, "a")                                 # positions [0, 3): 1 page
    eng.submit([2], 6, "b")                                 # [0, 6): 2 pages
    eng.submit(list(range(30)), 24, "long")                 # [0, 53): 14 pages > 16 - 3
    eng.submit([3], 1, "short")                             # [0, 1): 1 page
    eng.step()
    assert eng.records[-1].waiting_after == ["long", "short"]
    assert pool.num_used == 3 and eng.scheduler.kv_usage() == 3 / 16
    while eng.busy():
        eng.step()
        for r in eng.scheduler.running:                     # everything reserved, nothing more taken
            assert len(r.pages) == pages_for(r.max_total_len - 1)
        pool.check([r.pages for r in eng.scheduler.running])
    assert eng.joined["long"] == eng.left["a"] + 1          # a's page makes 14 free
    assert eng.joined["short"] == eng.left["b"] + 1         # long holds 14, b's 2 pages come back
    assert eng.scheduler.num_preemptions == 0
    for rid in ("a", "b", "long", "short"):
        r = eng.requests[rid]
        assert r.output_ids == expected_output(r.prompt_ids, r.params.max_tokens)


def test_no_overtaking_within_the_token_budget():
    """With one token of budget left, the long head of the queue gets a one-token chunk; the
    short request behind it does not jump ahead."""
    eng = FakeEngine(cfg(max_batch_size=4, max_num_batched_tokens=4), num_slots=4, max_len=64)
    eng.submit([1, 2, 3], 5, "a")
    eng.submit(list(range(20)), 2, "long")
    eng.submit([9], 2, "short")
    rec = eng.step()
    assert rec.chunks == [("a", 0, 3), ("long", 0, 1)] and rec.waiting_after == ["short"]
    eng.run()
    assert eng.requests["short"].output_ids == [10, 11]


# -- admission checks in add() ----------------------------------------------------------------


@pytest.mark.parametrize("prompt_len,max_tokens,match", [
    (0, 4, r"^prompt is empty: give at least one token$"),
    (9, 1, r"^prompt is 9 tokens; the maximum context length is 8 tokens, which leaves no room for a new token$"),
    (5, 4, r"^max_tokens=4 with a 5-token prompt needs 9 tokens, over the maximum context length "
           r"of 8; lower max_tokens to at most 3$"),
])
def test_add_rejects_requests_that_can_never_fit(prompt_len, max_tokens, match):
    sch = scheduler(cfg(), num_slots=2, max_len=8)
    with pytest.raises(ValueError, match=match):
        sch.add(request("x", [1] * prompt_len, max_tokens))
    assert not sch.waiting


def test_add_accepts_a_request_that_exactly_fits():
    sch = scheduler(cfg(), num_slots=2, max_len=8)
    sch.add(request("x", [1] * 5, 3))
    assert [r.request_id for r in sch.waiting] == ["x"]


def test_add_prompt_of_exactly_max_len_gets_an_actionable_message():
    sch = scheduler(cfg(), num_slots=2, max_len=8)
    with pytest.raises(ValueError) as e:
        sch.add(request("x", [1] * 8, 1))
    assert "at most 0" not in str(e.value) and "no room for a new token" in str(e.value)


def test_full_waiting_queue_raises_queue_full():
    sch = scheduler(cfg(max_waiting=2), num_slots=1, max_len=8)
    sch.add(request("a", [1]))
    sch.add(request("b", [1]))
    with pytest.raises(QueueFullError, match=r"^the waiting queue is full \(2 requests\); retry later$"):
        sch.add(request("c", [1]))
    sch.schedule()                                  # `a` leaves the queue for the batch: room again
    sch.add(request("c", [1]))
    assert [r.request_id for r in sch.waiting] == ["b", "c"]


# -- token budget and chunked prefill --------------------------------------------------------


def test_long_prompt_is_chunked_within_the_token_budget():
    eng = FakeEngine(cfg(max_batch_size=4, max_num_batched_tokens=8), num_slots=4, max_len=64, page_size=B)
    eng.submit([1, 2], 10, "a")
    eng.submit(list(range(20)), 2, "b")
    eng.run()
    assert trace(eng.records)[:5] == [
        ([], [("a", 0, 2), ("b", 0, 6)]),            # the budget cuts b after 6 tokens
        (["a"], [("b", 6, 7)]),                     # a decodes (1) + b's next chunk (7) = 8
        (["a"], [("b", 13, 7)]),                    # b's prompt completes and samples
        (["a", "b"], []),
        (["a"], []),                                # b has its 2 tokens and has left
    ]
    assert all(r.num_tokens <= 8 for r in eng.records)
    # Iteration 2: a's decode row, then b's chunk [6, 13), which reads [0, 6) from b's pages.
    meta = eng.records[1].plan.inputs.meta
    td, pad = meta.num_decode, eng.runner.kv.num_pages * B
    a_pages, b_pages = eng.pages["a"], eng.pages["b"]      # as they were when they left
    assert len(b_pages) == pages_for(22 - 1)               # positions [0, 21): prompt + 1 output
    assert meta.pos.tolist()[:td + 7] == [2] + [0] * (td - 1) + list(range(6, 13))
    assert meta.kv_index.tolist() == (kv_index(a_pages, [2]) + [pad] * (td - 1)
                                      + kv_index(b_pages, range(6, 13)) + [pad] * (len(meta.seg) - 7))
    assert meta.block_table[0].tolist()[:1] == a_pages[:1] and meta.dec_blocks == 1
    assert int(meta.num_hist) == 1
    assert (meta.hist_len[0], meta.hist_row0[0], meta.hist_rows[0]) == (6, 0, 7)
    W = eng.runner.kv.max_pages
    assert meta.hist_table[0].tolist() == b_pages[:pages_for(13)] + [0] * (W - pages_for(13))
    assert eng.requests["b"].output_ids == [20, 21]


def check_hist(rec: StepRecord, pages: dict[str, list[int]]) -> None:
    """The plan of `rec` has one history entry per chunk that continues a sequence (start > 0),
    in chunk order: its pages, where it starts and which prefill rows it has."""
    meta, row, h = rec.plan.inputs.meta, 0, 0
    for rid, start, length in rec.chunks:
        if start > 0:
            n = pages_for(start + length, B)
            assert meta.hist_table[h].tolist()[:n] == pages[rid][:n] and not meta.hist_table[h, n:].any()
            assert (meta.hist_len[h], meta.hist_row0[h], meta.hist_rows[h]) == (start, row, length)
            h += 1
        row += length
    assert int(meta.num_hist) == h


@MODES
def test_every_chunk_that_continues_a_sequence_is_a_history_entry(pipelined):
    """Any number of prefill segments in one iteration may continue a sequence already in its
    pages: a prompt cut by the budget, and prompts whose prefix is cached. Each is a history
    entry of the plan; the fake device checks they read only written positions."""
    eng = FakeEngine(cfg(max_batch_size=6, max_num_batched_tokens=24, max_prefill_seqs=3), num_slots=6,
                     max_len=64, pipelined=pipelined, page_size=B, prefix_caching=True)
    shared = list(range(40, 53))                            # 3 full pages + 1 token
    eng.submit(shared, 2, "first")
    eng.run()
    # Two requests whose first 12 tokens are cached, behind a prompt the budget cuts.
    eng.submit(list(range(30)), 3, "long")
    eng.submit(shared, 3, "again")
    eng.submit(shared[:12] + [7, 8, 9], 3, "sibling")
    eng.run()
    assert eng.scheduler.num_preemptions == 0
    pages = {rid: eng.pages[rid] for rid in eng.requests}   # unchanged while they ran
    assert any(sum(start > 0 for _, start, _ in rec.chunks) >= 2 for rec in eng.records)
    for rec in eng.records:
        if rec.plan is not None:
            check_hist(rec, pages)
        assert len(rec.chunks) <= 3 and rec.num_tokens <= 24
    assert eng.requests["again"].num_cached_tokens == eng.requests["sibling"].num_cached_tokens == 12
    for r in eng.requests.values():
        assert r.output_ids == expected_output(r.prompt_ids, r.params.max_tokens)


@MODES
def test_chunked_and_unchunked_runs_give_the_same_outputs(pipelined):
    prompts = [list(range(k, k + n)) for k, n in [(3, 1), (10, 25), (40, 7), (60, 16), (0, 2)]]

    def outputs(budget, buckets=None):
        eng = FakeEngine(cfg(max_batch_size=4, max_num_batched_tokens=budget), num_slots=3, max_len=64,
                         pipelined=pipelined, buckets=buckets)
        reqs = [eng.submit(p, 6) for p in prompts]
        eng.run()
        return eng, [r.output_ids for r in reqs]

    chunked, out_chunked = outputs(4)
    whole, out_whole = outputs(256, Buckets.make(3, 256, 3, min_prefill=256))  # one prefill bucket: no cut
    assert any(c[1] > 0 for r in chunked.records for c in r.chunks)
    assert not any(c[1] > 0 for r in whole.records for c in r.chunks)
    assert out_chunked == out_whole == [expected_output(p, 6) for p in prompts]


def test_prefill_chunks_are_cut_back_to_a_bucket_when_that_pads_less():
    """Buckets 16, 64 (budget 64): 20 prompt tokens would pad to 64 rows, so the step takes 16
    and the next 4 (the cut chunk continues); 50 tokens are nearer 64 and go whole. Two
    prompts of 12: the second is cut to 4, then continues."""
    eng = FakeEngine(cfg(max_batch_size=4, max_num_batched_tokens=64), num_slots=4, max_len=128, page_size=B)
    assert eng.scheduler.config.prefill_buckets == (16, 64)
    eng.submit(list(range(20)), 2, "a")
    eng.run()
    eng.submit(list(range(50)), 2, "b")
    eng.run()
    eng.submit(list(range(12)), 2, "c")
    eng.submit(list(range(30, 42)), 2, "d")
    eng.run()
    chunks = [r.chunks for r in eng.records if r.chunks]
    assert chunks == [[("a", 0, 16)], [("a", 16, 4)], [("b", 0, 50)],
                      [("c", 0, 12), ("d", 0, 4)], [("d", 4, 8)]]
    for rid in "abcd":
        assert eng.requests[rid].output_ids == expected_output(eng.requests[rid].prompt_ids, 2)
    # --no-bucket-chunking: the scheduler gets no buckets to cut back to
    from fake_model import FakeRunner
    from orca_jax.engine import Engine, EngineConfig
    off = Engine(FakeRunner(4, 128, 97, None), EngineConfig(max_batch_size=4, max_num_batched_tokens=64,
                                                            bucket_chunking=False))
    assert off.scheduler.config.prefill_buckets == ()


# -- abort -------------------------------------------------------------------------------------


@MODES
def test_abort_waiting_request(pipelined):
    eng = FakeEngine(cfg(), num_slots=1, max_len=32, pipelined=pipelined)
    a, b, c = eng.submit([1], 3, "a"), eng.submit([2], 3, "b"), eng.submit([3], 3, "c")
    eng.step()
    eng.abort(b)
    assert b.status is Status.FINISHED and b.finish_reason is FinishReason.ABORT
    assert [r.request_id for r in eng.scheduler.waiting] == ["c"]
    eng.run()
    assert "b" not in eng.joined and b.output_ids == []
    assert a.output_ids == [2, 3, 4] and c.output_ids == [4, 5, 6]


@MODES
def test_abort_mid_prefill_frees_the_slot_for_the_next_iteration(pipelined):
    eng = FakeEngine(cfg(max_batch_size=1, max_num_batched_tokens=4), num_slots=1, max_len=32,
                     pipelined=pipelined)
    a, b = eng.submit(list(range(10)), 3, "a"), eng.submit([20], 2, "b")
    assert eng.step().chunks == [("a", 0, 4)]
    assert eng.step().chunks == [("a", 4, 4)]       # a's prompt is half in its slot
    eng.abort(a)
    assert eng.scheduler.num_free_slots == 1 and not eng.scheduler.running
    rec = eng.step()
    assert rec.chunks == [("b", 0, 1)] and b.slot == 0
    eng.run()
    assert a.output_ids == [] and a.finish_reason is FinishReason.ABORT
    assert b.output_ids == [21, 22]


@MODES
def test_abort_mid_decode_frees_the_slot_for_the_next_iteration(pipelined):
    eng = FakeEngine(cfg(), num_slots=1, max_len=32, pipelined=pipelined)
    a, b = eng.submit([1], 10, "a"), eng.submit([30], 2, "b")
    for _ in range(3):
        eng.step()
    eng.abort(a)
    assert eng.scheduler.num_free_slots == 1 and eng.scheduler.kv_usage() == 0.0
    assert eng.step().admitted == ["b"]
    eng.run()
    # sync: 3 iterations = 3 tokens; pipelined: the third step's id was still in flight.
    assert a.output_ids == ([2, 3, 4] if not pipelined else [2, 3])
    assert a.finish_reason is FinishReason.ABORT and b.output_ids == [31, 32]


def test_finish_twice_is_a_no_op():
    sch = scheduler(cfg(), num_slots=2, max_len=8)
    a = request("a", [1])
    sch.add(a)
    sch.schedule()
    assert len(a.pages) == 1 and sch.pool.num_used == 1
    sch.finish(a, FinishReason.ABORT)
    sch.finish(a, FinishReason.LENGTH)                  # its page is not freed twice
    assert a.finish_reason is FinishReason.ABORT and sch.num_free_slots == 2
    assert a.pages == [] and sch.pool.num_used == 0 and sch.kv_usage() == 0.0
    sch.pool.check([])


# -- the static (request-level) baseline -------------------------------------------------------


@pytest.mark.parametrize("policy", ["iteration", "static"])
@MODES
def test_static_policy_forms_a_new_batch_only_when_the_whole_batch_finished(policy, pipelined):
    eng = FakeEngine(cfg(max_batch_size=3, policy=policy), num_slots=3, max_len=32, pipelined=pipelined)
    eng.submit([1], 2, "a")
    eng.submit([2], 6, "b")
    eng.step()
    eng.submit([3], 2, "c")                      # arrives while a and b run; a slot is free
    eng.run()
    if policy == "iteration":
        assert eng.joined["c"] == 2
    else:
        assert eng.joined["c"] == max(eng.left["a"], eng.left["b"]) + 1
        for rec in eng.records:                  # nobody joins a batch that still has members
            assert not rec.admitted or not rec.running_before
    assert [eng.requests[r].output_ids for r in "abc"] == [[2, 3], [3, 4, 5, 6, 7, 8], [4, 5]]


# -- KV pages: on-demand admission, preemption, prefix caching ---------------------------------


@pytest.mark.parametrize("max_tokens", [13, 29])
@pytest.mark.parametrize("kv_admission", ["on-demand", "reserve"])
@MODES
def test_on_demand_admission_runs_more_requests_than_reserve(kv_admission, max_tokens, pipelined):
    """A pool of 16 pages of 4 (two max_len sequences) and 8 requests of 3-token prompts.
    Reserving prompt + max_tokens lets only 16 // pages(3 + max_tokens - 1) run at once and
    never preempts; on demand all 8 join at once, taking pages as their tokens come, and the
    newest are preempted (recomputed later) when the pool runs out. Outputs are the same."""
    eng = FakeEngine(cfg(max_batch_size=8, kv_admission=kv_admission), num_slots=8, max_len=32,
                     pipelined=pipelined, page_size=B, num_pages=16)
    reqs = [eng.submit([10 * i, 10 * i + 1, 10 * i + 2], max_tokens, f"r{i}") for i in range(8)]
    pool = eng.engine.pool
    while eng.busy():
        eng.step()
        pool.check([r.pages for r in eng.scheduler.running])
    most = max(len(rec.slots) for rec in eng.records)
    if kv_admission == "reserve":
        assert most == 16 // pages_for(3 + max_tokens - 1) and eng.scheduler.num_preemptions == 0
    else:
        assert most == 8 and eng.scheduler.num_preemptions > 0
        assert sum(r.num_preemptions for r in reqs) == eng.scheduler.num_preemptions
    assert eng.engine.stats.max_batch_size_seen == most
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, max_tokens)
        assert r.finish_reason is FinishReason.LENGTH
    assert pool.num_free == pool.num_pages and eng.scheduler.kv_usage() == 0.0


@MODES
def test_preempted_request_goes_to_the_front_and_resumes_by_recomputing(pipelined):
    """A pool of 4 pages of 4 positions. a and b decode until it is full; d arrives and waits.
    When a needs a third page, b (the most recently admitted) is preempted: its pages are
    freed and it goes back to the FRONT of the queue, ahead of d. It resumes with one prefill
    of its prompt and the outputs it had made, which samples its next output."""
    eng = FakeEngine(cfg(), num_slots=4, max_len=16, page_size=B, num_pages=4, pipelined=pipelined)
    pool = eng.engine.pool
    a, b = eng.submit([1, 2, 3], 8, "a"), eng.submit([10, 11, 12], 8, "b")
    while pool.num_free:
        eng.step()
    d = eng.submit([20], 2, "d")
    preempted = resumed = None
    while eng.busy():
        made = len(b.output_ids)                         # b's outputs on the host before this step
        rec = eng.step()
        pool.check([r.pages for r in eng.scheduler.running])
        if preempted is None and "b" in rec.waiting_after and "b" in dict(rec.running_before):
            preempted = rec
            assert rec.decodes == ["a"] and rec.waiting_after == ["b", "d"]
            assert b.status is Status.WAITING and b.num_scheduled == 0 and b.pages == [] and b.slot is None
            assert b.num_preemptions == 1 and len(a.pages) == 3
        elif preempted is not None and rec.admitted == ["b"]:
            resumed = rec
            L = 3 + made                                 # prompt + every output it had made
            assert rec.chunks == [("b", 0, L)] and b.prefill_len == L
            assert [(row.request, row.index) for row in rec.plan.rows] == [(b, made)]
            assert rec.waiting_after == ["d"]            # d still waits behind it
    assert preempted is not None and resumed is not None
    assert eng.scheduler.num_preemptions == 1 and eng.joined["d"] > resumed.iteration
    assert a.output_ids == expected_output([1, 2, 3], 8) and b.output_ids == expected_output([10, 11, 12], 8)
    assert d.output_ids == [21, 22] and pool.num_free == pool.num_pages


def test_the_newest_request_preempts_itself_when_the_pool_is_short():
    """a and b each hold one page of a 3-page pool; a's decode takes the free page, so b's
    decode finds none: b, the most recently admitted, is preempted (itself), a goes on."""
    sch = scheduler(cfg(), num_slots=2, max_len=12, num_pages=3)
    a, b = request("a", [1, 2, 3, 4], 8), request("b", [5, 6, 7, 8], 8)
    sch.add(a)
    sch.add(b)
    first = sch.schedule()
    assert [(c.request, c.start, c.length) for c in first.prefills] == [(a, 0, 4), (b, 0, 4)]
    assert len(a.pages) == len(b.pages) == 1 and sch.pool.num_free == 1
    sch.iteration_done(first)
    a.output_ids.append(5)
    b.output_ids.append(9)
    second = sch.schedule()
    assert second.decodes == [a] and second.prefills == [] and len(a.pages) == 2
    assert list(sch.waiting) == [b] and b.status is Status.WAITING and b.pages == []
    assert b.num_preemptions == sch.num_preemptions == 1 and sch.running == [a]
    sch.pool.check([a.pages])


@pytest.mark.parametrize("prompt_len,cached", [(14, 12), (12, 8)])
@MODES
def test_prefix_cache_serves_the_full_pages_of_a_repeated_prompt(prompt_len, cached, pipelined):
    """A second request with the same prompt, after the first finished, takes the first's full
    pages before its last token (which must be computed: it samples) and prefills from there."""
    eng = FakeEngine(cfg(), num_slots=4, max_len=32, page_size=B, pipelined=pipelined, prefix_caching=True)
    pool, prompt = eng.engine.pool, list(range(30, 30 + prompt_len))
    first = eng.submit(prompt, 3, "first")
    eng.run()
    assert first.num_cached_tokens == 0 and (pool.queries, pool.hits) == (prompt_len, 0)
    again = eng.submit(prompt, 3, "again")
    rec = eng.step()
    assert again.num_cached_tokens == cached and rec.chunks == [("again", cached, prompt_len - cached)]
    assert again.pages[:cached // B] == eng.pages["first"][:cached // B]       # the same pages
    meta = rec.plan.inputs.meta
    assert int(meta.num_hist) == 1 and (meta.hist_len[0], meta.hist_rows[0]) == (cached, prompt_len - cached)
    assert (pool.queries, pool.hits) == (2 * prompt_len, cached)
    eng.run()
    assert first.output_ids == again.output_ids == expected_output(prompt, 3)
    # Pages filled by decode rows are cached too, once their tokens are on the host: a prompt
    # that continues `first` finds them (pipelined, its last decode input was still in flight).
    more = eng.submit(prompt + first.output_ids, 2, "more")
    eng.step()
    written = (prompt_len + 2) // B * B                  # full pages of what first wrote
    if pipelined:
        assert prompt_len // B * B <= more.num_cached_tokens <= written
    else:
        assert more.num_cached_tokens == written
    eng.run()
    assert more.output_ids == expected_output(more.prompt_ids, 2)
    assert pool.num_free == pool.num_pages
    pool.check([])


# -- build_plan -----------------------------------------------------------------------------------


def running(rid, prompt, slot, num_scheduled, pages, max_tokens=8) -> Request:
    r = request(rid, prompt, max_tokens)
    r.status, r.slot, r.num_scheduled, r.pages = Status.RUNNING, slot, num_scheduled, list(pages)
    return r


@pytest.mark.parametrize("n,choices,want", [
    (0, (0, 1, 2, 4), 0), (1, (0, 1, 2, 4), 1), (3, (0, 1, 2, 4), 4), (4, (0, 1, 2, 4), 4),
    (17, (0, 16, 32, 40), 32), (33, (0, 16, 32, 40), 40),
])
def test_bucket_is_the_smallest_at_least_the_count(n, choices, want):
    assert Buckets.pick(n, choices) == want


def test_bucket_pick_beyond_the_largest_raises():
    with pytest.raises(ValueError, match=r"^5 rows exceed the largest bucket 4$"):
        Buckets.pick(5, (0, 1, 2, 4))


def test_buckets_make_and_shapes():
    b = Buckets.make(max_batch_size=6, max_num_batched_tokens=40, max_prefill_seqs=3, min_decode=1, min_prefill=4)
    assert b.decode == (0, 1, 2, 4, 6) and b.prefill == (0, 4, 16, 40) and b.max_prefill_seqs == 3
    assert Buckets.make(1, 8, 1).decode == (0, 1) and Buckets.make(1, 8, 1).prefill == (0, 8)
    # Defaults: decode rows x2 from 1, prefill rows x4 from 16, steps with both from 8 decode rows.
    assert Buckets.make(64, 512, 4).decode == (0, 1, 2, 4, 8, 16, 32, 64)
    assert Buckets.make(8, 512, 4).prefill == (0, 16, 64, 256, 512)
    assert Buckets.make(64, 512, 4).min_mixed_decode == 8 and b.min_mixed_decode == 6
    shapes = b.shapes()
    # decode only (4) + prefill only (3) + both: decode rows >= 6 only (1 x 3)
    assert (0, 0) not in shapes and len(shapes) == len(set(shapes)) == 4 + 3 + 3
    assert (6, 40) in shapes and (0, 16) in shapes and (1, 0) in shapes and (0, 4) in shapes
    assert (4, 4) not in shapes and b.decode_rows(1, 4) == 6 and b.decode_rows(1, 0) == 1
    assert b.decode_rows(0, 4) == 0 and b.decode_rows(5, 0) == 6
    # R: room for every decode row and one completing row per prompt segment (possibly padded).
    for td, tp in shapes:
        assert b.num_sample_rows(td, tp) >= td + min(tp, b.max_prefill_seqs)


def test_build_plan_of_a_hand_made_batch():
    """Rows [decode a, b, e, pad | c's last 4 prompt tokens, d's first 3, pad]: Td = 4, Tp = 8.
    Pages of B = 4 positions, scattered over a pool of 20: each row's K and V go to
    page * B + pos % B of its own block table; c continues its prompt (a history entry)."""
    a = running("a", [7, 8, 9], slot=2, num_scheduled=5, pages=[5, 11])  # advanced by schedule(): input at pos 4
    b = running("b", [40], slot=0, num_scheduled=2, pages=[3])            # input at pos 1
    e = running("e", [1, 2], slot=4, num_scheduled=4, pages=[7])          # input at pos 3
    c = running("c", list(range(50, 60)), slot=1, num_scheduled=10, pages=[2, 9, 14])  # last chunk of its prompt
    d = running("d", [90, 91, 92, 93, 94], slot=3, num_scheduled=3, pages=[19])       # first chunk of its prompt
    batch = Batch(decodes=[a, b, e], prefills=[Chunk(c, 6, 4), Chunk(d, 0, 3)])
    buckets = Buckets(decode=(0, 1, 2, 4), prefill=(0, 4, 8, 16), max_prefill_seqs=2)
    kv = PagedKV.make(num_pages=20, page_size=B, max_len=16)
    p = build_plan(batch, buckets, num_slots=5, kv=kv)
    m, inp, smp = p.inputs.meta, p.inputs, p.sample
    S, PAD = 5, 20 * B
    assert kv.max_pages == 4 and (p.num_decode, p.num_prefill, p.num_tokens) == (4, 8, 10)
    assert m.slot.tolist() == [2, 0, 4, S, 1, 1, 1, 1, 3, 3, 3, S]
    assert m.pos.tolist() == [4, 1, 3, 0, 6, 7, 8, 9, 0, 1, 2, 0]
    assert m.kv_index.tolist() == [11 * B + 0, 3 * B + 1, 7 * B + 3, PAD,
                                   9 * B + 2, 9 * B + 3, 14 * B + 0, 14 * B + 1,
                                   19 * B + 0, 19 * B + 1, 19 * B + 2, PAD]
    assert m.seg.tolist() == [0, 0, 0, 0, 1, 1, 1, -1]
    assert inp.prefill_tokens.tolist() == [56, 57, 58, 59, 90, 91, 92, 0]
    # Decode rows read their sequence through its block table, up to ceil((4 + 1) / B) pages.
    assert m.block_table.tolist() == [[5, 11, 0, 0], [3, 0, 0, 0], [7, 0, 0, 0], [0, 0, 0, 0]]
    assert m.dec_blocks == 2
    # One history entry (Nh = min(max_prefill_seqs, Tp) = 2 rows): c's [0, 6) is in its pages.
    assert m.num_hist == 1 and m.hist_table.tolist() == [[2, 9, 14, 0], [0, 0, 0, 0]]
    assert (m.hist_len.tolist(), m.hist_row0.tolist(), m.hist_rows.tolist()) == ([6, 0], [0, 0], [4, 0])
    # Sampling rows: decodes a, b, e, then c's completing row; the rest (up to R) is padding.
    R = buckets.num_sample_rows(4, 8)
    assert R >= 4 + 2 and inp.sample_rows.shape == (R,)
    pad = R - 4
    assert inp.sample_rows.tolist() == [0, 1, 2, 7] + [0] * pad
    assert smp.sample_slot.tolist() == [2, 0, 4, 1] + [S] * pad
    assert smp.sample_pos.tolist() == [4, 1, 3, 9] + [0] * pad
    assert smp.prompt_len.tolist() == [3, 1, 2, 10] + [0] * pad
    assert p.rows == [SampleRow(a, 2), SampleRow(b, 1), SampleRow(e, 2), SampleRow(c, 0)]
    for arr in (m.slot, m.pos, m.kv_index, m.seg, m.block_table, m.hist_table, inp.prefill_tokens,
                inp.sample_rows, smp.sample_slot, smp.sample_pos):
        assert arr.dtype == np.int32


def test_build_plan_decode_only_and_prefill_only():
    buckets, page = Buckets.make(4, 16, 2, min_decode=1), 16
    kv = PagedKV.make(num_pages=8, page_size=page, max_len=64)
    dec = build_plan(Batch([running("a", [1], slot=3, num_scheduled=page + 1, pages=[6, 2])], []), buckets,
                     num_slots=4, kv=kv)
    dm, di = dec.inputs.meta, dec.inputs
    assert (dec.num_decode, dec.num_prefill) == (1, 0) and di.prefill_tokens.shape == (0,)
    assert dm.pos.tolist() == [page] and dm.dec_blocks == 2      # position 16 is on the 2nd page
    assert dm.kv_index.tolist() == [2 * page] and dm.block_table.tolist() == [[6, 2, 0, 0]]
    assert dm.num_hist == 0 and dm.hist_table.shape == (0, 4)    # Tp = 0: no history entries
    assert di.sample_rows.tolist()[:1] == [0] and dec.rows == [SampleRow(dec.rows[0].request, page)]
    pre = build_plan(Batch([], [Chunk(running("b", [5, 6, 7], slot=0, num_scheduled=3, pages=[4]), 0, 3)]),
                     buckets, num_slots=4, kv=kv)
    pm, pi, ps = pre.inputs.meta, pre.inputs, pre.sample
    assert (pre.num_decode, pre.num_prefill, pm.dec_blocks) == (0, 16, 0)
    assert pm.slot.tolist() == [0, 0, 0] + [4] * 13 and pm.seg.tolist() == [0] * 3 + [-1] * 13
    assert pm.kv_index.tolist() == [4 * page, 4 * page + 1, 4 * page + 2] + [8 * page] * 13
    assert pm.block_table.shape == (0, 4) and pm.num_hist == 0   # a fresh prompt reads no pages
    assert not pm.hist_table.any() and not pm.hist_len.any() and not pm.hist_rows.any()
    R = buckets.num_sample_rows(0, 16)
    assert pi.sample_rows.tolist() == [2] + [0] * (R - 1) and ps.sample_slot.tolist() == [0] + [4] * (R - 1)
    assert ps.sample_pos.tolist() == [2] + [0] * (R - 1) and pre.rows == [SampleRow(pre.rows[0].request, 0)]


def test_build_plan_history_of_a_long_continuing_chunk():
    page = 16
    pages = [3 * i + 1 for i in range(10)]                      # positions [0, 150): 10 pages
    c = running("c", list(range(200)), slot=1, num_scheduled=150, pages=pages)
    kv = PagedKV.make(num_pages=40, page_size=page, max_len=256)
    start = 8 * page + 2
    p = build_plan(Batch([], [Chunk(c, start, 150 - start)]), Buckets.make(4, 32, 2), 2, kv)
    m, smp = p.inputs.meta, p.sample
    assert m.num_hist == 1 and (m.hist_len[0], m.hist_row0[0], m.hist_rows[0]) == (130, 0, 20)
    assert m.hist_table[0].tolist() == pages + [0] * 6 and not m.hist_table[1].any()
    assert m.kv_index.tolist()[:20] == kv_index(pages, range(130, 150), page)
    assert p.rows == [] and (smp.sample_slot == 2).all()          # the prompt is not complete: no sample


def test_build_plan_two_continuing_chunks_get_two_history_entries():
    """Rows [c continues at 4 | e starts | d continues at 4]: two history entries, each with
    its own pages, its own start and its own rows."""
    c = running("c", list(range(10)), slot=0, num_scheduled=8, pages=[1, 6])
    e = running("e", [3, 4], slot=2, num_scheduled=2, pages=[5])
    d = running("d", list(range(20, 30)), slot=1, num_scheduled=8, pages=[3, 0])
    kv = PagedKV.make(num_pages=8, page_size=B, max_len=12)
    p = build_plan(Batch([], [Chunk(c, 4, 4), Chunk(e, 0, 2), Chunk(d, 4, 4)]), Buckets.make(4, 32, 3), 4, kv)
    m = p.inputs.meta
    assert m.seg.tolist()[:10] == [0] * 4 + [1] * 2 + [2] * 4
    assert m.kv_index.tolist()[:10] == [24, 25, 26, 27, 20, 21, 0, 1, 2, 3]
    assert m.num_hist == 2 and m.hist_table.tolist() == [[1, 6, 0], [3, 0, 0], [0, 0, 0]]
    assert m.hist_len.tolist() == [4, 4, 0] and m.hist_row0.tolist() == [0, 6, 0]
    assert m.hist_rows.tolist() == [4, 4, 0]
    assert p.inputs.prefill_tokens.tolist()[:10] == [4, 5, 6, 7, 3, 4, 24, 25, 26, 27]
    assert p.rows == [SampleRow(e, 0)]                           # only e's prompt completes


# -- SchedulerConfig ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    (dict(max_batch_size=0), r"^max_batch_size must be >= 1, got 0$"),
    (dict(max_batch_size=8, max_num_batched_tokens=4),
     r"^max_num_batched_tokens must be >= max_batch_size so every running request can decode each "
     r"iteration \(4 < 8\)$"),
    (dict(max_batch_size=4, max_prefill_seqs=0), r"^max_prefill_seqs must be in \[1, max_batch_size\], got 0$"),
    (dict(max_batch_size=4, max_prefill_seqs=5), r"^max_prefill_seqs must be in \[1, max_batch_size\], got 5$"),
    (dict(max_waiting=-1), r"^max_waiting must be >= 1, got -1$"),
    (dict(policy="fcfs"), r"^policy must be 'iteration' or 'static', got 'fcfs'$"),
])
def test_scheduler_config_validation(kw, match):
    kw.setdefault("max_prefill_seqs", 1)
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**kw)


def test_scheduler_config_defaults_are_valid():
    c = SchedulerConfig()
    assert (c.max_batch_size, c.max_num_batched_tokens, c.policy) == (64, 512, "iteration")


def test_scheduler_config_rejects_a_queue_that_can_hold_nothing():
    with pytest.raises(ValueError, match="max_waiting"):
        SchedulerConfig(max_waiting=0)


# -- randomized: invariants every iteration, hand-computed outputs at the end ----------------------


def check_iteration(eng: FakeEngine, rec: StepRecord) -> None:
    c, sch = eng.scheduler.config, eng.scheduler
    req = eng.requests
    # Limits of one iteration.
    assert rec.batch_size <= c.max_batch_size and len(rec.slots) <= c.max_batch_size
    assert rec.num_tokens <= c.max_num_batched_tokens
    assert len(rec.chunks) <= c.max_prefill_seqs
    # KV admission control: one slot per running request, none shared, none lost.
    assert len(rec.slots) + rec.free_slots == sch.num_slots
    assert sorted(rec.slots.values()) == sorted(set(rec.slots.values()))
    assert all(0 <= s < sch.num_slots for s in rec.slots.values())
    # KV pages: held exactly by the running requests, each with the pages of what it scheduled.
    sch.pool.check([r.pages for r in sch.running])
    for r in sch.running:
        assert len(r.pages) == -(-r.num_scheduled // sch.page_size)
    # Every chunk that continues a prompt reads its first positions through a history entry.
    if rec.plan is not None:
        meta = rec.plan.inputs.meta
        continuing = [(start, length) for _, start, length in rec.chunks if start > 0]
        assert int(meta.num_hist) == len(continuing)
        assert list(zip(meta.hist_len.tolist(), meta.hist_rows.tolist())) [:len(continuing)] == continuing
    # Every running request past its prompt that still owes tokens decodes (nobody starves).
    before = dict(rec.running_before)
    owed = [rid for rid, n in rec.running_before
            if n >= req[rid].prompt_len and n - req[rid].prompt_len + 1 < req[rid].params.max_tokens]
    assert rec.decodes == owed
    # Chunks: a prompt resumes where it stopped; a chunk shorter than what is left of its
    # prompt means the budget ran out, or the prefill rows were cut back to a bucket.
    prefill = sum(length for _, _, length in rec.chunks)
    cut = c.policy == "iteration" and prefill in c.prefill_buckets
    for rid, start, length in rec.chunks:
        assert start == before.get(rid, 0) and length >= 1
        if start + length < req[rid].prompt_len:
            assert rec.num_tokens == c.max_num_batched_tokens or cut
    # FCFS, no overtaking: the admitted are the head of the queue, in order.
    assert rec.admitted == rec.waiting_before[:len(rec.admitted)]
    assert rec.waiting_after == rec.waiting_before[len(rec.admitted):]
    # Work conserving: a request is left waiting only if a limit of Algorithm 1 stopped it.
    if rec.waiting_after:
        if c.policy == "static" and rec.running_before:
            assert not rec.admitted
        elif c.policy == "static":  # a static batch takes every request that has a slot
            assert rec.free_slots == 0 or len(rec.slots) >= c.max_batch_size
        else:
            assert (rec.free_slots == 0 or len(rec.slots) >= c.max_batch_size or cut
                    or rec.num_tokens >= c.max_num_batched_tokens or len(rec.chunks) >= c.max_prefill_seqs)
    if c.policy == "static" and rec.running_before:
        assert not rec.admitted


@pytest.mark.parametrize("policy", ["iteration", "static"])
@MODES
@pytest.mark.parametrize("seed", range(4))
def test_random_workload_invariants_and_outputs(seed, pipelined, policy):
    rng = np.random.default_rng(1000 * seed + 10 * pipelined + (policy == "static"))
    max_bs = int(rng.integers(1, 7))
    config = SchedulerConfig(max_batch_size=max_bs, max_num_batched_tokens=int(rng.integers(max_bs, max_bs + 13)),
                             max_prefill_seqs=int(rng.integers(1, max_bs + 1)), policy=policy)
    num_slots, max_len, vocab = int(rng.integers(1, 9)), 48, 23
    eos = None if seed % 2 else 0
    buckets = Buckets.make(config.max_batch_size, config.max_num_batched_tokens, config.max_prefill_seqs,
                           min_decode=int(rng.choice([1, 8])), min_prefill=int(rng.choice([1, 4, 16])))
    eng = FakeEngine(config, num_slots, max_len, vocab=vocab, eos_id=eos, pipelined=pipelined,
                          buckets=buckets)
    arrivals: dict[int, list] = {}
    for i in range(300):
        plen = int(rng.integers(1, 31))
        prompt = rng.integers(0, vocab, plen).tolist()
        arrivals.setdefault(int(rng.integers(1, 400)), []).append(
            (prompt, int(rng.integers(1, min(12, max_len - plen) + 1)), f"r{i}"))
    aborted = set()
    while eng.busy() or any(it > eng.iteration for it in arrivals):
        for args in arrivals.pop(eng.iteration + 1, []):
            eng.submit(*args)
        live = rng.random() < 0.03 and (list(eng.scheduler.waiting) + eng.scheduler.running)
        if live:                                          # a client cancels: waiting, prefill or decode
            victim = live[int(rng.integers(len(live)))]
            eng.abort(victim)
            aborted.add(victim.request_id)
            assert victim.slot is None or victim.slot not in {r.slot for r in eng.scheduler.running}
        check_iteration(eng, eng.step())
        assert eng.iteration < 20_000

    assert len(eng.requests) == 300 and all(r.finished for r in eng.requests.values())
    admitted = [rid for rec in eng.records for rid in rec.admitted]
    assert admitted == [rid for rid in eng.requests if rid in eng.joined]      # in submission order
    for rid, r in eng.requests.items():
        want = expected_output(r.prompt_ids, r.params.max_tokens, vocab, eos)
        if rid in aborted:
            assert r.finish_reason is FinishReason.ABORT and r.output_ids == want[:len(r.output_ids)]
        else:
            assert r.output_ids == want, rid
            assert r.finish_reason is (FinishReason.STOP if want[-1] == eos else FinishReason.LENGTH)
    assert sum(len(r.admitted) for r in eng.records) == len(eng.joined)
    assert eng.scheduler.num_free_slots == eng.scheduler.num_slots and not eng.scheduler.has_work()


def test_static_batch_is_the_whole_max_batch_even_when_prompts_exceed_one_budget():
    """The baseline is not handicapped by the per-iteration token budget: it forms a batch of
    max_batch_size requests and prefills their prompts over as many iterations as needed."""
    sch = scheduler(cfg(max_batch_size=4, max_num_batched_tokens=8, policy="static"), num_slots=4, max_len=32)
    for i in range(6):
        sch.add(request(f"r{i}", [1] * 6))
    first = sch.schedule()
    assert [r.request_id for r in sch.running] == ["r0", "r1", "r2", "r3"]
    assert [(c.request.request_id, c.start, c.length) for c in first.prefills] == [("r0", 0, 6), ("r1", 0, 2)]
    second = sch.schedule()  # r1 continues where the budget cut it, then r2 starts
    assert [(c.request.request_id, c.start, c.length) for c in second.prefills] == [("r1", 2, 4), ("r2", 0, 3)]
    assert [r.request_id for r in second.decodes] == ["r0"]
    assert [r.request_id for r in sch.waiting] == ["r4", "r5"]
    # On demand, pages only for the positions scheduled so far (r3 has none yet).
    assert [len(r.pages) for r in sch.running] == [pages_for(6), pages_for(6), pages_for(3), 0]
