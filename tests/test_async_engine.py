"""AsyncEngine: token deltas streamed from the engine loop thread to asyncio callers.

One real engine (a converted random HF GPT-2, byte-level ids, the same bucket set as
test_engine's `small_engine` so the programs come out of the compile cache) is shared by the
module; each test wraps it in a fresh AsyncEngine (a new loop thread) and shuts it down after.
The offline results are computed with the bare engine before any loop thread owns it. Every
asyncio body runs under a timeout: a hang is a failure, not a stuck test run.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import make_hf_gpt2

from orca_jax.async_engine import AsyncEngine, EngineDeadError
from orca_jax.checkpoints.hf_gpt2 import convert_hf_gpt2
from orca_jax.engine import Engine, EngineConfig
from orca_jax.client import Client
from orca_jax.request import FinishReason, SamplingParams
from orca_jax.server import BackgroundServer, ServerConfig

CONFIG = EngineConfig(max_batch_size=8, max_num_batched_tokens=16, max_prefill_seqs=4)
TIMEOUT = 60.0


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


# Text prompts are bytes (no tokenizer files in the checkpoint): text is predictable.
WORK = [
    ("Hello there", greedy(20)),
    ([5, 900, 17, 3], SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True)),
    ("x" * 40, greedy(12, logprobs=2)),
    (list(range(200, 260)), SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=16,
                                           repetition_penalty=1.3, ignore_eos=True)),
    ("a", greedy(1)),
]  # + a request with a stop string picked from its own output (see `model`)


@dataclasses.dataclass
class Stream:
    ids: list = dataclasses.field(default_factory=list)
    text: str = ""
    logprobs: list = dataclasses.field(default_factory=list)
    deltas: list = dataclasses.field(default_factory=list)

    @property
    def final(self):
        return self.deltas[-1]

    def add(self, out) -> None:
        assert not (self.deltas and self.final.finished), "a delta after the final one"
        self.deltas.append(out)
        self.ids += out.token_ids
        self.text += out.text
        self.logprobs += out.logprobs or []


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(engine, work, offline results of `work` from the bare engine, one per entry)."""
    d = tmp_path_factory.mktemp("async-model")
    make_hf_gpt2(d / "hf", seed=0, vocab_size=1001, n_positions=256, n_embd=64, n_layer=2, n_head=4)
    convert_hf_gpt2(d / "hf", d / "ckpt", progress=False)
    eng = Engine.from_checkpoint(str(d / "ckpt"), CONFIG)

    def offline(work):
        reqs = [eng.add_request(p, sp) for p, sp in work]
        results = {r.request_id: Stream() for r in reqs}
        while eng.has_unfinished():
            for out in eng.step():
                results[out.request_id].add(out)
        return [results[r.request_id] for r in reqs]

    # A 2-character stop string from the middle of a greedy output: it fires mid-stream, split
    # over tokens (one byte each), so streaming must hold its first character back.
    (probe,) = offline([("stop me", greedy(30))])
    assert len(probe.text) >= 3
    stop = probe.text[len(probe.text) // 2:][:2]
    work = WORK + [("stop me", greedy(30, stop=[stop]))]
    return eng, work, offline(work)


@pytest.fixture
def engine(model) -> Engine:
    eng = model[0]
    yield eng
    assert not eng.scheduler.has_work(), "a request outlived its AsyncEngine"
    assert eng.scheduler.num_free_slots == eng.num_slots


@pytest.fixture
def aeng(engine):
    a = AsyncEngine(engine).start()
    yield a
    a.shutdown(timeout=TIMEOUT)
    assert not a._thread.is_alive(), "the loop thread did not stop"


def run(coro):
    """asyncio.run with a deadline: a hang fails the test."""
    async def main():
        return await asyncio.wait_for(coro, TIMEOUT)
    return asyncio.run(main())


async def collect(agen, until=None, into: Stream | None = None) -> Stream:
    s = Stream() if into is None else into
    async for out in agen:
        s.add(out)
        if until is not None and until(s):
            break
    return s


async def eventually(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.01)


def test_streamed_deltas_concatenate_to_the_offline_result(model, aeng):
    _, work, offline = model

    async def main():
        return await asyncio.gather(*(collect(aeng.generate(p, sp)) for p, sp in work))

    streams = run(main())
    for (p, sp), got, want in zip(work, streams, offline):
        assert got.ids == want.ids and got.text == want.text, f"prompt {p!r}"
        assert got.final.finished and got.final.finish_reason is want.final.finish_reason
        assert not any(d.finished for d in got.deltas[:-1])
        assert got.final.usage.completion_tokens == len(got.ids)
        assert got.logprobs == want.logprobs
        if sp.max_tokens >= 12 and want.final.finish_reason is FinishReason.LENGTH:
            assert len(got.deltas) >= 4, "tokens were not streamed as they came"
    assert offline[-1].final.finish_reason is FinishReason.STOP  # the stop string did fire
    assert aeng.healthy()


def test_one_wakeup_per_iteration_and_a_slow_reader_gets_merged_deltas(model, aeng):
    """All of an iteration's deltas reach the event loop in one call_soon_threadsafe (not one
    per request), and a reader that falls behind gets its queued deltas as one, in order:
    the same tokens, text and logprobs as the offline run."""
    _, work, offline = model
    calls = []

    async def slow(agen, s: Stream):
        async for out in agen:
            s.add(out)
            await asyncio.sleep(0.3)  # several iterations pass meanwhile
        return s

    async def main():
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (calls.append(threading.current_thread().name), real(*a, **k))[1]
        fast = [collect(aeng.generate(p, sp)) for p, sp in work[:2]]
        return await asyncio.gather(*fast, slow(aeng.generate(*work[2]), Stream()))

    it0 = aeng.snapshot.iterations
    streams = run(main())
    iterations = aeng.snapshot.iterations - it0
    from_engine = calls.count("orca-engine")
    # one per iteration, plus one per submission (its future resolves on the engine thread)
    assert 0 < from_engine <= iterations + 3, (from_engine, iterations)
    assert sum(len(s.deltas) for s in streams) > from_engine
    for got, want in zip(streams, offline[:3]):  # (another batch than offline's: ulps differ)
        assert got.ids == want.ids and got.text == want.text
        assert [lp["logprob"] for lp in got.logprobs] == pytest.approx([lp["logprob"] for lp in want.logprobs], abs=1e-5)
    assert len(streams[2].deltas) < len(streams[2].ids), "the slow reader got a delta per token"


def test_cancelling_the_consumer_aborts_and_frees_the_slot(engine, aeng):
    finals = []
    aeng.add_listener(finals.append)

    async def main():
        seen = Stream()
        task = asyncio.create_task(collect(aeng.generate("cancel me", greedy(200)), into=seen))
        await eventually(lambda: len(seen.ids) >= 3, "a few streamed tokens")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: aeng.num_unfinished() == 0 and not engine.scheduler.has_work(),
                         "the aborted request to leave the engine")
        assert engine.scheduler.num_free_slots == engine.num_slots
        # Leaving the stream early with `break` (the generator is closed) aborts as well.
        async with contextlib.aclosing(aeng.generate("break me", greedy(200))) as gen:
            early = await collect(gen, until=lambda s: len(s.ids) >= 3)
        assert not early.final.finished
        await eventually(lambda: aeng.num_unfinished() == 0 and not engine.scheduler.has_work(),
                         "the closed stream's request to leave the engine")
        nxt = await collect(aeng.generate("next", greedy(5)))
        await eventually(lambda: len(finals) == 3, "the listener to see 3 finals")  # called after the sink
        return nxt

    nxt = run(main())
    assert nxt.final.finish_reason is FinishReason.LENGTH and len(nxt.ids) == 5
    reasons = [o.finish_reason for o in finals]
    assert reasons == [FinishReason.ABORT, FinishReason.ABORT, FinishReason.LENGTH]
    assert all(len(o.token_ids) < 200 for o in finals)


