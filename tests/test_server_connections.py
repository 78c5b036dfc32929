"""Connections a hostile or broken client holds open: idle, half-sent headers, a trickled
body, a stream it stops reading, too many at once. Each is closed or refused on a bound, as production HTTP servers do,
while normal requests keep being served. Raw sockets, so the test controls every byte."""
import json
import socket
import threading
import time

import grpc
import pytest

from orca_jax.async_engine import AsyncEngine
from orca_jax.client import Client
from orca_jax.engine import Engine, EngineConfig
from orca_jax.server import BackgroundServer, ServerConfig

ENGINE = EngineConfig(max_batch_size=8, max_num_batched_tokens=64, max_prefill_seqs=4,
                      max_model_len=128, max_waiting=64)
IDLE_S, BODY_S, WRITE_S, MAX_CONNECTIONS = 1.0, 1.0, 1.0, 4


@pytest.fixture(scope="module")
def bg(demo_model_dir):
    engine = AsyncEngine(Engine.from_checkpoint(demo_model_dir, ENGINE)).start()
    server = BackgroundServer(engine, ServerConfig(
        grpc_port=0, http_port=0, idle_timeout_s=IDLE_S, body_timeout_s=BODY_S, write_timeout_s=WRITE_S,
        max_connections=MAX_CONNECTIONS), "demo").start()
    yield server
    server.stop()
    engine.shutdown()


def connect(bg) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", bg.server.http_port), timeout=10)
    s.settimeout(10)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or 10 s pass: a failure)."""
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def closed_within(s: socket.socket, seconds: float) -> bool:
    t0 = time.monotonic()
    read_all(s)
    return time.monotonic() - t0 < seconds


def completion(bg, max_tokens=2) -> dict:
    s = connect(bg)
    body = json.dumps({"prompt": "The orca", "max_tokens": max_tokens}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    head, _, payload = read_all(s).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(payload)


def test_an_idle_connection_is_closed(bg):
    s = connect(bg)
    assert closed_within(s, IDLE_S + 5)
    completion(bg)


def test_half_sent_headers_are_closed(bg):
    s = connect(bg)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
    assert closed_within(s, IDLE_S + 5)
    completion(bg)


def test_a_trickled_body_gets_408(bg):
    s = connect(bg)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"prompt\":")  # 90 bytes never come
    head, _, payload = read_all(s).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    assert json.loads(payload)["error"]["param"] == "body"


def test_a_kept_alive_connection_is_closed_when_idle(bg):
    s = connect(bg)
    body = json.dumps({"prompt": "The orca", "max_tokens": 1}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    data = read_all(s)  # the response, then the close IDLE_S later
    assert data.startswith(b"HTTP/1.1 200") and b'"text_completion"' in data


def test_connections_over_the_limit_get_503_and_the_rest_are_served(bg):
    held = [connect(bg) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)  # the server has accepted them
    extra = connect(bg)
    head, _, payload = read_all(extra).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), head
    assert json.loads(payload)["error"]["code"] == 503
    for s in held:
        s.close()
    deadline = time.monotonic() + 10
    while True:  # once the server has seen the closes, new connections are served again
        try:
            completion(bg)
            break
        except (AssertionError, OSError):  # still refused: a 503, or reset mid-request
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_health_is_answered_over_the_limit(bg):
    """A flood of connections must not fail a liveness probe (and get the server restarted)."""
    held = [connect(bg) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)
    probe = connect(bg)
    probe.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, payload = read_all(probe).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and payload == b"ok\n", head
    for s in held:
        s.close()


def test_a_compressed_body_is_refused_unread(bg):
    """A gzip bomb would inflate on the event loop: bodies must come uncompressed (415)."""
    import gzip
    body = gzip.compress(b" " * (1 << 24))  # 16 MiB of spaces in 16 KiB
    s = connect(bg)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Encoding: gzip\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
              % (len(body), body))
    head, _, payload = read_all(s).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 415"), head
    assert json.loads(payload)["error"]["param"] == "body"


def test_unknown_paths_and_methods_answer_json(bg):
    """FastAPI's body, as vLLM answers them."""
    s = connect(bg)
    s.sendall(b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, payload = read_all(s).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404") and json.loads(payload) == {"detail": "Not Found"}
    s = connect(bg)
    s.sendall(b"GET /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, payload = read_all(s).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405") and json.loads(payload) == {"detail": "Method Not Allowed"}


def test_grpc_calls_over_the_limit_are_resource_exhausted(bg):
    started = threading.Barrier(MAX_CONNECTIONS + 1)
    errors = []

    def hold():
        try:
            with Client(bg.grpc_target, timeout=60) as c:
                stream = c.stream("The orca", max_tokens=100, ignore_eos=True, temperature=0)
                next(stream)
                started.wait(30)
                for _ in stream:
                    pass
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            started.abort()

    threads = [threading.Thread(target=hold) for _ in range(MAX_CONNECTIONS)]
    for t in threads:
        t.start()
    started.wait(60)
    with Client(bg.grpc_target, timeout=10) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("The orca", max_tokens=2)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with Client(bg.grpc_target, timeout=30) as c:
        assert c.generate("The orca", max_tokens=2).completion_tokens == 2


def test_a_stream_the_client_stops_reading_is_cut(bg, caplog):
    """64 streamed choices (4 prompts x n=16) of 120 tokens with 20 logprobs each, ~6 MB of
    SSE, more than loopback's socket buffers take (up to 4 MiB), to a client that reads
    nothing: once those and aiohttp's buffer are full, the server waits WRITE_S for the
    client, then closes the connection instead of holding the stream (and its deltas) for as
    long as the client likes. Without the write timeout the server never gives up."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", bg.server.http_port))
    body = json.dumps({"prompt": ["The orca"] * 4, "max_tokens": 120, "n": 16, "logprobs": 20,
                       "stream": True, "ignore_eos": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 60
    while not any("took no data" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the server never gave up on the client"
        time.sleep(0.2)
    data = b""
    try:
        while chunk := s.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass
    assert data.startswith(b"HTTP/1.1 200") and b"data: {" in data
    assert b"data: [DONE]" not in data
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "a slow client is not a server error"
    assert completion(bg)["choices"][0]["text"] is not None  # and everyone else is served
