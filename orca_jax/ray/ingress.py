"""The ingress in front of the engine replicas: one Ray Serve deployment that takes the
OpenAI-compatible requests on Serve's HTTP port (and gRPC calls on its gRPC port) and relays
each to the replica the global scheduler (router.py) picks.

    POST /v1/completions, /v1/chat/completions   routed: the prompt's page keys go along
                          (RouteKey) so that the router can send it where its prefix is cached
    GET  /health          200 {"replicas": n, "healthy": k, "by_replica": {...}} while some
                          replica serves; else 503
    GET  /metrics         every replica's vllm:* series and their sum, router decisions (metrics.py)
    anything else         relayed to whichever replica the router picks (/v1/models, /tokenize, ...)

and gRPC on Serve's gRPC port: orca_jax.v1.Generation (Generate, routed the same way; GetModelInfo),
relayed to the chosen replica's own gRPC server with its status codes.

Failures: when a replica dies (its process is killed) or answers 503 before anything was
sent to the client, the request is retried once on another replica; otherwise the client
gets a 503 with a retriable OpenAI error (a stream that had started gets an SSE error event
and no [DONE]). Non-streaming answers are collected whole before the client sees a byte, so
they are always retriable. Ray Serve restarts the dead replica; the router stops choosing it
as soon as Serve reports it dead.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from . import metrics
from .routing import RouteKey, lookup_hashes, prompt_tokens

log = logging.getLogger("ray.serve.orca_jax")

ROUTED = ("/v1/completions", "/v1/chat/completions")
PASSED_HEADERS = ("authorization", "content-type", "x-request-id", "accept")


# What a replica's death (or a Serve-side refusal) raises from a handle call. A failure inside
# `forward` is never the client's fault either (its mistakes come back as HTTP 4xx answers).
LOST = (RayError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)


class ReplicaLost(Exception):
    """The replica serving a request went away (or answered 503) before the client saw a byte."""


def _unavailable(message: str) -> JSONResponse:
    """503 with OpenAI's error body: retry (the server's own 503s look the same)."""
    return JSONResponse({"error": {"message": message, "type": "service_unavailable", "param": None,
                                   "code": 503}}, status_code=503, headers={"Retry-After": "1"})


class Ingress:
    """The ingress deployment's class (wrapped by `serve.deployment` in app.py)."""

    def __init__(self, engine, model: str, served_model_name: str, page_size: int,
                 route_by_prefix: bool = True, first_byte_timeout_s: float = 600.0):
        from ..tokenizer import load_tokenizer
        self.engine = engine.options(stream=True)
        self.model_name, self.page_size = served_model_name, page_size
        self.tokenizer = load_tokenizer(model) if route_by_prefix else None
        self.first_byte_timeout_s = first_byte_timeout_s

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if request.method == "GET" and path == "/health":
            return await self.health()
        if request.method == "GET" and path == "/metrics":
            reports = metrics.router_reports() or {}
            return Response(metrics.render(self.model_name, reports, metrics.DECISIONS),
                            media_type="text/plain; version=0.0.4")
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() in PASSED_HEADERS}
        if request.url.query:
            path += "?" + request.url.query
        key = None
        if request.method == "POST" and path in ROUTED:  # tokenizing a long prompt takes a while
            key = await asyncio.to_thread(self._route_key, path, body)
        return await self.forward(request.method, path, body, headers, key)

    def _route_key(self, path: str, body: bytes) -> RouteKey:
        if self.tokenizer is None:
            return RouteKey()
        try:
            ids = prompt_tokens(json.loads(body), path, self.tokenizer)
        except (ValueError, TypeError, AttributeError):  # the replica answers the 400 itself
            return RouteKey()
        return RouteKey(tuple(lookup_hashes(ids, self.page_size)))

    # -- gRPC (orca_jax.v1.Generation, on Serve's gRPC port) -----------------------------------

    async def Generate(self, request, grpc_context) -> AsyncIterator:
        """The Generation service's server-streaming call, relayed to a replica's own gRPC
        server: its responses and its status codes, retried once like HTTP."""
        from ..proto import generation_pb2 as pb
        body = ({"messages": [{"role": m.role, "content": m.content} for m in request.messages]}
                if request.messages else {"prompt": request.prompt or list(request.prompt_token_ids)})
        path = "/v1/chat/completions" if request.messages else "/v1/completions"
        key = await asyncio.to_thread(self._route_key, path, json.dumps(body).encode())
        async for data in self._relay_grpc("Generate", request.SerializeToString(), key, grpc_context):
            yield pb.GenerateResponse.FromString(data)

    async def GetModelInfo(self, request, grpc_context):
        from ..proto import generation_pb2 as pb
        async for data in self._relay_grpc("GetModelInfo", b"", None, grpc_context):
            return pb.ModelInfo.FromString(data)
        return pb.ModelInfo()

    async def _relay_grpc(self, method: str, request: bytes, key: RouteKey | None, ctx) -> AsyncIterator[bytes]:
        """A replica's serialized responses; its error (or a lost replica) as the call's status.
        Retried once, on another replica, when nothing was sent yet."""
        import grpc
        for attempt in (1, 2):
            gen = self.engine.forward_grpc.remote(method, request, **({} if key is None else {"route": key}))
            sent = False
            try:
                async for kind, *rest in gen:
                    if kind == "msg":
                        sent = True
                        yield rest[0]
                        continue
                    code, details = rest
                    if code != "UNAVAILABLE" or sent or attempt == 2:
                        ctx.set_code(getattr(grpc.StatusCode, code))
                        ctx.set_details(details)
                        return
                    raise ReplicaLost(f"the replica answered UNAVAILABLE: {details}")
                return
            except (*LOST, ReplicaLost) as e:
                log.warning("gRPC %s: %s (attempt %d of 2)", method, e, attempt)
                if sent or attempt == 2:
                    ctx.set_code(grpc.StatusCode.UNAVAILABLE)
                    ctx.set_details(f"the engine replica was lost ({type(e).__name__}); retry the request")
                    return
            finally:  # done, lost, or the client cancelled: the replica's call ends too
                gen.cancel()

    async def health(self) -> Response:
        reports = metrics.router_reports()
        if reports is None:  # no router yet: one relayed request creates it
            try:
                [_ async for _ in self.engine.forward.remote("GET", "/health")]
            except LOST as e:
                log.warning("GET /health: %s", e)
            reports = metrics.router_reports() or {}
        healthy = sum(bool(r.get("healthy", True)) for r in reports.values())
        body = {"status": "ok" if healthy else "unhealthy", "replicas": len(reports), "healthy": healthy,
                "by_replica": {name: {k: r.get(k) for k in ("healthy", "num_waiting", "num_running", "pid")}
                               for name, r in sorted(reports.items())}}
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def forward(self, method: str, path: str, body: bytes, headers: dict,
                      key: RouteKey | None) -> Response:
        """Relays one request, retrying once when its replica is lost before the client saw
        anything."""
        for attempt in (1, 2):
            kwargs = {} if key is None else {"route": key}
            gen = self.engine.forward.remote(method, path, body, headers, **kwargs)
            try:
                return await self._first_part(gen)
            except ReplicaLost as e:
                gen.cancel()
                log.warning("%s %s: %s (attempt %d of 2)", method, path, e, attempt)
                reason = str(e)
            except asyncio.CancelledError:  # the client went away: so does the replica's request
                gen.cancel()
                raise
        return _unavailable(f"no engine replica could serve the request ({reason}); retry")

    async def _first_part(self, gen) -> Response:
        """The response, once there is something to send: a whole non-streaming body, or the
        first chunk of a stream (the rest follows as it comes)."""
        try:
            status, headers = await asyncio.wait_for(gen.__anext__(), self.first_byte_timeout_s)
            if status == 503:
                raise ReplicaLost(f"the replica answered 503: {(await self._collect(gen))[:200]!r}")
            if "text/event-stream" not in headers.get("Content-Type", ""):
                return Response(await self._collect(gen), status_code=status, headers=headers)
            first = await asyncio.wait_for(gen.__anext__(), self.first_byte_timeout_s)
        except StopAsyncIteration:
            raise ReplicaLost("the replica closed the response early") from None
        except (*LOST, TimeoutError) as e:
            raise ReplicaLost(f"{type(e).__name__}: {e}") from None
        return StreamingResponse(_relay(first, gen), status_code=status, headers=headers)

    async def _collect(self, gen) -> bytes:
        try:
            return b"".join([c async for c in gen])
        except LOST as e:
            raise ReplicaLost(f"{type(e).__name__}: {e}") from None


async def _relay(first: bytes, gen) -> AsyncIterator[bytes]:
    """The rest of a stream. A replica lost mid-stream ends it with an SSE error event (no
    [DONE]): its tokens cannot be taken back, so it is not retried."""
    yield first
    try:
        async for chunk in gen:
            yield chunk
    except LOST as e:
        log.warning("a replica was lost mid-stream: %s", e)
        err = {"error": {"message": f"the engine replica was lost mid-stream ({type(e).__name__}); "
                                    "retry the request", "type": "service_unavailable",
                         "param": None, "code": 503}}
        yield b"data: " + json.dumps(err).encode() + b"\n\n"
    finally:
        gen.cancel()
