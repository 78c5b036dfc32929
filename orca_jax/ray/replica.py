"""One engine replica as a Ray Serve deployment: the same engine and network front end as
`orca-jax serve` (orca_jax/server), inside a Serve replica actor.

Each replica builds its engine from the `orca-jax serve` engine flags (`engine_argv`), starts
the standard Server on loopback (HTTP and gRPC on free ports: the OpenAI routes, chat,
streaming, errors and /metrics are the single-process server's own) and exposes to Serve:

    forward(method, path, body, headers, route=None)   streams the local server's answer:
                  first (status, headers + x-orca-jax-replica: its name), then body chunks
                  (the ingress relays them)
    forward_grpc(method, request, route=None)   the same for the gRPC API (Generate,
                  GetModelInfo): serialized responses, or the local server's status code
    record_routing_stats()   what the global scheduler reads (router.py): waiting, running,
                  KV pages free, the page keys in its prefix cache, the vllm:* counters
    check_health()  raises when the engine loop is dead or stuck: Serve replaces the replica

A replica reserves its devices through Ray resources (`num_gpus` in ray_actor_options; a
tensor-parallel replica asks for several and builds its mesh with `--mesh`).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, AsyncIterator, Sequence

import aiohttp
from ray import serve

log = logging.getLogger("ray.serve.orca_jax")

REPLICA_HEADER = "x-orca-jax-replica"  # on every answer: the replica that served it
MAX_REPORTED_KEYS = 8192      # prefix-cache keys per report (16 bytes each), newest first kept
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
               "content-encoding"}


def engine_args(engine_argv: Sequence[str]) -> argparse.Namespace:
    """The `orca-jax serve` engine flags (`--max-batch-size 8 --page-size 16 ...`) parsed."""
    from ..cli.flags import add_engine_flags
    p = argparse.ArgumentParser(prog="orca-jax serve (replica)")
    add_engine_flags(p)
    return p.parse_args(list(engine_argv))


class EngineReplica:
    """The engine deployment's class (wrapped by `serve.deployment` in app.py)."""

    def __init__(self, model: str, engine_argv: Sequence[str] = (), served_model_name: str = "orca-jax",
                 stuck_after_s: float = 60.0, chat_template: str | None = None):
        from ..async_engine import AsyncEngine
        from ..cli.flags import build_engine
        from ..server import BackgroundServer, ServerConfig
        t0 = time.perf_counter()
        args = engine_args(engine_argv)
        self.engine = AsyncEngine(build_engine(args, model), stuck_after_s=stuck_after_s,
                                  fail_when_stuck=True).start()
        config = ServerConfig(grpc_port=0, http_port=0, chat_template=chat_template)  # loopback
        self.server = BackgroundServer(self.engine, config, served_model_name).start()
        self.url = self.server.http_url
        self.name = serve.get_replica_context().replica_id.unique_id
        self._session: aiohttp.ClientSession | None = None
        self._channel = None      # grpc.aio channel to the local gRPC server, made on first use
        self._keys: list[bytes] = []
        log.info("engine replica (pid %d) ready in %.1f s on %s, gRPC %s", os.getpid(),
                 time.perf_counter() - t0, self.url, self.server.grpc_target)

    async def forward(self, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                      route=None) -> AsyncIterator[Any]:
        """The local server's answer to one HTTP request: (status, headers), then body chunks
        as they come (SSE events of a stream). `route` is the router's (routing.RouteKey)."""
        if self._session is None:
            # No total timeout: a long generation streams for as long as it takes; the local
            # server's own write and idle timeouts bound a stalled one.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=10))
        async with self._session.request(method, self.url + path, data=body, headers=headers or {}) as resp:
            headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
            yield resp.status, {**headers, REPLICA_HEADER: self.name}
            async for chunk in resp.content.iter_any():
                yield chunk

    async def forward_grpc(self, method: str, request: bytes, route=None) -> AsyncIterator[tuple]:
        """One call to the local gRPC server (Generate: a serialized GenerateRequest;
        GetModelInfo): ("msg", serialized response) per response, then, if it failed,
        ("error", status code name, details)."""
        import grpc

        from ..proto import generation_pb2 as pb
        from ..proto import generation_pb2_grpc as pb_grpc
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.server.grpc_target)
        stub = pb_grpc.GenerationStub(self._channel)
        try:
            if method == "GetModelInfo":
                yield "msg", (await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)).SerializeToString()
                return
            async for out in stub.Generate(pb.GenerateRequest.FromString(request)):
                yield "msg", out.SerializeToString()
        except grpc.aio.AioRpcError as e:
            yield "error", e.code().name, e.details() or ""

    def record_routing_stats(self) -> dict[str, Any]:
        """What the router reads (Serve polls it every request_routing_stats_period_s)."""
        s = self.engine.snapshot
        return {"num_waiting": s.num_waiting, "num_running": s.num_running,
                "max_running": self.engine.num_slots, "kv_pages_free": s.kv_pages_free,
                "kv_pages_total": s.kv_pages_total, "page_size": self.engine.kv_page_size,
                "kv_usage": s.kv_usage, "cached": self._cached_keys(),
                "num_preemptions": s.num_preemptions, "prefix_cache_queries": s.prefix_cache_queries,
                "prefix_cache_hits": s.prefix_cache_hits, "num_swapped": s.num_swapped,
                "iterations": s.iterations, "healthy": self.engine.healthy(), "pid": os.getpid()}

    def _cached_keys(self) -> list[bytes]:
        """The prefix cache's keys, copied on the engine thread; the last copy if the engine is
        busier than a report's patience."""
        try:
            self._keys = self.engine.prefix_cache_keys(MAX_REPORTED_KEYS).result(timeout=2.0)
        except Exception:  # TimeoutError, or the engine stopped: the router keeps the last keys
            pass
        return self._keys

    def check_health(self) -> None:
        problem = self.server.server.health_problem()
        if problem is not None:
            raise RuntimeError(f"engine replica unhealthy: {problem}")

    def __del__(self):
        """Serve's graceful stop (scale-down, shutdown)."""
        server, engine = getattr(self, "server", None), getattr(self, "engine", None)
        if server is not None:
            server.stop()
        if engine is not None:
            engine.shutdown(timeout=5)
