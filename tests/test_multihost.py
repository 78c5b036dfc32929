"""Two real processes on localhost serve one model over gRPC (sharding/multihost.py).

`orca-jax serve --num-processes 2` twice, 2 virtual CPU devices each, gloo collectives, on
one global `tensor=4` mesh (every tensor group spans both processes: process 0 schedules,
serves and sends each iteration's plan to process 1, both run every program) and on
`tensor=2,pipeline=2` (one stage per process: process 0 runs stage 0 and sends the
activations, process 1 runs stage 1 and sampling and sends the ids back). Concurrent mixed greedy requests (chunked prompts,
different lengths) must come back token for token as a 1-device engine in this process makes
them. Then the follower is killed: the leader must stay up, fail requests with a clear error
(UNAVAILABLE, naming the lost follower) and report unhealthy on gRPC health and HTTP /health,
not hang; SIGTERM still stops it. A slow test checks the clean stop: SIGTERM to both
processes drains a request in flight and both exit 0.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import converted_gpt2

from orca_jax.client import Client
from orca_jax.engine import Engine, EngineConfig
from orca_jax.request import SamplingParams

MODEL = dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4)
ENGINE_FLAGS = ["--max-batch-size", "8", "--max-num-batched-tokens", "64", "--max-prefill-seqs", "4",
                "--max-model-len", "128", "--kv-memory", "1e8"]
EC = EngineConfig(max_batch_size=8, max_num_batched_tokens=64, max_prefill_seqs=4, max_model_len=128,
                  kv_memory=int(1e8), warmup=False)
# (prompt length, max new tokens): prompts longer than the 64-token budget are chunked
REQUESTS = [(1, 6), (17, 5), (70, 4), (5, 9), (30, 3), (8, 12), (100, 7), (3, 10)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(1, MODEL["vocab_size"], size=n).tolist() for n, _ in REQUESTS]


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return converted_gpt2(tmp_path_factory.mktemp("multihost-model"), seed=2, **MODEL)


@contextlib.contextmanager
def serving_group(ckpt: str, tmp_path, mesh: str = "tensor=4"):
    """Two `orca-jax serve` processes (2 virtual CPU devices each) on one 4-device mesh;
    yields (leader, follower, grpc target, http url, log(i)); kills what is left at the end."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONUNBUFFERED": "1"}
    coord, control = f"127.0.0.1:{_free_port()}", str(_free_port())
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "orca_jax.cli", "serve", "--model", ckpt, "--mesh", mesh,
         "--layout", "megatron", "--grpc-port", "0", "--http-port", "0", "--coordinator", coord,
         "--num-processes", "2", "--process-id", str(i), "--control-port", control, *ENGINE_FLAGS],
        env=env, stdout=logs[i], stderr=subprocess.STDOUT, text=True) for i in (1, 0)][::-1]

    def log(i: int) -> str:
        logs[i].flush()
        return (tmp_path / f"process{i}.log").read_text()

    try:
        def ready():
            for i, p in enumerate(procs):
                assert p.poll() is None, f"process {i} exited early:\n{log(i)[-3000:]}"
            return re.search(r"ready grpc=(\S+) http=(\S+)", log(0))
        m = _wait(ready, 180, "the leader to be ready")
        assert "following the leader" in log(1)
        yield procs[0], procs[1], m.group(1), m.group(2), log
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()


