"""Server lifecycle: SIGTERM drain of a real `orca-jax serve` process, `generate --server`,
and an engine that gets stuck or fails (the server turns unhealthy instead of hanging)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orca_jax.async_engine import AsyncEngine
from orca_jax.client import Client
from orca_jax.engine import Engine, EngineConfig
from orca_jax.server import BackgroundServer, ServerConfig

ENGINE = EngineConfig(max_batch_size=8, max_num_batched_tokens=64, max_prefill_seqs=4,
                      max_model_len=128, max_waiting=64)
ENGINE_FLAGS = ["--max-batch-size", "8", "--max-num-batched-tokens", "64", "--max-prefill-seqs", "4",
                "--max-model-len", "128", "--max-waiting", "64"]
LONG = dict(max_tokens=120, ignore_eos=True, temperature=0.0)


def http_status(url: str, body: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body and json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def grpc_health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_sigterm_drains_in_flight_requests_and_exits_0(demo_model_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "orca_jax.cli", "serve", "--model", demo_model_dir, "--grpc-port", "0",
         "--http-port", "0", "--drain-timeout", "60", "--served-model-name", "demo", *ENGINE_FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        line = ""
        deadline = time.monotonic() + 240  # a cold XLA cache compiles every bucket first
        while "ready" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            line = proc.stdout.readline()
        parts = dict(p.split("=", 1) for p in line.split() if "=" in p)
        target, url = parts["grpc"], parts["http"]

        # `orca-jax generate --server` streams from it
        out = subprocess.run([sys.executable, "-m", "orca_jax.cli", "generate", "--server", target,
                              "--prompt", "The orca", "--max-tokens", "5"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "length, 5 tokens" in out.stderr and out.stdout.strip()
        bad = subprocess.run([sys.executable, "-m", "orca_jax.cli", "generate", "--server", target,
                              "--prompt", "The orca", "--temperature", "-1"],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "temperature" in bad.stderr

        # in-flight streams, then SIGTERM
        results, errors, started = {}, [], threading.Barrier(7)

        def stream(i):
            try:
                with Client(target, timeout=120) as c:
                    deltas = c.stream("The orca", **LONG)
                    first = next(deltas)
                    started.wait(30)
                    results[i] = [first, *deltas]
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                started.abort()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        started.wait(60)
        proc.send_signal(signal.SIGTERM)

        # while draining: new requests are refused (UNAVAILABLE / 503), health says so
        with Client(target, timeout=10) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.generate("The orca", max_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        try:
            status, body = http_status(url + "/health")
            assert status == 503 and "draining" in body
        except urllib.error.URLError:
            pass  # already drained and closed: nothing left to check

        for t in threads:
            t.join(120)
        assert not errors, errors
        for deltas in results.values():  # every in-flight request ran to completion
            assert deltas[-1].finished and deltas[-1].usage.completion_tokens == 120
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# `orca-jax serve` whose device step breaks on the first real iteration (warm-up plans carry no
# tokens): what a supervisor sees when an engine dies for good.
BREAKING_SERVE = """
import sys
from orca_jax.cli import main
from orca_jax.runner import ModelRunner
real = ModelRunner.run
def run(self, plan, sampling, x=None):
    if plan.num_tokens:
        raise RuntimeError("injected: the device is gone")
    return real(self, plan, sampling, x)
