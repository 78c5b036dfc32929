"""The Ray Serve application: N engine replicas (replica.py) behind the OpenAI-compatible
ingress (ingress.py), routed by the global scheduler (router.py).

    orca-jax serve --replicas 2 --http-port 8000                  # starts a local Ray
    serve run orca_jax.ray:app                                     # 2 demo-model replicas
    serve run orca_jax.ray:build_app model=/ckpt replicas=4 num_gpus=1 \\
        router=prefix engine_args="--max-batch-size 32"           # an existing Ray cluster

`build_app` takes `serve run`'s key=value arguments (strings); `build` takes a ReplicasConfig.
"""
from __future__ import annotations

import dataclasses
import shlex
from typing import Any, Mapping

from ray import serve
from ray.serve.config import RequestRouterConfig

from .ingress import Ingress
from .replica import EngineReplica, engine_args
from .router import OrcaRequestRouter
from .routing import RouterConfig

APP_NAME = "orca-jax"


@dataclasses.dataclass(frozen=True)
class ReplicasConfig:
    """N engine replicas and their router (the `orca-jax serve --replicas` flags)."""

    model: str                               # checkpoint directory (every replica loads it)
    served_model_name: str = "orca-jax"      # name in /v1/models and the metrics
    num_replicas: int = 2
    engine_argv: tuple[str, ...] = ()        # `orca-jax serve` engine flags for every replica
    router: str = "prefix"                   # routing.POLICIES
    overload_margin: float = 1.0             # routing.RouterConfig.overload_margin
    num_cpus: float = 1.0                    # Ray CPUs each replica reserves
    num_gpus: float = 0.0                    # Ray GPUs each replica reserves (several: tensor parallel)
    ingress_cpus: float = 0.1
    stats_period_s: float = 1.0              # how often replicas report their load to the router
    health_check_period_s: float = 2.0       # how often Serve asks each replica check_health()
    stuck_after_s: float = 60.0              # an iteration this long: the replica is unhealthy
    chat_template: str | None = None         # jinja source over the checkpoint's own (--chat-template)

    def __post_init__(self):
        RouterConfig(self.router, self.overload_margin)  # validates both
        if self.num_replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.num_replicas}")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.ingress_cpus < 0:
            raise ValueError("num_cpus, num_gpus and ingress_cpus must be >= 0")
        if self.stats_period_s <= 0 or self.health_check_period_s <= 0:
            raise ValueError("stats_period_s and health_check_period_s must be > 0")
        engine_args(self.engine_argv)  # a bad engine flag fails here, not in every replica


def build(c: ReplicasConfig):
    """The Serve application (bind graph) of `c`."""
    cfg = engine_args(c.engine_argv)
    # Each replica takes what its engine can hold (batch + waiting queue) and refuses beyond,
    # so that Serve's router backs off and tries the next rank rather than piling on one.
    max_ongoing = cfg.max_batch_size + cfg.max_waiting
    actor = {"num_cpus": c.num_cpus, "num_gpus": c.num_gpus}
    if 0 < c.num_gpus < 1:
        # Replicas sharing a GPU: XLA preallocates 75% of the device per process by default,
        # so a second replica could not start. Each takes its share instead (not yet tried on
        # a GPU here).
        actor["runtime_env"] = {"env_vars": {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 * c.num_gpus:.3f}"}}
    engine = serve.deployment(
        EngineReplica, name="OrcaEngine", num_replicas=c.num_replicas, ray_actor_options=actor,
        max_ongoing_requests=max_ongoing, health_check_period_s=c.health_check_period_s,
        health_check_timeout_s=max(10.0, 3 * c.health_check_period_s),
        graceful_shutdown_timeout_s=10.0,
        request_router_config=RequestRouterConfig(
            request_router_class=f"{OrcaRequestRouter.__module__}.{OrcaRequestRouter.__name__}",
            request_router_kwargs={"policy": c.router, "overload_margin": c.overload_margin,
                                   "memory_pages": 4096},
            request_routing_stats_period_s=c.stats_period_s,
            request_routing_stats_timeout_s=max(5.0, 5 * c.stats_period_s)),
    ).bind(c.model, list(c.engine_argv), c.served_model_name, c.stuck_after_s, c.chat_template)
    ingress = serve.deployment(Ingress, name="OrcaIngress", num_replicas=1,
                               max_ongoing_requests=c.num_replicas * max_ongoing,
                               ray_actor_options={"num_cpus": c.ingress_cpus})
    return ingress.bind(engine, c.model, c.served_model_name, cfg.page_size,
                        c.router == "prefix" and cfg.enable_prefix_caching)


_ARGS = {"model": str, "served_model_name": str, "replicas": int, "engine_args": str,
         "router": str, "overload_margin": float, "num_cpus": float, "num_gpus": float,
         "stats_period_s": float, "chat_template": str}


def config_from_args(args: Mapping[str, Any]) -> ReplicasConfig:
    """A ReplicasConfig from `serve run ... key=value` arguments (no model: the demo model)."""
    unknown = set(args) - set(_ARGS)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(sorted(unknown))}; known: {', '.join(_ARGS)}")
    a = {k: _ARGS[k](v) for k, v in args.items()}
    model, name = a.pop("model", None), a.pop("served_model_name", None)
    if "chat_template" in a:
        from ..chat import read_template_arg
        a["chat_template"] = read_template_arg(a["chat_template"])
    if model is None:
        from ..demo_model import DEMO_DIRNAME, ensure_demo_model
        model, name = ensure_demo_model(), name or DEMO_DIRNAME
    from pathlib import Path
    return ReplicasConfig(model, name or Path(model).resolve().name,
                          num_replicas=a.pop("replicas", 2),
                          engine_argv=tuple(shlex.split(a.pop("engine_args", ""))), **a)


def build_app(args: Mapping[str, Any] | None = None):
    """`serve run orca_jax.ray:build_app key=value ...` (keys: see `_ARGS`)."""
    return build(config_from_args(args or {}))