def test_bad_input_raises_before_any_delta(engine, aeng):
    async def first_delta(prompt, params, **kw):
        return await aeng.generate(prompt, params, **kw).__anext__()

    async def main():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await first_delta([1, 5000], greedy(4))
        with pytest.raises(ValueError, match="maximum context length"):
            await first_delta("y" * 300, greedy(4))
        with pytest.raises(ValueError, match="max_tokens=100"):
            await first_delta("y" * 200, greedy(100))
        with pytest.raises(ValueError, match="empty"):
            await first_delta([], greedy(4))
        task = asyncio.create_task(collect(aeng.generate("dup", greedy(50), request_id="dup")))
        await eventually(lambda: aeng.num_unfinished() == 1, "the first 'dup' to be accepted")
        with pytest.raises(ValueError, match="already in use"):
            await first_delta("dup", greedy(4), request_id="dup")
        first = await task
        assert first.final.finish_reason is FinishReason.LENGTH and len(first.ids) == 50
        return await collect(aeng.generate("fine", greedy(3)))

    assert len(run(main()).ids) == 3
    assert aeng.healthy()


def test_stop_accepting_drains_in_flight_requests(engine, aeng):
    async def main():
        task = asyncio.create_task(collect(aeng.generate("draining", greedy(30))))
        await eventually(lambda: engine.scheduler.running, "the request to start")
        aeng.stop_accepting()
        with pytest.raises(EngineDeadError, match="shutting down"):
            await aeng.generate("late", greedy(3)).__anext__()
        return await task

    done = run(main())
    assert done.final.finish_reason is FinishReason.LENGTH and len(done.ids) == 30