ModelRunner.run = run
sys.exit(main(sys.argv[1:]))
"""


def test_serve_exits_3_when_its_engine_dies(demo_model_dir):
    """Every request fails with a clear error (no hang), health turns 503, then the process
    closes its ports and exits with status 3 (ENGINE_FAILED_EXIT) for its supervisor to
    restart it."""
    from orca_jax.server.app import ENGINE_FAILED_EXIT
    proc = subprocess.Popen(
        [sys.executable, "-c", BREAKING_SERVE, "serve", "--model", demo_model_dir, "--grpc-port", "0",
         "--http-port", "0", "--served-model-name", "demo", *ENGINE_FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        line = ""
        deadline = time.monotonic() + 240
        while "ready" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            line = proc.stdout.readline()
        url = dict(p.split("=", 1) for p in line.split() if "=" in p)["http"]
        status, body = http_status(url + "/v1/completions", {"prompt": "The orca", "max_tokens": 4})
        assert status == 500 and "injected: the device is gone" in json.loads(body)["error"]["message"]
        assert proc.wait(30) == ENGINE_FAILED_EXIT
        assert "exit status 3 asks the supervisor for a restart" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def fresh_server(demo_model_dir):
    """Its own engine (this test breaks it), quick to call stuck, health followed every 50 ms."""
    engine = AsyncEngine(Engine.from_checkpoint(demo_model_dir, ENGINE), stuck_after_s=0.5).start()
    bg = BackgroundServer(engine, ServerConfig(grpc_port=0, http_port=0, health_poll_s=0.05), "demo").start()
    yield bg
    bg.stop()
    engine.shutdown()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_stuck_then_failed_engine_turns_unhealthy_and_fails_requests(fresh_server, monkeypatch):
    bg = fresh_server
    eng = bg.engine.engine
    real_step = eng.step
    release, fail = threading.Event(), threading.Event()

    def step():
        release.wait()
        if fail.is_set():
            raise RuntimeError("injected device failure")
        return real_step()
    monkeypatch.setattr(eng, "step", step)
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    # stuck: one iteration blocks for longer than stuck_after_s
    with Client(bg.grpc_target, timeout=30) as c:
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("out", c.generate("The orca", max_tokens=4)))
        t.start()
        wait_for(lambda: http_status(bg.http_url + "/health")[0] == 503)
        assert "not iterating" in http_status(bg.http_url + "/health")[1]
        wait_for(lambda: grpc_health(bg.grpc_target) == NOT_SERVING)
        release.set()  # unstuck: the request finishes, health comes back
        t.join(30)
        assert box["out"].completion_tokens == 4
        wait_for(lambda: http_status(bg.http_url + "/health")[0] == 200)
        wait_for(lambda: grpc_health(bg.grpc_target) == SERVING)

        # failed: every request in the engine fails with INTERNAL, nothing hangs
        errors = []

        def doomed():
            try:
                c.generate("The orca", **LONG)
            except grpc.RpcError as e:
                errors.append(e)
        threads = [threading.Thread(target=doomed) for _ in range(3)]
        for th in threads:
            th.start()
        wait_for(lambda: bg.engine.num_unfinished() == 3)
        fail.set()
        for th in threads:
            th.join(30)
        assert [e.code() for e in errors] == [grpc.StatusCode.INTERNAL] * 3
        assert all("injected device failure" in e.details() for e in errors)

        status, body = http_status(bg.http_url + "/health")
        assert status == 503 and "injected device failure" in body
        wait_for(lambda: grpc_health(bg.grpc_target) == NOT_SERVING)
        with pytest.raises(grpc.RpcError) as e:  # later requests: refused at once
            c.generate("The orca", max_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    status, body = http_status(bg.http_url + "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 503 and "not running" in body
    assert "orca_jax:engine_healthy{engine=\"0\",model_name=\"demo\"} 0.0" in http_status(bg.http_url + "/metrics")[1]


def test_demo_runs_a_burst_and_exits_cleanly(demo_model_dir):
    """`orca-jax demo` (on the test engine shape, whose programs the XLA cache already holds)."""
    out = subprocess.run([sys.executable, "-m", "orca_jax.cli", "demo", "--model", demo_model_dir,
                          "--requests", "12", "--max-tokens", "16", *ENGINE_FLAGS],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "12 requests" in out.stdout and "tokens/s" in out.stdout and "TTFT" in out.stdout


def test_drain_timeout_fails_leftover_requests_with_unavailable(fresh_server, monkeypatch):
    """In-flight requests that outlive the drain timeout end with UNAVAILABLE (gRPC) or 503
    (HTTP), not with a silent "abort" finish; requests during the drain are refused."""
    bg = fresh_server
    eng = bg.engine.engine
    step = eng.step

    def slow():  # 120 tokens take > 2.4 s: longer than the drain timeout below
        time.sleep(0.02)
        return step()
    monkeypatch.setattr(eng, "step", slow)
    errors, http_result = [], {}

    def grpc_call():
        with Client(bg.grpc_target, timeout=30) as c:
            try:
                c.generate("The orca", **LONG)
            except grpc.RpcError as e:
                errors.append(e)

    def http_call():
        http_result["r"] = http_status(bg.http_url + "/v1/completions", {"prompt": "The orca", **LONG})

    threads = [threading.Thread(target=grpc_call), threading.Thread(target=http_call)]
    for t in threads:
        t.start()
    wait_for(lambda: bg.engine.snapshot.num_running == 2)
    drained = bg.call(bg.server.drain(timeout=0.3))
    for t in threads:
        t.join(30)
    assert drained is False
    assert [e.code() for e in errors] == [grpc.StatusCode.UNAVAILABLE], errors
    assert "drain timeout" in errors[0].details()
    status, body = http_result["r"]
    assert status == 503 and "drain timeout" in body
    with Client(bg.grpc_target, timeout=10) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("The orca", max_tokens=2)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
    assert bg.engine.num_unfinished() == 0
