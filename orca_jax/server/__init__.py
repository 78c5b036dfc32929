"""The network front end of one engine: gRPC (`orca_jax.v1.Generation`, health, reflection)
and an optional OpenAI-compatible HTTP port, in one process and one asyncio loop.

    app.py        Server / ServerConfig / serve() (SIGTERM drain) / BackgroundServer
    grpc_api.py   the Generation service
    http_api.py   /v1/completions, /v1/models, /health, /metrics
    inputs.py     request validation shared by both (field-naming errors)
    stream.py     one request's deltas, cancel-safe; error kinds -> status codes
    metrics.py    Prometheus metrics with vLLM's names
    security.py   TLS and the bearer-token check

The engine loop runs in its own thread (orca_jax.async_engine); this loop only parses,
validates, tokenizes and streams, so slow clients never delay an iteration.
"""
from .app import BackgroundServer, Server, ServerConfig, serve

__all__ = ["BackgroundServer", "Server", "ServerConfig", "serve"]