def test_shutdown_fails_open_streams_instead_of_hanging(engine):
    aeng = AsyncEngine(engine).start()

    async def main():
        task = asyncio.create_task(collect(aeng.generate("long", greedy(200))))
        await eventually(lambda: engine.scheduler.running, "the request to start")
        await asyncio.to_thread(aeng.shutdown, TIMEOUT)
        return await task

    s = run(main())
    assert s.final.finished and s.final.finish_reason is FinishReason.ERROR and len(s.ids) < 200
    assert not aeng.healthy()
    async def after():
        return await aeng.generate("after", greedy(3)).__anext__()

    with pytest.raises(EngineDeadError):
        run(after())


def test_cancel_during_submission_neither_leaks_nor_kills_the_loop(engine, aeng, monkeypatch):
    entered, gate = threading.Event(), threading.Event()
    real_add = engine.add_request

    def gated_add(*args, **kw):  # runs on the loop thread
        entered.set()
        gate.wait(TIMEOUT)
        return real_add(*args, **kw)

    async def main():
        other = asyncio.create_task(collect(aeng.generate("bystander", greedy(40))))
        await eventually(lambda: engine.scheduler.running, "the bystander to start")
        monkeypatch.setattr(engine, "add_request", gated_add)
        task = asyncio.create_task(collect(aeng.generate("cancelled early", greedy(100))))
        await eventually(entered.is_set, "the submission to reach the loop thread")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        await asyncio.sleep(0.2)
        assert aeng.healthy(), "the engine loop thread died"
        done = await asyncio.wait_for(other, 30)  # the bystander still finishes
        await eventually(lambda: aeng.num_unfinished() == 0 and not engine.scheduler.has_work(),
                         "the cancelled request to leave the engine")
        return done

    try:
        done = run(main())
    finally:
        gate.set()
        monkeypatch.undo()
        aeng.shutdown(TIMEOUT)
        while engine.has_unfinished():  # leave the shared engine clean whatever happened
            for r in list(engine.scheduler.running) + list(engine.scheduler.waiting):
                engine.abort(r.request_id)
            engine.step()
    assert done.final.finish_reason is FinishReason.LENGTH and len(done.ids) == 40


def test_failing_step_fails_requests_and_marks_the_engine_dead(model, engine, monkeypatch):
    _, work, offline = model
    aeng = AsyncEngine(engine).start()
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) > 6:
            raise RuntimeError("device on fire")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)

    async def main():
        streams = [asyncio.create_task(collect(aeng.generate(p, greedy(100)))) for p in ("a", "bb", "ccc")]
        got = await asyncio.gather(*streams)
        assert not aeng.healthy()
        with pytest.raises(EngineDeadError, match="device on fire"):
            await aeng.generate("later", greedy(3)).__anext__()
        return got

    streams = run(main())
    for s in streams:
        assert s.final.finished and s.final.finish_reason is FinishReason.ERROR
        assert "RuntimeError: device on fire" in s.final.error
        assert len(s.ids) < 100
    assert engine.scheduler.num_free_slots == engine.num_slots
    aeng.shutdown(TIMEOUT)

    # The Engine object itself is still usable once its step works again: results of the
    # failed requests still in flight are dropped, a new loop serves the next request.
    monkeypatch.undo()
    fresh = AsyncEngine(engine).start()
    try:
        again = run(collect(fresh.generate(*work[0])))
    finally:
        fresh.shutdown(TIMEOUT)
    assert again.ids == offline[0].ids and again.text == offline[0].text


