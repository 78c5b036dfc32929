"""The server process: one asyncio loop runs the gRPC server and the optional HTTP port in front
of one AsyncEngine (whose loop runs in its own thread).

    engine = AsyncEngine(Engine.from_checkpoint(path, cfg)).start()
    server = Server(engine, ServerConfig(grpc_port=50051, http_port=8000), model_name="gpt2")
    await server.start()            # binds; port 0 picks a free port (server.grpc_port)
    await server.drain(timeout=30)  # stop accepting, let in-flight requests finish
    await server.stop()

`serve()` is the whole `orca-jax serve` lifecycle, SIGTERM drain included; `BackgroundServer`
runs a Server on a private loop in a thread (tests, `orca-jax demo`).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import threading
import time
from concurrent.futures import Future

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from .. import __version__
from ..async_engine import AsyncEngine, EngineDeadError
from ..proto import generation_pb2 as pb
from ..request import MAX_LOGPROBS, FinishReason, RequestOutput
from . import security
from .grpc_api import GenerationService, add_to_server
from .http_api import CompletionsAPI
from .inputs import Limits
from .metrics import ServerMetrics
from .stream import ErrorKind

log = logging.getLogger("orca_jax.server")

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # orca_jax.v1.Generation


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Network front end of one engine (the `orca-jax serve` flags)."""

    host: str = "127.0.0.1"               # interface to bind; 0.0.0.0 for every interface
    grpc_port: int | None = 50051         # None: no gRPC port; 0: any free port
    http_port: int | None = None          # OpenAI-compatible HTTP; None: off; 0: any free port
    tls_cert: str | None = None           # PEM certificate chain: TLS on both ports
    tls_key: str | None = None            # PEM private key of tls_cert
    auth_token: str | None = None         # require "authorization: Bearer <token>"
    max_request_bytes: int = 1 << 20      # larger requests: INVALID_ARGUMENT / HTTP 400
    max_connections: int = 1024           # open HTTP connections / concurrent gRPC calls; beyond:
                                          # HTTP 503 and close, gRPC RESOURCE_EXHAUSTED
    idle_timeout_s: float = 30.0          # a connection with no request in flight for this long
                                          # (or whose request headers take this long) is closed
    body_timeout_s: float = 30.0          # an HTTP body not received within this: 408
    write_timeout_s: float = 30.0         # an SSE chunk the client takes no byte of within this:
                                          # the stream is cut and its requests aborted
    drain_timeout_s: float = 30.0         # SIGTERM: how long in-flight requests may finish
    health_poll_s: float = 0.5            # how often gRPC health follows the engine's state
    chat_template: str | None = None      # jinja source for /v1/chat/completions, over the
                                          # checkpoint's own (--chat-template FILE)

    def __post_init__(self):
        if self.grpc_port is None and self.http_port is None:
            raise ValueError("grpc_port and http_port are both off: enable at least one")
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("auth_token is empty")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if min(self.idle_timeout_s, self.body_timeout_s, self.write_timeout_s) <= 0:
            raise ValueError("idle_timeout_s, body_timeout_s and write_timeout_s must be > 0")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")


def model_info(engine: AsyncEngine, model_name: str, max_request_bytes: int) -> pb.ModelInfo:
    c, eos = engine.model_config, engine.eos_token_id
    return pb.ModelInfo(
        model_name=model_name, architecture=c.model_type, max_model_len=engine.max_len, vocab_size=c.vocab_size,
        eos_token_id=-1 if eos is None else eos, max_batch_size=engine.num_slots, max_logprobs=MAX_LOGPROBS,
        num_layers=c.num_layers, hidden_size=c.hidden_size, num_heads=c.num_heads, num_parameters=c.num_params(),
        dtype=c.dtype, version=__version__, max_request_bytes=max_request_bytes)


