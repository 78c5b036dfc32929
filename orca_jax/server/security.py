"""Optional TLS and a bearer-token check, the same for the gRPC and the HTTP port.

The token is compared in constant time. Health checks stay open so that load balancers and
Kubernetes probes need no secret: gRPC `grpc.health.v1.Health/*`, HTTP `GET /health` and
`GET /metrics` (as vLLM leaves them). Everything else (Generation, reflection, `/v1/*`)
needs `authorization: Bearer <token>` when a token is configured.
"""
from __future__ import annotations

import hmac
import ssl
from typing import Awaitable, Callable

import grpc
from aiohttp import web

OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)
OPEN_HTTP_PATHS = ("/health", "/metrics")


def token_ok(expected: str, header: str | None) -> bool:
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), expected.encode())


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def grpc_credentials(cert: str, key: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(_read(key), _read(cert))])


def http_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


class GrpcBearerAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without the token with UNAUTHENTICATED, before the handler runs."""

    def __init__(self, token: str):
        self.token = token

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(OPEN_GRPC_PREFIXES):
            return await continuation(details)
        header = dict(details.invocation_metadata or ()).get("authorization")
        if token_ok(self.token, header):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        return _refusing(handler, "authorization: expected 'Bearer <token>' metadata with the "
                                  "server's token")


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary/stream) that aborts with UNAUTHENTICATED."""
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    fn = refuse_stream if handler.response_streaming else refuse
    return make(fn, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def http_bearer_auth(token: str) -> Callable:
    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if request.path in OPEN_HTTP_PATHS or token_ok(token, request.headers.get("Authorization")):
            return await handler(request)
        return web.json_response(
            {"error": {"message": "authorization: expected 'Authorization: Bearer <token>' with the "
                                  "server's token", "type": "authentication_error", "param": None,
                       "code": "invalid_api_key"}}, status=401)
    return check
