"""The benchmark's arrival loops on a fake engine and a fake `generate` with a manual clock:
every timestamp below is worked out by hand (no JAX, no torch)."""
import types

import pytest

from orca_jax.bench.metrics import summarize
from orca_jax.bench.systems import Clock, EngineSystem, HFSystem
from orca_jax.bench.workloads import Trace, TraceRequest
from orca_jax.request import FinishReason, RequestOutput, Usage


class ManualClock(Clock):
    """Time moves only when the fake systems say a step took 1 s (or when idle is skipped)."""

    def __init__(self):
        super().__init__(skip_idle=True)
        self.t = 0.0

    def start(self):
        self.t, self._skipped = 0.0, 0.0
        return self

    def now(self):
        return self.t + self._skipped


class FakeEngine:
    """Iteration-level: a request added before step() gets one token per step from that step
    on; each step takes 1 s; results come back at the end of the step."""

    def __init__(self, clock):
        self.clock, self.running = clock, []
        self.runner = types.SimpleNamespace(num_compiles=0)
        self.stats = types.SimpleNamespace(iterations=0, batch_size_sum=0, max_batch_size_seen=0,
                                           host_seconds=0.0, device_wait_seconds=0.0, tokens=0,
                                           padded_tokens=0)
        self.pool = types.SimpleNamespace(queries=0, hits=0)
        self.scheduler = types.SimpleNamespace(num_preemptions=0)

    def add_request(self, prompt, params, request_id):
        self.running.append({"id": request_id, "want": params.max_tokens, "got": 0, "prompt": len(prompt)})
        self.asked = getattr(self, "asked", []) + [params.max_tokens]

    def abort(self, request_id):
        self.running = [r for r in self.running if r["id"] != request_id]

    def has_unfinished(self):
        return bool(self.running)

    def step(self):
        self.clock.t += 1.0
        self.stats.iterations += 1
        self.stats.batch_size_sum += len(self.running)
        self.stats.max_batch_size_seen = max(self.stats.max_batch_size_seen, len(self.running))
        outs = []
        for r in list(self.running):
            r["got"] += 1
            done = r["got"] == r["want"]
            outs.append(RequestOutput(r["id"], [7], "", done, FinishReason.LENGTH if done else None,
                                      Usage(r["prompt"], r["got"])))
            if done:
                self.running.remove(r)
        return outs


def trace(*reqs):
    return Trace("orca", 0, 100, 1.0, {}, tuple(TraceRequest(a, (1,) * p, o) for a, p, o in reqs))


def test_engine_loop_timeline():
    clock = ManualClock()
    system = object.__new__(EngineSystem)
    system.name, system.engine, system._runs, system.max_tokens = "orca", FakeEngine(clock), 0, None
    # r0 at 0 s wants 2 tokens; r1 at 10 s wants 1; r2 at 10.5 s wants 2.
    records, info = system.run(trace((0.0, 3, 2), (10.0, 4, 1), (10.5, 5, 2)), clock)
    # r0: steps end at 1 and 2. Then the engine is empty until 10: 8 s skipped. r1 joins the
    # step 10 -> 11; r2 arrived mid-step (10.5) and joins the next one: tokens at 12 and 13.
    assert [r.chunks for r in records] == [[(1.0, 1), (2.0, 1)], [(11.0, 1)], [(12.0, 1), (13.0, 1)]]
    assert info["idle_skipped_s"] == 8.0 and info["iterations"] == 5
    assert info["mean_batch_size"] == 1.0 and info["compiles_during_run"] == 0
    m = summarize(records)
    assert m["duration_s"] == 13.0
    assert [r.ttft for r in records] == [1.0, 1.0, 1.5] and records[2].latency == 2.5


def test_engine_loop_max_tokens_stops_requests_at_their_output_length():
    """--max-tokens: every request asks for 5 tokens (what reserve admission reserves) and is
    stopped at its output length, as at an EOS, in the step its last token arrives."""
    clock = ManualClock()
    system = object.__new__(EngineSystem)
    system.name, system.engine, system._runs, system.max_tokens = "orca", FakeEngine(clock), 0, 5
    records, info = system.run(trace((0.0, 3, 2), (0.0, 4, 1)), clock)
    assert system.engine.asked == [5, 5]
    assert [r.chunks for r in records] == [[(1.0, 1), (2.0, 1)], [(1.0, 1)]]
    assert info["iterations"] == 2 and not system.engine.running


def test_hf_loop_forms_static_batches_from_arrivals():
    clock = ManualClock()
    system = object.__new__(HFSystem)
    system.batch_size = 2
    calls = []

    def generate(batch, max_new, clk):  # each decoding step takes 1 s
        calls.append(([r.output_len for r in batch], max_new))
        times = [clk.t + k + 1.0 for k in range(max_new)]
        clk.t += max_new
        return times, clk.now()

    system._generate = generate
    # r0 at 0 (2 tokens); r1, r2 at 0.5 (1 and 3 tokens); r3 at 20 (1 token).
    records, info = system.run(trace((0.0, 2, 2), (0.5, 2, 1), (0.5, 2, 3), (20.0, 2, 1)), clock)
    # Batch [r0] runs 0 -> 2; batch [r1, r2] (arrived meanwhile, cap 2) runs 2 -> 5 and returns
    # together at 5; the system is then empty until 20 (15 s skipped): batch [r3] runs 20 -> 21.
    assert calls == [([2], 2), ([1, 3], 3), ([1], 1)]
    assert [r.chunks for r in records] == [[(1.0, 1), (2.0, 1)], [(5.0, 1)],
                                           [(3.0, 1), (4.0, 1), (5.0, 1)], [(21.0, 1)]]
    assert info == {"batches": 3, "mean_batch_size": 4 / 3, "wasted_decode_tokens": 2, "idle_skipped_s": 15.0}
    # r1's single token waits for r2's three: TTFT 4.5 s, the cost of request-level batching.
    assert records[1].ttft == 4.5


def test_clock_skips_or_sleeps():
    c = Clock(skip_idle=True).start()
    c.idle_until(c.now() + 100.0)
    assert c.now() >= 100.0 and c.skipped == pytest.approx(100.0, abs=0.1)
    c.idle_until(0.0)  # in the past: nothing
    assert c.skipped == pytest.approx(100.0, abs=0.1)
    w = Clock(skip_idle=False).start()
    w.idle_until(0.02)
    assert w.now() >= 0.02 and w.skipped == 0.0