@pytest.mark.parametrize("stage", ["prepare", "output"])
def test_a_failure_pinned_on_one_request_fails_only_that_request(model, engine, monkeypatch, stage):
    """A request whose own inputs (`prepare`) or outputs (`output`) raise inside an iteration
    fails alone, with a clear error and its slot freed; the others in the same iterations
    finish with exactly their offline tokens, and the engine stays healthy."""
    _, work, offline = model
    victim = "victim"

    def hook(where, req):
        if where == stage and req.request_id == victim and len(req.output_ids) >= 2:
            raise OverflowError("injected: this request's data cannot go on device")
    monkeypatch.setattr(engine, "fault_hook", hook)
    aeng = AsyncEngine(engine).start()
    try:
        async def main():
            doomed = asyncio.create_task(collect(aeng.generate("doomed", greedy(30), victim)))
            others = [asyncio.create_task(collect(aeng.generate(p, sp))) for p, sp in work]
            return await doomed, await asyncio.gather(*others)

        doomed, others = run(main())
        assert doomed.final.finish_reason is FinishReason.ERROR
        assert "OverflowError: injected" in doomed.final.error and len(doomed.ids) < 30
        for got, want in zip(others, offline):
            assert got.ids == want.ids and got.text == want.text
            assert got.final.finish_reason == want.final.finish_reason
        assert aeng.healthy() and aeng.dead is None
        again = run(collect(aeng.generate(*work[0])))  # and it goes on serving
        assert again.ids == offline[0].ids
    finally:
        aeng.shutdown(TIMEOUT)
    assert engine.scheduler.num_free_slots == engine.num_slots


def test_a_host_failure_that_blames_everyone_is_the_engines(model, engine, monkeypatch):
    """If every request of an iteration fails alone too, the fault is not theirs: everyone
    fails and the engine is marked dead (health false, a server exits 3), instead of each
    request being failed in turn while health stays green."""
    def hook(where, req):
        if where == "prepare":
            raise RuntimeError("injected: the host path is broken for everyone")
    monkeypatch.setattr(engine, "fault_hook", hook)
    aeng = AsyncEngine(engine).start()
    try:
        async def main():
            streams = [asyncio.create_task(collect(aeng.generate(p, greedy(10)))) for p in ("a", "bb", "ccc")]
            return await asyncio.gather(*streams)
        for s in run(main()):
            assert s.final.finish_reason is FinishReason.ERROR and "broken for everyone" in s.final.error
        assert aeng.dead is not None and not aeng.healthy()
    finally:
        aeng.shutdown(TIMEOUT)
    assert engine.scheduler.num_free_slots == engine.num_slots


# -- a stuck iteration (a device wait that never returns) -----------------------------------

STUCK_AFTER_S = 0.5
SLACK_S = 1.0  # the watchdog polls every stuck_after / 10; the rest is thread and loop hops


class BlockingFetch:
    """Wraps the runner's `fetch` (the engine thread's wait for a step's results on device):
    once armed, the next fetch blocks until released, as a wait on a collective whose peer
    process died would. `blocked_at` is when it started blocking."""

    def __init__(self, engine: Engine, monkeypatch):
        self.real = engine.runner.fetch
        self.armed, self.release = threading.Event(), threading.Event()
        self.blocked = threading.Event()
        self.blocked_at = 0.0
        monkeypatch.setattr(engine.runner, "fetch", self)

    def __call__(self, *args, **kwargs):
        if self.armed.is_set() and not self.release.is_set():
            self.blocked_at = time.monotonic()
            self.blocked.set()
            self.release.wait()
        return self.real(*args, **kwargs)

    async def block_mid_stream(self, aeng: AsyncEngine, prompt: str, max_tokens: int) -> asyncio.Task:
        """Start streaming `prompt`, then, once 2 tokens are out, block the engine thread in
        fetch; returns the stream's task (a Stream once it ends)."""
        seen = Stream()
        task = asyncio.create_task(collect(aeng.generate(prompt, greedy(max_tokens)), into=seen))
        await eventually(lambda: len(seen.ids) >= 2, "tokens")
        self.armed.set()
        await eventually(self.blocked.is_set, "the engine thread to block")
        return task