class Server:
    def __init__(self, engine: AsyncEngine, config: ServerConfig = ServerConfig(),
                 model_name: str = "orca-jax"):
        self.engine = engine
        self.config = config
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.limits = Limits(engine.max_len, engine.model_config.vocab_size, config.max_request_bytes)
        self.metrics = ServerMetrics(engine, model_name, engine.max_len)
        self.draining = False       # SIGTERM: refusing new requests, finishing in-flight ones
        self.closing = False        # drain timed out: the leftovers are being aborted
        self.active: set[str] = set()  # engine request ids of in-flight calls
        self.started_at = int(time.time())
        self.grpc_port: int | None = None     # bound ports, after start()
        self.http_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._http_listener: asyncio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._poll: asyncio.Task | None = None
        self._token_cache: dict[int, str] = {}
        self.chat, self.chat_problem = self._chat_template()

    def _chat_template(self):
        """(ChatTemplate, None), or (None, why /v1/chat/completions cannot serve). A bad
        --chat-template fails here (at start-up); a bad checkpoint template only disables chat."""
        from ..chat import ChatTemplate
        specials = getattr(self.tokenizer, "special_tokens", {}) or {}
        if self.config.chat_template is not None:
            return ChatTemplate(self.config.chat_template, specials), None
        source = getattr(self.tokenizer, "chat_template", None)
        error = getattr(self.tokenizer, "chat_template_error", None)
        if source is None:
            why = (f"its chat template is unusable ({error})" if error
                   else "its tokenizer has no chat template")
            return None, (f"model {self.model_name!r} cannot serve chat completions: {why}; start "
                          "the server with --chat-template FILE (a jinja chat template) or use "
                          "/v1/completions")
        try:
            return ChatTemplate(source, specials), None
        except ValueError as e:
            log.warning("the checkpoint's chat template is unusable: %s", e)
            return None, (f"model {self.model_name!r} cannot serve chat completions: {e}; start the "
                          "server with --chat-template FILE or use /v1/completions")

    # -- helpers the APIs share -------------------------------------------------------------

    def health_problem(self) -> str | None:
        """None when serving; else why not (dead engine, stuck iteration, draining)."""
        if self.engine.dead is not None:
            return f"the engine loop failed: {self.engine.dead}"
        if not self.engine.healthy():
            return (f"the engine loop is not iterating (stopped, or one iteration has taken over "
                    f"{self.engine.stuck_after_s:.0f} s)")
        if self.draining:
            return "draining: the server is shutting down"
        return None

    async def outputs(self, prompt, params, request_id: str):
        """`AsyncEngine.generate`'s deltas (submission errors raise from the first one; closing
        or cancelling aborts), tracked in `self.active` so that a timed-out drain can abort it.
        A request that a broken engine (a stuck iteration, a lost follower) fails before its
        first token raises EngineDeadError like a refused submission, so that an HTTP stream
        answers 503 rather than 200 and an error event. Each delta's tokens are timed here for
        vllm:inter_token_latency_seconds (metrics.py)."""
        self.active.add(request_id)
        try:
            async with contextlib.aclosing(self.engine.generate(prompt, params, request_id)) as st:
                first, last_token = True, None
                async for out in st:
                    if first and self._engine_broke(out):
                        raise EngineDeadError(out.error)
                    first = False
                    last_token = self.metrics.observe_delta(len(out.token_ids), time.monotonic(), last_token)
                    yield out
        finally:
            self.active.discard(request_id)

    def _engine_broke(self, out: RequestOutput) -> bool:
        """Whether `out` failed because the engine was failed from outside (AsyncEngine.broken)."""
        return out.finish_reason is FinishReason.ERROR and self.engine.broken is not None

    def failure(self, out: RequestOutput) -> tuple[ErrorKind, str] | None:
        """How a final output that is not a normal finish must be reported, or None."""
        if out.finish_reason is FinishReason.ERROR and self.draining:
            return ErrorKind.UNAVAILABLE, f"the server shut down before the request finished ({out.error})"
        if self._engine_broke(out):  # not the request's fault: retry on a healthy server
            return ErrorKind.UNAVAILABLE, f"the engine failed: {out.error}"
        if out.finish_reason is FinishReason.ERROR:
            return ErrorKind.INTERNAL, f"the engine failed this request: {out.error}"
        if out.finish_reason is FinishReason.ABORT and self.closing:
            return ErrorKind.UNAVAILABLE, ("the server shut down before the request finished "
                                           "(drain timeout)")
        return None

    def token_text(self, token_id: int) -> str:
        """One token's text (for logprobs), cached: vocabularies are small. A byte-level token
        that is not whole UTF-8 characters (half of one) is "", as vLLM shows it."""
        t = self._token_cache.get(token_id)
        if t is None:
            table = getattr(self.tokenizer, "token_bytes", None)
            if table is not None and 0 <= token_id < len(table):
                try:
                    t = table[token_id].decode("utf-8")
                except UnicodeDecodeError:
                    t = ""
            else:
                t = self.tokenizer.decode([token_id])
            self._token_cache[token_id] = t
        return t

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        c = self.config
        if c.grpc_port is not None:
            hard_limit = max(4 * c.max_request_bytes, 4 << 20)  # beyond it gRPC itself refuses
            interceptors = [security.GrpcBearerAuth(c.auth_token)] if c.auth_token else []
            idle_ms = int(c.idle_timeout_s * 1000)
            self._grpc = grpc.aio.server(
                interceptors=interceptors, maximum_concurrent_rpcs=c.max_connections, options=[
                    ("grpc.max_receive_message_length", hard_limit),
                    ("grpc.so_reuseport", 0),
                    ("grpc.max_connection_idle_ms", idle_ms),        # idle connections close
                    ("grpc.server_handshake_timeout_ms", idle_ms)])  # so do half-open ones
            add_to_server(GenerationService(self, model_info(self.engine, self.model_name,
                                                             c.max_request_bytes)), self._grpc)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
            reflection.enable_server_reflection(
                (GENERATION_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME), self._grpc)
            addr = f"{c.host}:{c.grpc_port}"
            if c.tls_cert:
                self.grpc_port = self._grpc.add_secure_port(addr, security.grpc_credentials(c.tls_cert, c.tls_key))
            else:
                self.grpc_port = self._grpc.add_insecure_port(addr)
            await self._grpc.start()
        if c.http_port is not None:
            middlewares = [security.http_bearer_auth(c.auth_token)] if c.auth_token else []
            app = CompletionsAPI(self).app(middlewares)
            # keepalive_timeout: aiohttp closes a connection idle (or still sending its request
            # headers) that long after it opened or after its last response; lingering_time:
            # how long it reads an unread body (a refused or timed-out request's) before closing.
            self._http = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                       shutdown_timeout=1.0, keepalive_timeout=c.idle_timeout_s,
                                       lingering_time=1.0)
            await self._http.setup()
            ssl_ctx = security.http_ssl_context(c.tls_cert, c.tls_key) if c.tls_cert else None
            handler = self._http.server

            def connection():  # over the limit: only /health is answered, then it is closed
                if len(handler.connections) >= c.max_connections:
                    return _OverLimit(self)
                return handler()
            tls = {"ssl_handshake_timeout": c.idle_timeout_s} if ssl_ctx else {}
            self._http_listener = await asyncio.get_running_loop().create_server(
                connection, c.host, c.http_port, ssl=ssl_ctx, reuse_address=True, **tls)
            self.http_port = self._http_listener.sockets[0].getsockname()[1]
        await self._update_health()
        self._poll = asyncio.create_task(self._follow_health())

    async def _update_health(self) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if self.health_problem() is None
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", GENERATION_SERVICE):
            await self._health.set(service, status)

    async def _follow_health(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_poll_s)
            await self._update_health()

    async def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests (UNAVAILABLE / 503), wait for in-flight ones to finish.
        Returns False if some were still running at the timeout."""
        timeout = self.config.drain_timeout_s if timeout is None else timeout
        self.draining = True
        self.engine.stop_accepting()
        await self._update_health()
        deadline = time.monotonic() + timeout
        while self.engine.num_unfinished() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.engine.num_unfinished()
        if left:
            log.warning("drain timeout (%.0f s): aborting %d requests", timeout, left)
            self.closing = True  # their calls end with UNAVAILABLE, not a normal "abort" finish
            for rid in list(self.active):
                self.engine.abort(rid)
            deadline = time.monotonic() + 2.0  # let the handlers send their errors
            while self.active and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        return left == 0

    async def stop(self, grace: float = 1.0) -> None:
        """Close both ports; calls still open get `grace` seconds, then are cancelled."""
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._http_listener is not None:
            self._http_listener.close()
        if self._http is not None:
            await self._http.cleanup()


class _OverLimit(asyncio.Protocol):
    """An HTTP connection over `max_connections`. It may still ask for `GET /health` (so that
    a flood of connections never fails a liveness probe and gets the server restarted);
    anything else is answered 503. Either way the connection then closes, after a second in
    which what the client still sends is read and dropped (closing with unread data would
    reset the connection before the client reads the answer)."""

    LINGER_S = 1.0

    def __init__(self, server: "Server"):
        self.server = server
        self.head = b""
        self.transport = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(self.LINGER_S, self._answer)

    def data_received(self, data: bytes) -> None:
        if self.head is None:
            return  # answered: dropping the rest
        self.head += data[:8192]
        if b"\r\n" in self.head or len(self.head) >= 8192:
            self._answer()

    def _answer(self) -> None:
        if self.head is None or self.transport is None:
            return
        method, _, rest = self.head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        self.head = None
        if method == b"GET" and path == b"/health":
            problem = self.server.health_problem()
            status, body = ("200 OK", b"ok\n") if problem is None else (
                "503 Service Unavailable", json.dumps({"status": "unhealthy", "reason": problem}).encode())
        else:
            status, body = "503 Service Unavailable", json.dumps({"error": {
                "message": "the server has too many open connections; retry", "type":
                "service_unavailable", "param": None, "code": 503}}).encode()
        self.transport.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                             f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(self.LINGER_S, self.transport.close)

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None


ENGINE_FAILED_EXIT = 3  # `orca-jax serve`'s exit status when its engine died: restart it


def serve(engine: AsyncEngine, config: ServerConfig, model_name: str,
          on_ready=None) -> int:
    """Runs the server until SIGTERM/SIGINT, then drains (stop accepting, let in-flight
    requests finish up to `config.drain_timeout_s`), stops and returns 0. If the engine dies
    (a step failed in a way no request can be blamed for, or a follower process was lost),
    every request has already failed with a clear error; the ports close after a second (so
    that handlers send those errors) and it returns ENGINE_FAILED_EXIT, for a supervisor
    (systemd, Kubernetes, SLURM) to restart the process. The caller owns the engine (and
    shuts it down after)."""

    async def main() -> int:
        server = Server(engine, config, model_name)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if on_ready is not None:
            on_ready(server)
        while not stop.is_set() and engine.dead is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), config.health_poll_s)
        if engine.dead is not None:
            log.error("the engine failed (%s): closing the ports; exit status %d asks the "
                      "supervisor for a restart", engine.dead, ENGINE_FAILED_EXIT)
            await asyncio.sleep(1.0)
            await server.stop()
            return ENGINE_FAILED_EXIT
        log.warning("signal received: draining (up to %.0f s)", config.drain_timeout_s)
        await server.drain()
        await server.stop()
        return 0

    return asyncio.run(main())


class BackgroundServer:
    """A Server on its own event loop in a daemon thread: `start()` returns once it is bound."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, model_name: str = "orca-jax"):
        self.engine, self.config, self.model_name = engine, config, model_name
        self.loop = asyncio.new_event_loop()
        self.server: Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="orca-server", daemon=True)

    def start(self) -> "BackgroundServer":
        self._thread.start()

        async def up():
            self.server = Server(self.engine, self.config, self.model_name)
            await self.server.start()
        self.call(up())
        return self

    def call(self, coro, timeout: float | None = 60):
        """Runs a coroutine on the server's loop and returns its result."""
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    @property
    def grpc_target(self) -> str:
        return f"{_connect_host(self.config.host)}:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{_connect_host(self.config.host)}:{self.server.http_port}"

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