@pytest.mark.parametrize("mesh", ["tensor=4", "tensor=2,pipeline=2"])
def test_two_processes_serve_like_one_and_a_dead_follower_fails_cleanly(ckpt, tmp_path, mesh):
    with serving_group(ckpt, tmp_path, mesh) as (leader, follower, target, http, log):
        # Concurrent mixed requests over gRPC == a 1-device engine in this process.
        prompts = _prompts()

        def call(i: int) -> list[int]:
            with Client(target) as c:
                return c.generate(prompts[i], max_tokens=REQUESTS[i][1], temperature=0.0,
                                  ignore_eos=True).token_ids
        with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
            got = list(pool.map(call, range(len(REQUESTS))))
        engine = Engine.from_checkpoint(ckpt, EC)
        reqs = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
                for p, (_, n) in zip(prompts, REQUESTS)]
        want = {r.request_id: [] for r in reqs}
        while engine.has_unfinished():
            for o in engine.step():
                want[o.request_id] += o.token_ids
        assert got == [want[r.request_id] for r in reqs]
        assert _health(target) == health_pb2.HealthCheckResponse.SERVING

        # A follower dies: clear errors and unhealthy, not a hang and not a dead leader.
        follower.send_signal(signal.SIGKILL)
        follower.wait(10)
        _wait(lambda: _http(http + "/health")[0] == 503, 20, "/health to turn 503")
        status, body = _http(http + "/health")
        assert "follower process 1 of 2 is gone" in body
        _wait(lambda: _health(target) == health_pb2.HealthCheckResponse.NOT_SERVING, 20, "gRPC NOT_SERVING")
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err, Client(target) as c:
            c.generate(prompts[0], max_tokens=4, temperature=0.0)
        assert time.monotonic() - t0 < 10
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "follower process 1 of 2 is gone" in err.value.details()
        assert leader.poll() is None, "the leader must stay up to report the failure"

        leader.send_signal(signal.SIGTERM)
        leader.wait(60)


@pytest.mark.slow  # another 2-process start-up (~30 s) per mesh
@pytest.mark.parametrize("mesh", ["tensor=4", "tensor=2,pipeline=2"])
def test_sigterm_stops_the_whole_group_cleanly(ckpt, tmp_path, mesh):
    """Supervisors signal every process: followers keep following while the leader drains a
    request in flight, then everyone exits 0 (followers leave jax.distributed first)."""
    with serving_group(ckpt, tmp_path, mesh) as (leader, follower, target, http, log):
        with Client(target) as c:
            stream = c.stream(_prompts()[0], max_tokens=40, temperature=0.0, ignore_eos=True)
            first = next(stream)
            follower.send_signal(signal.SIGTERM)
            leader.send_signal(signal.SIGTERM)
            rest = list(stream)
        assert len(first.token_ids) + sum(len(d.token_ids) for d in rest) == 40  # drained, not cut
        assert leader.wait(60) == 0, log(0)[-3000:]
        assert follower.wait(60) == 0, log(1)[-3000:]


STUCK_AFTER_S = 3.0


@pytest.mark.parametrize("fault", [pytest.param("SIGKILL", marks=pytest.mark.slow), "SIGSTOP"])
def test_a_follower_dying_or_hanging_mid_stream_fails_the_stream_not_hangs(ckpt, tmp_path, monkeypatch, fault):
    """The follower dies (SIGKILL: its control connection closes, the leader calls `fail`)
    or hangs (SIGSTOP: alive, connection open, the leader waits inside a collective that
    never completes) while a request streams. Either way the stream ends with UNAVAILABLE
    naming the cause, within --stuck-after (+ slack) for the hang, and the leader exits with
    status 3 for a restart instead of hanging."""
    monkeypatch.setattr(sys.modules[__name__], "ENGINE_FLAGS",  # read by serving_group
                        ENGINE_FLAGS + ["--stuck-after", str(STUCK_AFTER_S)])
    with serving_group(ckpt, tmp_path) as (leader, follower, target, http, log):
        with Client(target, timeout=60) as c:
            stream = c.stream(_prompts()[0], max_tokens=100, temperature=0.0, ignore_eos=True)
            assert next(stream).token_ids
            follower.send_signal(getattr(signal, fault))
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
            failed_after_s = time.monotonic() - t0
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        if fault == "SIGKILL":
            assert "follower process 1 of 2 is gone" in err.value.details()
            assert failed_after_s < 10
        else:
            assert "stuck" in err.value.details() and "--stuck-after" in err.value.details()
            assert failed_after_s < STUCK_AFTER_S + 4  # the step before the stop may finish first
        assert leader.wait(60) == 3, log(0)[-3000:]
        if fault == "SIGSTOP":  # it did not wait for the collective, which never returns
            assert "still inside a device step" in log(0), log(0)[-3000:]