@pytest.fixture
def stuck_engine(engine, monkeypatch):
    """(AsyncEngine that fails everything when stuck, its BlockingFetch); afterwards the
    fetch is released and the shared engine is left clean (the loop frees every slot)."""
    fetch = BlockingFetch(engine, monkeypatch)
    aeng = AsyncEngine(engine, stuck_after_s=STUCK_AFTER_S, fail_when_stuck=True).start()
    yield aeng, fetch
    fetch.release.set()
    aeng.shutdown(TIMEOUT)
    assert not aeng._thread.is_alive(), "the loop thread did not get out of the released step"


def test_a_stuck_iteration_fails_every_request_within_the_deadline(engine, stuck_engine):
    """In-flight, waiting (more requests than slots) and queued (submitted while the loop is
    inside the stuck step) requests all fail within stuck_after + slack, with an error naming
    the iteration and --stuck-after; health is false and new submissions are refused at once."""
    aeng, fetch = stuck_engine

    async def main():
        streams = [Stream() for _ in range(12)]  # 8 slots: 4 wait
        tasks = [asyncio.create_task(collect(aeng.generate(f"p{i}", greedy(200)), into=s))
                 for i, s in enumerate(streams)]
        await eventually(lambda: len(streams[0].ids) >= 2, "the first requests to stream")
        fetch.armed.set()
        await eventually(fetch.blocked.is_set, "the engine thread to block in fetch")
        late = asyncio.create_task(collect(aeng.generate("late", greedy(5))))  # never added
        done = await asyncio.gather(*tasks)
        failed_at = time.monotonic()
        with pytest.raises(EngineDeadError) as late_error:
            await late
        with pytest.raises(EngineDeadError, match="stuck"):  # later: refused at once
            await aeng.generate("later", greedy(3)).__anext__()
        return done, failed_at, str(late_error.value)

    done, failed_at, late_error = run(main())
    assert failed_at - fetch.blocked_at < STUCK_AFTER_S + SLACK_S
    assert failed_at - fetch.blocked_at >= STUCK_AFTER_S * 0.9  # not before the deadline
    assert any(s.ids for s in done)  # some were streaming, some never got a token
    assert any(not s.ids for s in done)
    for s in done:
        assert s.final.finished and s.final.finish_reason is FinishReason.ERROR
        assert len(s.ids) < 200
    error = done[0].final.error
    assert f"iteration {aeng.snapshot.iterations + 1} has run for" in error
    assert f"longer than --stuck-after ({STUCK_AFTER_S:g} s)" in error
    assert all(s.final.error == error for s in done) and error in late_error
    assert aeng.stuck == aeng.broken == aeng.dead == error and not aeng.healthy()
    assert aeng.num_unfinished() == 0


def test_a_slow_iteration_under_the_deadline_fails_nothing(engine, monkeypatch):
    """The watchdog only fires past stuck_after: an iteration that takes 60 % of it passes."""
    fetch = BlockingFetch(engine, monkeypatch)
    aeng = AsyncEngine(engine, stuck_after_s=STUCK_AFTER_S, fail_when_stuck=True).start()
    try:
        async def main():
            task = await fetch.block_mid_stream(aeng, "slow", 20)
            await asyncio.sleep(STUCK_AFTER_S * 0.6)
            fetch.release.set()
            return await task

        done = run(main())
        assert done.final.finish_reason is FinishReason.LENGTH and len(done.ids) == 20
        assert aeng.healthy() and aeng.stuck is None
    finally:
        fetch.release.set()
        aeng.shutdown(TIMEOUT)


