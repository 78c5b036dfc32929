"""`orca-jax serve --replicas N`: the engine flags of `orca-jax serve`, N replicas on Ray Serve.

Starts a local Ray (or joins `--ray-address`), runs the application (app.py) with its ingress on
`--host`:`--http-port`, prints the ready line, waits for SIGTERM/SIGINT, then shuts Serve
down (each replica drains through its engine's shutdown). gRPC (`orca_jax.v1.Generation`) is
on Serve's gRPC proxy at `--grpc-port`, without health service and reflection (docs/replicas.md).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from .app import APP_NAME, ReplicasConfig, build


def engine_argv(args: argparse.Namespace) -> tuple[str, ...]:
    """The engine flags of parsed `args` that differ from their defaults, as argv again
    (every replica parses them: replica.engine_args)."""
    from ..cli.flags import engine_fields, off_flag
    out: list[str] = []
    for f, kind in engine_fields():
        value = getattr(args, f.name)
        if value == f.default:
            continue
        out += [off_flag(f.name)] if kind is bool else ["--" + f.name.replace("_", "-"), str(value)]
    for name in ("dtype", "mesh"):
        if getattr(args, name, None) is not None:
            out += ["--" + name, str(getattr(args, name))]
    if getattr(args, "layout", "megatron") != "megatron":
        out += ["--layout", args.layout]
    return tuple(out)


def replicas_config(args: argparse.Namespace, model: str, name: str,
                    chat_template: str | None = None) -> ReplicasConfig:
    return ReplicasConfig(model, args.served_model_name or name, num_replicas=args.replicas,
                          engine_argv=engine_argv(args), router=args.router,
                          overload_margin=args.overload_margin, num_cpus=args.replica_cpus,
                          num_gpus=args.replica_gpus, stuck_after_s=args.stuck_after,
                          chat_template=chat_template)


GRPC_SERVICER = "orca_jax.proto.generation_pb2_grpc.add_GenerationServicer_to_server"


def start(config: ReplicasConfig, host: str, port: int, address: str | None = None,
          num_cpus: int | None = None, grpc_port: int | None = None) -> None:
    """Ray (local unless `address`), Serve's HTTP on host:port (and gRPC on host:grpc_port),
    the application; returns once every replica is up (warm-up included)."""
    import ray
    from ray import serve
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False)
    grpc = {} if grpc_port is None else {"grpc_options": {"port": grpc_port,
                                                           "grpc_servicer_functions": [GRPC_SERVICER]}}
    serve.start(http_options={"host": host, "port": port}, **grpc)
    serve.run(build(config), name=APP_NAME, route_prefix="/", blocking=False)


def run(args: argparse.Namespace, model: str, name: str, chat_template: str | None = None) -> int:
    """The `orca-jax serve --replicas N` lifecycle (`chat_template`: --chat-template's source)."""
    config = replicas_config(args, model, name, chat_template)
    if args.tls_cert or args.auth_token_file:
        raise ValueError("--tls-cert and --auth-token-file are not supported with --replicas yet: "
                         "terminate TLS and check tokens in front of the Ray Serve ingress")
    port = 8000 if args.http_port is None else args.http_port
    t0 = time.perf_counter()
    print(f"starting {config.num_replicas} engine replicas on Ray Serve (router: {config.router}) ...",
          file=sys.stderr, flush=True)
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    start(config, args.host, port, args.ray_address, args.ray_cpus, args.grpc_port)
    # Again: ray.init installs its own (C++) SIGTERM handler, which logs a stack dump first.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    grpc = "" if args.grpc_port is None else f"grpc={args.host}:{args.grpc_port} "
    print(f"orca-jax serve: ready {grpc}http=http://{args.host}:{port} replicas={config.num_replicas} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        print("orca-jax serve: shutting down the replicas", file=sys.stderr, flush=True)
        if not shutdown(SHUTDOWN_TIMEOUT_S):
            sys.stdout.flush()
            os._exit(1)  # Ray's exit hooks would wait for the lost processes again
    return 0


SHUTDOWN_TIMEOUT_S = 30.0


def shutdown(timeout_s: float) -> bool:
    """Serve, then the local Ray, within `timeout_s`; False if that did not finish. A
    supervisor that signals the whole process group (systemd's default KillMode, Ctrl-C in a
    terminal, `timeout`) stops Ray's own processes too, and Serve's shutdown would then wait
    for its controller forever: after the timeout the process exits regardless."""
    import ray
    from ray import serve

    def stop_all():
        serve.shutdown()
        ray.shutdown()
    t = threading.Thread(target=stop_all, name="orca-ray-shutdown", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        print(f"orca-jax serve: Ray did not shut down within {timeout_s:.0f} s (were its processes "
              "signalled too?): exiting without it", file=sys.stderr, flush=True)
    return not t.is_alive()