def test_fail_from_another_thread_fails_requests_while_a_step_hangs(engine, monkeypatch):
    """`fail` (a lost follower) does not wait for the loop: the step may never return."""
    fetch = BlockingFetch(engine, monkeypatch)
    aeng = AsyncEngine(engine).start()  # no watchdog: only `fail` can end these requests
    try:
        async def main():
            task = await fetch.block_mid_stream(aeng, "hung", 100)
            aeng.fail("follower process 1 of 2 is gone")
            return await asyncio.wait_for(task, 5)

        done = run(main())
        assert done.final.finish_reason is FinishReason.ERROR
        assert done.final.error == "follower process 1 of 2 is gone"
        assert not aeng.healthy() and aeng.stuck is None
        assert aeng.broken == aeng.dead == "follower process 1 of 2 is gone"  # servers: UNAVAILABLE
    finally:
        fetch.release.set()
        aeng.shutdown(TIMEOUT)


def _http(url: str, body: dict | None = None) -> tuple[int, str]:
    """(status, whole body) of a GET, or of a POST of `body` (an SSE stream: every event)."""
    req = urllib.request.Request(url, data=body and json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_stuck_engine_fails_server_clients_with_unavailable(engine, stuck_engine):
    """A real server on loopback over a stuck engine: a gRPC stream and an HTTP SSE stream
    that were streaming, and gRPC / HTTP / HTTP-stream requests sent while the step hangs,
    all end with UNAVAILABLE / 503 naming --stuck-after within the deadline (the streams
    that had not started get a 503 status, not 200 and an error event); both health checks
    turn unhealthy."""
    aeng, fetch = stuck_engine
    bg = BackgroundServer(aeng, ServerConfig(grpc_port=0, http_port=0, health_poll_s=0.05), "m").start()
    results: dict[str, tuple] = {}
    streaming = {"grpc": threading.Event(), "sse": threading.Event()}
    long = dict(max_tokens=200, temperature=0.0, ignore_eos=True)

    def grpc_call(name: str) -> None:
        with Client(bg.grpc_target, timeout=30) as c:
            try:
                for d in c.stream(name, **long):
                    if d.token_ids and name in streaming:
                        streaming[name].set()
                results[name] = ("finished",)
            except grpc.RpcError as e:
                results[name] = (e.code(), e.details(), time.monotonic())

    def sse_started() -> None:  # reads the stream line by line: it starts before the hang
        req = urllib.request.Request(bg.http_url + "/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": "sse", "stream": True, **long}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            for line in r:
                event = line.decode().removeprefix("data: ").strip()
                if event.startswith("{") and "error" in json.loads(event):
                    results["sse"] = (r.status, json.loads(event)["error"], time.monotonic())
                    return
                if event.startswith("{"):
                    streaming["sse"].set()
        results["sse"] = ("finished",)

    def http_call(name: str, stream: bool) -> None:
        status, body = _http(bg.http_url + "/v1/completions", {"prompt": name, "stream": stream, **long})
        results[name] = (status, body, time.monotonic())

    try:
        before = [threading.Thread(target=grpc_call, args=("grpc",)), threading.Thread(target=sse_started)]
        for t in before:
            t.start()
        assert streaming["grpc"].wait(30) and streaming["sse"].wait(30)
        fetch.armed.set()
        assert fetch.blocked.wait(30)
        during = [threading.Thread(target=grpc_call, args=("grpc-late",)),
                  threading.Thread(target=http_call, args=("http-late", False)),
                  threading.Thread(target=http_call, args=("sse-late", True))]
        for t in during:
            t.start()
        for t in before + during:
            t.join(30)
        deadline = fetch.blocked_at + STUCK_AFTER_S + SLACK_S

        for name in ("grpc", "grpc-late"):
            code, details, at = results[name]
            assert code == grpc.StatusCode.UNAVAILABLE, (name, details)
            assert "stuck" in details and "--stuck-after" in details and at < deadline
        status, error, at = results["sse"]  # 200 was sent long ago: the error is an event
        assert status == 200 and error["code"] == 503 and "--stuck-after" in error["message"]
        assert at < deadline
        for name in ("http-late", "sse-late"):
            status, body, at = results[name]
            assert status == 503, (name, body)
            assert "--stuck-after" in json.loads(body)["error"]["message"] and at < deadline

        status, body = _http(bg.http_url + "/health")
        assert status == 503 and "stuck" in body
        with grpc.insecure_channel(bg.grpc_target) as ch:  # it follows the engine every 50 ms
            check = lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            until = time.monotonic() + 2.0
            while check().status != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < until, "gRPC health still SERVING 2 s after the failure"
                time.sleep(0.02)
    finally:
        fetch.release.set()
        bg.stop()
